"""Stages 4-5: fine-tune each extracted model (AdamW, optional distillation from the dense model), then
measure the task's metric and the throughput of the dense and every fine-tuned model."""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

from spp_jax import checkpoint, finetune, sharding
from spp_jax.errors import ConfigError, NonFiniteLoss
from spp_jax.family import load_pruned
from spp_jax.progress import Progress, log
from spp_jax.stages.context import RunContext
from spp_jax.workdir import Workdir


def finetune_params(
    ctx: RunContext, wd: Workdir, module, params, train_src, steps, lr, stage, teacher=None, augment=None
) -> dict:
    """`steps` of AdamW (warmup + cosine to 0, `cfg.finetune` settings) on all weights of `module`;
    `teacher = (module, params)` adds distillation; `augment=None` takes `finetune.augment`. Loss/accuracy
    rows go to WORKDIR/metrics.jsonl."""
    cfg, task = ctx.cfg, ctx.task
    f = cfg.finetune
    tx = finetune.adamw_cosine(lr, steps, min(f.warmup, steps // 2), f.weight_decay)
    # weights, AdamW moments and the teacher sharded over fsdp (replicated when mesh.fsdp is 1)
    mesh = sharding.run_mesh(cfg)
    rep, data_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    t_apply, t_params, t_sh = None, None, rep
    if teacher:
        t_apply, t_params = teacher[0].apply, sharding.place_params(teacher[1], mesh)
        t_sh = sharding.fsdp_shardings(t_params, mesh)
    init = lambda p: finetune.init_train_state(p, tx, cfg.seed)
    state_sh = sharding.fsdp_shardings(jax.eval_shape(init, params), mesh)
    step_fn = jax.jit(
        finetune.make_train_step(module.apply, tx, t_apply, f.distill_alpha, f.distill_temp, task),
        in_shardings=(state_sh, data_sh, t_sh),
        out_shardings=(state_sh, rep),
        donate_argnums=(0,),
    )
    # built on the mesh in its final layout: no device ever holds the whole state
    state = jax.jit(init, out_shardings=state_sh)(sharding.place_params(params, mesh))
    augment = f.get("augment", False) if augment is None else augment
    loader = task.train_loader(train_src, f.batch_size, cfg.seed + 1, augment=augment)
    prog = Progress(stage, steps)
    for k in range(1, steps + 1):
        state, metrics = step_fn(state, sharding.shard_batch(next(loader), mesh), t_params)
        if k % 10 == 0 or k == steps:
            metrics = jax.device_get(metrics)
            if metrics["nonfinite"]:
                raise NonFiniteLoss(f"{stage}: loss became NaN/Inf at step {k}: lower the learning rate")
            wd.metrics.write(stage, k, loss=metrics["loss"], accuracy=metrics["accuracy"])
            prog.update(k, loss=float(metrics["loss"]))
    return jax.tree.map(np.asarray, jax.device_get(state.params))


def finetune_model(
    ctx: RunContext, wd: Workdir, model_dir: Path, teacher=None, steps: int | None = None
) -> Path:
    """Fine-tune a saved model into WORKDIR/finetuned/<model_dir name>/ (skipped if that is complete)."""
    cfg = ctx.cfg
    steps = cfg.finetune.steps if steps is None else steps
    if steps < 1:
        raise ConfigError(f"fine-tuning steps={steps} is not allowed; use an integer >= 1")
    # restored straight onto the run's mesh in the fsdp layout, whatever topology saved it
    mesh = sharding.run_mesh(cfg)
    module, params, arch = checkpoint.load_pruned(model_dir, sharding=sharding.leaf_sharding(mesh))
    name = model_dir.name
    out = wd.path / "finetuned" / name
    meta = {"finetuned_from": wd.rel(model_dir), "steps": steps}
    if checkpoint.is_complete_model(out, **meta):
        log(f"[finetune] {wd.rel(out)} is complete, skipped")
        return out
    params = finetune_params(
        ctx, wd, module, params, ctx.train_src, steps, cfg.finetune.lr, f"finetune:{name}", teacher
    )
    checkpoint.save_model(out, params, arch, **meta)
    ctx.task.save_assets(out)
    return out


def evaluate_model(
    ctx: RunContext, model_dir: Path, value: float | None = None, target: str | None = None
) -> dict:
    """The task's metric on the eval split (unless already known) and the measured throughput of a saved
    model, or of the member `target` of a saved weight family."""
    mesh = sharding.run_mesh(ctx.cfg)  # with mesh.fsdp > 1 the weights stay sharded, as in fine-tuning
    placed = sharding.leaf_sharding(mesh) if mesh.shape[sharding.FSDP_AXIS] > 1 else None
    module, params, _ = load_pruned(model_dir, target, sharding=placed)
    task = ctx.task
    if value is None:
        step = jax.jit(finetune.make_eval_step(module.apply, task))
        value = finetune.evaluate(step, params, task.eval_batches(ctx.eval_src), task=task)
    out = {task.metric: value, "throughput": task.throughput(module, params)}
    extra = task.extra_metrics(module, params, ctx.eval_src)
    return {**out, "extra": extra} if extra else out


def stage_finetune_evaluate(ctx: RunContext, wd: Workdir, extracted: dict) -> tuple[dict, dict]:
    """Fine-tune every extracted model (distilled from the dense one when `finetune.distill`), then
    measure each model's metric and throughput."""
    cfg, metric = ctx.cfg, ctx.task.metric
    done = wd.result("finetune")
    if done is None:
        t0 = time.perf_counter()
        teacher = None
        if cfg.finetune.distill:
            module, params, _ = checkpoint.load_pruned(wd.path / "dense")
            teacher = (module, params)
        for t in extracted["targets"]:
            finetune_model(ctx, wd, wd.resolve(t["dir"]), teacher)
        done = {"seconds": time.perf_counter() - t0}
        wd.save_result("finetune", done)
    ev = wd.result("evaluate")
    if ev is None:
        t0 = time.perf_counter()
        dense_value = wd.result("dense")[metric]  # measured by the dense stage on the same split
        ev = {"dense": evaluate_model(ctx, wd.path / "dense", dense_value), "targets": {}}
        for t in extracted["targets"]:
            r = evaluate_model(ctx, wd.path / "finetuned" / wd.resolve(t["dir"]).name)
            ev["targets"][t["target"]] = r
            log(
                f"[evaluate] {t['target']}: {metric} {r[metric]:.4f}, "
                f"{r['throughput']:.1f} {ctx.task.throughput_unit}"
            )
        ev["seconds"] = time.perf_counter() - t0
        wd.save_result("evaluate", ev)
    return done, ev
