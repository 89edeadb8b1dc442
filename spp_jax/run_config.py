"""What a run config means, checked before any stage runs.

`validate_config` turns every value a later stage would reject (minutes later, or with a traceback) into a
one-line `ConfigError` naming the key, the value and what is allowed. `make_mask_tx` builds the SPP
transform the config describes. Keys are those of the files in `configs/`: the keys every run has (below),
plus the `CONFIG_RULES` of the run's architecture (`model.arch`) and task (`task`).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

from spp_jax import baselines, selection
from spp_jax import spp as spp_lib
from spp_jax.architectures import ARCHITECTURES, architecture_class
from spp_jax.compute import check_compute, compute_options
from spp_jax.config_rules import (
    Rule,
    boolean,
    is_int,
    is_num,
    nonneg,
    nonneg_int,
    one_of,
    optional,
    positive,
    positive_int,
    unit,
)
from spp_jax.errors import ConfigError
from spp_jax.tasks import TASKS, task_class

# key -> (predicate, what is allowed): keys every run has; architectures and tasks add their own
# (`CONFIG_RULES` of the classes spp_jax.architectures / spp_jax.tasks name).
_RULES: dict[str, Rule] = {
    "seed": (lambda v: is_int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "task": one_of(tuple(TASKS)),
    "model.arch": one_of(tuple(ARCHITECTURES)),
    "dense.finetune_steps": nonneg_int,
    "dense.lr": positive,
    "search.steps": positive_int,
    "search.mode": one_of(spp_lib.MODES),
    "search.lr": positive,
    "search.kappa": optional(positive),
    "search.nu": optional((lambda v: is_num(v) and v > 0, "a number > 0 (inf = no coupling)")),
    "search.lam": optional(nonneg),
    "search.shrink": optional(one_of(spp_lib.SHRINKS)),
    "search.base": optional(one_of(spp_lib.BASES)),
    "search.batch_size": positive_int,
    "search.resume_every": positive_int,
    "search.eval_examples": positive_int,
    "search.percent_points": boolean,
    "search.eval_points": boolean,
    "search.curvature_chunks": nonneg_int,
    "extract.round_to": positive_int,
    "extract.fold_masks": boolean,
    "extract.ranking": one_of(baselines.RANKINGS),
    "extract.allocation": one_of(baselines.ALLOCATIONS),
    "extract.score_batches": positive_int,
    "extract.lasso_penalties": (
        lambda v: isinstance(v, tuple | list) and len(v) > 0 and all(nonneg[0](x) for x in v),
        "a non-empty tuple of numbers >= 0 (units of mean |dL/dM|), e.g. (0.75, 1.0, 1.25, 2.0)",
    ),
    "extract.lasso_steps": positive_int,
    "extract.lasso_lr": positive,
    "recovery": one_of(("family", "separate")),
    "family.steps": positive_int,
    "family.lr": positive,
    "family.members_per_step": (lambda v: is_int(v) and v >= 2, "an integer >= 2"),
    "family.resume_every": positive_int,
    "finetune.steps": positive_int,
    "finetune.batch_size": positive_int,
    "finetune.lr": positive,
    "finetune.warmup": nonneg_int,
    "finetune.weight_decay": nonneg,
    "finetune.distill": boolean,
    "finetune.distill_alpha": unit,
    "finetune.distill_temp": positive,
    "eval.batch_size": positive_int,
    "mesh.fsdp": positive_int,
}


def _get(cfg: ml_collections.ConfigDict, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            raise ConfigError(
                f"config has no key {key}; start from a file in configs/, which defines every key"
            ) from None
    return node


def add_missing_keys(cfg: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict) -> None:
    """Give `cfg` (e.g. a workdir's saved config.json) every key of `defaults` it lacks: keys added to
    configs/vit.py after a workdir was made take their defaults, so older workdirs still load."""
    for key, value in defaults.items():
        if key not in cfg:
            with cfg.unlocked():
                cfg[key] = value
        elif hasattr(value, "items") and hasattr(cfg[key], "items"):
            add_missing_keys(cfg[key], value)


def make_mask_tx(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The SPP transform of `cfg.search` (None fields take the mode's defaults, spp_jax.spp.spp)."""
    s = cfg.search
    return spp_lib.spp(
        s.mode, learning_rate=s.lr, kappa=s.kappa, nu=s.nu, lam=s.lam, shrink=s.shrink, base=s.base
    )


def check_run_target(text: str) -> selection.Target:
    """Parse a target a run extracts; refuse the ones that keep no block dims at all."""
    target = selection.parse_target(text)
    frac = getattr(target, "fraction", getattr(target, "fractions", None))
    if frac == 0 or (isinstance(frac, dict) and frac and not any(frac.values())):
        raise ConfigError(
            f"target {text!r} keeps no block dims (only embeddings, norms and head would remain); "
            "give a fraction > 0"
        )
    return target


def for_this_backend(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A saved run config made fit for this machine: model.attention=cudnn (the fused GPU kernel) becomes
    xla off a GPU. Both compute the same function (spp_jax.models.vit.attention_core), so a workdir searched
    on a GPU extracts, fine-tunes and evaluates anywhere; a new run that asks for cudnn on a CPU is refused
    by `validate_config` instead."""
    if cfg.model.get("attention") == "cudnn" and jax.default_backend() != "gpu":
        with cfg.unlocked():
            cfg.model.attention = "xla"
    return cfg


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Fail in the first second, not after the dense stage, on values a later stage would reject."""
    for rules in (_RULES, architecture_class(_get(cfg, "model.arch")).CONFIG_RULES,
                  task_class(_get(cfg, "task")).CONFIG_RULES):  # fmt: skip
        for key, (ok, allowed) in rules.items():
            value = _get(cfg, key)
            if not ok(value):
                raise ConfigError(f"{key}={value!r} is not allowed; use {allowed}")
    compute = compute_options(cfg.model)
    if compute["attention"] == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(
            f"model.attention=cudnn needs a GPU and this backend is {jax.default_backend()}; "
            "use model.attention=xla"
        )
    try:
        check_compute(**compute)  # the combinations the model configs refuse, in the first second
    except ConfigError as e:
        raise ConfigError(f"model settings: {e}") from None
    try:
        make_mask_tx(cfg)
    except ConfigError as e:  # a combination the rules above do not cover (e.g. nu=inf in paper mode)
        raise ConfigError(f"search settings: {e}") from None
    for key in ("extract.targets", "family.targets", "family.eval_targets"):
        targets = _get(cfg, key)
        if isinstance(targets, str) or not targets:
            raise ConfigError(
                f"{key}={targets!r} is not allowed; give a non-empty tuple, e.g. \"('params:0.5',)\""
            )
        for t in targets:
            check_run_target(t)
    if len(cfg.family.targets) < 2:
        raise ConfigError(
            f"family.targets={tuple(cfg.family.targets)!r} needs at least two sizes (the largest and the "
            "smallest the nested fine-tune trains)"
        )
    s = cfg.search
    if not 1 <= s.path_every <= s.steps:
        raise ConfigError(
            f"search.path_every={s.path_every!r} is not allowed; "
            f"use an integer in [1, search.steps={s.steps}]"
        )
    chunks = s.get("curvature_chunks") or 0
    if chunks and (s.mode != "curvature" or s.batch_size % chunks):
        raise ConfigError(
            f"search.curvature_chunks={chunks} needs search.mode=curvature and a divisor of "
            f"search.batch_size={s.batch_size}; use 0 (per example) or such a divisor"
        )
    n = jax.device_count()
    if n % cfg.mesh.fsdp:
        raise ConfigError(f"mesh.fsdp={cfg.mesh.fsdp} does not divide the {n} devices; use a divisor of {n}")
    for name in ("search", "finetune"):
        b = cfg[name].batch_size
        if b % n:
            raise ConfigError(
                f"{name}.batch_size={b} is not a multiple of the {n} devices; use a multiple of {n}"
            )


def check_inputs(ctx: Any, dense_done: bool = False) -> None:
    """What `validate_config` cannot see: the checkpoint file and the data a run will read.

    For `run_all`, before the workdir is created (a later stage would fail on these minutes in, with the
    workdir already written). `ctx` is the run's `spp_jax.stages.context.RunContext`; `dense_done`: the
    workdir has a finished dense stage, which no longer reads the checkpoint.
    """
    cfg = ctx.cfg
    if not dense_done:
        ctx.arch.check_init(cfg)
    n = jax.process_count()
    d = cfg.data
    search_split = "data.search_split" if d.get("search_split") else "data.train_split"
    for key, src, split in (
        ("search.batch_size", ctx.search_src, search_split),
        ("finetune.batch_size", ctx.train_src, "data.train_split"),
    ):
        b = _get(cfg, key)
        if len(src) // n < b // n:
            raise ConfigError(
                f"{key}={b} is more than the {len(src)} examples of {split}={_get(cfg, split)!r}; "
                "use a smaller batch or a bigger split"
            )
    s = cfg.search
    if s.mode == "curvature" and not s.get("curvature_chunks") and not ctx.task.per_example_loss:
        raise ConfigError(
            f"task {ctx.task.name}'s loss has no per-example form (its examples share the batch); set "
            "search.curvature_chunks to a divisor of search.batch_size (configs/clip.py uses 4)"
        )
    ctx.task.check_data(ctx.train_src)
