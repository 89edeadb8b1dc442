r"""Does the path earn its place? Every ranking on one dense model, same targets, several seeds.

  python bench/quality.py --workdir workdirs/vit_fmnist --seeds 3 \
      [--rankings spp,official,paper,random,magnitude,taylor,fisher] [--allocation global] \
      [--targets params:0.9,params:0.8,params:0.7,params:0.5,flops:0.5] [--name vit_fmnist]

Reuses the dense model and config of a finished run (WORKDIR/dense, WORKDIR/config.json). For each seed s:
- SPP rankings run a search of the run's length with data seed s (`spp` = the run's search settings,
  `official` / `paper` = the two forms with the settings below) in WORKDIR/quality/<ranking>/seed<s>;
- baselines (spp_jax/baselines.py) score the dense model: random with seed s, taylor and fisher on
  `extract.score_batches` batches of the search data in seed-s order, magnitude once (no randomness);
- every ranking, re-ranked by --allocation, selects every target; the binary-masked dense model (equal to
  the extracted one, tests/test_extraction.py) is evaluated on the run's eval split, BEFORE fine-tuning.
Reports mean, std and per-seed accuracy per ranking and target, each ranking's wall time, and Kendall's
tau between the first two seeds' orders of each seeded ranking. Writes bench/results/quality_<name>.json,
a markdown table (.md) and a plot (.png) of accuracy against kept block params.
Not yet measured here: accuracy after fine-tuning, and the kappa/lam sensitivity sweep.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import ml_collections
import numpy as np

from configs.vit import get_config
from spp_jax import baselines, checkpoint, finetune, run, selection
from spp_jax.run_config import add_missing_keys
from spp_jax.workdir import Workdir

FORMS = {
    "official": dict(mode="official"),
    "paper": dict(mode="paper", lr=0.2, kappa=10.0, nu=100.0, lam=0.1, base="sgd", shrink="l1"),
}
RESULTS = Path(__file__).resolve().parent / "results"


def spp_record(cfg, name: str, seed: int, base: Path, adapter, params, train_src, eval_src):
    """(final path point, search seconds) of a search with seed `seed`; a finished search in
    WORKDIR/quality/<name>/seed<s> is reused with the seconds it took then."""
    c = ml_collections.ConfigDict(cfg.to_dict())
    with c.unlocked():
        c.seed = seed
        c.search.update(FORMS.get(name, {}))
        c.search.eval_points = False
    wd = Workdir(base / "quality" / name / f"seed{seed}").create()
    result = run.stage_search(c, wd, adapter, params, train_src, eval_src)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rankings", default="spp,official,paper,random,magnitude,taylor,fisher")
    ap.add_argument("--allocation", default="global", choices=baselines.ALLOCATIONS)
    ap.add_argument("--targets", default="params:0.9,params:0.8,params:0.7,params:0.5,flops:0.5")
    ap.add_argument("--name", default="vit_fmnist")
    args = ap.parse_args()

    base = Path(args.workdir)
    cfg = ml_collections.ConfigDict(json.loads((base / "config.json").read_text()))
    add_missing_keys(cfg, get_config())
    train_src, eval_src = run.sources(cfg)
    adapter = run.build_adapter(cfg)
    spec = adapter.mask_spec()
    _, params, _ = checkpoint.load_pruned(base / "dense")
    eval_step = jax.jit(finetune.make_eval_step(adapter.module().apply))
    eval_batches = list(run.eval_batches(cfg, eval_src))
    dense = finetune.evaluate(eval_step, params, eval_batches)
    targets, rankings = args.targets.split(","), args.rankings.split(",")
    print(f"dense accuracy {dense:.4f}; {len(eval_batches)} eval batches", flush=True)

    acc = {r: {t: [] for t in targets} for r in rankings}
    kept = {r: {t: [] for t in targets} for r in rankings}
    seconds = {r: [] for r in rankings}
    records: dict[str, list] = {r: [] for r in rankings}
    for seed in range(args.seeds):
        for r in rankings:
            if r == "magnitude" and seed > 0:  # deterministic: one score serves every seed
                rec = records[r][0]
                seconds[r].append(seconds[r][0])
            else:
                if r in ("spp", *FORMS):
                    rec, took = spp_record(cfg, r, seed, base, adapter, params, train_src, eval_src)
                else:
                    t0 = time.perf_counter()
                    rec = run.ranking_record(cfg, adapter, params, train_src, r, seed)
                    took = time.perf_counter() - t0
                seconds[r].append(took)
            records[r].append(rec)
            alloc = baselines.allocate(spec, rec, args.allocation)
            for t in targets:
                keep = selection.select_subnetwork(spec, alloc, t, round_to=cfg.extract.round_to)
                masks = {k: np.asarray(v, np.float32) for k, v in keep.items()}
                acc[r][t].append(finetune.evaluate(eval_step, params, eval_batches, masks))
                kept[r][t].append(selection.keep_summary(spec, keep)["block_params_fraction"])
            print(f"seed {seed} {r:10s} " + " ".join(f"{t}={acc[r][t][-1]:.4f}" for t in targets)
                  + f"  ({seconds[r][-1]:.0f}s)", flush=True)  # fmt: skip

    taus = {r: kendall_tau(spec, records[r][0], records[r][1]) for r in rankings if len(records[r]) > 1}
    out = {
        "command": " ".join(sys.argv),
        "dense_accuracy": dense,
        "allocation": args.allocation,
        "seeds": args.seeds,
        "eval_examples": len(eval_src) if hasattr(eval_src, "__len__") else None,
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
    lines = [
        f"Binary-masked accuracy before fine-tuning, mean ± std over {args.seeds} seed(s); "
        f"dense {dense:.1%}; allocation {args.allocation}.",
        "",
        "| ranking | " + " | ".join(targets) + " | seconds | tau(seed 0, 1) |",
        "|---|" + "---|" * (len(targets) + 2),
    ]
    for r in rankings:
        cells = [f"{np.mean(acc[r][t]):.1%} ± {np.std(acc[r][t]):.1%}" for t in targets]
        tau = f"{taus[r]:.2f}" if r in taus else "–"
        lines.append(f"| {r} | " + " | ".join(cells) + f" | {np.mean(seconds[r]):.0f} | {tau} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(stem.with_suffix(".png"), rankings, targets, acc, kept, dense)


def _plot(path: Path, rankings, targets, acc, kept, dense: float) -> None:
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
    ax.set_ylabel("accuracy before fine-tuning")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
