"""Stage 1: the dense task model: the architecture's pretrained (or random) weights, prepared by the task
(an image classifier gets a probe-fitted head unless `dense.head=train`; a language model is used as
loaded), then `dense.finetune_steps` of full training when asked (`dense.augment`, None = as
`finetune.augment`). The stage saves once at its end: a kill inside it repeats the stage."""

from __future__ import annotations

import time

import jax

from spp_jax import checkpoint, finetune
from spp_jax.progress import log
from spp_jax.stages.context import RunContext
from spp_jax.stages.finetune import finetune_params
from spp_jax.workdir import Workdir


def evaluate_params(ctx: RunContext, params: dict, arch_spec: dict | None = None, src=None) -> float:
    """The task's metric of `params` (run as `arch_spec`, default dense) on `src` (default the eval split)."""
    step = jax.jit(finetune.make_eval_step(ctx.adapter.module(arch_spec).apply, ctx.task))
    src = ctx.eval_src if src is None else src
    return finetune.evaluate(step, params, ctx.task.eval_batches(src), task=ctx.task)


def stage_dense(ctx: RunContext, wd: Workdir) -> dict:
    """Load (or make and save) WORKDIR/dense; returns its result dict plus "params_tree"."""
    done = wd.result("dense")
    if done is not None:
        _, params, _ = checkpoint.load_pruned(wd.path / "dense")
        return {**done, "params_tree": params}
    t0 = time.perf_counter()
    cfg, adapter, metric = ctx.cfg, ctx.adapter, ctx.task.metric
    params = ctx.arch.load_pretrained(cfg, adapter)
    n_params, macs = adapter.arch_cost(adapter.dense_spec())
    log(f"[dense] loaded {cfg.model.init} weights ({n_params / 1e6:.2f}M params)")
    params = ctx.task.prepare_dense(ctx, params)
    if cfg.dense.finetune_steps:
        steps, lr = cfg.dense.finetune_steps, cfg.dense.lr
        augment = cfg.dense.get("augment")  # None: as the fine-tuning of pruned models
        params = finetune_params(
            ctx, wd, adapter.module(), params, ctx.train_src, steps, lr, "dense", None, augment
        )
    value = evaluate_params(ctx, params)
    checkpoint.save_model(wd.path / "dense", params, adapter.dense_spec(), **{metric: value})
    ctx.task.save_assets(wd.path / "dense")
    result = {metric: value, "params": n_params, "macs": macs, "seconds": time.perf_counter() - t0}
    extra = ctx.task.extra_metrics(adapter.module(), params, ctx.eval_src)
    references = ctx.task.references()
    result.update({"extra": extra} if extra else {}, **({"references": references} if references else {}))
    wd.save_result("dense", result)
    log(f"[dense] {metric} {value:.4f} ({result['seconds']:.0f}s)")
    return {**result, "params_tree": params}
