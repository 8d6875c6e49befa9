"""Valid values of the config fields, checked in `__post_init__` (before any model is loaded).

Numeric fields have ranges; string fields with a fixed set of values are typed `Literal[...]`, so that `--help`
(`HfArgumentParser`, `TrlParser`) lists the choices and `check_choices` refuses any other value given in Python.

RANGES = {"kl_coef": at_least(0), "lam": between(0, 1), "gamma": Range(0, 1, low_open=True), ...}
check_ranges(config, RANGES)   # ValueError: "kl_coef must be >= 0, got -1.0."
check_choices(config)          # ValueError: "kl_estimator must be 'k1' or 'k3', got 'k9'."
"""

from __future__ import annotations

import functools
import math
import types
import typing
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Range:
    """`low <= value <= high` (an end is exclusive when `low_open` / `high_open`, absent when None). `none_ok`: None
    is valid too (and what it means is `none_means`); `also`: other valid special values (e.g. -1), with their
    meaning in `also_means`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    none_ok: bool = False
    none_means: str = ""
    also: tuple = ()
    also_means: str = ""

    def contains(self, value) -> bool:
        if value is None:
            return self.none_ok
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
            return False
        if value in self.also:
            return True
        above = self.low is None or value > self.low or (not self.low_open and value == self.low)
        below = self.high is None or value < self.high or (not self.high_open and value == self.high)
        return above and below

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low:g}"
        else:
            text = f"{'<' if self.high_open else '<='} {self.high:g}"
        extras = [f"{v!r}{f' ({self.also_means})' if self.also_means else ''}" for v in self.also]
        if self.none_ok:
            extras.append(f"None{f' ({self.none_means})' if self.none_means else ''}")
        return text + "".join(f" or {extra}" for extra in extras)


def at_least(low: float, **kwargs) -> Range:
    return Range(low=low, **kwargs)


def positive(**kwargs) -> Range:
    return Range(low=0, low_open=True, **kwargs)


def between(low: float, high: float, **kwargs) -> Range:
    return Range(low=low, high=high, **kwargs)


def check_ranges(config, ranges: dict[str, Range]) -> None:
    """Raise `ValueError` naming the first field of `config` outside its range, its value and the valid range."""
    for name, valid in ranges.items():
        value = getattr(config, name)
        if not valid.contains(value):
            raise ValueError(f"{name} must be {valid.describe()}, got {value!r}.")


def literal_choices(annotation) -> tuple | None:
    """The values of a `Literal[...]` (or `Literal[...] | None`) annotation; None for any other type."""
    if typing.get_origin(annotation) is typing.Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(members) == 1 and typing.get_origin(members[0]) is typing.Literal:
            return (*typing.get_args(members[0]), None)
    return None


@functools.cache
def choice_fields(cls: type) -> dict[str, tuple]:
    """{field name: its valid values} for every `Literal`-typed field of the dataclass `cls`."""
    hints = typing.get_type_hints(cls)
    choices = {f.name: literal_choices(hints.get(f.name)) for f in fields(cls)}
    return {name: values for name, values in choices.items() if values is not None}


def describe_choices(values: tuple) -> str:
    """('a',) -> "'a'"; ('a', 'b') -> "'a' or 'b'"; ('a', 'b', None) -> "'a', 'b' or None"."""
    names = [repr(value) for value in values]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def check_choices(config) -> None:
    """Raise `ValueError` naming the first `Literal`-typed field of `config` holding another value, and the choices.

    The command-line parser refuses such a value itself; this covers a config built in Python or from a mapping.
    """
    for name, values in choice_fields(type(config)).items():
        value = getattr(config, name)
        if value not in values:
            raise ValueError(f"{name} must be {describe_choices(values)}, got {value!r}.")


__all__ = ["Range", "at_least", "between", "check_choices", "check_ranges", "choice_fields", "positive"]
