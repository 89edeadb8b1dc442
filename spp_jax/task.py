"""The task protocol: what a loss, a metric and a batch layout mean, apart from any architecture.

A leaf of the library: it imports nothing from spp_jax, so the core (search, baselines, finetune, lasso,
nested, lm) reads a task through it, and the task implementations (spp_jax.tasks) build on it.

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
builders close over the task object. `model_loss` is the one place where a model meets a task. Library
functions that take `task=None` mean image classification (`default_task`: its pure parts, `ImageLabels`).
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
    needs_tokenizer: bool  # built with tokenizer=(tokenizer, special ids) of the run's model

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

    def num_classes(self) -> int | None:
        """Classes of the model's head (the run hands them to the architecture); None: no class head."""
        ...

    # -- optional measurements (TaskDefaults gives none) -------------------------------------------
    def references(self) -> dict[str, float]:
        """Metric values of reference methods that need no model (e.g. TF-IDF + logistic regression),
        measured once with the dense model and shown in the report."""
        ...

    def extra_metrics(self, module: Any, params: Params, src: Sequence) -> dict[str, float]:
        """Metrics besides `metric` of a model on `src` (e.g. retrieval recall), measured wherever the
        task's metric is: dense, every target before and after fine-tuning."""
        ...


class TaskContext(Protocol):
    """What a task's dense-model preparation reads of its run (spp_jax.stages.context.RunContext is one):
    the config, the architecture, its adapter and the training source."""

    cfg: Any
    arch: Any
    adapter: Any
    train_src: Sequence


class TaskDefaults:
    """No tokenizer, no class head, no references, no extra metrics, a loss that is a mean over
    independent examples: what a task without them inherits."""

    per_example_loss = True  # False: the curvature search needs micro-batches (search.curvature_chunks)
    needs_tokenizer = False

    def num_classes(self) -> int | None:
        return None

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


# -- pure loss helpers -----------------------------------------------------------------------------------
def softmax_kl(student: jax.Array, teacher: jax.Array, temp: float, weights: jax.Array | None = None):
    """T^2 KL(softmax(t/T) || softmax(s/T)) over the last axis, averaged over the other axes (weighted by
    `weights` of their shape when given): the distillation term of algorithm.md §6."""
    t_prob = jax.nn.softmax(teacher.astype(jnp.float32) / temp)
    kl = optax.kl_divergence(jax.nn.log_softmax(student.astype(jnp.float32) / temp), t_prob)
    if weights is None:
        return temp**2 * kl.mean()
    return temp**2 * (kl * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def classification_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean softmax cross-entropy and accuracy (sums over the batch, divided by its size)."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
    acc = (logits.argmax(-1) == labels).mean()
    return loss, acc


def next_token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-position negative log-likelihood [B, L] of `targets` under `logits` [B, L, V] (float32)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


# -- the pure parts of classification, and the library's default task ----------------------------------
class LabelClassification(TaskDefaults):
    """The pure parts of a classification task: softmax cross-entropy and top-1 accuracy on
    `batch["label"]`, logit distillation. A subclass says what its batches hold (`inputs`);
    spp_jax.tasks.classification adds the data and the dense-model preparation."""

    metric = "accuracy"
    higher_is_better = True

    def inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        raise NotImplementedError

    def loss(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
        return classification_loss(outputs, batch["label"])

    def eval_sums(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
        valid = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
        return ((outputs.argmax(-1) == batch["label"]) * valid).sum(), valid.sum()

    def finalize(self, num: float, den: float) -> float:
        return float(num / max(den, 1.0))

    def distill_loss(self, student: jax.Array, teacher: jax.Array, batch: Batch, temp: float) -> jax.Array:
        return softmax_kl(student, teacher, temp)


class ImageLabels(LabelClassification):
    """Image classification's pure parts: the model reads `batch["image"]` (spp_jax.tasks.image_classification
    adds its data)."""

    name = "image_classification"
    throughput_unit = "img/s"

    def inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        return (batch["image"],)


def default_task(task: Task | None) -> Task:
    """`task`, or image classification (its pure parts, all a library function reads) for None."""
    return ImageLabels() if task is None else task
