"""The family recovery (`recovery="family"`): build the weight family from the path, train it once with the
nested fine-tune (spp_jax.nested), save it as one elastic checkpoint (WORKDIR/family/), and measure every
size the report names, cut on demand from that one checkpoint.

The nested fine-tune writes a resume state (weights, AdamW state, data position) every
`family.resume_every` steps under WORKDIR/nested/resume; a killed run replays from the latest one bit for
bit (the members of a step are drawn from the step number). SIGTERM/SIGINT stop it after the current step
with a resume state saved, as in the search.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from spp_jax import checkpoint, data, finetune, nested, preemption, sharding
from spp_jax.errors import NonFiniteLoss
from spp_jax.family import Family, build_family, load_family, member_apply, save_family
from spp_jax.progress import Progress, log
from spp_jax.run_config import check_run_target
from spp_jax.stages.context import RunContext
from spp_jax.stages.dense import evaluate_params
from spp_jax.stages.extract import final_ranking, model_entry
from spp_jax.workdir import Workdir


def family_grid(ctx: RunContext, family: Family) -> list[str]:
    """The sizes the nested fine-tune draws by name (`family.targets`, checked by validate_config), largest
    first by kept params."""
    targets = list(ctx.cfg.family.targets)
    cost = lambda t: ctx.adapter.arch_cost(family.cut(t, ctx.cfg.extract.round_to)[1])[0]
    return sorted(targets, key=cost, reverse=True)


def stage_family(ctx: RunContext, wd: Workdir, dense_params: dict) -> dict:
    """Build, train and save WORKDIR/family (skipped when done); returns the stage's result."""
    done = wd.result("family")
    if done is not None:
        return done
    t0 = time.perf_counter()
    cfg = ctx.cfg
    record, _ = final_ranking(ctx, wd, dense_params)
    meta = {
        "ranking": cfg.extract.ranking,
        "allocation": cfg.extract.allocation,
        "round_to": cfg.extract.round_to,
    }
    family = build_family(ctx.adapter, dense_params, record, meta)
    grid = family_grid(ctx, family)
    masked = wd.result("family_masked")
    if masked is None:  # the members before any training: what launch/extract.py gives for each target
        masked = {}
        for t in cfg.family.eval_targets:
            params, arch = family.cut(t, cfg.extract.round_to)
            masked[t] = evaluate_params(ctx, params, arch)
            log(f"[family] {t}: before fine-tuning {ctx.task.metric} {masked[t]:.4f}")
        wd.save_result("family_masked", masked)
    params, info = train_family(ctx, wd, family, grid)
    save_family(wd.path / "family", family, params, grid=grid, steps=cfg.family.steps)
    ctx.task.save_assets(wd.path / "family")
    result = {**info, "grid": grid, "seconds": time.perf_counter() - t0}
    wd.save_result("family", result)
    log(f"[family] saved {wd.rel(wd.path / 'family')} ({result['seconds']:.0f}s)")
    return result


def train_family(ctx: RunContext, wd: Workdir, family: Family, grid: list[str]) -> tuple[dict, dict]:
    """The nested fine-tune of `family` over `grid` (spp_jax.nested); returns (trained params, cost info)."""
    cfg, task, f, ft = ctx.cfg, ctx.task, ctx.cfg.family, ctx.cfg.finetune
    steps, per_step = f.steps, min(f.members_per_step, len(grid))  # both checked by validate_config
    tx = finetune.adamw_cosine(f.lr, steps, min(ft.warmup, steps // 2), ft.weight_decay)
    mesh = sharding.run_mesh(cfg)
    rep = sharding.replicated(mesh)
    init = lambda p: nested.init_state(p, tx)
    state_sh = sharding.fsdp_shardings(jax.eval_shape(init, family.params), mesh)
    members = [member_apply(family, family.keep(t, cfg.extract.round_to)) for t in grid]
    alpha = ft.distill_alpha if ft.distill else None
    grad_sh = (state_sh.params, rep, rep)
    grads = [
        jax.jit(nested.make_member_grad(s, apply, task, alpha, ft.distill_temp), out_shardings=grad_sh)
        for s, apply, _ in members
    ]
    teacher_macs = ctx.adapter.arch_cost(ctx.adapter.dense_spec())[1] if ft.distill else None
    member_macs = [ctx.adapter.arch_cost(arch)[1] for _, _, arch in members]
    teacher, t_params = None, None
    if ft.distill:
        _, t_raw, _ = checkpoint.load_pruned(wd.path / "dense")
        t_params = sharding.place_params(t_raw, mesh)
        t_apply = ctx.adapter.module().apply
        teacher = jax.jit(lambda p, batch: t_apply({"params": p}, *task.inputs(batch)))
    update = jax.jit(nested.make_update(tx), out_shardings=(state_sh, rep), donate_argnums=(0,))
    state = jax.jit(init, out_shardings=state_sh)(sharding.place_params(family.params, mesh))
    loader = task.train_loader(ctx.train_src, ft.batch_size, cfg.seed + 1, augment=ft.get("augment", False))
    resume = checkpoint.ResumeStore(wd.path / "nested" / "resume")
    start = 0
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = resume.restore_latest(abstract)
    if restored is not None:
        start, state, extras = restored
        data.restore_loader_state(loader, extras["data"])
        log(f"[family] resumed at step {start} from {wd.rel(resume.directory)}")
    resume.delete_after(start)
    wd.metrics.drop_after(("family",), start)
    base_key = jax.random.PRNGKey(cfg.seed)
    prog = Progress("family", steps, start=start)
    try:
        with preemption.deferred():
            for k in range(start + 1, steps + 1):
                drawn = nested.draw_members(k, cfg.seed, len(grid), per_step)
                batch = sharding.shard_batch(next(loader), mesh)
                t_out = teacher(t_params, batch) if teacher is not None else None
                key = jax.random.fold_in(base_key, k)
                outs = [grads[m](state.params, batch, t_out, jax.random.fold_in(key, m)) for m in drawn]
                state, nonfinite = update(state, [g for g, _, _ in outs])
                if k % 10 == 0 or k == steps:
                    losses = [float(loss) for _, loss, _ in outs]
                    if int(nonfinite):
                        raise NonFiniteLoss(
                            f"family: loss became NaN/Inf at step {k}: lower --config.family.lr"
                        )
                    row = {f"loss/{grid[m]}": v for m, v in zip(drawn, losses, strict=True)}
                    wd.metrics.write("family", k, loss=float(np.mean(losses)), **row)
                    prog.update(k, loss=float(np.mean(losses)))
                resumable = k % f.resume_every == 0 or k == steps
                if resumable:
                    resume.save(k, state, {"data": data.loader_state(loader)})
                signum = preemption.stop_requested(k)
                if signum is not None:
                    if not resumable:
                        resume.save(k, state, {"data": data.loader_state(loader)})
                    resume.wait()
                    raise preemption.stopped(signum, k)
        resume.wait()
    finally:
        resume.close()
    # training cost of the whole schedule (the same whether or not the run was resumed)
    drawn_macs = lambda k: [member_macs[m] for m in nested.draw_members(k, cfg.seed, len(grid), per_step)]
    cost = sum(nested.step_flops(ft.batch_size, teacher_macs, drawn_macs(k)) for k in range(1, steps + 1))
    # one separate member's fine-tune (finetune.steps of the grid's middle size), the unit of bench/family.py
    one = ft.steps * nested.step_flops(ft.batch_size, teacher_macs, [member_macs[len(grid) // 2]])
    params = jax.tree.map(np.asarray, jax.device_get(state.params))
    return params, {"steps": steps, "members_per_step": per_step, "cost_flops": cost, "one_member_flops": one}


def stage_family_evaluate(ctx: RunContext, wd: Workdir) -> dict:
    """Cut every `family.eval_targets` member from WORKDIR/family and measure its metric and throughput."""
    done = wd.result("family_evaluate")
    if done is not None:
        return done
    t0 = time.perf_counter()
    cfg, task, metric = ctx.cfg, ctx.task, ctx.task.metric
    family = load_family(wd.path / "family")
    masked = wd.result("family_masked") or {}
    _, dense_params, _ = checkpoint.load_pruned(wd.path / "dense")
    out = {"dense": {"throughput": task.throughput(ctx.adapter.module(), dense_params)}, "targets": []}
    for t in cfg.family.eval_targets:
        params, arch = family.cut(t, cfg.extract.round_to)
        value = evaluate_params(ctx, params, arch)
        entry = {"target": t, **model_entry(ctx, params, arch, value, "finetuned")}
        entry[f"{metric}_masked"] = masked.get(t)
        entry["throughput"] = task.throughput(ctx.adapter.module(arch), params)
        log(
            f"[evaluate] {t}: {entry['params'] / 1e6:.2f}M params ({entry['params_frac']:.1%}), {metric} "
            f"{value:.4f}, {entry['throughput']:.1f} {task.throughput_unit}"
        )
        out["targets"].append(entry)
    out["seconds"] = time.perf_counter() - t0
    wd.save_result("family_evaluate", out)
    return out


def save_members(ctx: RunContext, wd: Workdir, targets: list[str], round_to: int | None = None) -> None:
    """Cut `targets` from WORKDIR/family and save each as a model of its own in
    WORKDIR/family_members/<target>/ (loads with spp_jax.load_pruned(dir), runs without the family)."""
    from spp_jax.workdir import target_dirname

    parsed = [check_run_target(t) for t in targets]  # every target checked before any model is written
    family = load_family(wd.path / "family")
    round_to = family.meta.get("round_to", 1) if round_to is None else round_to
    for text, target in zip(targets, parsed, strict=True):
        params, arch = family.cut(target, round_to)
        directory = wd.path / "family_members" / target_dirname(text)
        n_params, macs = ctx.adapter.arch_cost(arch)
        checkpoint.save_model(directory, params, arch, target=text, from_family=wd.rel(wd.path / "family"))
        ctx.task.save_assets(directory)
        log(f"[extract] {text}: {n_params / 1e6:.2f}M params, {2 * macs / 1e9:.3f} GFLOPs -> {directory}")
