"""spp_jax: Solution Path Pruning for pretrained transformers in JAX/Flax."""

from spp_jax.groups import KeepSet, MaskGroup, Masks, MaskSpec

__all__ = ["KeepSet", "MaskGroup", "MaskSpec", "Masks"]
