"""Lasso path over the masks: the l1 baseline an SPP path is compared with, as a path-shaped ranking.

Weights W frozen. For each penalty lam_k (k = 1..K) an independent run starts from M = 1 and minimises

    F_k(M) = L(M) + lam_k ||M||_1    subject to M >= 0

by proximal gradient (ISTA): S steps of size eta on the search batches b_1..b_S (the same, seeded, for
every k), each a plain gradient step followed by the prox of eta lam_k |.| + indicator(M >= 0):

    M <- max(M - eta grad L_{b_s}(M) - eta lam_k, 0)

L is the search's loss: `task`'s (spp_jax.tasks; None = image classification).

Calibration: `penalties` and `lr` are relative to gbar = mean over entries of |dL_b/dM| at M = 1, averaged
over the first `calib_batches` batches (the first batches the runs read):

    lam_k = penalties[k] * gbar,    eta = lr / gbar

so one gradient step moves a typical mask by about `lr` (like the Adam-normalised SPP search step), and a
run moves an entry the loss does not defend by S * lr * penalties[k] towards 0: with S * lr = 1 (the
defaults, 50 x 0.02), penalty 1 just zeroes an undefended entry, penalty p zeroes every entry whose loss
gradient does not push back by more than (p - 1) gbar on average.

Record (selection.rank_entries orders by t_in ascending, steps_in_support descending, z descending):
    t_in              number of penalties at whose run's end M_i = 0 (0 = survived every penalty)
    steps_in_support  number of steps, over all runs, after which M_i != 0 (who was zeroed later)
    z                 mean over the runs of the final M_i
so an entry that survives more penalties ranks first: where the survivors are nested (nearly so in
practice; a lasso path need not be), one that survives a larger penalty before one that only survives
smaller ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import islice
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.errors import ConfigError
from spp_jax.groups import MaskSpec
from spp_jax.task import Task, default_task, model_loss

Batches = Callable[[], Iterable[Mapping[str, Any]]]


def lasso_runs(
    apply_fn: Callable,
    spec: MaskSpec,
    params: Any,
    batches: Batches,
    penalties: Sequence[float],
    *,
    steps: int,
    lr: float,
    calib_batches: int = 8,
    task: Task | None = None,
) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray], float]:
    """One ISTA run per penalty (module docstring).

    `batches()` is called once per run (and once for the calibration) and must yield the same >= `steps`
    batches each time. Returns (final masks of each run, steps with M != 0 summed over the runs, gbar).
    """
    task = default_task(task)
    if not penalties or any(not 0 <= p < np.inf for p in penalties):
        raise ConfigError(f"lasso penalties {tuple(penalties)} are not allowed; give numbers >= 0")
    if steps < 1 or not 0 < lr < np.inf:
        raise ConfigError(f"lasso steps={steps}, lr={lr} are not allowed; use steps >= 1 and lr > 0")

    def loss(m, batch):
        return model_loss(apply_fn, task, params, batch, masks=m, train=False)[0]

    n_entries = sum(g.num_entries for g in spec.groups)

    @jax.jit
    def step(m, nonzero, batch, lam, eta):  # -> (M after one ISTA step, nonzero counts, mean |grad L|)
        g = jax.grad(loss)(m, batch)
        m = jax.tree.map(lambda m, g: jnp.maximum(m - eta * g - eta * lam, 0.0), m, g)
        nonzero = jax.tree.map(lambda n, m: n + (m != 0), nonzero, m)
        return m, nonzero, sum(jnp.abs(x).sum() for x in jax.tree.leaves(g)) / n_entries

    ones = spec.init_masks()
    zeros = jax.tree.map(lambda m: jnp.zeros(m.shape, jnp.int32), ones)
    calib = [
        float(step(ones, zeros, b, 0.0, 0.0)[2]) for b in islice(batches(), max(1, min(calib_batches, steps)))
    ]
    gbar = float(np.mean(calib)) if calib else 0.0
    if not 0 < gbar < np.inf:
        raise ConfigError(
            f"lasso calibration: mean |dL/dM| at M = 1 is {gbar} on the first batches; "
            "the loss must depend on the masks (a trained head, data batches)"
        )
    finals, nonzero = [], zeros
    for p in penalties:
        m, n = ones, 0
        for batch in islice(batches(), steps):
            m, nonzero, _ = step(m, nonzero, batch, p * gbar, lr / gbar)
            n += 1
        if n < steps:
            raise ConfigError(f"lasso got {n} batches for {steps} steps; give at least {steps}")
        finals.append(jax.tree.map(np.asarray, m))
    return finals, jax.tree.map(np.asarray, nonzero), gbar


def lasso_record(
    spec: MaskSpec, finals: Sequence[Mapping[str, Any]], nonzero: Mapping[str, Any]
) -> dict[str, dict[str, np.ndarray]]:
    """The path-shaped record of the runs' final masks and nonzero-step counts (module docstring)."""
    zeroed = {g.name: sum((np.asarray(f[g.name]) == 0) for f in finals) for g in spec.groups}
    return {
        "t_in": {k: np.asarray(v, np.float32) for k, v in zeroed.items()},
        "steps_in_support": {g.name: np.asarray(nonzero[g.name], np.int32) for g in spec.groups},
        "z": {
            g.name: np.mean([np.asarray(f[g.name], np.float64) for f in finals], axis=0).astype(np.float32)
            for g in spec.groups
        },
    }


def lasso_path(
    apply_fn: Callable,
    spec: MaskSpec,
    params: Any,
    batches: Batches,
    penalties: Sequence[float],
    **options: Any,
) -> dict[str, dict[str, np.ndarray]]:
    """The lasso ranking of `spec`'s entries: `lasso_runs` (`options`: its keyword arguments), then
    `lasso_record`."""
    finals, nonzero, _ = lasso_runs(apply_fn, spec, params, batches, penalties, **options)
    return lasso_record(spec, finals, nonzero)
