"""Tiny models and random data shared by the tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.adapters import ViTAdapter
from spp_jax.models.vit import vit_config


def mu_adapter(groups=("qk", "vo", "mlp"), **overrides) -> ViTAdapter:
    return ViTAdapter(vit_config("mu", **{"num_classes": 5, **overrides}), tuple(groups))


def random_params(adapter: ViTAdapter, seed: int = 0, scale: float = 0.1):
    """Init params, then perturb every leaf (the zero-init head and LayerScale would hide bugs)."""
    c = adapter.config
    x = jnp.zeros((1, c.image_size, c.image_size, 3))
    params = adapter.module().init(jax.random.key(seed), x)["params"]
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(tree, leaves)


def random_images(adapter: ViTAdapter, n: int = 4, seed: int = 0) -> jax.Array:
    c = adapter.config
    return jax.random.normal(jax.random.key(seed), (n, c.image_size, c.image_size, 3))


def random_keep(spec, rng: np.random.Generator, p: float = 0.5) -> dict[str, np.ndarray]:
    return {g.name: rng.random(g.shape) < p for g in spec.groups}


def as_masks(keep) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v, jnp.float32) for k, v in keep.items()}


def write_synthetic_fashion_mnist(directory) -> None:
    """Fashion-MNIST-format IDX files whose class c images are bright in column block c (learnable, fast)."""
    from spp_jax.data.fashion_mnist import write_idx

    rng = np.random.default_rng(0)
    for split, n in (("train", 320), ("t10k", 160)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            images[i, :, 2 * c : 2 * c + 6] += 150
        write_idx(directory / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", labels)


def tree_snapshot(root) -> dict[str, tuple]:
    """Every path under `root` with its kind, size and content hash ({} if `root` does not exist):
    equal snapshots, equal trees."""
    import hashlib
    import os
    from pathlib import Path

    root = Path(root)
    file_entry = lambda p: ("file", p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    if not root.exists() and not root.is_symlink():
        return {}
    if root.is_file():
        return {".": file_entry(root)}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_dir():
            out[rel] = ("dir",)
        else:
            out[rel] = file_entry(p)
    return out
