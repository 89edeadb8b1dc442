"""The Swin Transformer (v1) entry: `spp_jax.models.swin`, `spp_jax.adapters.swin`, the Swin importers.

Config keys: model.variant (mu | nano | T | S | B; for model.init=hf/timm the checkpoint's own shape is
used and the variant is only a label), model.init:
  hf      a Hugging Face Swin directory at model.init_path (config.json + model.safetensors)
  timm    a timm `swin_*` checkpoint file at model.init_path (.safetensors or .npz)
  random  our own init of model.variant
model.image_size (the input side, costed there), model.groups (kinds qk, vo, mlp, heads: one group per
stage and kind, `stage{s}/{kind}`), model.droppath_rate (optional, default 0), model.dtype (float32 |
bfloat16: compute dtype). A Swin here is a classifier:
its task says how many classes; a checkpoint head of another size is replaced by a zero head.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, ClassVar

from spp_jax.architectures.vit import head_classes
from spp_jax.compute import COMPUTE_DTYPES, compute_options
from spp_jax.config_rules import Rule, one_of, positive_int
from spp_jax.errors import ConfigError

INITS = ("hf", "timm", "random")
VARIANT_NAMES = ("mu", "nano", "T", "S", "B")  # = spp_jax.models.swin.VARIANTS (checked by the tests)


@functools.lru_cache(maxsize=1)
def _read_checkpoint(init: str, path: str, image_size: int) -> tuple[Any, dict]:
    """(SwinConfig, params) of a checkpoint, read once per process."""
    if init == "hf":
        from spp_jax.importers.swin_hf import read_hf_swin

        return read_hf_swin(path)
    from spp_jax.importers.swin_timm import read_timm_swin

    return read_timm_swin(path, image_size)


def fit_head(params: dict, config: Any) -> dict:
    """`params` with the head `config` needs: dropped for num_classes=0, zeros when the sizes differ."""
    import numpy as np

    params = dict(params)
    head = params.pop("head", None)
    if config.num_classes:
        shape = (config.num_features, config.num_classes)
        if head is None or tuple(np.shape(head["kernel"])) != shape:
            head = {"kernel": np.zeros(shape, np.float32), "bias": np.zeros(shape[1], np.float32)}
        params["head"] = head
    return params


class SwinArchitecture:
    name = "swin"
    CONFIG_RULES: ClassVar[dict[str, Rule]] = {
        "model.init": one_of(INITS),
        "model.variant": one_of(VARIANT_NAMES),
        "model.image_size": positive_int,
        "model.dtype": one_of(COMPUTE_DTYPES),
    }

    def _droppath(self, cfg: Any) -> float:
        rate = cfg.model.get("droppath_rate", 0.0)
        if not isinstance(rate, int | float) or isinstance(rate, bool) or not 0 <= rate < 1:
            raise ConfigError(f"model.droppath_rate={rate!r} is not allowed; use a number in [0, 1)")
        return float(rate)

    def build_adapter(self, cfg: Any, task: Any = None, num_classes: int | None = None):
        """The run's Swin with a `num_classes`-class head (the run passes its task's; None asks `task`)."""
        from spp_jax.adapters.swin import SwinAdapter
        from spp_jax.models.swin import swin_config

        num_classes = head_classes(self.name, task, num_classes)
        m = cfg.model
        kw = dict(
            image_size=m.image_size, num_classes=num_classes, droppath_rate=self._droppath(cfg),
            dtype=compute_options(m)["dtype"],
        )  # fmt: skip
        if m.init == "random":
            config = swin_config(m.variant, **kw)
        else:
            self.check_init(cfg)
            config = dataclasses.replace(_read_checkpoint(m.init, m.init_path, m.image_size)[0], **kw)
        return SwinAdapter(config, tuple(m.groups))

    def check_init(self, cfg: Any) -> None:
        m = cfg.model
        if m.init == "random":
            return
        what = "Hugging Face Swin directory" if m.init == "hf" else "timm Swin checkpoint file"
        exists = Path(m.init_path).is_dir() if m.init == "hf" else Path(m.init_path).is_file()
        if not m.init_path or not exists:
            raise ConfigError(
                f"model.init_path={m.init_path!r} does not exist; give the {what} of model.init={m.init}"
            )

    def load_pretrained(self, cfg: Any, adapter: Any) -> dict:
        m = cfg.model
        if m.init == "random":
            return init_params(adapter, cfg.seed)
        self.check_init(cfg)
        return fit_head(_read_checkpoint(m.init, m.init_path, m.image_size)[1], adapter.config)

    def feature_module(self, adapter: Any):
        """The head-less Swin (pooled features), for a probe-fitted classifier head."""
        from spp_jax.models.swin import SwinTransformer

        return SwinTransformer(dataclasses.replace(adapter.config, num_classes=0))

    def fingerprint(self, cfg: Any) -> dict:
        keys = ("variant", "init", "init_path", "image_size")
        return {"arch": self.name, **{k: cfg.model[k] for k in keys}, "droppath_rate": self._droppath(cfg)}

    def report_model(self, cfg: Any) -> dict:
        return {k: cfg.model[k] for k in ("arch", "variant", "init", "image_size")}

    def tiny_example(self, groups: tuple[str, ...] | None, seed: int) -> tuple[Any, dict, tuple]:
        """The "mu" Swin with 5 classes; `groups` are kinds (each gives one group per stage)."""
        import jax

        from spp_jax.adapters.swin import SwinAdapter
        from spp_jax.models.swin import KINDS, swin_config

        adapter = SwinAdapter(swin_config("mu", num_classes=5), tuple(groups or KINDS))
        c = adapter.config
        images = jax.random.normal(jax.random.key(seed), (2, c.image_size, c.image_size, 3))
        return adapter, tiny_params(adapter, seed), (images,)


def init_params(adapter: Any, seed: int) -> dict:
    """The adapter's dense model at our own init (numpy arrays)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    c = adapter.config
    x = jnp.zeros((1, c.image_size, c.image_size, 3), jnp.float32)
    return jax.tree.map(np.asarray, jax.jit(adapter.module().init)(jax.random.key(seed), x)["params"])


def tiny_params(adapter: Any, seed: int, scale: float = 0.1) -> dict:
    """`init_params` plus N(0, scale^2) noise on every leaf (the zero-initialised head would hide bugs)."""
    from spp_jax.architectures.vit import perturbed

    return perturbed(init_params(adapter, seed), seed, scale)
