"""Image classification: softmax cross-entropy, top-1 accuracy, tfds image sources, a probe-fitted head.

Batches are `{"image": float32 [B, H, W, 3], "label": int32 [B]}` (+ `"mask"` [B] in eval batches, 0 for
padding rows). The dense model is prepared as: pretrained backbone (the architecture's importer) ->
multinomial logistic regression on frozen features for the head (full-batch AdamW) -> optionally a short
full fine-tune (`dense.finetune_steps`). With `dense.head=train` no probe is fitted and those steps train
the whole model (a from-scratch dense model when `model.init=random`). Config keys: `data.*` (dataset,
splits, feature keys), `dense.*`, `finetune.augment`, `eval.throughput_batch`, `model.image_size`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spp_jax.config_rules import Rule, boolean, nonneg, one_of, positive, positive_int
from spp_jax.errors import ConfigError
from spp_jax.progress import Progress
from spp_jax.tasks.base import Batch, softmax_kl

if TYPE_CHECKING:
    import ml_collections

    from spp_jax.stages.context import RunContext


def classification_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean softmax cross-entropy and accuracy (sums over the batch, divided by its size)."""
    loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()
    acc = (logits.argmax(-1) == labels).mean()
    return loss, acc


class _Head:
    """The first n records of a random-access source."""

    def __init__(self, src, n: int):
        self.src, self.n = src, min(n, len(src))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if i >= self.n:
            raise IndexError(i)
        return self.src[i]


class ImageClassification:
    """The image classification task of a run config (module docstring). Without a config, only the pure
    loss/metric methods are usable (as in the search step of a test)."""

    CONFIG_RULES: ClassVar[dict[str, Rule]] = {
        "dense.head": one_of(("probe", "train")),
        "dense.augment": boolean,
        "dense.probe_steps": positive_int,
        "dense.probe_lr": positive,
        "dense.probe_weight_decay": nonneg,
        "finetune.augment": boolean,
        "eval.throughput_batch": positive_int,
    }
    name = "image_classification"
    metric = "accuracy"
    higher_is_better = True
    throughput_unit = "img/s"

    def __init__(self, cfg: ml_collections.ConfigDict | None = None):
        self.cfg = cfg

    # -- pure parts (traced in jit) -------------------------------------------------------------------
    def inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        return (batch["image"],)

    def loss(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
        return classification_loss(outputs, batch["label"])

    def eval_sums(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
        valid = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
        return ((outputs.argmax(-1) == batch["label"]) * valid).sum(), valid.sum()

    def finalize(self, num: float, den: float) -> float:
        return float(num / max(den, 1.0))

    def distill_loss(self, student: jax.Array, teacher: jax.Array, batch: Batch, temp: float) -> jax.Array:
        return softmax_kl(student, teacher, temp)

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
    def prepare_dense(self, ctx: RunContext, params: dict) -> dict:
        """Pretrained backbone -> probe-fitted classifier head (`dense.head=probe`; the stage then
        fine-tunes, if asked), or the loaded params as they are (`dense.head=train`: the dense stage's
        `dense.finetune_steps` train the whole model, e.g. from a random init)."""
        if self.cfg.dense.head == "train":
            if not self.cfg.dense.finetune_steps:
                raise ConfigError(
                    "dense.head=train leaves the classifier to the dense stage's training, but "
                    "dense.finetune_steps=0; set dense.finetune_steps > 0 or dense.head=probe"
                )
            return params
        x, y = self.features(ctx, params, ctx.train_src)
        return {**params, "head": fit_probe(self.cfg, x, y, self.num_classes())}

    def features(self, ctx: RunContext, params: dict, src) -> tuple[np.ndarray, np.ndarray]:
        """Frozen backbone features (the architecture's head-less module) and labels of every example."""
        feat_model = ctx.arch.feature_module(ctx.adapter)
        fwd = jax.jit(lambda p, x: feat_model.apply({"params": p}, x))
        backbone = {k: v for k, v in params.items() if k != "head"}
        feats, labels = [], []
        prog = Progress("features", math.ceil(len(src) / self.cfg.eval.batch_size))
        for i, b in enumerate(self.eval_batches(src)):
            keep = b["mask"] > 0
            feats.append(np.asarray(fwd(backbone, b["image"]))[keep])
            labels.append(b["label"][keep])
            prog.update(i + 1)
        return np.concatenate(feats), np.concatenate(labels)

    def throughput(self, module, params, repeats: int = 5) -> float:
        """Images per second of the jitted forward pass (median of `repeats` timed calls after warm-up)."""
        c = self.cfg
        x = jnp.zeros((c.eval.throughput_batch, c.model.image_size, c.model.image_size, 3), jnp.float32)
        return measure_throughput(lambda p: module.apply({"params": p}, x), params, x.shape[0], repeats)

    def save_assets(self, directory) -> None:
        """Nothing besides the params and the arch spec is needed to run an image classifier."""


def measure_throughput(fn, params, units: int, repeats: int = 5) -> float:
    """`units` / median seconds of the jitted `fn(params)` after one warm-up call."""
    fwd = jax.jit(fn)
    params = jax.tree.map(jnp.asarray, params)
    jax.block_until_ready(fwd(params))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(params))
        times.append(time.perf_counter() - t0)
    return units / float(np.median(times))


def fit_probe(cfg, x: np.ndarray, y: np.ndarray, num_classes: int) -> dict:
    """Multinomial logistic regression on frozen features (full batch AdamW) -> head params."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    tx = optax.adamw(cfg.dense.probe_lr, weight_decay=cfg.dense.probe_weight_decay)
    head = {"kernel": jnp.zeros((x.shape[1], num_classes)), "bias": jnp.zeros((num_classes,))}
    loss = lambda h: optax.softmax_cross_entropy_with_integer_labels(x @ h["kernel"] + h["bias"], y).mean()

    @jax.jit
    def step(h, s):
        g = jax.grad(loss)(h)
        u, s = tx.update(g, s, h)
        return optax.apply_updates(h, u), s

    state = tx.init(head)
    for _ in range(cfg.dense.probe_steps):
        head, state = step(head, state)
    return jax.tree.map(np.asarray, head)
