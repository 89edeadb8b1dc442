"""Inference throughput of the dense ViT against pruned (extracted) ones, same machine, one run.

    python bench/throughput.py --variant S/16 --batch 32 --targets params:0.3,params:0.5,params:0.7
    python bench/throughput.py --workdir runs/my_run        # the architectures of a finished run

Measures images/s of a jitted forward pass (median of --runs timed calls after compile + one warm-up,
`jax.block_until_ready`) on random images. Keep-sets come either from `DIR/extracted/*/arch_spec.json`
of a finished run (--workdir; weights are random from the spec: only the shapes matter for timing;
--variant/--image_size are then taken from the specs) or from a random ranking (random t_in) passed
through `select_subnetwork` for each --targets entry, then `adapter.extract`.
Prints target, params, GFLOPs (2 x MACs per image), img/s and speedup vs dense.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.adapters import ViTAdapter, adapter_from_spec
from spp_jax.models.vit import VARIANTS, vit_config
from spp_jax.selection import parse_target, select_subnetwork


def random_params(module, image_size: int, seed: int):
    """Random weights of the module's shapes, without running (or compiling) `module.init`."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape), s.dtype), shapes)


def images_per_second(module, params, batch: int, image_size: int, runs: int) -> float:
    x = jax.random.normal(jax.random.key(1), (batch, image_size, image_size, 3), jnp.float32)
    fwd = jax.jit(lambda p, x: module.apply({"params": p}, x)).lower(params, x).compile()
    jax.block_until_ready(fwd(params, x))  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(params, x))
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def models_from_workdir(workdir: str):
    """(name, adapter, arch_spec) for the dense model and each DIR/extracted/*/arch_spec.json."""
    files = sorted(glob.glob(os.path.join(workdir, "extracted", "*", "arch_spec.json")))
    if not files:
        raise SystemExit(f"no {workdir}/extracted/*/arch_spec.json: is this a finished run's workdir?")
    out = []
    for f in files:
        with open(f) as fh:
            spec = json.load(fh)
        adapter = adapter_from_spec(spec)
        if not out:
            out.append(("dense", adapter, adapter.dense_spec()))
        out.append((os.path.basename(os.path.dirname(f)), adapter, spec))
    return out


def models_from_random_ranking(a):
    """(name, adapter, arch_spec, params) for dense and each target, from a random t_in ranking."""
    config = vit_config(a.variant, image_size=a.image_size, num_classes=a.num_classes)
    adapter = ViTAdapter(config, tuple(a.groups.split(",")))
    spec = adapter.mask_spec()
    params = random_params(adapter.module(), a.image_size, a.seed)
    rng = np.random.default_rng(a.seed)
    record = {
        "t_in": {g.name: rng.random(g.shape) for g in spec.groups},
        "steps_in_support": {g.name: np.zeros(g.shape, np.int64) for g in spec.groups},
        "z": {g.name: np.zeros(g.shape) for g in spec.groups},
    }
    out = [("dense", adapter, adapter.dense_spec(), params)]
    for t in a.targets.split(","):
        keep = select_subnetwork(spec, record, parse_target(t), round_to=a.round_to)
        new_params, arch_spec = adapter.extract(params, keep)
        out.append((t, adapter, arch_spec, jax.tree.map(jnp.asarray, new_params)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=None, help="finished run: time DIR/extracted/*/arch_spec.json")
    ap.add_argument("--variant", default="S/16", choices=sorted(VARIANTS))
    ap.add_argument("--image_size", type=int, default=224)
    ap.add_argument("--num_classes", type=int, default=1000)
    ap.add_argument("--groups", default="qk,vo,mlp", help="mask groups, comma separated")
    ap.add_argument("--targets", default="params:0.3,params:0.5,params:0.7")
    ap.add_argument("--round_to", type=int, default=1, help="round kept dims per layer up to a multiple")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=5, help="timed forward calls per model (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()

    if a.workdir:
        models = []
        for name, adapter, spec in models_from_workdir(a.workdir):
            params = random_params(adapter.module(spec), adapter.config.image_size, a.seed)
            models.append((name, adapter, spec, params))
    else:
        models = models_from_random_ranking(a)

    rows = []
    for name, adapter, spec, params in models:
        p, macs = adapter.arch_cost(spec)
        ips = images_per_second(adapter.module(spec), params, a.batch, adapter.config.image_size, a.runs)
        rows.append({"target": name, "params": int(p), "gflops": 2 * macs / 1e9, "img_per_s": ips})
    dense = rows[0]
    for r in rows:
        r["params_frac"] = r["params"] / dense["params"]
        r["speedup"] = r["img_per_s"] / dense["img_per_s"]

    cfg = models[0][1].config
    print(f"device {jax.devices()[0]} ({os.cpu_count()} CPUs), jax {jax.__version__}; width {cfg.width}, "
          f"depth {cfg.depth}, {cfg.image_size} px, batch {a.batch}, median of {a.runs}")  # fmt: skip
    print(f"{'target':24} {'params':>12} {'% dense':>8} {'GFLOPs':>8} {'img/s':>9} {'speedup':>8}")
    for r in rows:
        print(
            f"{r['target']:24} {r['params']:12,d} {100 * r['params_frac']:7.1f}% {r['gflops']:8.3f} "
            f"{r['img_per_s']:9.1f} {r['speedup']:7.2f}x"
        )
    if a.out:
        with open(a.out, "w") as f:
            json.dump(
                {"batch": a.batch, "runs": a.runs, "image_size": cfg.image_size, "rows": rows}, f, indent=2
            )


if __name__ == "__main__":
    main()
