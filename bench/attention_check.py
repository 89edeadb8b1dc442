"""On a GPU: spp_jax's fused cuDNN attention core against the einsum core, bfloat16 compute, same weights.

    python bench/attention_check.py [--out result.json]

For ViT-B/16 at 224 px (197 tokens: odd, so `fused_attention` pads) and the SmolLM2-135M shape at 2047
(odd, causal) tokens: the loss, the mask gradients of the batch (the official form's) and the
per-example mask gradients under `jax.vmap` (the curvature form's), each as the largest difference relative
to the einsum core's largest entry. Both cores run in bfloat16, so differences of a few bfloat16 ulps (~1e-2
relative) are expected; a wrong mask or padding shows as O(1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from search_step import build

from spp_jax.tasks import model_loss


def compare(arch: str, variant: str, batch: int, image_size: int = 224, seq: int = 2048) -> dict:
    a = SimpleNamespace(arch=arch, variant=variant, batch=batch, image_size=image_size, seq=seq, seed=0,
                        num_classes=10, groups="qk,vo,mlp", dtype="bfloat16", attention="xla")  # fmt: skip
    adapter, task, params, data = build(a)
    if arch == "vit":  # a random head: the zero-initialised one gives zero mask gradients
        head = params["head"]
        params = {
            **params,
            "head": {**head, "kernel": 0.02 * jax.random.normal(jax.random.key(1), head["kernel"].shape)},
        }
    rng = np.random.default_rng(0)
    masks = {
        k: jnp.asarray(0.5 + rng.random(m.shape), jnp.float32)
        for k, m in adapter.mask_spec().init_masks().items()
    }
    out = {
        "arch": arch,
        "variant": variant,
        "batch": batch,
        "tokens": adapter.config.num_tokens if arch == "vit" else seq,
    }
    res = {impl: _loss_and_grads(adapter, impl, task, params, masks, data) for impl in ("xla", "cudnn")}
    (l0, g0, p0), (l1, g1, p1) = res["xla"], res["cudnn"]
    rel = lambda x, y: float(
        np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)).max()
        / np.abs(np.asarray(x, np.float32)).max()
    )
    out["loss"] = {"xla": l0, "cudnn": l1, "rel_diff": abs(l0 - l1) / abs(l0)}
    out["grad_rel_diff"] = {k: rel(g0[k], g1[k]) for k in g0}
    out["per_example_grad_rel_diff"] = {k: rel(p0[k], p1[k]) for k in p0}
    print(json.dumps(out), flush=True)
    return out


def _loss_and_grads(adapter, impl: str, task, params, masks, data) -> tuple:
    """(loss, batch mask gradients, per-example mask gradients) with attention core `impl`."""
    ad = dataclasses.replace(adapter, config=dataclasses.replace(adapter.config, attention=impl))
    apply = ad.module().apply

    def loss(m, d, p):  # the weights are an argument: closed over, XLA constant-folds the 28M-entry head
        return model_loss(apply, task, p, d, masks=m, train=False)[0]

    def one(m, d, p):  # one example, as the curvature form differentiates it
        return loss(m, jax.tree.map(lambda x: x[None], d), p)

    value, grads = jax.jit(jax.value_and_grad(loss))(masks, data, params)
    per_example = jax.jit(jax.vmap(jax.grad(one), in_axes=(None, 0, None)))(masks, data, params)
    return float(value), jax.device_get(grads), jax.device_get(per_example)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", default="vit,llama", help="which checks: vit, llama")
    a = ap.parse_args()
    rows = [compare("vit", "B/16", 4)] if "vit" in a.rows else []
    rows += [compare("llama", "smollm2-135m", 2, seq=2047)] if "llama" in a.rows else []
    if a.out:
        with open(a.out, "w") as f:
            json.dump(
                {"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
