r"""The weight family against separately fine-tuned members, on a finished run's workdir (dense + search).

  python bench/family.py --workdir workdirs/vit_fmnist --name vit_fmnist --seeds 2

For each seed: (a) one nested fine-tune of the family (the run's `family` settings; the seed sets the data
order and the sizes drawn), every size then cut from it; (b) each size fine-tuned on its own with the run's
`finetune` budget (the seed sets the data order), starting from the same cut of the untrained family, which
is the model launch/extract.py makes. Both distil from the run's dense model as the run does. Sizes are
`--targets` and the family's drawn grid; those outside the grid (never drawn by name) are also compared with
the straight line between their drawn neighbours. Costs are training FLOPs (teacher passes included,
spp_jax.nested.step_flops) and wall seconds. `--separate_from` takes the separate members of an earlier
result on the same dense model and budget instead of training them again (a family design trial).

Writes bench/results/family_<name>.{json,md,png}: `methods` -> family / separate -> target -> {mean, std,
seeds}, each method's `cost_flops` and `seconds`, and `one_member_flops` (one separate fine-tune of the
grid's middle size). Nothing in the workdir changes: scratch work goes to --scratch.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "launch"))
TARGETS = ("0.9", "0.85", "0.8", "0.7", "0.65", "0.6", "0.55", "0.5")  # kept params compared by default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument(
        "--targets", default=",".join(f"params:{f}" for f in TARGETS), help="sizes besides the grid"
    )
    ap.add_argument("--separate_targets", default="", help="sizes fine-tuned separately (default: all)")
    ap.add_argument("--family_only", action="store_true", help="no separate members (a design trial)")
    ap.add_argument("--separate_from", default="", help="an earlier family_<name>.json: its separate members")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override the run's config, e.g. --set family.lr=5e-5 (a design trial; repeatable)",
    )
    ap.add_argument("--scratch", default="")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()

    from _common import load_run_config  # the launch scripts' config loader

    from spp_jax import checkpoint, nested
    from spp_jax.family import build_family
    from spp_jax.stages.context import make_context
    from spp_jax.stages.dense import evaluate_params
    from spp_jax.stages.extract import final_ranking
    from spp_jax.stages.family import family_grid, train_family
    from spp_jax.stages.finetune import finetune_params
    from spp_jax.workdir import Workdir

    wd = Workdir(args.workdir)
    cfg = load_run_config(args.workdir)
    for item in args.set:
        key, _, value = item.partition("=")
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        try:
            node[leaf] = ast.literal_eval(value)
        except (ValueError, SyntaxError):  # a bare word: a string value
            node[leaf] = value
    ctx = make_context(cfg)
    metric = ctx.task.metric
    _, dense, _ = checkpoint.load_pruned(wd.path / "dense")
    record, _ = final_ranking(ctx, wd, dense)
    fam = build_family(ctx.adapter, dense, record, {"round_to": cfg.extract.round_to})
    grid = family_grid(ctx, fam)
    targets = list(dict.fromkeys(grid + [t for t in args.targets.split(",") if t]))
    separate_targets = [t for t in args.separate_targets.split(",") if t] or targets
    earlier = json.loads(Path(args.separate_from).read_text()) if args.separate_from else None
    if earlier is not None and (earlier["dense"], earlier["finetune_steps"]) != (
        wd.result("dense")[metric],
        cfg.finetune.steps,
    ):
        sys.exit(f"{args.separate_from}: another dense model or fine-tune budget than {args.workdir}")
    separate_targets = [] if args.family_only or earlier else separate_targets
    cost = lambda t: ctx.adapter.arch_cost(fam.cut(t, cfg.extract.round_to)[1])
    targets.sort(key=lambda t: cost(t)[0], reverse=True)
    ft = cfg.finetune
    teacher_macs = ctx.adapter.arch_cost(ctx.adapter.dense_spec())[1] if ft.distill else None
    teacher = (ctx.adapter.module(), dense) if ft.distill else None
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="spp_family_bench_"))
    values = {"family": {t: [] for t in targets}, "separate": {t: [] for t in separate_targets}}
    costs, seconds = {"family": 0.0, "separate": 0.0}, {"family": 0.0, "separate": 0.0}
    one_member = 0.0
    for seed in range(args.seeds):
        cfg.seed = seed
        swd = Workdir(scratch / f"seed{seed}").create()
        if not (swd.path / "dense").exists():
            (swd.path / "dense").symlink_to((wd.path / "dense").absolute())
        shutil.rmtree(swd.path / "nested", ignore_errors=True)
        t0 = time.perf_counter()
        params, info = train_family(ctx, swd, fam, grid)
        seconds["family"] += time.perf_counter() - t0
        costs["family"] += info["cost_flops"]
        one_member = info["one_member_flops"]
        tuned = dataclasses.replace(fam, params=params)
        for t in targets:
            p, arch = tuned.cut(t, cfg.extract.round_to)
            values["family"][t].append(evaluate_params(ctx, p, arch))
            print(f"[bench] seed {seed} family {t}: {metric} {values['family'][t][-1]:.4f}", flush=True)
        for t in separate_targets:
            p, arch = fam.cut(t, cfg.extract.round_to)
            t0 = time.perf_counter()
            module = ctx.adapter.module(arch)
            p = finetune_params(ctx, swd, module, p, ctx.train_src, ft.steps, ft.lr, f"separate:{t}", teacher)
            seconds["separate"] += time.perf_counter() - t0
            costs["separate"] += ft.steps * nested.step_flops(ft.batch_size, teacher_macs, [cost(t)[1]])
            values["separate"][t].append(evaluate_params(ctx, p, arch))
            print(f"[bench] seed {seed} separate {t}: {metric} {values['separate'][t][-1]:.4f}", flush=True)
    stats = lambda v: {"mean": float(np.mean(v)), "std": float(np.std(v)), "seeds": [float(x) for x in v]}
    methods = {m: {t: stats(v) for t, v in values[m].items() if v} for m in values}
    if earlier is not None:
        methods["separate"] = earlier["methods"]["separate"]
        costs["separate"] = earlier["cost_flops"]["separate"] * args.seeds
        seconds["separate"] = earlier["seconds"]["separate"] * args.seeds
    out = {
        "workdir": str(wd.path),
        "metric": metric,
        "seeds": args.seeds,
        "grid": grid,
        "params_frac": {t: cost(t)[0] / ctx.adapter.arch_cost(ctx.adapter.dense_spec())[0] for t in targets},
        "dense": wd.result("dense")[metric],
        "methods": methods,
        "separate_from": args.separate_from or None,
        "cost_flops": {m: costs[m] / args.seeds for m in costs},
        "seconds": {m: seconds[m] / args.seeds for m in seconds},
        "one_member_flops": one_member,
        "family": {k: cfg.family[k] for k in ("steps", "members_per_step", "lr")},
        "overrides": args.set,
        "finetune_steps": ft.steps,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"family_{args.name}"
    checkpoint.write_json_atomic(stem.with_suffix(".json"), out)
    stem.with_suffix(".md").write_text(render(out))
    plot(out, stem.with_suffix(".png"))
    print(f"[bench] wrote {stem}.json/.md/.png")


def render(out: dict) -> str:
    """The markdown table: one row per method, one column per size, costs in units of one member."""
    targets = sorted(out["params_frac"], key=lambda t: -out["params_frac"][t])
    pct = out["metric"] == "accuracy"
    fmt = lambda s: (
        f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}" if pct else f"{s['mean']:.2f} ± {s['std']:.2f}"
    )
    head = [
        "method",
        *[f"{t} ({out['params_frac'][t]:.0%})" for t in targets],
        "FLOPs (x one member)",
        "seconds",
    ]
    lines = [f"# Weight family vs separate members ({out['seeds']} seeds, {out['metric']})", ""]
    lines += [f"Dense {out['metric']}: {out['dense']:.4f}. Drawn by name: {', '.join(out['grid'])}.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, per in out["methods"].items():
        cells = [fmt(per[t]) if t in per else "–" for t in targets]
        ratio = out["cost_flops"][m] / out["one_member_flops"]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {ratio:.2f} | {out['seconds'][m]:.0f} |")
    fam, sep = out["methods"]["family"], out["methods"].get("separate", {})
    scale = 100 if pct else 1
    diff = lambda t: f"{scale * (fam[t]['mean'] - sep[t]['mean']):+.2f}" if t in sep else "–"
    lines.append("| family − separate | " + " | ".join(diff(t) for t in targets) + " | | |")
    lines += ["", "Sizes never drawn by name against the straight line between their drawn neighbours:", ""]
    frac = out["params_frac"]
    for t in targets:
        above = [g for g in out["grid"] if frac[g] > frac[t]]
        below = [g for g in out["grid"] if frac[g] < frac[t]]
        if t in out["grid"] or not above or not below:
            continue
        hi, lo = min(above, key=frac.get), max(below, key=frac.get)
        w = (frac[t] - frac[lo]) / (frac[hi] - frac[lo])
        line = w * fam[hi]["mean"] + (1 - w) * fam[lo]["mean"]
        lines.append(f"- {t}: {scale * fam[t]['mean']:.2f} against {scale * line:.2f} ({lo} to {hi})")
    return "\n".join(lines) + "\n"


def plot(out: dict, filename: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    scale = 100 if out["metric"] == "accuracy" else 1
    for m, per in out["methods"].items():
        ts = sorted(per, key=lambda t: out["params_frac"][t])
        xs = [out["params_frac"][t] for t in ts]
        ys, errs = [scale * per[t]["mean"] for t in ts], [scale * per[t]["std"] for t in ts]
        ratio = out["cost_flops"][m] / out["one_member_flops"]
        ax.errorbar(xs, ys, errs, fmt=".-", capsize=3, label=f"{m} ({ratio:.1f}x one member)")
    ax.axhline(scale * out["dense"], color="0.6", ls=":", label="dense")
    ax.set_xlabel("kept params (fraction of dense)")
    ax.set_ylabel(out["metric"] + (" (%)" if scale == 100 else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(filename, dpi=120)


if __name__ == "__main__":
    main()
