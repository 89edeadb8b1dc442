"""Fine-tuning and evaluation of (dense or extracted) models (algorithm.md §6).

Fine-tuning: AdamW, warmup + cosine decay, all weights trained, optional distillation from the dense
teacher: loss = (1 - a) CE(y, s) + a T^2 KL(softmax(t/T) || softmax(s/T)).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

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
) -> Callable:
    """`step(state, batch, teacher_params) -> (state, metrics)`; non-finite updates are not applied."""

    def step(state: TrainState, batch: dict[str, jax.Array], teacher_params: Params = None):
        rng, drop_rng = jax.random.split(state.rng)

        def loss_fn(params):
            logits = apply_fn({"params": params}, batch["image"], train=True, rngs={"dropout": drop_rng})
            logits = logits.astype(jnp.float32)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
            loss = ce
            if teacher_apply is not None:
                t = jax.lax.stop_gradient(teacher_apply({"params": teacher_params}, batch["image"]))
                t_prob = jax.nn.softmax(t.astype(jnp.float32) / distill_temp)
                kl = optax.kl_divergence(jax.nn.log_softmax(logits / distill_temp), t_prob).mean()
                loss = (1 - distill_alpha) * ce + distill_alpha * distill_temp**2 * kl
            return loss, (logits.argmax(-1) == batch["label"]).mean()

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new = TrainState(state.step + 1, optax.apply_updates(state.params, updates), opt_state, rng)
        finite = jnp.isfinite(loss)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
        return new, {"loss": loss, "accuracy": acc, "nonfinite": (~finite).astype(jnp.int32)}

    return step


def make_eval_step(apply_fn: Callable) -> Callable:
    """`eval_step(params, batch, masks) -> (correct, count)` summed over valid (mask == 1) examples."""

    def eval_step(params: Params, batch: dict[str, jax.Array], masks=None):
        logits = apply_fn({"params": params}, batch["image"], masks=masks)
        valid = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
        correct = ((logits.argmax(-1) == batch["label"]) * valid).sum()
        return correct, valid.sum()

    return eval_step


def evaluate(eval_step: Callable, params: Params, batches: Iterable[dict], masks=None) -> float:
    """Top-1 accuracy over every batch (a padded last batch counts only its valid rows)."""
    correct, total = 0.0, 0.0
    for batch in batches:
        c, n = eval_step(params, batch, masks)
        correct, total = correct + float(c), total + float(n)
    if jax.process_count() > 1:  # each process evaluated its own shard
        correct, total = np.asarray(multihost_utils.process_allgather(np.array([correct, total]))).sum(0)
    return float(correct / max(total, 1.0))


def measure_throughput(
    apply_fn: Callable, params: Params, image_size: int, batch_size: int = 64, repeats: int = 5
) -> float:
    """Images per second of the jitted forward pass (median of `repeats` timed calls after warm-up)."""
    fwd = jax.jit(lambda p, x: apply_fn({"params": p}, x))
    x = jnp.zeros((batch_size, image_size, image_size, 3), jnp.float32)
    params = jax.tree.map(jnp.asarray, params)
    jax.block_until_ready(fwd(params, x))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(params, x))
        times.append(time.perf_counter() - t0)
    return batch_size / float(np.median(times))
