"""Helpers shared by the checkpoint importers: array conversion, strict key reading, shape checks."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from spp_jax.errors import CheckpointMismatch
from spp_jax.models.vit import ViTConfig

Params = dict[str, Any]


def to_numpy(x: Any) -> np.ndarray:
    """A writable float32 numpy copy of a numpy / jax / torch array."""
    if hasattr(x, "detach"):  # torch tensor, without importing torch
        x = x.detach().cpu().float().numpy()
    return np.array(x, dtype=np.float32)


def load_flat(path_or_dict: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A flat {name: array} dict from a mapping, a `.safetensors` file or an `.npz` file."""
    if isinstance(path_or_dict, Mapping):
        return {str(k): to_numpy(v) for k, v in path_or_dict.items()}
    path = os.fspath(path_or_dict)
    if not os.path.exists(path):
        raise CheckpointMismatch(f"checkpoint file {path!r} does not exist; check the path")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return {k: to_numpy(v) for k, v in load_file(path).items()}
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            return {k: to_numpy(z[k]) for k in z.files}
    raise CheckpointMismatch(
        f"checkpoint {path!r} has an unsupported format; use a .safetensors or .npz file"
    )


class KeyReader:
    """Takes arrays out of a flat checkpoint by name; every miss or leftover is a `CheckpointMismatch`."""

    def __init__(
        self,
        flat: Mapping[str, np.ndarray],
        source: str,
        fix: str = "fix the config (width, heads, mlp_dim, patch, posemb grid, num_classes)",
        model: str = "ViT",
    ):
        self.flat = dict(flat)
        self.used: set[str] = set()
        self.source, self.fix, self.model = source, fix, model

    def has(self, key: str) -> bool:
        return key in self.flat

    def take(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        """The array `key`, which must have `shape` (the shape the config expects)."""
        if key not in self.flat:
            raise CheckpointMismatch(
                f"{self.source}: missing key {key!r} (expected an array of shape {shape}); "
                "the checkpoint does not match the config"
            )
        arr = self.flat[key]
        if tuple(arr.shape) != tuple(shape):
            raise CheckpointMismatch(
                f"{self.source}: {key!r} has shape {tuple(arr.shape)} but the config expects {tuple(shape)}; "
                f"{self.fix}"
            )
        self.used.add(key)
        return arr

    def ignore(self, prefix: str) -> None:
        """Mark every key starting with `prefix` as consumed (e.g. a head the config drops)."""
        self.used.update(k for k in self.flat if k.startswith(prefix))

    def finish(self) -> None:
        """Raise if any key was not consumed (the checkpoint has parts the config does not model)."""
        left = sorted(set(self.flat) - self.used)
        if left:
            raise CheckpointMismatch(
                f"{self.source}: unexpected key {left[0]!r} ({len(left)} unused in all); "
                f"the checkpoint has parts this {self.model} config does not model"
            )


def head_features(config: ViTConfig) -> int:
    """Input width of the classifier head for the config's pooling."""
    return config.width * (2 if config.pool == "cls+gap" else 1)


def with_zero_head(params: Params, config: ViTConfig) -> Params:
    """`params` plus a zero head [F, num_classes] when the config has classes (as the model inits it)."""
    params = {k: v for k, v in params.items() if k != "head"}
    if config.num_classes:
        f = head_features(config)
        params["head"] = {
            "kernel": np.zeros((f, config.num_classes), np.float32),
            "bias": np.zeros((config.num_classes,), np.float32),
        }
    return params


def torch_linear(r: KeyReader, key: str, n_in: int, n_out: int, bias: bool = True) -> Params:
    """A torch Linear `key` ([out, in] weight) as a Flax Dense ({"kernel": [in, out], "bias": [out]})."""
    out = {"kernel": np.ascontiguousarray(r.take(f"{key}.weight", (n_out, n_in)).T)}
    if bias:
        out["bias"] = r.take(f"{key}.bias", (n_out,))
    return out


def torch_layer_norm(r: KeyReader, key: str, n: int) -> Params:
    """A torch LayerNorm `key` as a Flax LayerNorm ({"scale", "bias"})."""
    return {"scale": r.take(f"{key}.weight", (n,)), "bias": r.take(f"{key}.bias", (n,))}


def torch_conv(r: KeyReader, key: str, n_in: int, n_out: int, k: int) -> Params:
    """A torch Conv2d `key` ([out, in, k, k]) as a Flax Conv ({"kernel": [k, k, in, out], "bias"})."""
    w = r.take(f"{key}.weight", (n_out, n_in, k, k))
    return {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0)), "bias": r.take(f"{key}.bias", (n_out,))}
