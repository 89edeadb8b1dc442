"""Classification, the part shared by every input kind: softmax cross-entropy, top-1 accuracy, the
probe-fitted head of a dense model, throughput timing.

A subclass says what its batches hold (`inputs`) and where its data comes from; batches carry `"label"`
int32 [B] (+ `"mask"` [B] in eval batches, 0 for padding rows). The dense model is prepared as: pretrained
backbone (the architecture's importer) -> multinomial logistic regression on frozen features for the head
(full-batch AdamW; the architecture's `feature_module` gives the features) -> optionally a short full
fine-tune (`dense.finetune_steps`). With `dense.head=train` no probe is fitted and those steps train the
whole model (a from-scratch dense model when `model.init=random`).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spp_jax.config_rules import Rule, nonneg, one_of, positive, positive_int
from spp_jax.errors import ConfigError
from spp_jax.progress import Progress
from spp_jax.task import LabelClassification, TaskContext
from spp_jax.task import classification_loss as classification_loss  # re-exported: the tasks' public name

if TYPE_CHECKING:
    import ml_collections


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


class Classification(LabelClassification):
    """The shared part of a classification task (module docstring); the pure loss/metric methods are
    spp_jax.task.LabelClassification's. Without a config, only those are usable (as in the search step of a
    test)."""

    CONFIG_RULES: ClassVar[dict[str, Rule]] = {
        "dense.head": one_of(("probe", "train")),
        "dense.probe_steps": positive_int,
        "dense.probe_lr": positive,
        "dense.probe_weight_decay": nonneg,
        "eval.throughput_batch": positive_int,
    }

    def __init__(self, cfg: ml_collections.ConfigDict | None = None):
        self.cfg = cfg

    def num_classes(self) -> int:
        raise NotImplementedError

    def eval_batches(self, src, limit: int | None = None):
        raise NotImplementedError

    # -- dense model -----------------------------------------------------------------------------------
    def prepare_dense(self, ctx: TaskContext, params: dict) -> dict:
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

    def features(
        self, ctx: TaskContext, params: dict, src, feat_model=None, inputs=None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Frozen backbone features and labels of every example, in source order; with several processes
        each computes its shard and every process gets them all (so all fit the same probe). The backbone
        is the architecture's head-less module reading `self.inputs(batch)`, unless `feat_model` and
        `inputs(batch)` say otherwise."""
        feat_model = ctx.arch.feature_module(ctx.adapter) if feat_model is None else feat_model
        inputs = self.inputs if inputs is None else inputs
        fwd = jax.jit(lambda p, *x: feat_model.apply({"params": p}, *x))
        backbone = {k: v for k, v in params.items() if k != "head"}
        feats, labels, keep = [], [], []
        prog = Progress("features", math.ceil(len(src) / self.cfg.eval.batch_size))
        for i, b in enumerate(self.eval_batches(src)):
            feats.append(np.asarray(fwd(backbone, *inputs(b))))
            labels.append(np.asarray(b["label"]))
            keep.append(np.asarray(b["mask"]) > 0)
            prog.update(i + 1)
        x, y, k = (np.concatenate(a) for a in (feats, labels, keep))
        if jax.process_count() > 1:  # process i's row j is example i + j * count (data.iterate_eval)
            from jax.experimental import multihost_utils

            x, y, k = (
                np.asarray(a).swapaxes(0, 1).reshape(-1, *a.shape[2:])
                for a in multihost_utils.process_allgather((x, y, k.astype(np.int32)))
            )
            k = k > 0
        return x[k], y[k]


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
