"""The end-to-end SPP run: dense model -> search -> extract -> fine-tune -> evaluate -> report.

`run_all` reads like the table of contents of a run; each stage lives in spp_jax.stages and writes its
outputs under the workdir (layout: `spp_jax.workdir`) and a `results/<stage>.json`. What the run prunes is
the config's architecture (`model.arch`, spp_jax.architectures) on its task (`task`, spp_jax.tasks).

A rerun skips finished stages, fine-tuned models that are complete, and the search continues from its
latest resume state. A run killed at any moment (SIGKILL included) therefore resumes on the same path, bit
for bit: the data order is deterministic, and path points a killed run wrote past its last resume state are
replaced by the replayed steps. SIGTERM and SIGINT stop the search at the end of the current step with a
resume state saved (`spp_jax.preemption`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections

from spp_jax import checkpoint, preemption, report
from spp_jax.errors import ConfigError, saving
from spp_jax.progress import log
from spp_jax.run_config import check_inputs, validate_config
from spp_jax.stages.context import RunContext, make_context
from spp_jax.stages.dense import stage_dense
from spp_jax.stages.extract import stage_extract
from spp_jax.stages.family import stage_family, stage_family_evaluate
from spp_jax.stages.finetune import stage_finetune_evaluate
from spp_jax.stages.search import stage_search
from spp_jax.workdir import Workdir


def fingerprint(ctx: RunContext) -> dict:
    """What identifies a workdir's model, data and search (spp_jax.workdir.Workdir.check_fingerprint)."""
    cfg = ctx.cfg
    out = {
        "model": ctx.arch.fingerprint(cfg),
        "mask_spec": ctx.adapter.mask_spec().to_json(),
        "data": ctx.task.data_fingerprint(),
        "search": {
            k: cfg.search[k] for k in ("mode", "lr", "kappa", "nu", "lam", "shrink", "base", "batch_size")
        },
        "seed": cfg.seed,
    }
    if ctx.task.name != "image_classification":  # the first task's workdirs predate the key
        out["task"] = ctx.task.name
    return out


STAGES = ("dense", "search", "extract", "finetune")  # `until` values; "finetune" includes evaluate + report


def run_all(
    cfg: ml_collections.ConfigDict, workdir: str | Path, fresh_search: bool = False, until: str = "finetune"
) -> dict:
    """Run (or resume) every stage up to `until` and write the report; returns the report dict ({} when
    `until` stops before the report).

    Everything that can be checked without running a stage (config values, data, model, the workdir's
    fingerprint) is checked before the workdir is created or changed; a workdir another live run holds is
    refused (`WorkdirInUse`), and a failed write (a full disk) stops the run with `SaveFailed`.
    SIGTERM/SIGINT raise `Preempted` after saving a resume state (see `spp_jax.preemption`).
    `fresh_search` moves an existing search (and what was derived from it) to `discarded/` and starts a
    new one, e.g. after a NaN loss.
    """
    validate_config(cfg)
    if until not in STAGES:
        raise ConfigError(f"until={until!r} is not a stage; use one of {STAGES}")
    wd = Workdir(workdir)
    ctx = make_context(cfg)
    check_inputs(ctx, dense_done=wd.result("dense") is not None)
    wd.create()
    with wd.lock():  # a second run on this workdir is refused (WorkdirInUse) before it changes anything
        wd.check_fingerprint(fingerprint(ctx), fresh_search=fresh_search)
        if jax.process_index() == 0:  # only once the workdir is known to be this run's
            checkpoint.write_json_atomic(wd.path / "config.json", cfg.to_dict())
            wd.sign_lock()
        devices = f"{jax.device_count()} devices ({jax.devices()[0].platform})"
        log(f"[run] {devices}, {jax.process_count()} processes")
        with preemption.stop_signals():
            return _run_stages(ctx, wd, STAGES.index(until))


def _run_stages(ctx: RunContext, wd: Workdir, last: int) -> dict:
    dense = stage_dense(ctx, wd)
    dense_params = dense.pop("params_tree")
    if last < 1:
        return {}
    searched = stage_search(ctx, wd, dense_params)
    if last < 2:
        return {}
    if ctx.cfg.recovery == "family":  # one elastic checkpoint, recovered once (spp_jax.stages.family)
        if last < 3:
            return {}
        tuned = stage_family(ctx, wd, dense_params)
        rep = family_report(ctx, wd, dense, searched, tuned, stage_family_evaluate(ctx, wd))
    else:
        extracted = stage_extract(ctx, wd, dense_params)
        if last < 3:
            return {}
        tuned, ev = stage_finetune_evaluate(ctx, wd, extracted)
        rep = run_report(ctx, wd, dense, searched, extracted, tuned, ev)
    if jax.process_index() == 0:
        with saving(f"the report to {wd.path}"):
            report.write_report(str(wd.path), rep)
    log(f"[run] done: {wd.path / 'report.md'}")
    return rep


def run_report(ctx: RunContext, wd: Workdir, dense, searched, extracted, tuned, ev) -> dict:
    """The report dict of a finished run of separately fine-tuned members (spp_jax.report documents its
    layout)."""
    metric = ctx.task.metric
    targets = []
    for t in extracted["targets"]:
        r = ev["targets"][t["target"]]
        targets.append({**t, f"{metric}_finetuned": r[metric], "throughput": r["throughput"],
                        **({"extra_finetuned": r["extra"]} if "extra" in r else {})})  # fmt: skip
    stages = {"extract": extracted["seconds"], "finetune": tuned["seconds"], "evaluate": ev["seconds"]}
    return _report(ctx, wd, dense, searched, stages, ev["dense"]["throughput"], targets)


def family_report(ctx: RunContext, wd: Workdir, dense, searched, tuned, ev) -> dict:
    """The report dict of a family run: every `family.eval_targets` member, cut from WORKDIR/family."""
    stages = {"family": tuned["seconds"], "evaluate": ev["seconds"]}
    rep = _report(ctx, wd, dense, searched, stages, ev["dense"]["throughput"], ev["targets"])
    f = ctx.cfg.family
    rep["config"] = {
        "recovery": "family (one nested fine-tune, WORKDIR/family)",
        "family/steps": f.steps,
        "family/members_per_step": f.members_per_step,
        "family/drawn": ", ".join(tuned["grid"]),
    }
    return rep


def _report(ctx: RunContext, wd: Workdir, dense, searched, stages, dense_throughput, targets) -> dict:
    cfg, metric = ctx.cfg, ctx.task.metric
    with checkpoint.PathStore(wd.path / "search" / "path", read_only=True) as paths:
        path_records = paths.records()
    rep = {
        "model": {**ctx.arch.report_model(cfg), "params": dense["params"], "macs": dense["macs"]},
        "data": ctx.task.report_data(),
        "search": {k: cfg.search[k] for k in ("mode", "lr", "steps", "batch_size")},
        "stages": {"dense": dense["seconds"], "search": searched["seconds"], **stages},
        "dense": {
            **{k: dense[k] for k in (metric, "params", "macs")},
            "throughput": dense_throughput,
            **({"extra": dense["extra"]} if "extra" in dense else {}),
        },
        "path": path_records,
        "targets": targets,
    }
    if "references" in dense:
        rep["references"] = dense["references"]
    if ctx.task.name != "image_classification":  # the report's defaults are the first task's
        rep["metric"] = {"name": metric, "higher_is_better": ctx.task.higher_is_better,
                         "throughput_unit": ctx.task.throughput_unit}  # fmt: skip
    return rep
