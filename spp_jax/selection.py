"""From a solution path to a sub-network: ranking, targets, exact top-k (algorithm.md §4).

A path record holds, per mask entry (dicts keyed by group name, arrays `[depth, size]`, numpy or
jax): `t_in` (float, first step in the support of Gamma, +inf = never), `steps_in_support` (int),
`z` (float, current Z) and `gamma` (float, Gamma at the path point).

Entries are ranked globally (most important first) by t_in ascending, then steps_in_support
descending, then z descending, then flat index ascending (groups in `spec.groups` order, row-major
inside a group). Every target keeps a prefix of that ranking (GroupFraction: a prefix per group),
so selection is an exact top-k and the family is nested: a sparser target keeps a subset of what a
denser one keeps. The reference code's `score >= threshold` rule is NOT used: it keeps all ties
and prunes nothing when most entries never entered the support.

Hardware alignment (`round_to`) rounds each (group, layer) kept count UP to a multiple of
`round_to` (capped at the layer size) by adding that layer's next-ranked entries. This keeps
nesting for a fixed `round_to` but may exceed a budget target by fewer than `round_to` entries per
layer; `keep_summary` reports the real cost.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from spp_jax.errors import CheckpointMismatch, ConfigError, UnreachableTarget
from spp_jax.groups import KeepSet, MaskSpec

__all__ = [
    "FlopsFraction",
    "GroupFraction",
    "ParamsFraction",
    "PathStep",
    "Target",
    "keep_summary",
    "parse_target",
    "rank_entries",
    "rank_positions",
    "select_subnetwork",
    "support_from_t_in",
    "target_from_json",
    "target_to_json",
]

ArrayTree = Mapping[str, Any]  # group name -> array [depth, size]


# ------------------------------------------------------------------------------------------------
# Ranking


def _flat(spec: MaskSpec, tree: ArrayTree, field: str, dtype) -> np.ndarray:
    """Concatenate a per-group field into one flat vector (spec.groups order, row-major)."""
    parts = []
    for g in spec.groups:
        if g.name not in tree:
            raise CheckpointMismatch(
                f"path record field {field!r} has no group {g.name!r} (has {sorted(tree)}); "
                "was this path made with another model or group setting?"
            )
        a = np.asarray(tree[g.name])
        if a.shape != g.shape:
            raise CheckpointMismatch(
                f"path record field {field!r} group {g.name!r} has shape {a.shape}, the model "
                f"needs {g.shape}; was this path made with another model variant?"
            )
        parts.append(a.reshape(-1).astype(dtype))
    return np.concatenate(parts)


def rank_entries(spec: MaskSpec, t_in: ArrayTree, steps_in_support: ArrayTree, z: ArrayTree) -> np.ndarray:
    """Global order over all entries, most important first (algorithm.md §4).

    Returns flat indices (groups in `spec.groups` order, row-major inside a group) sorted by t_in
    ascending, then steps_in_support descending, then z descending, then index ascending. NaN t_in
    counts as never entered (+inf), NaN z as -inf.
    """
    t = _flat(spec, t_in, "t_in", np.float64)
    s = _flat(spec, steps_in_support, "steps_in_support", np.int64)
    zz = _flat(spec, z, "z", np.float64)
    t = np.where(np.isnan(t), np.inf, t)
    zz = np.where(np.isnan(zz), -np.inf, zz)
    idx = np.arange(t.size)
    # np.lexsort: the LAST key is the primary one.
    return np.lexsort((idx, -zz, -s, t))


def rank_positions(
    spec: MaskSpec, t_in: ArrayTree, steps_in_support: ArrayTree, z: ArrayTree
) -> dict[str, np.ndarray]:
    """Per-group view of `rank_entries`: group -> int [depth, size], 0 = most important globally."""
    order = rank_entries(spec, t_in, steps_in_support, z)
    pos = np.empty_like(order)
    pos[order] = np.arange(order.size)
    out, off = {}, 0
    for g in spec.groups:
        out[g.name] = pos[off : off + g.num_entries].reshape(g.shape)
        off += g.num_entries
    return out


def support_from_t_in(t_in: ArrayTree, step: int) -> KeepSet:
    """Support of Gamma at `step` reconstructed as t_in <= step (for when no path point was stored).

    Exact only when no entry ever left the support after entering (true for constant masks,
    algorithm.md §7 item 4); otherwise it over-counts entries that exited.
    """
    return {k: np.asarray(v) <= step for k, v in t_in.items()}


# ------------------------------------------------------------------------------------------------
# Targets


def _check_fraction(value: Any, what: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {value!r} is not a number; give a fraction in [0, 1]") from None
    if not 0.0 <= f <= 1.0:  # also rejects NaN
        raise ConfigError(f"{what} {value!r} is out of range; give a fraction in [0, 1]")
    return f


@dataclasses.dataclass(frozen=True)
class GroupFraction:
    """Keep round(f_g * num_entries_g) entries of each group g (half rounds up), chosen by the
    global ranking restricted to g; layers compete inside a group. A dict names per-group
    fractions; groups it does not name are kept whole.

    A dict key addresses a group by its name or by a prefix of "/"-separated names: with groups
    text/qk, text/mlp, vision/mlp, `groups:text=0.5` sets both text groups, `groups:text=0.5,text/mlp=0.8`
    sets text/qk to 0.5 and text/mlp to 0.8 (the longest matching key wins)."""

    fractions: float | dict[str, float]
    kind = "groups"

    def __post_init__(self):
        if isinstance(self.fractions, Mapping):
            if not self.fractions:
                raise ConfigError("groups target has no group=fraction pair; give at least one")
            fr = {
                str(k): _check_fraction(v, f"groups target fraction for {k!r}")
                for k, v in self.fractions.items()
            }
        else:
            fr = _check_fraction(self.fractions, "groups target fraction")
        object.__setattr__(self, "fractions", fr)

    def fraction_for(self, spec: MaskSpec, name: str) -> float:
        if not isinstance(self.fractions, dict):
            return self.fractions
        unknown = sorted(k for k in self.fractions if not any(_addresses(k, g) for g in spec.names))
        if unknown:
            raise ConfigError(
                f"groups target names unknown group(s) {unknown}; the model's groups are {list(spec.names)}"
            )
        keys = [k for k in self.fractions if _addresses(k, name)]
        return self.fractions[max(keys, key=len)] if keys else 1.0

    def describe(self) -> str:
        if isinstance(self.fractions, dict):
            return "groups:" + ",".join(f"{k}={v!r}" for k, v in self.fractions.items())
        return f"groups:{self.fractions!r}"


def _addresses(key: str, group: str) -> bool:
    """`key` is the group's name or a "/"-prefix of it ("text" and "text/" address "text/mlp")."""
    key = key.rstrip("/")
    return group == key or group.startswith(key + "/")


@dataclasses.dataclass(frozen=True)
class ParamsFraction:
    """Keep the longest prefix of the ranking whose params fit fraction * spec.block_params."""

    fraction: float
    kind = "params"

    def __post_init__(self):
        object.__setattr__(self, "fraction", _check_fraction(self.fraction, "params target"))

    def describe(self) -> str:
        return f"params:{self.fraction!r}"


@dataclasses.dataclass(frozen=True)
class FlopsFraction:
    """Keep the longest prefix of the ranking whose MACs, plus the base MACs, fit
    fraction * spec.total_macs. Below base_macs / total_macs it is unreachable."""

    fraction: float
    kind = "flops"

    def __post_init__(self):
        object.__setattr__(self, "fraction", _check_fraction(self.fraction, "flops target"))

    def describe(self) -> str:
        return f"flops:{self.fraction!r}"


@dataclasses.dataclass(frozen=True)
class PathStep:
    """Keep the support of Gamma (gamma != 0) of the record of the path point at `step`. The caller
    passes that point's record; if it has no `gamma`, the support is rebuilt as t_in <= step
    (see `support_from_t_in`)."""

    step: int
    kind = "step"

    def __post_init__(self):
        try:
            ok = not isinstance(self.step, bool) and float(self.step).is_integer() and self.step >= 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(f"step target {self.step!r} is out of range; give a path step >= 0")
        object.__setattr__(self, "step", int(self.step))

    def describe(self) -> str:
        return f"step:{self.step}"


Target = GroupFraction | ParamsFraction | FlopsFraction | PathStep
_KINDS = {
    "groups": GroupFraction,
    "params": ParamsFraction,
    "flops": FlopsFraction,
    "step": PathStep,
}
_FORMS = "'params:0.5', 'flops:0.4', 'groups:0.5', 'groups:qk=0.5,mlp=0.3' or 'step:1200'"


def parse_target(text: str) -> Target:
    """Parse a config string such as 'params:0.5', 'flops:0.4', 'groups:0.5',
    'groups:qk=0.5,vo=0.5,mlp=0.3' or 'step:1200'. Inverse of `describe()`."""
    kind, sep, value = str(text).strip().partition(":")
    kind, value = kind.strip().lower(), value.strip()
    if not sep or kind not in _KINDS or not value:
        raise ConfigError(f"cannot parse selection target {text!r}; use {_FORMS}")
    try:
        if kind == "step":
            return PathStep(int(value))
        if kind == "groups" and "=" in value:
            fr = {}
            for item in value.split(","):
                name, eq, v = item.partition("=")
                name = name.strip()
                if not eq or not name or name in fr:
                    raise ValueError(item)
                fr[name] = float(v)
            return GroupFraction(fr)
        return _KINDS[kind](float(value))
    except ConfigError:  # parsed, but out of range
        raise
    except ValueError:
        raise ConfigError(f"cannot parse selection target {text!r}; use {_FORMS}") from None


def target_to_json(target: Target) -> dict:
    """JSON-friendly form: {'kind': ..., <fields>}."""
    return {"kind": target.kind, **dataclasses.asdict(target)}


def target_from_json(d: Mapping) -> Target:
    d = dict(d)
    kind = d.pop("kind", None)
    if kind not in _KINDS:
        raise ConfigError(f"unknown selection target kind {kind!r}; kinds are {sorted(_KINDS)}")
    try:
        return _KINDS[kind](**d)
    except TypeError as e:
        raise ConfigError(f"bad fields for a {kind!r} selection target ({e}); rewrite it") from None


# ------------------------------------------------------------------------------------------------
# Selection


def _field(record: Any, name: str) -> ArrayTree | None:
    if isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name, None)


def _need(record: Any, name: str) -> ArrayTree:
    v = _field(record, name)
    if v is None:
        raise CheckpointMismatch(
            f"path record has no {name!r}; selection needs t_in, "
            "steps_in_support and z (and gamma for a step target)"
        )
    return v


def _prefix_count(costs_in_order: np.ndarray, budget: float, scale: float) -> int:
    """Length of the longest prefix whose summed cost is <= budget (relative tolerance 1e-9)."""
    cum = np.cumsum(costs_in_order, dtype=np.float64)
    return int(np.searchsorted(cum, budget + 1e-9 * max(scale, 1.0), side="right"))


def _layer_minimums(spec: MaskSpec, min_per_layer: int | Mapping[str, int]) -> dict[str, int]:
    if isinstance(min_per_layer, Mapping):
        unknown = sorted(set(min_per_layer) - set(spec.names))
        if unknown:
            raise ConfigError(
                f"min_per_layer names unknown group(s) {unknown}; the model's groups are {list(spec.names)}"
            )
        mins = {g.name: min_per_layer.get(g.name, 0) for g in spec.groups}
    else:
        mins = {g.name: min_per_layer for g in spec.groups}
    for g in spec.groups:
        m = mins[g.name]
        if isinstance(m, bool) or not isinstance(m, int | np.integer) or not 0 <= m <= g.size:
            raise ConfigError(
                f"min_per_layer for group {g.name!r} must be an integer in [0, {g.size}], got {m!r}"
            )
    return mins


def select_subnetwork(
    spec: MaskSpec,
    record: Any,
    target: Target | str,
    *,
    round_to: int = 1,
    min_per_layer: int | Mapping[str, int] = 0,
) -> KeepSet:
    """Keep-set (group -> bool [depth, size]) for `target` on one path record (algorithm.md §4).

    `record` is a mapping or object with t_in / steps_in_support / z (and gamma for `PathStep`).
    With round_to=1 and min_per_layer=0 the count kept is exactly what the target asks for. Then
    each (group, layer) count c becomes ceil(max(c, min_per_layer) / round_to) * round_to, capped at
    the layer size, filled with that layer's next-ranked entries: monotone in c, so nesting
    survives, but a budget may be exceeded by fewer than round_to (plus min_per_layer) entries per
    layer. min_per_layer is an int for all groups or a dict group -> int (others 0).
    """
    if isinstance(target, str):
        target = parse_target(target)
    if isinstance(round_to, bool) or not isinstance(round_to, int | np.integer) or round_to < 1:
        raise ConfigError(f"round_to={round_to!r} is not allowed; use a positive integer")
    mins = _layer_minimums(spec, min_per_layer)
    adjust = round_to > 1 or any(mins.values())
    n = sum(g.num_entries for g in spec.groups)
    offsets = np.cumsum([0] + [g.num_entries for g in spec.groups])

    order = None
    if not isinstance(target, PathStep) or adjust:
        order = rank_entries(
            spec, _need(record, "t_in"), _need(record, "steps_in_support"), _need(record, "z")
        )

    keep = np.zeros(n, bool)
    if isinstance(target, GroupFraction):
        for g, lo, hi in zip(spec.groups, offsets[:-1], offsets[1:], strict=True):
            k = math.floor(target.fraction_for(spec, g.name) * g.num_entries + 0.5)
            in_group = order[(order >= lo) & (order < hi)]
            keep[in_group[:k]] = True
    elif isinstance(target, ParamsFraction | FlopsFraction):
        attr = "params_per_entry" if isinstance(target, ParamsFraction) else "macs_per_entry"
        cost = np.concatenate([np.full(g.num_entries, float(getattr(g, attr))) for g in spec.groups])
        if isinstance(target, ParamsFraction):
            budget = target.fraction * spec.block_params
            scale = spec.block_params
        else:
            total, base = spec.total_macs, spec.base_macs
            budget = target.fraction * total - base
            scale = total
            if budget < -1e-9 * max(scale, 1.0):
                raise UnreachableTarget(
                    f"flops target {target.fraction!r} is below the un-prunable base "
                    f"({base:.4g} of {total:.4g} MACs); give a fraction >= {base / total:.6g}, "
                    "the smallest reachable fraction"
                )
        keep[order[: _prefix_count(cost[order], budget, scale)]] = True
    elif isinstance(target, PathStep):
        gamma = _field(record, "gamma")
        if gamma is not None:
            keep = _flat(spec, gamma, "gamma", np.float64) != 0
        else:
            keep = _flat(spec, support_from_t_in(_need(record, "t_in"), target.step), "t_in", bool)
    else:
        raise ConfigError(f"unknown selection target {target!r}; use {_FORMS}")

    if adjust:
        pos = np.empty(n, np.int64)
        pos[order] = np.arange(n)
    out: KeepSet = {}
    for g, lo, hi in zip(spec.groups, offsets[:-1], offsets[1:], strict=True):
        kg = keep[lo:hi].reshape(g.shape).copy()
        if adjust:
            pg = pos[lo:hi].reshape(g.shape)
            for layer in range(g.depth):
                c = int(kg[layer].sum())
                want = min(g.size, -(-max(c, mins[g.name]) // round_to) * round_to)
                if want > c:
                    free = np.flatnonzero(~kg[layer])
                    kg[layer, free[np.argsort(pg[layer, free], kind="stable")[: want - c]]] = True
        out[g.name] = kg
    return out


def keep_summary(spec: MaskSpec, keep: Mapping[str, Any]) -> dict:
    """JSON-friendly summary of a keep-set (algorithm.md §4): per-group kept fraction and per-layer
    counts, kept params and MACs, params fraction of the total and of the block params, MACs
    fraction of the total."""
    groups = {}
    for g in spec.groups:
        k = np.asarray(keep[g.name], bool)
        if k.shape != g.shape:
            raise ConfigError(f"keep-set group {g.name!r} has shape {k.shape}, expected {g.shape}")
        groups[g.name] = {
            "kept": int(k.sum()),
            "entries": g.num_entries,
            "fraction": float(k.sum() / g.num_entries),
            "per_layer": [int(c) for c in k.sum(axis=1)],
        }
    params, macs = spec.kept_cost({g.name: np.asarray(keep[g.name], bool) for g in spec.groups})
    block = spec.block_params
    return {
        "groups": groups,
        "params": float(params),
        "macs": float(macs),
        "params_fraction": float(params / spec.total_params),
        "block_params_fraction": float((params - spec.base_params) / block) if block else 1.0,
        "macs_fraction": float(macs / spec.total_macs),
    }
