r"""Does the path earn its place? Every ranking on one dense model, same targets, several seeds.

  python bench/quality.py --workdir workdirs/smollm2_books --seeds 3 --name smollm2 \
      --targets params:0.9,params:0.8,params:0.7,params:0.5 --search_steps 40 --eval_blocks 16 \
      --finetune_targets ""
  python bench/quality.py --workdir workdirs/vit_fmnist --seeds 3 \
      [--rankings curvature,official,paper,lasso,random,magnitude,wanda,taylor,fisher] \
      [--allocation per_group] \
      [--targets params:0.9,params:0.8,params:0.7,params:0.5,flops:0.5] [--name vit_fmnist] \
      [--finetune_rankings curvature,official,fisher,wanda,random] \
      [--finetune_targets params:0.7,params:0.5] \
      [--sensitivity]

Reuses the dense model and config of a finished run (WORKDIR/dense, WORKDIR/config.json). For each seed s:
- SPP rankings run a search with data seed s (`spp` = the run's search settings; `curvature`, `official`,
  `paper` = the three forms with the settings in FORMS below) in WORKDIR/quality/<ranking>/seed<s>;
- baselines score the dense model (spp_jax/baselines.py): random with seed s; taylor, fisher and wanda on
  `extract.score_batches` batches of the search data in seed-s order; magnitude once (no randomness);
  lasso (spp_jax/lasso.py) runs its penalised searches on the same data;
- every ranking, re-ranked by --allocation, selects every target; the binary-masked dense model (equal to
  the extracted one, tests/test_extraction.py) is evaluated on the run's eval split, BEFORE fine-tuning.
- seed 0's models of --finetune_rankings at --finetune_targets are extracted and fine-tuned with the run's
  fine-tuning settings (`finetune.*`, the budget the default run gives its models), then evaluated;
- --sensitivity reruns the `curvature` search of seed 0 with kappa and lam halved and doubled.
The metric is the run's task's (accuracy, or perplexity for a causal-LM run, where lower is better).
Reports mean, std and per-seed values per ranking and target, each ranking's wall time (searches: the
whole search; baselines: scoring), and Kendall's tau between the first two seeds' orders of each seeded
ranking. Writes bench/results/quality_<name>.json, a markdown table (.md) and a plot (.png) of accuracy
against kept block params.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import ml_collections
import numpy as np

from spp_jax import baselines, checkpoint, finetune, selection
from spp_jax.run_config import add_missing_keys
from spp_jax.stages.context import RunContext, make_context
from spp_jax.stages.dense import evaluate_params
from spp_jax.stages.extract import ranking_record
from spp_jax.stages.finetune import finetune_params
from spp_jax.stages.search import stage_search
from spp_jax.workdir import Workdir

_SEARCH = dict(kappa=None, nu=None, lam=None, base=None, shrink=None)  # None = the mode's default
FORMS = {  # every search setting spelled out, so the forms do not depend on the run's config
    "curvature": _SEARCH | dict(mode="curvature", steps=100, lr=0.1, path_every=10),
    "official": _SEARCH | dict(mode="official", steps=200, lr=2e-2, path_every=20),
    "paper": dict(mode="paper", steps=200, lr=0.2, kappa=10.0, nu=100.0, lam=0.1, base="sgd", shrink="l1",
                  path_every=20),
}  # fmt: skip
SENSITIVITY = {  # the curvature form's kappa and lam halved and doubled (defaults: spp_jax.spp._DEFAULTS)
    f"curvature:{k}{v}": FORMS["curvature"] | {k: v}
    for k, v in (("kappa", 0.5), ("kappa", 2.0), ("lam", 0.5), ("lam", 2.0))
}
SEARCHES = {**FORMS, **SENSITIVITY}
RESULTS = Path(__file__).resolve().parent / "results"


def spp_record(ctx: RunContext, name: str, seed: int, base: Path, params, steps: int | None = None):
    """(final path point, search seconds) of a search with seed `seed`; a finished search in
    WORKDIR/quality/<name>/seed<s> is reused with the seconds it took then."""
    c = ml_collections.ConfigDict(ctx.cfg.to_dict())
    with c.unlocked():
        c.seed = seed
        c.search.update(SEARCHES.get(name, {}))
        c.search.eval_points = False
        if steps is not None:  # one step budget for every form (--search_steps)
            c.search.steps, c.search.path_every = steps, max(1, steps // 10)
    wd = Workdir(base / "quality" / name.replace(":", "_") / f"seed{seed}").create()
    result = stage_search(dataclasses.replace(ctx, cfg=c), wd, params)
    with checkpoint.PathStore(wd.path / "search" / "path", read_only=True) as paths:
        return paths.arrays(paths.steps()[-1]), result["seconds"]


def kendall_tau(spec, a: dict, b: dict) -> float:
    from scipy.stats import kendalltau

    pos = lambda r: np.concatenate(
        [
            v.reshape(-1)
            for v in selection.rank_positions(spec, r["t_in"], r["steps_in_support"], r["z"]).values()
        ]
    )
    return float(kendalltau(pos(a), pos(b)).statistic)


def masked_metric(ctx, spec, eval_step, params, eval_batches, record, targets, allocation):
    """{target: (the task's metric of the binary-masked model, kept block-params fraction)} of a ranking."""
    cfg = ctx.cfg
    alloc = baselines.allocate(spec, record, allocation)
    out = {}
    for t in targets:
        keep = selection.select_subnetwork(spec, alloc, t, round_to=cfg.extract.round_to)
        masks = {k: np.asarray(v, np.float32) for k, v in keep.items()}
        out[t] = (
            finetune.evaluate(eval_step, params, eval_batches, masks, ctx.task),
            selection.keep_summary(spec, keep)["block_params_fraction"],
        )
    return out


def finetuned_metric(ctx: RunContext, base: Path, params, ranking: str, record, target, allocation):
    """The task's metric of the extracted model after the run's fine-tuning budget (`finetune.*`).

    Each result is kept in WORKDIR/quality/finetune/accuracy.json under its ranking, target, allocation and
    budget, and reused, so an interrupted bench loses at most the model in progress."""
    cfg, adapter = ctx.cfg, ctx.adapter
    f = cfg.finetune
    key = f"{ranking}|{target}|{allocation}|steps={f.steps}|lr={f.lr}|distill={f.distill}|seed={cfg.seed}"
    wd = Workdir(base / "quality" / "finetune").create()
    cache_file = wd.path / "accuracy.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    if key in cache:
        return cache[key]
    spec = adapter.mask_spec()
    keep = selection.select_subnetwork(
        spec, baselines.allocate(spec, record, allocation), target, round_to=cfg.extract.round_to
    )
    small, arch = adapter.extract(params, keep)
    module = adapter.module(arch)
    teacher = (adapter.module(), params) if f.distill else None
    tuned = finetune_params(
        ctx, wd, module, small, ctx.train_src, f.steps, f.lr, f"finetune:{target}", teacher
    )
    acc = evaluate_params(ctx, tuned, arch)
    checkpoint.write_json_atomic(cache_file, cache | {key: acc})
    return acc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument(
        "--rankings", default="curvature,official,paper,lasso,random,magnitude,wanda,taylor,fisher"
    )
    ap.add_argument("--allocation", default="per_group", choices=baselines.ALLOCATIONS)
    ap.add_argument("--targets", default="params:0.9,params:0.8,params:0.7,params:0.5,flops:0.5")
    ap.add_argument("--finetune_rankings", default="curvature,official,fisher,wanda,random")
    ap.add_argument("--finetune_targets", default="params:0.7,params:0.5")
    ap.add_argument("--sensitivity", action="store_true")
    ap.add_argument("--name", default="vit_fmnist")
    ap.add_argument(
        "--search_steps",
        type=int,
        default=None,
        help="steps of every SPP form (default: each form's own, FORMS)",
    )
    ap.add_argument(
        "--eval_blocks",
        type=int,
        default=None,
        help="causal LM: eval blocks per model (default: the run's eval.max_blocks)",
    )
    args = ap.parse_args()

    base = Path(args.workdir)
    cfg = ml_collections.ConfigDict(json.loads((base / "config.json").read_text()))
    add_missing_keys(cfg, importlib.import_module(f"configs.{cfg.model.get('arch', 'vit')}").get_config())
    if args.eval_blocks is not None:
        cfg.eval.max_blocks = args.eval_blocks
    ctx = make_context(cfg)
    adapter, task, eval_src = ctx.adapter, ctx.task, ctx.eval_src
    spec = adapter.mask_spec()
    _, params, _ = checkpoint.load_pruned(base / "dense")
    eval_step = jax.jit(finetune.make_eval_step(adapter.module().apply, task))
    eval_batches = list(task.eval_batches(eval_src))
    dense = finetune.evaluate(eval_step, params, eval_batches, task=task)
    fmt = _formatter(task.metric)
    targets, rankings = args.targets.split(","), args.rankings.split(",")
    ft_rankings = [r for r in args.finetune_rankings.split(",") if r] if args.finetune_targets else []
    ft_targets = [t for t in args.finetune_targets.split(",") if t]
    print(f"dense {task.metric} {dense:.4f}; {len(eval_batches)} eval batches", flush=True)

    def record_of(r: str, seed: int):
        if r in ("spp", *SEARCHES):
            return spp_record(ctx, r, seed, base, params, args.search_steps)
        t0 = time.perf_counter()
        rec = ranking_record(ctx, params, r, seed)
        return rec, time.perf_counter() - t0

    acc = {r: {t: [] for t in targets} for r in rankings}
    kept = {r: {t: [] for t in targets} for r in rankings}
    seconds = {r: [] for r in rankings}
    records: dict[str, list] = {r: [] for r in rankings}
    for seed in range(args.seeds):
        for r in rankings:
            if r == "magnitude" and seed > 0:  # deterministic: one score serves every seed
                rec, took = records[r][0], seconds[r][0]
            else:
                rec, took = record_of(r, seed)
            seconds[r].append(took)
            records[r].append(rec)
            for t, (a, k) in masked_metric(
                ctx, spec, eval_step, params, eval_batches, rec, targets, args.allocation
            ).items():
                acc[r][t].append(a)
                kept[r][t].append(k)
            print(f"seed {seed} {r:10s} " + " ".join(f"{t}={acc[r][t][-1]:.4f}" for t in targets)
                  + f"  ({seconds[r][-1]:.0f}s)", flush=True)  # fmt: skip

    tuned: dict[str, dict[str, float]] = {}
    for r in ft_rankings:
        rec = records[r][0] if r in records else record_of(r, 0)[0]
        tuned[r] = {}
        for t in ft_targets:
            tuned[r][t] = finetuned_metric(ctx, base, params, r, rec, t, args.allocation)
            print(f"fine-tuned {r:10s} {t}={tuned[r][t]:.4f}", flush=True)

    sensitivity: dict[str, dict[str, float]] = {}
    if args.sensitivity:
        for r in SENSITIVITY:
            rec, took = record_of(r, 0)
            res = masked_metric(ctx, spec, eval_step, params, eval_batches, rec, targets, args.allocation)
            sensitivity[r] = {t: a for t, (a, _) in res.items()} | {"seconds": took}
            print(f"sensitivity {r:18s} " + " ".join(f"{t}={res[t][0]:.4f}" for t in targets), flush=True)

    taus = {r: kendall_tau(spec, records[r][0], records[r][1]) for r in rankings if len(records[r]) > 1}
    out = {
        "command": " ".join(sys.argv),
        "metric": task.metric,
        "dense_accuracy" if task.metric == "accuracy" else f"dense_{task.metric}": dense,
        "allocation": args.allocation,
        "seeds": args.seeds,
        "eval_examples": int(sum(float(np.sum(b["mask"])) for b in eval_batches)),
        "search_steps": args.search_steps,
        "finetune": {"steps": cfg.finetune.steps, "lr": cfg.finetune.lr, "distill": cfg.finetune.distill,
                     "seed": 0, "accuracy": tuned},
        "sensitivity_seed0": sensitivity,
        "rankings": {
            r: {
                t: {"mean": float(np.mean(v)), "std": float(np.std(v)), "seeds": v,
                    "kept_block_params": float(np.mean(kept[r][t]))}
                for t, v in acc[r].items()
            }
            | {"seconds": float(np.mean(seconds[r])), "kendall_tau_seed0_seed1": taus.get(r)}
            for r in rankings
        },
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"quality_{args.name}"
    stem.with_suffix(".json").write_text(json.dumps(out, indent=2))
    lines = _table(
        args, targets, rankings, acc, seconds, taus, dense, tuned, ft_targets, sensitivity, fmt, task
    )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(stem.with_suffix(".png"), rankings, targets, acc, kept, dense, task.metric)


def _formatter(metric: str):
    return (lambda v: f"{v:.1%}") if metric == "accuracy" else (lambda v: f"{v:.2f}")


def _table(args, targets, rankings, acc, seconds, taus, dense, tuned, ft_targets, sensitivity, fmt, task):
    ft_cols = [f"{t} tuned" for t in ft_targets]
    better = "higher" if task.higher_is_better else "lower"
    lines = [
        f"Binary-masked {task.metric} ({better} is better) before fine-tuning, mean ± std over "
        f"{args.seeds} seed(s); dense {fmt(dense)}; allocation {args.allocation}. 'tuned': after the "
        "run's fine-tuning budget, seed 0.",
        "",
        "| ranking | " + " | ".join(targets + ft_cols) + " | seconds | tau(seed 0, 1) |",
        "|---|" + "---|" * (len(targets) + len(ft_cols) + 2),
    ]
    for r in rankings:
        cells = [f"{fmt(np.mean(acc[r][t]))} ± {fmt(np.std(acc[r][t]))}" for t in targets]
        cells += [fmt(tuned[r][t]) if r in tuned else "–" for t in ft_targets]
        tau = f"{taus[r]:.2f}" if r in taus else "–"
        lines.append(f"| {r} | " + " | ".join(cells) + f" | {np.mean(seconds[r]):.0f} | {tau} |")
    if sensitivity:
        lines += [
            "",
            "Sensitivity of the curvature form (seed 0, before fine-tuning):",
            "",
            "| search | " + " | ".join(targets) + " | seconds |",
            "|---|" + "---|" * (len(targets) + 1),
        ]
        for r, v in sensitivity.items():
            lines.append(f"| {r} | " + " | ".join(fmt(v[t]) for t in targets) + f" | {v['seconds']:.0f} |")
    return lines


def _plot(path: Path, rankings, targets, acc, kept, dense: float, metric: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    params_targets = [t for t in targets if t.startswith("params:")]
    for r in rankings:
        x = [np.mean(kept[r][t]) for t in params_targets]
        y = [np.mean(acc[r][t]) for t in params_targets]
        e = [np.std(acc[r][t]) for t in params_targets]
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=r)
    ax.axhline(dense, color="gray", ls="--", lw=1, label="dense")
    ax.set_xlabel("kept fraction of block params")
    ax.set_ylabel(f"{metric} before fine-tuning")
    if metric == "perplexity":
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
