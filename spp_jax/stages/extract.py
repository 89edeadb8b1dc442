"""Stage 3: extraction of the configured targets (no re-search): select each target on the stored path (or
on a one-shot baseline's ranking), slice the dense params into a smaller model, measure the task's metric
of the extracted model before fine-tuning and save it under WORKDIR/extracted/."""

from __future__ import annotations

import time

from spp_jax import baselines, checkpoint, selection
from spp_jax.errors import CheckpointMismatch, ConfigError
from spp_jax.progress import log
from spp_jax.run_config import check_run_target
from spp_jax.stages.context import RunContext
from spp_jax.stages.dense import evaluate_params
from spp_jax.workdir import Workdir, target_dirname


def ranking_record(ctx: RunContext, params: dict, name: str, seed: int) -> dict:
    """A baseline's path-shaped record (spp_jax.baselines, spp_jax.lasso). The data scores (taylor, fisher,
    wanda) read the first `extract.score_batches` batches of the search data (seeded order); each lasso run
    reads the first `extract.lasso_steps` batches of that same stream."""
    cfg, adapter, task = ctx.cfg, ctx.adapter, ctx.task
    batches = None
    spec = adapter.mask_spec()
    if name in ("taylor", "fisher", "wanda", "lasso"):
        stream = lambda: task.train_loader(ctx.search_src, cfg.search.batch_size, seed, augment=False)
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
                task=task,
            )
        loader = stream()
        batches = (next(loader) for _ in range(cfg.extract.score_batches))
    scores = baselines.importance_scores(
        name, spec, adapter=adapter, params=params, batches=batches, seed=seed, task=task
    )
    return baselines.score_record(spec, scores)


def final_ranking(
    ctx: RunContext, wd: Workdir, params: dict, steps: set[int] = frozenset()
) -> tuple[dict, dict[int, dict]]:
    """The record every params / flops / groups target is selected on (the last path point, or the
    baseline ranking `extract.ranking`, re-ranked by `extract.allocation`) and the path points of `steps`."""
    cfg, e = ctx.cfg, ctx.cfg.extract
    with checkpoint.PathStore(wd.path / "search" / "path", read_only=True) as paths:
        stored = paths.steps()
        if not stored and e.ranking == "path":
            raise CheckpointMismatch(
                f"no path points in {paths.directory}; run the search first (launch/train.py)"
            )
        final = paths.arrays(stored[-1]) if e.ranking == "path" else None
        at_step = {k: paths.arrays(k) for k in sorted(steps)}
    if e.ranking != "path":
        final = ranking_record(ctx, params, e.ranking, cfg.seed)
    return baselines.allocate(ctx.adapter.mask_spec(), final, e.allocation), at_step


def extract_targets(ctx: RunContext, wd: Workdir, params: dict, targets) -> list[dict]:
    """Select each target and save the extracted model (no re-search).

    The ranking is `cfg.extract.ranking`: "path" (the stored solution path) or a one-shot baseline of
    spp_jax.baselines, re-ranked by the allocation rule `cfg.extract.allocation`. Models land in
    extracted/[<ranking>_]<target>[_<rule>]/: the ranking is named unless it is the path, the rule unless it
    is per_group (the default).
    """
    cfg, adapter, metric = ctx.cfg, ctx.adapter, ctx.task.metric
    spec = adapter.mask_spec()
    e = cfg.extract
    ranking, allocation = e.ranking, e.allocation
    parsed = [check_run_target(t) for t in targets]  # every target checked before any model is written
    if ranking != "path" and (e.fold_masks or any(isinstance(t, selection.PathStep) for t in parsed)):
        raise ConfigError(
            f"extract.ranking={ranking} has no path: step targets and fold_masks need ranking=path"
        )
    steps_needed = {t.step for t in parsed if isinstance(t, selection.PathStep)}
    final, at_step = final_ranking(ctx, wd, params, steps_needed)
    out = []
    for text, target in zip(targets, parsed, strict=True):
        record = at_step[target.step] if isinstance(target, selection.PathStep) else final
        keep = selection.select_subnetwork(spec, record, target, round_to=e.round_to)
        masks = record.get("masks") if e.fold_masks else None
        small, arch = adapter.extract(params, keep, masks=masks, fold_masks=e.fold_masks)
        name = text if ranking == "path" else f"{ranking}:{text}"
        name += "" if allocation == "per_group" else f":{allocation}"  # the default rule is unmarked
        directory = wd.path / "extracted" / target_dirname(name)
        summary = selection.keep_summary(spec, adapter.normalize_keep(keep))
        value = evaluate_params(ctx, small, arch)
        checkpoint.save_model(
            directory, small, arch, target=text, ranking=ranking, allocation=allocation, summary=summary,
            **{metric: value},
        )  # fmt: skip
        ctx.task.save_assets(directory)
        entry = {
            "target": text,
            "ranking": ranking,
            "allocation": allocation,
            "dir": wd.rel(directory),
            **model_entry(ctx, small, arch, value),
        }
        log(
            f"[extract] {text}: {entry['params'] / 1e6:.2f}M params ({entry['params_frac']:.1%}), "
            f"{2 * entry['macs'] / 1e9:.3f} GFLOPs ({entry['macs_frac']:.1%}), masked {metric} {value:.4f} "
            f"-> {directory}"
        )
        out.append(entry)
    return out


def model_entry(ctx: RunContext, params: dict, arch: dict, value: float, when: str = "masked") -> dict:
    """A report entry's size fields (params, MACs, their fractions of dense, per-layer dims) and the task's
    metric `value` (and extra metrics) of a model before (`when="masked"`) or after fine-tuning."""
    adapter = ctx.adapter
    n_params, macs = adapter.arch_cost(arch)
    dense_params, dense_macs = adapter.arch_cost(adapter.dense_spec())
    entry = {
        "params": n_params,
        "macs": macs,
        "params_frac": n_params / dense_params,
        "macs_frac": macs / dense_macs,
        "layers": spec_layers(arch),
        f"{ctx.task.metric}_{when}": value,
    }
    extra = ctx.task.extra_metrics(adapter.module(arch), params, ctx.eval_src)
    return {**entry, f"extra_{when}": extra} if extra else entry


def spec_layers(arch: dict) -> list | dict:
    """The per-layer dims of an arch spec; of a two-tower spec, {tower: its per-layer dims}."""
    if "layers" in arch:
        return arch["layers"]
    return {k: v["layers"] for k, v in arch.items() if isinstance(v, dict) and "layers" in v}


def stage_extract(ctx: RunContext, wd: Workdir, params: dict) -> dict:
    done = wd.result("extract")
    if done is not None:
        return done
    t0 = time.perf_counter()
    result = {"targets": extract_targets(ctx, wd, params, ctx.cfg.extract.targets)}
    result["seconds"] = time.perf_counter() - t0
    wd.save_result("extract", result)
    return result
