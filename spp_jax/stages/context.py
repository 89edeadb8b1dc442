"""What every stage of a run reads: the config, its task and architecture, the adapter and the data."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections

from spp_jax.architectures import Architecture, build_architecture
from spp_jax.tasks import Task, build_task, task_class


@dataclasses.dataclass
class RunContext:
    """One run's config, task (`cfg.task`), architecture (`cfg.model.arch`), adapter and data sources.

    `search_src` is what the search and the data-driven baselines read (a split held out from the dense
    model's preparation when the task has one, else `train_src`)."""

    cfg: ml_collections.ConfigDict
    task: Task
    arch: Architecture
    adapter: Any
    train_src: Sequence
    eval_src: Sequence
    search_src: Sequence


def make_context(cfg: ml_collections.ConfigDict) -> RunContext:
    """Build the architecture and the task `cfg` names, open the task's data sources, build the adapter.

    Neither builds the other: the architecture's tokenizer goes to a task that reads text
    (`needs_tokenizer`), the task's class count to the architecture's adapter."""
    arch = build_architecture(cfg)
    needs_tokenizer = task_class(cfg.get("task", "image_classification")).needs_tokenizer
    task = build_task(cfg, tokenizer=arch.tokenizer(cfg) if needs_tokenizer else None)
    train_src, eval_src, search_src = task.sources()
    adapter = arch.build_adapter(cfg, None, num_classes=task.num_classes())
    return RunContext(cfg, task, arch, adapter, train_src, eval_src, search_src)
