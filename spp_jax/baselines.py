"""One-shot importance scores (the baselines a path must beat) and allocation rules, as path records.

A ranking in spp_jax is a *record*: per mask group, `t_in`, `steps_in_support` and `z` arrays of shape
`[depth, size]`, ranked by t_in ascending, then steps in support descending, then z descending, then index
(`selection.rank_entries`). A one-shot score s (higher = more important) becomes the record
`{t_in: 0, steps_in_support: 0, z: s}`, so `select_subnetwork`, extraction and the launch scripts take a
baseline exactly like a path point (`score_record`).

Scores, per entry i of the mask vector M (all masks 1, the dense model), over batches b:

    random      u_i ~ U(0, 1), i.i.d. (seeded)
    magnitude   the product of the norms of the weight slices entry i owns (`Adapter.entry_weight_norms`)
    taylor      | sum_e g_{e,i} |,   g_e = dL_e/dM at M = 1   first-order loss change when M_i: 1 -> 0
    fisher      sum_e g_{e,i}^2                               diagonal empirical Fisher, second order
                (e runs over the examples of the batches: per-example gradients, not batch means, whose
                squares mostly measure batch noise)
    wanda       prod_a ||x_{a,i}|| * ||W_out,i||   activation x weight (Wanda/FLAP, structured): x_{a,i}, over
                every batch, example and token, is each activation a that M_i multiplies (ViT: the fc1
                output h_j for mlp j; v[..., :, j] for vo j; q_j and k_j, both, for qk j; the attention
                output of head h for heads h), W_out,i the weight slice consuming it
                (`Adapter.entry_out_weight_norms`: fc2[j, :], W_o[:, j, :], none for qk, W_o[h])

Taylor and Fisher need only the mask gradients, so every architecture whose adapter declares mask groups
gets them; magnitude needs the adapter to name an entry's weight slices; wanda needs the module to sow, at
each mask point, the per-entry sum of squares of the activations it masks (collection `MASK_INPUTS`, only
when mutable, so ordinary applies are unchanged) and the adapter to name the consuming weight slices.

One more ranking is a path, not a score: "lasso" (spp_jax.lasso), K l1-penalised mask-training runs; an
entry ranks by how many of the penalties it survives.

Allocation rules say how entries of different groups compete for one budget (`allocate`):

    global      the record's own order (SPP: the path order; baselines: raw scores across groups)
    per_group   each entry is ranked by its quantile inside its group, (rank + 1/2) / group size, so every
                prefix keeps about the same fraction of every group; within a group the order is kept
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np
from flax import traverse_util

from spp_jax import selection
from spp_jax.errors import ConfigError
from spp_jax.groups import MaskSpec
from spp_jax.task import Task, default_task

SCORES = ("random", "magnitude", "taylor", "fisher", "wanda")
RANKINGS = ("path", *SCORES, "lasso")
ALLOCATIONS = ("global", "per_group")

ArrayTree = Mapping[str, Any]
MASK_INPUTS = "mask_inputs"  # the collection modules sow mask-point activation sums of squares into


def score_record(spec: MaskSpec, scores: ArrayTree) -> dict[str, dict[str, np.ndarray]]:
    """A path-record-shaped ranking of `scores` (group -> [depth, size], higher = more important)."""
    spec.check_masks(scores)
    z = {g.name: np.asarray(scores[g.name], np.float32) for g in spec.groups}
    if any(not np.isfinite(v).all() for v in z.values()):
        raise ConfigError("importance scores hold NaN/Inf; check the model and data they were computed on")
    zeros = lambda dt: {g.name: np.zeros(g.shape, dt) for g in spec.groups}
    return {"t_in": zeros(np.float32), "steps_in_support": zeros(np.int32), "z": z}


def allocate(spec: MaskSpec, record: Any, rule: str = "global") -> Any:
    """The record re-ranked by an allocation rule (module docstring); "global" returns it unchanged."""
    if rule not in ALLOCATIONS:
        raise ConfigError(f"allocation {rule!r} is unknown; use one of {ALLOCATIONS}")
    if rule == "global":
        return record
    get = lambda name: record[name] if isinstance(record, Mapping) else getattr(record, name)
    pos = selection.rank_positions(spec, get("t_in"), get("steps_in_support"), get("z"))
    quantile = {}
    for g in spec.groups:
        inside = np.empty(g.num_entries, np.float64)
        inside[np.argsort(pos[g.name].reshape(-1), kind="stable")] = np.arange(g.num_entries)
        quantile[g.name] = ((inside + 0.5) / g.num_entries).reshape(g.shape).astype(np.float32)
    zeros = lambda dt: {g.name: np.zeros(g.shape, dt) for g in spec.groups}
    return {"t_in": quantile, "steps_in_support": zeros(np.int32), "z": zeros(np.float32)}


def mask_gradient_moments(
    apply_fn: Callable,
    spec: MaskSpec,
    params: Any,
    batches: Iterable[Mapping[str, Any]],
    task: Task | None = None,
) -> Iterable[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Per batch b, the sums over its examples e of dL_e/dM and of (dL_e/dM)^2 at M = 1 (one jitted,
    vmapped per-example gradient per batch of `task`'s loss; no weight gradient is formed).
    """
    from spp_jax.search import per_example_mask_gradients

    @jax.jit
    def moments(params, masks, batch):
        _, per_ex = per_example_mask_gradients(apply_fn, task, params, masks, batch)
        return jax.tree.map(lambda g: g.sum(0), per_ex), jax.tree.map(lambda g: (g * g).sum(0), per_ex)

    ones = spec.init_masks()
    for batch in batches:
        yield jax.tree.map(np.asarray, moments(params, ones, batch))


def _layer_order(path: tuple[str, ...]) -> tuple:
    """Sort key of a module path with its numbers compared as numbers (encoderblock_2 < encoderblock_10)."""
    parts = re.split(r"(\d+)", "/".join(path))
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def mask_input_norms(
    apply_fn: Callable,
    spec: MaskSpec,
    params: Any,
    batches: Iterable[Mapping[str, Any]],
    task: Task | None = None,
) -> dict[str, np.ndarray]:
    """Per entry ([depth, size] per group), the product over the activations its mask multiplies of their
    L2 norms over every batch, example and token, at M = 1 (one jitted forward per batch).

    The module must sow, per layer, into collection `MASK_INPUTS` under the group's name, the per-entry sum
    of squares of each masked activation (`Adapter.entry_out_weight_norms` states the protocol).
    """

    task = default_task(task)

    @jax.jit
    def sums(params, masks, batch):
        _, state = apply_fn(
            {"params": params}, *task.inputs(batch), masks=masks, train=False, mutable=[MASK_INPUTS]
        )
        return state.get(MASK_INPUTS, {})

    ones = spec.init_masks()
    total: dict[str, np.ndarray] | None = None
    for batch in batches:
        found: dict[str, list] = {g.name: [] for g in spec.groups}
        for path, values in traverse_util.flatten_dict(sums(params, ones, batch)).items():
            if path[-1] in found:
                found[path[-1]].append((_layer_order(path[:-1]), values))
        stacked = {}
        for g in spec.groups:
            layers = [np.asarray(v, np.float64) for _, v in sorted(found[g.name], key=lambda t: t[0])]
            if len(layers) != g.depth or any(v.ndim != 2 or v.shape[1] != g.size for v in layers):
                raise ConfigError(
                    f"the model recorded {len(layers)} layers of mask-{g.name} activations, the mask spec "
                    f"has {g.depth} of size {g.size}; its module must sow them into {MASK_INPUTS!r}"
                )
            stacked[g.name] = np.stack(layers)  # [depth, activations per entry, size]
        total = stacked if total is None else {k: total[k] + v for k, v in stacked.items()}
    if total is None:
        raise ConfigError("the wanda score got no data batches; give at least one")
    return {k: np.prod(np.sqrt(v), axis=1).astype(np.float32) for k, v in total.items()}


def importance_scores(
    name: str,
    spec: MaskSpec,
    *,
    adapter: Any = None,
    params: Any = None,
    batches: Iterable[Mapping[str, Any]] | None = None,
    seed: int = 0,
    task: Task | None = None,
) -> dict[str, np.ndarray]:
    """Per-entry scores of baseline `name` (module docstring); `batches` (of `task`, None = image
    classification) for taylor, fisher and wanda."""
    if name == "random":
        rng = np.random.default_rng(seed)
        return {g.name: rng.random(g.shape).astype(np.float32) for g in spec.groups}
    if name == "magnitude":
        if adapter is None or params is None:
            raise ConfigError("the magnitude score needs the adapter and the dense params")
        return {k: np.asarray(v, np.float32) for k, v in adapter.entry_weight_norms(params).items()}
    if name in ("taylor", "fisher"):
        if adapter is None or params is None or batches is None:
            raise ConfigError(f"the {name} score needs the adapter, the dense params and data batches")
        total = {g.name: np.zeros(g.shape, np.float64) for g in spec.groups}
        n = 0
        for first, second in mask_gradient_moments(adapter.module().apply, spec, params, batches, task):
            for k in total:
                total[k] += first[k] if name == "taylor" else second[k]
            n += 1
        if n == 0:
            raise ConfigError(f"the {name} score got no data batches; give at least one")
        return {k: (np.abs(v) if name == "taylor" else v).astype(np.float32) for k, v in total.items()}
    if name == "wanda":
        if adapter is None or params is None or batches is None:
            raise ConfigError("the wanda score needs the adapter, the dense params and data batches")
        act = mask_input_norms(adapter.module().apply, spec, params, batches, task)
        out = adapter.entry_out_weight_norms(params)
        return {k: (act[k] * np.asarray(out[k], np.float32)).astype(np.float32) for k in act}
    if name == "lasso":
        raise ConfigError(
            "lasso is a path of penalised runs, not a one-shot score; use spp_jax.lasso.lasso_path"
        )
    raise ConfigError(f"ranking {name!r} is unknown; use one of {RANKINGS}")
