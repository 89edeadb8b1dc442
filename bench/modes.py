r"""Which SPP form makes the better path? Same dense model, same data, same targets; masked accuracy.

  python bench/modes.py --workdir workdirs/vit_fmnist --out modes.json

Reuses the dense classifier of a finished run (WORKDIR/dense), then for each mode setting below runs the
search (same steps, batch and data order as the run) in WORKDIR/modes/<name>, extracts the run's targets
and reports the accuracy of each binary-masked sub-network BEFORE fine-tuning (the path's own quality),
plus the search wall time. Fine-tuning would blur the comparison and costs minutes per model on a CPU.
A "random" row ranks the entries at random (same targets): the floor a useful path must beat.
A finished search in WORKDIR/modes/<name> is reused (delete it to rerun).
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ml_collections

from spp_jax import baselines, checkpoint, selection
from spp_jax.stages.context import make_context
from spp_jax.stages.dense import evaluate_params
from spp_jax.stages.extract import extract_targets
from spp_jax.stages.search import stage_search
from spp_jax.workdir import Workdir

_OFFICIAL = dict(mode="official", lr=2e-2, steps=200, path_every=20)  # the settings these rows were run with
MODES = {
    "official": _OFFICIAL,
    # The official form with a 4x smaller step and 3.5x the steps: more gradient averaging before entries.
    "official-slow": _OFFICIAL | dict(lr=5e-3, steps=700, path_every=50),
    # The official form searching on 5k images the probe head was NOT fitted on.
    "official-heldout": _OFFICIAL | dict(search_split="train[5000:10000]"),
    # Paper form: kappa * alpha = 0.05 is far below the stability bound nu / (1 + nu L) for L < 20.
    "paper": dict(mode="paper", lr=0.05, kappa=1.0, nu=10.0, lam=0.5, steps=200, path_every=20),
}


def random_baseline(ctx, params, targets) -> dict[str, float]:
    """Accuracy of the same targets selected from a random ranking with the same kept fraction in every
    group (spp_jax.baselines: random scores, per-group allocation). Ranking raw per-group permutations
    globally would put every qk/vo entry (ranks < 64 per layer) ahead of almost every mlp entry: that is
    MLP-only pruning, not a random floor."""
    cfg, adapter = ctx.cfg, ctx.adapter
    spec = adapter.mask_spec()
    scores = baselines.importance_scores("random", spec, seed=0)
    record = baselines.allocate(spec, baselines.score_record(spec, scores), "per_group")
    out = {}
    for t in targets:
        keep = selection.select_subnetwork(spec, record, t, round_to=cfg.extract.round_to)
        small, arch = adapter.extract(params, keep)
        out[t] = evaluate_params(ctx, small, arch)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="a finished launch/train.py workdir")
    ap.add_argument("--modes", default="official,paper", help="comma separated subset of " + ",".join(MODES))
    ap.add_argument("--targets", default=None, help="comma separated (default: the run's extract.targets)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    base = Path(args.workdir)
    cfg = ml_collections.ConfigDict(json.loads((base / "config.json").read_text()))
    ctx = make_context(cfg)
    _, params, _ = checkpoint.load_pruned(base / "dense")
    targets = args.targets.split(",") if args.targets else list(cfg.extract.targets)
    results = {}
    for name in args.modes.split(","):
        c = ml_collections.ConfigDict(cfg.to_dict())
        with c.unlocked():
            setting = dict(MODES[name])
            c.data.search_split = setting.pop("search_split", "")
            c.search.update(setting)
            c.search.eval_points = False
        wd = Workdir(base / "modes" / name).create()
        c_ctx = dataclasses.replace(ctx, cfg=c)
        seconds = stage_search(c_ctx, wd, params)["seconds"]
        extracted = extract_targets(c_ctx, wd, params, targets)
        results[name] = {
            "search": MODES[name],
            "search_seconds": seconds,
            "accuracy_masked": {t["target"]: t["accuracy_masked"] for t in extracted},
        }
        print(name, json.dumps(results[name]), flush=True)
    results["random"] = {"accuracy_masked": random_baseline(ctx, params, targets)}
    print(f"{'mode':10s} " + " ".join(f"{t:>12s}" for t in targets) + "   search s")
    for name, r in results.items():
        accs = " ".join(f"{r['accuracy_masked'][t]:12.4f}" for t in targets)
        print(f"{name:10s} {accs}   {r.get('search_seconds', 0):.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
