"""The task protocol: what a loss, a metric and a batch layout mean, apart from any architecture.

A task owns (issue: "a task owns the loss, the metrics, the eval loop, the batch layout and the dense-model
preparation"):

- the batch layout: `inputs(batch)` are the model's positional arguments, the rest of the batch is targets;
- the training / search loss `loss(outputs, batch) -> (loss, aux)`: the mean over the batch's units
  (examples or tokens) and one batch metric for logs (accuracy, token accuracy);
- the evaluation metric as sums over valid rows (`batch["mask"]`, padded last batches):
  `eval_sums(outputs, batch) -> (numerator, denominator)`, reduced by `finalize(num, den)`; accuracy is
  num / den, perplexity exp(num / den);
- distillation targets (`distill_loss`), the data sources and loaders of a run config, the dense-model
  preparation (`prepare_dense`) and the throughput measurement of a model.

The pure parts (`inputs`, `loss`, `eval_sums`, `finalize`, `distill_loss`) are traced inside jit: the step
builders close over the task object. `model_loss` is the one place where a model meets a task.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax

Batch = Mapping[str, jax.Array]
Params = Any
ApplyFn = Callable[..., Any]


class Task(Protocol):
    name: str
    metric: str  # "accuracy", "perplexity", ...
    higher_is_better: bool
    throughput_unit: str  # "img/s", "tok/s"
    per_example_loss: bool  # the loss is a mean of per-example terms (not so for a contrastive loss)

    def inputs(self, batch: Batch) -> tuple[jax.Array, ...]: ...

    def loss(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]: ...

    def eval_sums(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]: ...

    def finalize(self, num: float, den: float) -> float: ...

    def distill_loss(
        self, student: jax.Array, teacher: jax.Array, batch: Batch, temp: float
    ) -> jax.Array: ...

    # -- data of a run config ----------------------------------------------------------------------
    def sources(self) -> tuple[Sequence, Sequence, Sequence]:
        """(train, eval, search) random-access sources."""
        ...

    def train_loader(self, src: Sequence, batch_size: int, seed: int, augment: bool) -> Iterator[dict]: ...

    def eval_batches(self, src: Sequence, limit: int | None = None) -> Iterable[dict]: ...

    # -- optional measurements (TaskDefaults gives none) -------------------------------------------
    def references(self) -> dict[str, float]:
        """Metric values of reference methods that need no model (e.g. TF-IDF + logistic regression),
        measured once with the dense model and shown in the report."""
        ...

    def extra_metrics(self, module: Any, params: Params, src: Sequence) -> dict[str, float]:
        """Metrics besides `metric` of a model on `src` (e.g. retrieval recall), measured wherever the
        task's metric is: dense, every target before and after fine-tuning."""
        ...


class TaskDefaults:
    """No references, no extra metrics, a loss that is a mean over independent examples: what a task
    without them inherits."""

    per_example_loss = True  # False: the curvature search needs micro-batches (search.curvature_chunks)

    def references(self) -> dict[str, float]:
        return {}

    def extra_metrics(self, module: Any, params: Params, src: Sequence) -> dict[str, float]:
        return {}


def model_loss(
    apply_fn: ApplyFn, task: Task, params: Params, batch: Batch, masks: Any = None, **kwargs: Any
) -> tuple[jax.Array, jax.Array]:
    """task.loss(apply_fn({"params": params}, *task.inputs(batch), masks=masks, **kwargs), batch)."""
    outputs = apply_fn({"params": params}, *task.inputs(batch), masks=masks, **kwargs)
    return task.loss(outputs, batch)


def softmax_kl(student: jax.Array, teacher: jax.Array, temp: float, weights: jax.Array | None = None):
    """T^2 KL(softmax(t/T) || softmax(s/T)) over the last axis, averaged over the other axes (weighted by
    `weights` of their shape when given): the distillation term of algorithm.md §6."""
    t_prob = jax.nn.softmax(teacher.astype(jnp.float32) / temp)
    kl = optax.kl_divergence(jax.nn.log_softmax(student.astype(jnp.float32) / temp), t_prob)
    if weights is None:
        return temp**2 * kl.mean()
    return temp**2 * (kl * weights).sum() / jnp.maximum(weights.sum(), 1.0)
