"""Image classification: tfds image sources on top of spp_jax.tasks.classification (loss, accuracy, the
probe-fitted head of the dense model).

Batches are `{"image": float32 [B, H, W, 3], "label": int32 [B]}` (+ `"mask"` [B] in eval batches, 0 for
padding rows). Config keys: `data.*` (dataset,
splits, feature keys), `dense.*`, `finetune.augment`, `eval.throughput_batch`, `model.image_size`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import ClassVar

import jax.numpy as jnp

from spp_jax.config_rules import Rule, boolean
from spp_jax.errors import ConfigError
from spp_jax.task import ImageLabels
from spp_jax.tasks.classification import (  # noqa: F401  (re-exported: the image task's public names)
    Classification,
    _Head,
    classification_loss,
    fit_probe,
    measure_throughput,
)


class ImageClassification(Classification, ImageLabels):
    """The image classification task of a run config (module docstring); the pure parts (`inputs`, loss,
    metric) are spp_jax.task.ImageLabels', what library functions take `task=None` for."""

    CONFIG_RULES: ClassVar[dict[str, Rule]] = {
        **Classification.CONFIG_RULES,
        "dense.augment": boolean,
        "finetune.augment": boolean,
    }

    # -- data ------------------------------------------------------------------------------------------
    def _source(self, split: str):
        from spp_jax import data  # the data stack (grain, tfds) only where data is read

        d = self.cfg.data
        return data.get_source(d.dataset, split, d.data_dir or None)

    def sources(self) -> tuple[Sequence, Sequence, Sequence]:
        """(train, eval, search): the search reads data.search_split when set (held out from the head's
        fit), else the train split."""
        d = self.cfg.data
        train = self._source(d.train_split)
        search = self._source(d.search_split) if d.get("search_split") else train
        return train, self._source(d.eval_split), search

    def num_classes(self) -> int:
        from spp_jax import data

        d = self.cfg.data
        return data.num_classes(d.dataset, d.data_dir or None, label_key=d.label_key)

    def train_loader(self, src: Sequence, batch_size: int, seed: int, augment: bool) -> Iterator[dict]:
        from spp_jax import data

        c = self.cfg
        return data.make_loader(
            src, global_batch_size=batch_size, image_size=c.model.image_size, train=True, seed=seed,
            num_epochs=None, augment=augment, image_key=c.data.image_key, label_key=c.data.label_key,
        )  # fmt: skip

    def eval_batches(self, src: Sequence, limit: int | None = None) -> Iterable[dict]:
        """Every example of `src` once (padded last batch), or only the first `limit` examples."""
        from spp_jax import data

        c = self.cfg
        if limit is not None:
            src = _Head(src, limit)
        return data.iterate_eval(
            src, batch_size=c.eval.batch_size, image_size=c.model.image_size,
            image_key=c.data.image_key, label_key=c.data.label_key,
        )  # fmt: skip

    def check_data(self, train_src: Sequence) -> None:
        """The configured feature keys exist (checked before a workdir is touched)."""
        d = self.cfg.data
        if len(train_src):
            example = train_src[0]
            for key in ("image_key", "label_key"):
                if d[key] not in example:
                    raise ConfigError(
                        f"data.{key}={d[key]!r} is not a feature of dataset {d.dataset!r}; "
                        f"use one of {sorted(example)}"
                    )

    def data_fingerprint(self) -> dict:
        return {k: self.cfg.data.get(k, "") for k in ("dataset", "train_split", "search_split")}

    def report_data(self) -> dict:
        d = self.cfg.data
        return {"dataset": d.dataset, "train_split": d.train_split, "eval_split": d.eval_split,
                "num_classes": self.num_classes()}  # fmt: skip

    # -- dense model -----------------------------------------------------------------------------------
    def throughput(self, module, params, repeats: int = 5) -> float:
        """Images per second of the jitted forward pass (median of `repeats` timed calls after warm-up)."""
        c = self.cfg
        x = jnp.zeros((c.eval.throughput_batch, c.model.image_size, c.model.image_size, 3), jnp.float32)
        return measure_throughput(lambda p: module.apply({"params": p}, x), params, x.shape[0], repeats)

    def save_assets(self, directory) -> None:
        """Nothing besides the params and the arch spec is needed to run an image classifier."""
