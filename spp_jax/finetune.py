"""Fine-tuning and evaluation of (dense or extracted) models (algorithm.md §6).

Fine-tuning: AdamW, warmup + cosine decay, all weights trained, optional distillation from the dense
teacher: loss = (1 - a) L_task(y, s) + a T^2 KL(softmax(t/T) || softmax(s/T)), with the task's loss and
its distillation targets (spp_jax.tasks; None = image classification). Evaluation sums the task's metric
over valid rows and reduces it once at the end (accuracy, perplexity).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from spp_jax.task import Task, default_task

Params = Any


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Params
    opt_state: optax.OptState
    rng: jax.Array


def adamw_cosine(lr: float, steps: int, warmup: int, weight_decay: float) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup, 1), max(steps, warmup + 1), 0.0)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))


def init_train_state(params: Params, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
    params = jax.tree.map(jnp.asarray, params)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.key(seed))


def make_train_step(
    apply_fn: Callable,
    tx: optax.GradientTransformation,
    teacher_apply: Callable | None = None,
    distill_alpha: float = 0.5,
    distill_temp: float = 2.0,
    task: Task | None = None,
) -> Callable:
    """`step(state, batch, teacher_params) -> (state, metrics)`; non-finite updates are not applied."""
    task = default_task(task)

    def step(state: TrainState, batch: dict[str, jax.Array], teacher_params: Params = None):
        rng, drop_rng = jax.random.split(state.rng)
        inputs = task.inputs(batch)

        def loss_fn(params):
            outputs = apply_fn({"params": params}, *inputs, train=True, rngs={"dropout": drop_rng})
            loss, aux = task.loss(outputs, batch)
            if teacher_apply is not None:
                t = jax.lax.stop_gradient(teacher_apply({"params": teacher_params}, *inputs))
                kl = task.distill_loss(outputs, t, batch, distill_temp)
                loss = (1 - distill_alpha) * loss + distill_alpha * kl
            return loss, aux

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state, rng)
        finite = jnp.isfinite(loss)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        return new, {"loss": loss, "accuracy": acc, "nonfinite": (~finite).astype(jnp.int32)}

    return step


def make_eval_step(apply_fn: Callable, task: Task | None = None) -> Callable:
    """`eval_step(params, batch, masks) -> (num, den)`: the task's metric sums over valid rows."""
    task = default_task(task)

    def eval_step(params: Params, batch: dict[str, jax.Array], masks=None):
        return task.eval_sums(apply_fn({"params": params}, *task.inputs(batch), masks=masks), batch)

    return eval_step


def evaluate(
    eval_step: Callable, params: Params, batches: Iterable[dict], masks=None, task: Task | None = None
) -> float:
    """The task's metric over every batch (top-1 accuracy for classification; a padded last batch counts
    only its valid rows)."""
    num, den = 0.0, 0.0
    for batch in batches:
        n, d = eval_step(params, batch, masks)
        num, den = num + float(n), den + float(d)
    if jax.process_count() > 1:  # each process evaluated its own shard
        num, den = np.asarray(multihost_utils.process_allgather(np.array([num, den]))).sum(0)
    return default_task(task).finalize(num, den)
