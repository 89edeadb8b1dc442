"""What every stage of a run reads: the config, its task and architecture, the adapter and the data."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import ml_collections

from spp_jax.architectures import Architecture, build_architecture
from spp_jax.tasks import Task, build_task


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
    """Build the task and the architecture `cfg` names, open its data sources, build the adapter."""
    task = build_task(cfg)
    arch = build_architecture(cfg)
    train_src, eval_src, search_src = task.sources()
    adapter = arch.build_adapter(cfg, task)
    return RunContext(cfg, task, arch, adapter, train_src, eval_src, search_src)
