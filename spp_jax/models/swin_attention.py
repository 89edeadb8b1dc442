"""Shifted-window multi-head self-attention of the Swin Transformer (v1), with qk/vo/heads masks.

Window rules (the original Swin and Hugging Face `SwinModel` behaviour), for a feature map of side H x W and
the configured window w:
  - if min(H, W) <= w, the window becomes min(H, W) and the block does not shift;
  - otherwise the map (after the block's first LayerNorm) is zero-padded at the bottom/right to multiples of
    w, then cyclically rolled by -w//2 on both axes in the shifted (odd) blocks. Padded tokens take part in
    the attention as keys (their k and v are the projection biases), exactly as in Hugging Face; timm rolls
    before padding and so differs from both whenever a pad is needed.
  - in a shifted block, tokens of one window that come from non-adjacent parts of the unrolled map get -100
    added to their logits (the original's shift mask): they never attend to each other.
Relative position bias: a learned table [(2w-1)^2, heads] per block for the configured w. A window shrunk
to w' < w reads the table at its own offsets |dy|, |dx| < w' (the centre of the table), as a model built
with window w' and the centre-cropped table would.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.models.layers import Bias, LayerDims, mask_mul, sow_mask_input

Array = jax.Array
SHIFT_MASK_VALUE = -100.0  # added to the logits of token pairs the shift separated (original Swin's value)


def window_geometry(height: int, width: int, window: int, shifted: bool) -> tuple[int, int, int, int]:
    """(window, shift, padded height, padded width) of a block on a height x width map (module docstring)."""
    if min(height, width) <= window:
        win, shift = min(height, width), 0
    else:
        win, shift = window, (window // 2 if shifted else 0)
    return win, shift, -(-height // win) * win, -(-width // win) * win


@functools.cache
def relative_position_index(win: int, table_window: int) -> np.ndarray:
    """[win^2, win^2] row of the [(2*table_window-1)^2] bias table for each (query, key) pair of a window."""
    ys, xs = np.meshgrid(np.arange(win), np.arange(win), indexing="ij")
    coords = np.stack([ys.ravel(), xs.ravel()])  # [2, T], row-major over the window
    rel = coords[:, :, None] - coords[:, None, :] + (table_window - 1)  # [2, T, T], offsets >= 0
    return rel[0] * (2 * table_window - 1) + rel[1]


def to_windows(x: Array, win: int) -> Array:
    """[B, H, W, C] (H, W multiples of win) -> [B, windows, win*win, C], windows row-major over the map."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // win, win, w // win, win, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // win) * (w // win), win * win, c)


def from_windows(x: Array, win: int, height: int, width: int) -> Array:
    """Inverse of `to_windows`: [B, windows, win*win, C] -> [B, height, width, C]."""
    b, c = x.shape[0], x.shape[-1]
    x = x.reshape(b, height // win, width // win, win, win, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


@functools.cache
def shift_mask(height: int, width: int, win: int, shift: int) -> np.ndarray:
    """[windows, T, T] additive mask of a rolled (padded) height x width map: 0 where both tokens come from
    the same region of the unrolled map, -100 where the roll brought them together."""

    def regions(n: int) -> np.ndarray:
        i = np.arange(n)
        return (i >= n - win).astype(np.int64) + (i >= n - shift)

    label = regions(height)[:, None] * 3 + regions(width)[None, :]
    label = np.asarray(to_windows(label[None, :, :, None], win))[0, :, :, 0]  # [windows, T]
    same = label[:, :, None] == label[:, None, :]
    return np.where(same, 0.0, SHIFT_MASK_VALUE).astype(np.float32)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with relative position bias and qk/vo/heads masks.

    Masks as the ViT's (spp_jax.models.vit): qk [qk_dim] scales q and k channels of every head, vo [v_dim]
    the v channels, heads [num_heads] each head's output; activations are sown for wanda under
    `group_prefix + kind`. The scale stays the original 1/sqrt(head_dim), so pruned dims keep the function.
    A block without value dims (or heads) reduces to W_o's bias; it keeps its bias table while it has heads.
    `dtype` is the compute dtype; the logits, position bias and softmax stay float32.
    """

    dims: LayerDims
    width: int
    head_dim: int
    table_window: int
    group_prefix: str = ""
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, win: int, mask: np.ndarray | None, masks: Mapping[str, Array]) -> Array:
        """x: [B, windows, T, C] (T = win^2); mask: [windows, T, T] shift mask or None."""
        h, dqk, dv = self.dims.num_heads, self.dims.qk_dim, self.dims.v_dim
        n_rel = (2 * self.table_window - 1) ** 2
        if h > 0:
            table = self.param(
                "relative_position_bias_table", nn.initializers.truncated_normal(0.02), (n_rel, h)
            )
        if h * dv == 0:
            return Bias(self.width, name="out")(x)
        sow = lambda kind, y, axis=-1: sow_mask_input(self, self.group_prefix + kind, y, axis)
        dense = lambda feats, name: nn.DenseGeneral(feats, name=name, dtype=self.dtype)
        v = dense((h, dv), "value")(x)  # [B, n, T, h, dv]
        if "vo" in masks:
            sow("vo", v)
            v = mask_mul(v, masks["vo"])
        logits = table[relative_position_index(win, self.table_window)].transpose(2, 0, 1)  # [h, T, T]
        if dqk > 0:
            q, k = dense((h, dqk), "query")(x), dense((h, dqk), "key")(x)
            if "qk" in masks:
                sow("qk", q)
                sow("qk", k)
                q, k = mask_mul(q, masks["qk"]), mask_mul(k, masks["qk"])
            qk = jnp.einsum("bnqhd,bnkhd->bnhqk", q, k, preferred_element_type=jnp.float32)
            logits = qk / math.sqrt(self.head_dim) + logits
        else:  # every qk dim removed: the logits are the position bias alone
            logits = jnp.broadcast_to(logits, (*x.shape[:2], *logits.shape))
        if mask is not None:
            logits = logits + jnp.asarray(mask)[None, :, None]
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bnhqk,bnkhd->bnqhd", weights, v)
        if "heads" in masks:
            sow("heads", out, axis=-2)
            out = mask_mul(out, masks["heads"][:, None])
        return nn.DenseGeneral(self.width, axis=(-2, -1), name="out", dtype=self.dtype)(out)
