"""Rewrites imports of the modules that moved into subpackages, in place: `python scripts/migrate_imports.py FILE...`.

    from srppo_trl.ppo_math import masked_whiten       ->  from srppo_trl.trainer.ppo_math import masked_whiten
    from srppo_trl import modeling                      ->  from srppo_trl.models import modeling
    "srppo_trl.rollout.sample_responses" (monkeypatch)  ->  "srppo_trl.trainer.rollout.sample_responses"
    from .coherent_reward import X  (in src/srppo_trl/trainer/scoring.py)  ->  from ..models.coherent_reward import X

Paths that still work as they are (`srppo_trl.trainer`, `srppo_trl.pipeline`, `srppo_trl.data`, `srppo_trl.single_base`,
`srppo_trl.coherent_reward`, `srppo_trl.reward_funcs`, `srppo_trl.smollm2`) are left alone: they re-export their
public names (docs/architecture.md). Patch a function in its home module, though: `srppo_trl.pipeline.run.X`.
Prints each changed line; `--check` prints them without writing and exits 1 if any would change.
"""

import argparse
import re
import sys
from pathlib import Path


PACKAGE = "srppo_trl"
MOVED = {  # old module under srppo_trl -> its home now
    "adapter_merge": "models.adapter_merge",
    "checkpointing": "trainer.checkpointing",
    "config": "trainer.config",
    "contiguous_lm_head": "models.contiguous_lm_head",
    "demo_data": "data.demo",
    "field_ranges": "trainer.field_ranges",
    "logprobs": "models.logprobs",
    "modeling": "models.modeling",
    "ppo_math": "trainer.ppo_math",
    "ppo_step": "trainer.ppo_step",
    "precision": "trainer.precision",
    "rollout": "trainer.rollout",
    "scoring": "trainer.scoring",
    "shared_lower_layers": "models.shared_lower_layers",
    "single_base_pipeline": "pipeline.single_base",
    "spin": "pipeline.spin",
    "tokenization": "data.tokenization",
    "trl112_compat": "trainer.trl112_compat",
    "vllm_rollout": "trainer.vllm_rollout",
}
# Inside the package every import names the home module, also of the modules that keep a stable path outside it.
MOVED_INSIDE = {
    **MOVED,
    "coherent_reward": "models.coherent_reward",
    "data": "data.builders",
    "pipeline": "pipeline.run",
    "reward_funcs": "rewards.reward_funcs",
    "single_base": "models.single_base",
    "smollm2": "pipeline.smollm2",
    "trainer": "trainer.srppo_trainer",
}

ABSOLUTE = re.compile(rf"\b{PACKAGE}\.({'|'.join(MOVED)})\b")
FROM_PACKAGE = re.compile(rf"^(\s*)from {PACKAGE} import (.+)$")
RELATIVE = re.compile(r"^(\s*)from (\.+)([\w.]*) import (.+)$")


def _package_of(path: Path) -> list[str] | None:
    """The package `path` is in, as names from `srppo_trl` down, or None outside `srppo_trl`."""
    parts = path.resolve().parts
    if PACKAGE not in parts:
        return None
    return list(parts[parts.index(PACKAGE) : -1])


def _relative(target: list[str], package: list[str]) -> str:
    common = 0
    while common < min(len(target), len(package)) and target[common] == package[common]:
        common += 1
    return "." * (len(package) - common + 1) + ".".join(target[common:])


def _rewrite_relative(line: str, package: list[str], root: Path) -> str:
    match = RELATIVE.match(line)
    if not match:
        return line
    indent, dots, module, names = match.groups()
    if not module:
        return line  # `from . import x`: x is a sibling, which moved with it
    target = package[: len(package) - len(dots) + 1] + module.split(".")
    if root.joinpath(*target[1:]).with_suffix(".py").exists() or root.joinpath(*target[1:]).is_dir():
        return line  # it exists where it points
    # Written before the move, the import pointed at a top-level module: `from .X` (or `from ..X` in evaluation/).
    first, *rest = module.split(".")
    if first not in MOVED_INSIDE:
        return line
    home = [PACKAGE, *MOVED_INSIDE[first].split("."), *rest]
    return f"{indent}from {_relative(home, package)} import {names}"


def _rewrite_from_package(line: str) -> list[str]:
    """`from srppo_trl import ppo_math, SRPPOConfig` -> one line for what stays, one per moved module."""
    match = FROM_PACKAGE.match(line)
    if not match or "(" in match.group(2):
        return [line]
    indent, names = match.groups()
    names = [name.strip() for name in names.split(",")]
    moved = [name for name in names if name.split(" as ")[0] in MOVED]
    if not moved:
        return [line]
    kept = [name for name in names if name not in moved]
    lines = [f"{indent}from {PACKAGE} import {', '.join(kept)}"] if kept else []
    for name in moved:
        home, _, leaf = MOVED[name.split(" as ")[0]].rpartition(".")
        alias = name.partition(" as ")[2] or leaf
        lines.append(f"{indent}from {PACKAGE}.{home} import {leaf}" + (f" as {alias}" if alias != leaf else ""))
    return lines


def _changes(text: str, path: Path) -> list[tuple[str, list[str]]]:
    """Each line of `text` with what it becomes (one line, or several for a split `from srppo_trl import`)."""
    package = _package_of(path)
    root = None
    if package is not None:
        parts = path.resolve().parts
        root = Path(*parts[: parts.index(PACKAGE) + 1])
    changes = []
    for line in text.split("\n"):
        new = _rewrite_relative(line, package, root) if package is not None else line
        new = ABSOLUTE.sub(lambda m: f"{PACKAGE}.{MOVED[m.group(1)]}", new)
        changes.append((line, _rewrite_from_package(new)))
    return changes


def rewrite(text: str, path: Path) -> str:
    return "\n".join(line for _, new in _changes(text, path) for line in new)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true", help="print what would change, write nothing, exit 1 if any")
    args = parser.parse_args(argv)
    changed = False
    for path in args.files:
        changes = _changes(path.read_text(encoding="utf-8"), path)
        edits = [(number, new) for number, (old, new) in enumerate(changes, 1) if new != [old]]
        for number, new in edits:
            print(f"{path}:{number}: " + " | ".join(line.strip() for line in new))
        if edits:
            changed = True
            if not args.check:
                path.write_text("\n".join(line for _, new in changes for line in new), encoding="utf-8")
    return 1 if (changed and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
