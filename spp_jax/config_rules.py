"""Config value rules: (predicate, what is allowed) pairs, shared by the run config and by the config keys
that architectures and tasks add (their `CONFIG_RULES`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Rule = tuple[Callable[[Any], bool], str]


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)


positive_int = (lambda v: is_int(v) and v >= 1, "an integer >= 1")
nonneg_int = (lambda v: is_int(v) and v >= 0, "an integer >= 0")
positive = (lambda v: is_num(v) and 0 < v < math.inf, "a number > 0")
nonneg = (lambda v: is_num(v) and 0 <= v < math.inf, "a number >= 0")
unit = (lambda v: is_num(v) and 0 <= v <= 1, "a number in [0, 1]")
boolean = (lambda v: isinstance(v, bool), "true or false")


def optional(rule: Rule) -> Rule:
    """`rule`, or None (= the search mode's default, spp_jax.spp.spp)."""
    ok, allowed = rule
    return (lambda v: v is None or ok(v), f"{allowed}, or None for the mode's default")


def one_of(choices: tuple) -> Rule:
    return (lambda v: v in choices, f"one of {choices}")
