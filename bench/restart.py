"""What the persistent compilation cache saves a restarted run: wall time of whole `launch/train.py` runs.

    python bench/restart.py [--config configs/vit.py:mu] [--steps 60] [--runs 3] [--out results/restart.json]

Each run is a new process, `launch/train.py --until search` into a new workdir, as a resume after a
preemption or a kill starts (the dense stage, the search's compile and its steps). The kinds alternate:
`off` (`--compilation_cache=off`: every process compiles everything) and `cached` (one cache directory
for all runs of the benchmark, filled by a first run reported apart as `cold`). Every program
is cached (`JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0`: the tiny configs compile in under a second,
below JAX's default threshold); `--min_compile_secs 1` measures JAX's default. A first run, not timed,
builds the dataset.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_once(args, workdir: Path, data_dir: Path, cache: str, env: dict) -> float:
    cmd = [
        sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / args.config),
        f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", f"--config.search.steps={args.steps}",
        "--until=search", f"--compilation_cache={cache}",
    ]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/vit.py:mu")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--min_compile_secs", type=float, default=0.0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(args.min_compile_secs)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = tmp / "xla_cache"
        run_once(args, tmp / "warmup", tmp / "tfds", "off", env)  # builds the dataset
        times: dict[str, list[float]] = {"off": [], "cold": [], "cached": []}
        rounds = [("off", "cached") if i % 2 == 0 else ("cached", "off") for i in range(args.runs)]
        for i, kind in enumerate(["cold", *(k for r in rounds for k in r)]):
            setting = "off" if kind == "off" else str(cache)
            wall = run_once(args, tmp / f"run{i}", tmp / "tfds", setting, env)
            times[kind].append(wall)
            print(f"{kind:>6} {wall:.1f} s", flush=True)
        entries = sum(1 for f in cache.iterdir() if f.is_file())
    summary = {k: {"median_s": statistics.median(v), "all_s": v} for k, v in times.items() if v}
    ratio = summary["cached"]["median_s"] / summary["off"]["median_s"]
    print(f"median: off {summary['off']['median_s']:.1f} s, cached {summary['cached']['median_s']:.1f} s "
          f"(x{ratio:.2f}), cold {summary['cold']['median_s']:.1f} s; {entries} cache files")  # fmt: skip
    if args.out:
        result = {"args": vars(args), "cache_files": entries, "cached_over_off": ratio, **summary}
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
