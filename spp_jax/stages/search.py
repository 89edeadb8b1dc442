"""Stage 2: the SPP search (masks only, weights frozen) with path points and resume state.

The search reads `ctx.search_src` in a seeded order, steps the jitted search step of `ctx.task`'s loss, and
writes a path point every `search.path_every` steps and whenever the support crosses a new percent (with
the task's metric of the binary-masked model at cadence points), and a resume state every
`search.resume_every` steps. A killed run resumes from its latest resume state and replays the steps
after it bit for bit (spp_jax.run).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from spp_jax import checkpoint, data, finetune, preemption, search, sharding
from spp_jax.errors import NonFiniteLoss
from spp_jax.progress import Progress, log
from spp_jax.run_config import make_mask_tx
from spp_jax.stages.context import RunContext
from spp_jax.workdir import Workdir


def path_arrays(state: search.SearchState) -> dict:
    o = state.opt_state
    return {
        "gamma": o.gamma,
        "z": o.z,
        "masks": state.masks,
        "t_in": o.t_in,
        "steps_in_support": o.steps_in_support,
    }


def _nonfinite(step: int, points: list[int], progress: bool) -> NonFiniteLoss:
    """The NaN message; its advice is what the workdir accepts (a changed lr needs --fresh_search once
    the search has saved progress, see Workdir.check_fingerprint)."""
    kept = f"path points up to step {points[-1]} kept" if points else "no path point was written"
    fresh = " plus --fresh_search (the old search moves to discarded/)" if progress else ""
    return NonFiniteLoss(
        f"search loss became NaN/Inf at step {step} ({kept}); rerun with a lower --config.search.lr{fresh}, "
        "or check the input data"
    )


def stage_search(ctx: RunContext, wd: Workdir, params: dict) -> dict:
    """Run (or resume) the search of `ctx.cfg.search` on the dense `params` (module docstring)."""
    done = wd.result("search")
    if done is not None:
        return done
    t0 = time.perf_counter()
    cfg, adapter, task = ctx.cfg, ctx.adapter, ctx.task
    s = cfg.search
    spec = adapter.mask_spec()
    tx = make_mask_tx(cfg)
    module = adapter.module()
    mesh = sharding.run_mesh(cfg)  # masks + SPP state replicated, weights sharded over fsdp, batch over all
    rep, data_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    params_sh = sharding.fsdp_shardings(params, mesh)
    step_fn = jax.jit(
        search.make_search_step(
            module.apply,
            spec,
            tx,
            task=task,
            curvature=s.mode == "curvature",
            curvature_chunks=s.get("curvature_chunks") or None,
        ),
        in_shardings=(rep, params_sh, data_sh),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(finetune.make_eval_step(module.apply, task))
    point_batches = list(task.eval_batches(ctx.eval_src, s.eval_examples)) if s.eval_points else []

    params = jax.device_put(params, params_sh)
    state = sharding.replicate(search.init_search_state(spec, tx), mesh)
    loader = task.train_loader(ctx.search_src, s.batch_size, cfg.seed, augment=False)
    paths = checkpoint.PathStore(wd.path / "search" / "path")
    resume = checkpoint.ResumeStore(wd.path / "search" / "resume")
    last_percent, start = -1, 0
    # restored onto this run's mesh, whatever mesh saved it (a search may resume on another topology)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state)
    restored = resume.restore_latest(abstract)
    if restored is not None:
        start, state, extras = restored
        data.restore_loader_state(loader, extras["data"])
        last_percent = extras["last_percent"]
        log(f"[search] resumed at step {start} from {wd.rel(resume.directory)}")
    # A killed run may have written path points (and unreadable resume states) past the state it resumes
    # from. The replayed steps recompute them bit for bit, so they are replaced rather than kept twice.
    dropped = paths.delete_after(start)
    resume.delete_after(start)
    wd.metrics.drop_after(("search", "path"), start)
    if dropped:
        log(f"[search] replaying from step {start}: replaced path points {dropped}")

    def save_point(k: int, metrics: dict, with_eval: bool) -> None:
        record = {
            "step": k,
            **{m: float(v) for m, v in metrics.items() if m not in ("nonfinite", "accuracy")},
        }
        # "batch_accuracy": the search batch's aux metric; task.metric: the masked model on eval data
        record["batch_accuracy"] = float(metrics["accuracy"])
        record["support"] = {g.name: record.pop(f"support/{g.name}") for g in spec.groups}
        record["support"]["all"] = record.pop("support/all")
        if with_eval and point_batches:
            binary = jax.tree.map(lambda g: (g != 0).astype(jnp.float32), state.opt_state.gamma)
            record[task.metric] = finetune.evaluate(eval_step, params, point_batches, binary, task)
        paths.save(k, jax.device_get(path_arrays(state)), record)
        wd.metrics.write("path", k, **{k_: v for k_, v in record.items() if k_ not in ("step", "support")})

    def save_resume(k: int) -> None:
        paths.wait()  # a resume state must never be committed ahead of the path points before it
        resume.save(k, state, {"data": data.loader_state(loader), "last_percent": last_percent})

    prog = Progress("search", s.steps, start=start)
    try:
        with preemption.deferred():
            for k in range(start + 1, s.steps + 1):
                batch = sharding.shard_batch(next(loader), mesh)
                state, metrics = step_fn(state, params, batch)
                metrics = jax.device_get(metrics)  # a few scalars: needed for the percent-crossing check
                if metrics["nonfinite"]:
                    paths.wait()  # the message counts committed points only
                    raise _nonfinite(k, paths.steps(), wd.has_search_progress())
                percent = int(metrics["support/all"] * 100)
                cadence = k % s.path_every == 0 or k == s.steps
                if cadence or (s.percent_points and percent > last_percent):
                    save_point(k, metrics, with_eval=cadence and s.eval_points)
                    last_percent = max(last_percent, percent)
                resumable = k % s.resume_every == 0 or k == s.steps
                if resumable:
                    save_resume(k)
                wd.metrics.write("search", k, loss=metrics["loss"], support=metrics["support/all"])
                prog.update(k, loss=float(metrics["loss"]), support=float(metrics["support/all"]))
                signum = preemption.stop_requested(k)
                if signum is not None:
                    if not resumable:
                        save_resume(k)
                    resume.wait()
                    raise preemption.stopped(signum, k)
        paths.wait()
        points = paths.steps()
    finally:  # let in-flight async saves finish, also when the run stops with an error
        try:
            paths.close()
        finally:
            resume.close()
    result = {"steps": s.steps, "points": points, "seconds": time.perf_counter() - t0}
    result["seconds_per_step"] = result["seconds"] / max(s.steps - start, 1)
    wd.save_result("search", result)
    return result
