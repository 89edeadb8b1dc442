"""The task protocol and the pure loss helpers, re-exported: they live in the leaf module spp_jax.task, which
the core (search, baselines, finetune, ...) imports without importing the task implementations."""

from spp_jax.task import (
    ApplyFn,
    Batch,
    ImageLabels,
    LabelClassification,
    Params,
    Task,
    TaskContext,
    TaskDefaults,
    classification_loss,
    default_task,
    model_loss,
    next_token_nll,
    softmax_kl,
)

__all__ = [
    "ApplyFn",
    "Batch",
    "ImageLabels",
    "LabelClassification",
    "Params",
    "Task",
    "TaskContext",
    "TaskDefaults",
    "classification_loss",
    "default_task",
    "model_loss",
    "next_token_nll",
    "softmax_kl",
]
