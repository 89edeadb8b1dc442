"""The compute options a model runs with: its compute dtype and its attention core.

"float32" or "bfloat16" (mixed precision: parameters, masks and the SPP state stay float32, the matmuls and
activations run in bfloat16; spp_jax/models/vit.py says what else stays float32), and the attention core
"xla" (einsum + softmax) or "cudnn" (`jax.nn.dot_product_attention`'s fused kernel: a GPU and bfloat16).
Shared by the model configs, which check them, and by the run config, whose `model.dtype` /
`model.attention` keys name them. No JAX or Flax import: the config checks stay fast.
"""

from __future__ import annotations

from typing import Any

from spp_jax.errors import ConfigError

COMPUTE_DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("xla", "cudnn")


def check_compute(dtype: str, attention: str) -> None:
    """One-line ConfigErrors for a compute dtype / attention core a model cannot run."""
    if dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not a compute dtype; use one of {COMPUTE_DTYPES}")
    if attention not in ATTENTION_IMPLS:
        raise ConfigError(f"attention={attention!r} is not an attention core; use one of {ATTENTION_IMPLS}")
    if attention == "cudnn" and dtype == "float32":
        raise ConfigError("attention='cudnn' runs in bfloat16 only; set dtype='bfloat16' or attention='xla'")


def compute_options(model_cfg: Any) -> dict[str, str]:
    """{"dtype", "attention"} of a run config's `model` section (float32 / xla where a config lacks them)."""
    return {"dtype": model_cfg.get("dtype", "float32"), "attention": model_cfg.get("attention", "xla")}
