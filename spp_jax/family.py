"""The weight family: one elastic checkpoint from which any member of the solution path is cut.

Every selection target keeps a prefix of one global ranking (spp_jax.selection, algorithm.md §4), so the
members of a path are nested. A family stores the weights with each layer's prunable axes (qk / vo dims,
MLP units, heads / kv groups) permuted into that ranking's order: in every layer, the entry a target keeps
first sits first. Any member is then a prefix of each layer's axes:

    member(target) = extract(family_params, keep(target)),  keep(target)[g][l] = [1]*k_gl + [0]*(n_g - k_gl)

where k_gl is the count the selection keeps in group g of layer l. The stored ranking (`rank`: each family
position's place in the global order) reproduces the selection exactly for params / flops / groups targets
with any `round_to`; a `step:K` target keeps the entries with t_in <= K (`selection.support_from_t_in`,
exact when no entry left the support after entering).

`MemberSlicer` cuts a member inside jit (prefix slices and small gathers of the family's arrays), so a
nested fine-tune (spp_jax.nested) trains one shared set of weights through many members.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax import checkpoint, selection
from spp_jax.adapters import Adapter, adapter_from_spec
from spp_jax.adapters.base import ArchSpec, Params
from spp_jax.errors import CheckpointMismatch, ConfigError
from spp_jax.groups import KeepSet

__all__ = ["Family", "MemberSlicer", "build_family", "is_family", "load_family", "load_pruned", "save_family"]


@dataclasses.dataclass(frozen=True)
class Family:
    """A weight family: `params` (dense shapes, prunable axes in rank order), the `arch` spec they run as,
    and per group [depth, size] arrays in family order: `rank` (place in the global ranking, ascending along
    each layer), `t_in` (first step in the support) and `order` (the dense index of each family position)."""

    adapter: Adapter
    params: Params
    arch: ArchSpec
    rank: dict[str, np.ndarray]
    t_in: dict[str, np.ndarray]
    order: dict[str, np.ndarray]
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    def keep(self, target: selection.Target | str, round_to: int = 1, min_per_layer: int = 0) -> KeepSet:
        """The keep-set of `target` in family positions: a prefix of every layer (module docstring)."""
        if isinstance(target, str):
            target = selection.parse_target(target)
        spec = self.adapter.mask_spec()
        record: dict[str, Any] = {
            "t_in": {g: r.astype(np.float64) for g, r in self.rank.items()},
            "steps_in_support": {g: np.zeros(r.shape, np.int64) for g, r in self.rank.items()},
            "z": {g: np.zeros(r.shape, np.float64) for g, r in self.rank.items()},
        }
        if isinstance(target, selection.PathStep):
            record["gamma"] = {g: (t <= target.step).astype(np.float32) for g, t in self.t_in.items()}
        keep = selection.select_subnetwork(
            spec, record, target, round_to=round_to, min_per_layer=min_per_layer
        )
        for g, k in keep.items():  # the selection keeps prefixes of the ranking: check, never assume
            counts = k.sum(axis=1)
            if not all(k[i, : counts[i]].all() for i in range(k.shape[0])):
                raise CheckpointMismatch(f"family group {g!r}: {target} is not a prefix; rebuild the family")
        return keep

    def cut(self, target: selection.Target | str, round_to: int = 1) -> tuple[Params, ArchSpec]:
        """The smaller dense model of `target` (numpy params, arch spec)."""
        return self.adapter.extract(self.params, self.keep(target, round_to), source=self.arch)

    def dense_keep(self, keep: KeepSet) -> KeepSet:
        """A family-position keep-set in the dense model's indices (what spp_jax.selection would return)."""
        out = {}
        for g, k in keep.items():
            dense = np.zeros_like(k)
            np.put_along_axis(dense, self.order[g], k, axis=1)
            out[g] = dense
        return out


def build_family(adapter: Adapter, params: Params, record: Any, meta: Mapping | None = None) -> Family:
    """The family of a path `record` (t_in / steps_in_support / z, after any allocation rule) over the
    dense `params`: each layer's entries laid out in the record's global ranking order."""
    spec = adapter.mask_spec()
    get = lambda f: record[f] if isinstance(record, Mapping) else getattr(record, f)
    pos = selection.rank_positions(spec, get("t_in"), get("steps_in_support"), get("z"))
    order = {g: np.argsort(p, axis=1, kind="stable") for g, p in pos.items()}
    everything = {g.name: np.ones(g.shape, bool) for g in spec.groups}
    fam_params, arch = adapter.extract(params, everything, order=order)
    t_in = get("t_in")
    return Family(
        adapter,
        fam_params,
        arch,
        rank={g: np.take_along_axis(pos[g], order[g], axis=1) for g in order},
        t_in={g: np.take_along_axis(np.asarray(t_in[g], np.float64), order[g], axis=1) for g in order},
        order=order,
        meta=dict(meta or {}),
    )


# ------------------------------------------------------------------------------------------------
# Storage


def save_family(directory: str | Path, family: Family, params: Params | None = None, **meta: Any) -> None:
    """Store a family as a saved model (params + arch spec, checksummed) plus its ranking arrays; `params`
    replaces the family's own (e.g. after the nested fine-tune)."""
    arrays = {"rank": family.rank, "t_in": family.t_in, "order": family.order}
    params = family.params if params is None else params
    checkpoint.save_model(directory, params, family.arch, arrays=arrays, family={**family.meta, **meta})


def is_family(directory: str | Path) -> bool:
    """True if `directory` is a saved weight family (its meta.json names one)."""
    try:
        meta = json.loads((Path(directory) / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "family" in meta


def load_family(directory: str | Path, sharding: Any = None) -> Family:
    """Read a family written by `save_family` (checked like every saved model)."""
    _, params, arch = checkpoint.load_pruned(directory, sharding=sharding)
    arrays = checkpoint.load_arrays(directory)
    meta = json.loads((Path(directory) / "meta.json").read_text())["family"]
    try:
        return Family(adapter_from_spec(arch), params, arch, **arrays, meta=meta)
    except TypeError:
        raise CheckpointMismatch(
            f"{directory}: the family's ranking arrays are incomplete; rebuild it"
        ) from None


def load_pruned(
    directory: str | Path, target: str | None = None, round_to: int | None = None, sharding: Any = None
):
    """Load a saved model, or the member `target` of a saved weight family: (flax module, params, spec).

    Example:
        module, params, spec = spp_jax.load_pruned("workdir/family", target="params:0.63")
        logits = module.apply({"params": params}, images)

    `round_to` (families only) defaults to the one the family was built with; `sharding` as
    `checkpoint.load_pruned` (None: numpy params)."""
    if not is_family(directory):
        if target is not None:
            raise ConfigError(
                f"{directory} is one saved model, not a weight family; drop the target, or point at a "
                "workdir's family/ directory"
            )
        return checkpoint.load_pruned(directory, sharding=sharding)
    if target is None:
        raise ConfigError(
            f"{directory} is a weight family: give a target, e.g. params:0.5, flops:0.6, groups:0.7 or step:N"
        )
    family = load_family(directory)
    round_to = family.meta.get("round_to", 1) if round_to is None else round_to
    params, arch = family.cut(target, round_to)
    if sharding is not None:
        place = sharding if callable(sharding) else (lambda _shape: sharding)
        params = jax.tree.map(lambda x: jax.device_put(x, place(np.shape(x))), params)
    return family.adapter.module(arch), params, arch


# ------------------------------------------------------------------------------------------------
# Cutting members inside jit


@dataclasses.dataclass(frozen=True)
class _LeafCut:
    source: str  # key path of the family leaf
    axes: tuple[Any, ...]  # per axis: None (whole axis), a slice, or an int index vector
    flat: np.ndarray | None = None  # a gather of flat indices when the cut is no product of axis cuts
    shape: tuple[int, ...] = ()

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.flat is not None:
            return jnp.take(x.reshape(-1), self.flat).reshape(self.shape)
        for k, a in enumerate(self.axes):
            if isinstance(a, slice):
                x = jax.lax.slice_in_dim(x, a.start, a.stop, axis=k)
            elif a is not None:
                x = jnp.take(x, a, axis=k)
        return x


class MemberSlicer:
    """A member's params as a traceable function of the family's: `slicer(family_params)` equals
    `adapter.extract(family_params, keep, source=arch)[0]`, built from the adapter's own slicing (run once
    on index arrays), so no architecture needs slicing code of its own. Gradients flow back into the
    family's arrays (prefix slices; index vectors where an axis is cut in two ranges, e.g. RoPE halves)."""

    def __init__(self, family: Family, keep: KeepSet):
        flat, _ = jax.tree_util.tree_flatten_with_path(family.params)
        keys = [jax.tree_util.keystr(p) for p, _ in flat]
        shapes = [tuple(np.shape(x)) for _, x in flat]
        offsets = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
        index_leaves = [
            np.arange(offsets[i], offsets[i + 1], dtype=np.float64).reshape(s) for i, s in enumerate(shapes)
        ]
        index_tree = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(family.params), index_leaves)
        sliced, self.arch = family.adapter.extract(index_tree, keep, source=family.arch)

        def plan(path, v) -> _LeafCut:
            v = np.asarray(v)
            key = jax.tree_util.keystr(path)
            if v.size == 0:
                return _LeafCut(key, tuple(slice(0, n) for n in v.shape))
            if not np.array_equal(np.floor(v), v):
                raise CheckpointMismatch(f"{family.adapter.name} slicing changes values at {key}")
            idx = v.astype(np.int64)
            src = int(np.searchsorted(offsets, idx.reshape(-1)[0], side="right") - 1)
            local = idx - offsets[src]
            if local.min() < 0 or local.max() >= offsets[src + 1] - offsets[src]:
                raise CheckpointMismatch(f"{family.adapter.name} slicing mixes family leaves at {key}")
            shape = shapes[src]
            axes = _axis_cuts(local, shape)
            if axes is None:
                return _LeafCut(keys[src], (), local.reshape(-1).astype(np.int32), local.shape)
            return _LeafCut(keys[src], axes)

        self._plan = jax.tree_util.tree_map_with_path(plan, sliced)

    def __call__(self, family_params: Params) -> Params:
        flat, _ = jax.tree_util.tree_flatten_with_path(family_params)
        leaves = {jax.tree_util.keystr(p): x for p, x in flat}
        return jax.tree.map(
            lambda c: c(leaves[c.source]), self._plan, is_leaf=lambda x: isinstance(x, _LeafCut)
        )


def _axis_cuts(local: np.ndarray, shape: tuple[int, ...]) -> tuple[Any, ...] | None:
    """Per-axis cuts (None / slice / index vector) whose product gives the flat indices `local`, or None."""
    if local.ndim != len(shape):
        return None
    coords = np.unravel_index(local, shape)
    cuts = []
    for k, c in enumerate(coords):
        line = c[tuple(slice(None) if j == k else 0 for j in range(c.ndim))]
        along_k = line.reshape([-1 if j == k else 1 for j in range(c.ndim)])
        if not np.array_equal(c, np.broadcast_to(along_k, c.shape)):
            return None
        if np.array_equal(line, np.arange(shape[k])):
            cuts.append(None)
        elif np.array_equal(line, np.arange(line[0], line[0] + len(line))):
            cuts.append(slice(int(line[0]), int(line[0]) + len(line)))
        else:
            cuts.append(line.astype(np.int32))
    return tuple(cuts)


def member_apply(family: Family, keep: KeepSet) -> tuple[Callable, Callable, ArchSpec]:
    """(slicer, member module's apply, member arch spec) of a family-position keep-set."""
    slicer = MemberSlicer(family, keep)
    return slicer, family.adapter.module(slicer.arch).apply, slicer.arch
