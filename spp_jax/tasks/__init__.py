"""Tasks: loss, metric, batch layout, data and dense-model preparation (spp_jax.tasks.base).

`config.task` names one of `TASKS`; `build_task(cfg)` builds it from a run config. Library functions that
take `task=None` mean image classification, the library's first task.
"""

from __future__ import annotations

from typing import Any

from spp_jax.registry import lookup
from spp_jax.tasks.base import Task, model_loss, softmax_kl

# name -> "module:class"; imported on use, so a config naming one task never imports the others' data code
TASKS = {
    "image_classification": "spp_jax.tasks.image_classification:ImageClassification",
    "causal_lm": "spp_jax.tasks.causal_lm:CausalLM",
    "text_classification": "spp_jax.tasks.text_classification:TextClassification",
    "image_text": "spp_jax.tasks.image_text:ImageText",
}


def task_class(name: str) -> type:
    return lookup(TASKS, name, "task")


def build_task(cfg: Any) -> Task:
    """The task `cfg.task` names, reading its data settings from `cfg`."""
    return task_class(cfg.get("task", "image_classification"))(cfg)


def default_task(task: Task | None) -> Task:
    """`task`, or image classification for None."""
    return task_class("image_classification")() if task is None else task


__all__ = ["TASKS", "Task", "build_task", "default_task", "model_loss", "softmax_kl", "task_class"]
