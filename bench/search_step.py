"""Cost of one SPP search step against one full fine-tuning step, same model, batch and machine.

    python bench/search_step.py --variant S/16 --batch 32 --image_size 224 --steps 3 [--out result.json]

Search step: `make_search_step(module.apply, spec, spp("official"))`, jitted: loss gradient w.r.t. the
masks only (weights frozen, passed as an argument) plus the SPP mask update. Fine-tuning step: loss
gradient w.r.t. ALL weights, `optax.adamw` update, `optax.apply_updates`, jitted. Both use random
weights (`module.init`) and random images/labels. Each is compiled first (compile time reported), run
once to warm up, then timed over --steps calls with `jax.block_until_ready`; median and min reported.
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

from spp_jax.adapters import ViTAdapter
from spp_jax.models.vit import VARIANTS, vit_config
from spp_jax.search import init_search_state, make_search_step
from spp_jax.spp import spp
from spp_jax.tasks.image_classification import classification_loss


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
    return {
        "compile_s": compile_s,
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "times_ms": [1e3 * t for t in times],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="S/16", choices=sorted(VARIANTS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image_size", type=int, default=224)
    ap.add_argument("--num_classes", type=int, default=1000)
    ap.add_argument("--groups", default="qk,vo,mlp", help="mask groups, comma separated")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per kind (after one warm-up)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()

    config = vit_config(a.variant, image_size=a.image_size, num_classes=a.num_classes)
    adapter = ViTAdapter(config, tuple(a.groups.split(",")))
    spec, module = adapter.mask_spec(), adapter.module()
    k_init, k_img, k_lab = jax.random.split(jax.random.key(a.seed), 3)
    images = jax.random.normal(k_img, (a.batch, a.image_size, a.image_size, 3), jnp.float32)
    batch = {"image": images, "label": jax.random.randint(k_lab, (a.batch,), 0, a.num_classes)}
    params = module.init(k_init, images[:1])["params"]
    n_params = sum(x.size for x in jax.tree.leaves(params))

    # Search step: masks only, frozen weights.
    mask_tx = spp("official")
    search_step = make_search_step(module.apply, spec, mask_tx)
    state = init_search_state(spec, mask_tx)
    search = time_compiled(search_step, (state, params, batch), a.steps, carry=1)

    # Full fine-tuning step: grads w.r.t. all weights, AdamW.
    tx = optax.adamw(1e-4, weight_decay=0.05)

    def finetune_step(params, opt_state, batch):
        def loss_of(p):
            return classification_loss(
                module.apply({"params": p}, batch["image"], train=True), batch["label"]
            )

        (loss, _), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    finetune = time_compiled(finetune_step, (params, tx.init(params), batch), a.steps, carry=2)

    result = {
        "variant": a.variant,
        "batch": a.batch,
        "image_size": a.image_size,
        "steps": a.steps,
        "params": int(n_params),
        "groups": {g.name: {"depth": g.depth, "size": g.size, "entries": g.num_entries} for g in spec.groups},
        "search": search,
        "finetune": finetune,
        "ratio_median": search["median_ms"] / finetune["median_ms"],
        "ratio_min": search["min_ms"] / finetune["min_ms"],
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
    }
    print(f"device {result['device']} ({os.cpu_count()} CPUs), jax {jax.__version__}")
    print(f"{a.variant}: {n_params:,} params; mask groups: " + ", ".join(
        f"{g.name} {g.depth}x{g.size}={g.num_entries}" for g in spec.groups
    ) + f" ({sum(g.num_entries for g in spec.groups)} entries)")  # fmt: skip
    print(f"{'variant':8} {'batch':>5} {'px':>4} {'kind':9} {'median ms':>10} {'min ms':>9} {'compile s':>9}")
    for kind, r in (("search", search), ("finetune", finetune)):
        print(
            f"{a.variant:8} {a.batch:5d} {a.image_size:4d} {kind:9} {r['median_ms']:10.1f} "
            f"{r['min_ms']:9.1f} {r['compile_s']:9.2f}"
        )
    print(f"search / finetune: {result['ratio_median']:.3f} (median), {result['ratio_min']:.3f} (min)")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
