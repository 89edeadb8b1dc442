"""Tasks: loss, metric, batch layout, data and dense-model preparation, on top of the task protocol and the
pure loss helpers of the leaf module spp_jax.task (re-exported here).

`config.task` names one of `TASKS`; `build_task(cfg, tokenizer)` builds it from a run config (a task that
reads text, `needs_tokenizer`, is handed the model's tokenizer: the run takes it from the architecture,
spp_jax.stages.context). Library functions that take `task=None` mean image classification, the library's
first task (`default_task`).
"""

from __future__ import annotations

from typing import Any

from spp_jax.registry import lookup
from spp_jax.task import Task, default_task, model_loss, softmax_kl

# name -> "module:class"; imported on use, so a config naming one task never imports the others' data code
TASKS = {
    "image_classification": "spp_jax.tasks.image_classification:ImageClassification",
    "causal_lm": "spp_jax.tasks.causal_lm:CausalLM",
    "text_classification": "spp_jax.tasks.text_classification:TextClassification",
    "image_text": "spp_jax.tasks.image_text:ImageText",
}


def task_class(name: str) -> type:
    return lookup(TASKS, name, "task")


def build_task(cfg: Any, tokenizer: Any = None) -> Task:
    """The task `cfg.task` names, reading its data settings from `cfg`; `tokenizer` ((tokenizer, special
    ids) of the run's model) goes to a task that `needs_tokenizer`."""
    cls = task_class(cfg.get("task", "image_classification"))
    return cls(cfg, tokenizer=tokenizer) if cls.needs_tokenizer else cls(cfg)


__all__ = ["TASKS", "Task", "build_task", "default_task", "model_loss", "softmax_kl", "task_class"]
