r"""Which SPP form makes the better path? Same dense model, same data, same targets; masked accuracy.

  python bench/modes.py --workdir workdirs/vit_fmnist --out modes.json

Reuses the dense classifier of a finished run (WORKDIR/dense), then for each mode setting below runs the
search (same steps, batch and data order as the run) in WORKDIR/modes/<name>, extracts the run's targets
and reports the accuracy of each binary-masked sub-network BEFORE fine-tuning (the path's own quality),
plus the search wall time. Fine-tuning would blur the comparison and costs minutes per model on a CPU.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ml_collections

from spp_jax import checkpoint, data, run

MODES = {
    "official": dict(mode="official"),
    # Paper form: kappa * alpha = 0.05 is far below the stability bound nu / (1 + nu L) for L < 20.
    "paper": dict(mode="paper", lr=0.05, kappa=1.0, nu=10.0, lam=0.5),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="a finished launch/train.py workdir")
    ap.add_argument("--modes", default=",".join(MODES), help="comma separated subset of " + ",".join(MODES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    base = Path(args.workdir)
    cfg = ml_collections.ConfigDict(json.loads((base / "config.json").read_text()))
    train_src, eval_src = run.sources(cfg)
    adapter = run.build_adapter(cfg, data.num_classes(cfg.data.dataset, cfg.data.data_dir or None))
    _, params, _ = checkpoint.load_pruned(base / "dense")
    results = {}
    for name in args.modes.split(","):
        c = ml_collections.ConfigDict(cfg.to_dict())
        with c.unlocked():
            c.search.update({k: v for k, v in MODES[name].items()})
            c.search.eval_points = False
        wd = run.Workdir(base / "modes" / name)
        shutil.rmtree(wd.path / "search", ignore_errors=True)
        (wd.path / "results" / "search.json").unlink(missing_ok=True)
        t0 = time.perf_counter()
        run.stage_search(c, wd, adapter, params, train_src, eval_src)
        seconds = time.perf_counter() - t0
        targets = run.extract_targets(c, wd, adapter, params, eval_src, c.extract.targets)
        results[name] = {
            "search": MODES[name],
            "search_seconds": seconds,
            "accuracy_masked": {t["target"]: t["accuracy_masked"] for t in targets},
        }
        print(name, json.dumps(results[name]), flush=True)
    print(f"{'mode':10s} " + " ".join(f"{t:>12s}" for t in cfg.extract.targets) + "   search s")
    for name, r in results.items():
        accs = " ".join(f"{r['accuracy_masked'][t]:12.4f}" for t in cfg.extract.targets)
        print(f"{name:10s} {accs}   {r['search_seconds']:.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
