"""Valid ranges of the numeric config fields, checked in `__post_init__` (before any model is loaded).

RANGES = {"kl_coef": at_least(0), "lam": between(0, 1), "gamma": Range(0, 1, low_open=True), ...}
check_ranges(config, RANGES)   # ValueError: "kl_coef must be >= 0, got -1.0."
"""

from __future__ import annotations

import math
from dataclasses import dataclass


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


__all__ = ["Range", "at_least", "between", "check_ranges", "positive"]
