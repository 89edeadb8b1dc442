"""Cost of one SPP search step against one full fine-tuning step, same model, batch and machine.

    python bench/search_step.py --variant S/16 --batch 32 --image_size 224 --steps 3 [--out result.json]
    python bench/search_step.py --arch llama --variant smollm2-135m --batch 4 --seq 2048 \
        [--mode curvature] [--peak_tflops 494.7] [--dtype bfloat16 --attention cudnn]

Search step: `make_search_step(module.apply, spec, spp("official"))`, jitted: loss gradient w.r.t. the
masks only (weights frozen, passed as an argument) plus the SPP mask update. Fine-tuning step: loss
gradient w.r.t. ALL weights, `optax.adamw` update, `optax.apply_updates`, jitted. Both use random
weights (`module.init`, float32) and random images/labels; `--dtype` is the model's compute dtype
(spp_jax/models/vit.py) and `--attention` its attention core. Each is compiled first (compile time
reported), run once to warm up, then timed over --steps calls with `jax.block_until_ready`; median and
min reported.

Model FLOPs utilisation (MFU, with --peak_tflops: the device's peak for the compute dtype): a search step's
work is the forward pass and the backward pass through the activations, 2 x 2 x MACs per example (no
weight gradients), a fine-tuning step's the usual 3 x 2 x MACs; MACs are the adapter's counted cost
(`arch_cost`). XLA's own FLOP count of each compiled step (`cost_analysis`) is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from spp_jax.allocator import use_tcmalloc
from spp_jax.finetune import init_train_state, make_train_step
from spp_jax.search import init_search_state, make_search_step
from spp_jax.spp import spp


def time_compiled(fn, args, steps: int, carry: int) -> dict:
    """Compile `fn(*args)`, warm up once, then time `steps` calls; outputs[:carry] feed the next call."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    args = list(args)
    out = jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(steps):
        args[:carry] = out[:carry]
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return {
        "xla_flops": float(cost.get("flops", 0.0)) if cost else None,
        "compile_s": compile_s,
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "times_ms": [1e3 * t for t in times],
    }


def build(a) -> tuple:
    """(adapter, task, params, batch) for --arch, random weights and data."""
    k_init, k_x, k_y = jax.random.split(jax.random.key(a.seed), 3)
    groups = tuple(a.groups.split(","))
    compute = dict(dtype=getattr(a, "dtype", "float32"), attention=getattr(a, "attention", "xla"))
    if a.arch == "vit":
        from spp_jax.adapters import ViTAdapter
        from spp_jax.models.vit import vit_config
        from spp_jax.tasks.image_classification import ImageClassification

        adapter = ViTAdapter(
            vit_config(a.variant, image_size=a.image_size, num_classes=a.num_classes, **compute), groups
        )
        images = jax.random.normal(k_x, (a.batch, a.image_size, a.image_size, 3), jnp.float32)
        batch = {"image": images, "label": jax.random.randint(k_y, (a.batch,), 0, a.num_classes)}
        task, example = ImageClassification(), images[:1]
    else:
        import dataclasses

        from spp_jax.adapters.llama import LlamaAdapter
        from spp_jax.models.llama import llama_config
        from spp_jax.tasks.causal_lm import CausalLM

        config = llama_config(a.variant)
        config = dataclasses.replace(
            config, cost_seq_len=a.seq, max_len=max(config.max_len, a.seq), **compute
        )
        adapter = LlamaAdapter(config, groups)
        tokens = jax.random.randint(k_x, (a.batch, a.seq + 1), 0, config.vocab_size)
        batch, task, example = {"tokens": tokens}, CausalLM(), tokens[:1, :8]
    params = adapter.module().init(k_init, example)["params"]
    return adapter, task, params, batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit", choices=["vit", "llama"])
    ap.add_argument("--variant", default="S/16", help="a vit_config or llama_config variant")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image_size", type=int, default=224)
    ap.add_argument("--seq", type=int, default=256, help="llama: tokens per sequence")
    ap.add_argument("--num_classes", type=int, default=1000)
    ap.add_argument("--groups", default="qk,vo,mlp", help="mask groups, comma separated")
    ap.add_argument("--mode", default="official", help="SPP form of the search step")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per kind (after one warm-up)")
    ap.add_argument("--dtype", default="float32", help="compute dtype: float32 | bfloat16")
    ap.add_argument("--attention", default="xla", help="attention core: xla | cudnn (GPU, bfloat16)")
    ap.add_argument("--peak_tflops", type=float, default=None, help="device peak for the MFU column")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    use_tcmalloc()  # as the launch scripts run (spp_jax/allocator.py)

    adapter, task, params, batch = build(a)
    spec = adapter.mask_spec()
    n_params = sum(x.size for x in jax.tree.leaves(params))
    macs = adapter.arch_cost(adapter.dense_spec())[1]
    per_example = macs * (a.seq if a.arch == "llama" else 1)  # llama MACs are per token

    # Search step: masks only, frozen weights.
    mask_tx = spp(a.mode)
    search_step = make_search_step(
        adapter.module().apply, spec, mask_tx, task=task, curvature=a.mode == "curvature"
    )
    state = init_search_state(spec, mask_tx)
    search = time_compiled(search_step, (state, params, batch), a.steps, carry=1)

    # Full fine-tuning step: grads w.r.t. all weights, AdamW.
    tx = optax.adamw(1e-4, weight_decay=0.05)
    train_step = make_train_step(adapter.module().apply, tx, task=task)
    finetune = time_compiled(train_step, (init_train_state(params, tx), batch), a.steps, carry=1)

    model_flops = {"search": 4 * per_example * a.batch, "finetune": 6 * per_example * a.batch}
    for kind, r in (("search", search), ("finetune", finetune)):
        r["model_flops"] = model_flops[kind]
        r["model_tflops_per_s"] = model_flops[kind] / (r["median_ms"] / 1e3) / 1e12
        if a.peak_tflops:
            r["mfu"] = r["model_tflops_per_s"] / a.peak_tflops
    result = {
        "arch": a.arch,
        "variant": a.variant,
        "batch": a.batch,
        "image_size": a.image_size if a.arch == "vit" else None,
        "seq": a.seq if a.arch == "llama" else None,
        "mode": a.mode,
        "dtype": a.dtype,
        "attention": a.attention,
        "steps": a.steps,
        "params": int(n_params),
        "groups": {g.name: {"depth": g.depth, "size": g.size, "entries": g.num_entries} for g in spec.groups},
        "search": search,
        "finetune": finetune,
        "ratio_median": search["median_ms"] / finetune["median_ms"],
        "ratio_min": search["min_ms"] / finetune["min_ms"],
        "peak_tflops": a.peak_tflops,
        "device": str(jax.devices()[0]),
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
    }
    print(f"device {result['device_kind']} ({os.cpu_count()} CPUs), jax {jax.__version__}")
    print(f"{a.arch} {a.variant}: {n_params:,} params; mask groups: " + ", ".join(
        f"{g.name} {g.depth}x{g.size}={g.num_entries}" for g in spec.groups
    ))  # fmt: skip
    print(f"{'kind':9} {'median ms':>10} {'min ms':>9} {'compile s':>9} {'model TFLOP/s':>13} {'MFU':>6}")
    for kind, r in (("search", search), ("finetune", finetune)):
        mfu = f"{r['mfu']:.1%}" if "mfu" in r else "-"
        print(
            f"{kind:9} {r['median_ms']:10.1f} {r['min_ms']:9.1f} {r['compile_s']:9.2f} "
            f"{r['model_tflops_per_s']:13.2f} {mfu:>6}"
        )
    print(f"search / finetune: {result['ratio_median']:.3f} (median), {result['ratio_min']:.3f} (min)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
