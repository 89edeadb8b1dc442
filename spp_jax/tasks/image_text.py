"""Image-text contrastive learning with class captions, and zero-shot classification by text prompts.

Images and labels come from the image-classification data (`data.*`, Fashion-MNIST by default); the texts
are captions made from the class names and templates ("a photo of a sneaker."), tokenised with the text
tower's tokenizer to `model.seq_len` tokens. Two disjoint template sets:
    train templates (`TRAIN_TEMPLATES`): the captions of the contrastive loss (search, fine-tuning, dense);
    eval prompts (`EVAL_TEMPLATES`): the prompt set of zero-shot classification and of retrieval, never
    trained on.
A train batch is `{"image", "label"}`; the model reads the batch's images and every train caption
(C classes x T templates: 60 captions of 16 tokens by default, about the cost of 32 images at 56 px).
Eval batches carry `"mask"` (padding rows) and are read with the eval prompts instead.

Loss (a CLIP loss with several positives, since captions repeat across a batch): logits = s * I C^T with
I [B, E] the image and C [C*T, E] the caption embeddings, s the learned temperature. Image i's target is
uniform over the captions of its class; caption j's target is uniform over the batch's images of its class
(captions of a class absent from the batch are left out):
    L = 1/2 (mean_i CE(logits_i, p_i) + mean_j CE(logits^T_j, q_j)).
Zero-shot: class embedding = normalize(mean of its prompts' embeddings); prediction = argmax_c I_i . e_c;
metric = top-1 accuracy. Extra metrics (`extra_metrics`, class-level retrieval recall@1 on the first
`eval.retrieval_images` eval images): i2t = share of images whose nearest eval prompt names their class,
t2i = share of eval prompts whose nearest image is of their class.

The dense model (`prepare_dense`) is built the LiT way: both towers pretrained and frozen, only the
projections and the temperature trained on cached tower features (`dense.proj_steps` full-batch AdamW steps
on the train split); `dense.finetune_steps` > 0 then trains every weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spp_jax.config_rules import Rule, boolean, nonneg, positive, positive_int
from spp_jax.task import Batch, TaskContext, softmax_kl
from spp_jax.tasks.image_classification import ImageClassification, measure_throughput

# Fashion-MNIST's classes as a caption says them (label order of the dataset).
CLASS_PHRASES = (
    "t-shirt", "pair of trousers", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
TRAIN_TEMPLATES = (
    "a photo of a {}.",
    "a black and white picture of a {}.",
    "a grayscale photo of a {}.",
    "a low resolution photo of a {}.",
    "a product photo of a {}.",
    "a picture of a {}, a piece of clothing.",
)
EVAL_TEMPLATES = (
    "an image of a {}.",
    "a small photo of the {}.",
    "a blurry picture of a {}.",
    "a {} in black and white.",
)


def captions(templates: Sequence[str], phrases: Sequence[str] = CLASS_PHRASES) -> list[str]:
    """Class-major captions: [c0 t0, c0 t1, ..., c1 t0, ...] (len(phrases) * len(templates))."""
    return [t.format(p) for p in phrases for t in templates]


def contrastive_logits(outputs: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
    """s * I C^T [B, T] of the model outputs (image_emb, text_emb, s)."""
    image_emb, text_emb, scale = outputs
    return scale * image_emb.astype(jnp.float32) @ text_emb.astype(jnp.float32).T


def multi_positive_loss(logits: jax.Array, labels: jax.Array, text_labels: jax.Array) -> jax.Array:
    """The symmetric CLIP loss with every same-class pair a positive (module docstring)."""
    pos = (labels[:, None] == text_labels[None, :]).astype(jnp.float32)  # [B, T]
    i2t = optax.softmax_cross_entropy(logits, pos / pos.sum(1, keepdims=True)).mean()
    n_img = pos.sum(0)  # images per caption's class in this batch
    t2i = optax.softmax_cross_entropy(logits.T, pos.T / jnp.maximum(n_img, 1.0)[:, None])
    present = (n_img > 0).astype(jnp.float32)
    return 0.5 * (i2t + (t2i * present).sum() / jnp.maximum(present.sum(), 1.0))


def class_scores(image_emb: jax.Array, text_emb: jax.Array, num_classes: int) -> jax.Array:
    """[B, C] cosine of each image with each class embedding (its prompts' mean, normalised)."""
    per_class = text_emb.astype(jnp.float32).reshape(num_classes, -1, text_emb.shape[-1]).mean(1)
    per_class = per_class / jnp.linalg.norm(per_class, axis=-1, keepdims=True)
    return image_emb.astype(jnp.float32) @ per_class.T


class ImageText(ImageClassification):
    """The image-text task of a run config (module docstring); image data as image classification."""

    CONFIG_RULES: ClassVar[dict[str, Rule]] = {
        "dense.augment": boolean,
        "dense.proj_steps": positive_int,
        "dense.proj_lr": positive,
        "dense.proj_weight_decay": nonneg,
        "finetune.augment": boolean,
        "eval.throughput_batch": positive_int,
        "eval.retrieval_images": positive_int,
    }
    name = "image_text"
    throughput_unit = "img/s"
    per_example_loss = False  # captions are shared by the batch: curvature needs micro-batches
    needs_tokenizer = True

    def __init__(self, cfg: Any = None, tokenizer: Any = None, phrases: Sequence[str] = CLASS_PHRASES):
        super().__init__(cfg)
        self._tokenizer = tokenizer
        self.phrases = tuple(phrases)
        self._tokens: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # -- captions --------------------------------------------------------------------------------------
    def tokenizer(self) -> tuple[Any, dict]:
        """(tokenizer, special ids) of the text tower, as the task was built with (the run hands it the
        architecture's `tokenizer(cfg)`, spp_jax.stages.context)."""
        if self._tokenizer is None:
            raise ValueError(
                f"the {self.name} task reads text and was built without a tokenizer; build it with "
                "tokenizer=arch.tokenizer(cfg), as spp_jax.stages.context.make_context does"
            )
        return self._tokenizer

    def caption_tokens(self, which: str) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask) int32 [C*T, seq_len] of the "train" or "eval" captions."""
        if which not in self._tokens:
            from spp_jax.data.bbc_news import encode_texts

            tok, special = self.tokenizer()
            templates = TRAIN_TEMPLATES if which == "train" else EVAL_TEMPLATES
            texts = captions(templates, self.phrases)
            self._tokens[which] = encode_texts(tok, texts, self.cfg.model.seq_len, special.get("pad") or 0)
        return self._tokens[which]

    def _text_labels(self, which: str) -> jax.Array:
        per = len(TRAIN_TEMPLATES if which == "train" else EVAL_TEMPLATES)
        return jnp.repeat(jnp.arange(len(self.phrases)), per)

    # -- pure parts (traced in jit) ----------------------------------------------------------------------
    @staticmethod
    def _which(batch: Batch) -> str:
        return "eval" if "mask" in batch else "train"  # the dict's keys are static under jit

    def inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        ids, mask = self.caption_tokens(self._which(batch))
        return (batch["image"], jnp.asarray(ids), jnp.asarray(mask))

    def loss(self, outputs: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
        which = self._which(batch)
        logits = contrastive_logits(outputs)
        text_labels = self._text_labels(which)
        acc = (text_labels[logits.argmax(-1)] == batch["label"]).mean()
        return multi_positive_loss(logits, batch["label"], text_labels), acc

    def eval_sums(self, outputs: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
        image_emb, text_emb, _ = outputs
        pred = class_scores(image_emb, text_emb, len(self.phrases)).argmax(-1)
        valid = batch.get("mask", jnp.ones(batch["label"].shape, jnp.float32))
        return ((pred == batch["label"]) * valid).sum(), valid.sum()

    def distill_loss(self, student: Any, teacher: Any, batch: Batch, temp: float) -> jax.Array:
        """The dense model's similarity matrix as the target, both ways as the task loss is: the KL of
        each image's distribution over the captions and of each caption's over the batch's images."""
        s, t = contrastive_logits(student), contrastive_logits(teacher)
        return 0.5 * (softmax_kl(s, t, temp) + softmax_kl(s.T, t.T, temp))

    # -- measurements ----------------------------------------------------------------------------------
    def num_classes(self) -> int:
        return len(self.phrases)

    def report_data(self) -> dict:
        return {**super().report_data(), "seq_len": self.cfg.model.seq_len}

    def data_fingerprint(self) -> dict:
        return {**super().data_fingerprint(), "seq_len": self.cfg.model.seq_len}

    def extra_metrics(self, module: Any, params: dict, src: Sequence) -> dict[str, float]:
        """Class-level recall@1 both ways over the first `eval.retrieval_images` images of `src`."""
        ids, mask = self.caption_tokens("eval")
        text_emb = np.asarray(module.apply({"params": params}, ids, mask, method="encode_text"))
        enc = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode_image"))
        embs, labels = [], []
        for b in self.eval_batches(src, self.cfg.eval.retrieval_images):
            keep = b["mask"] > 0
            embs.append(np.asarray(enc(params, b["image"]))[keep])
            labels.append(np.asarray(b["label"])[keep])
        image_emb, labels = np.concatenate(embs), np.concatenate(labels)
        text_labels = np.asarray(self._text_labels("eval"))
        sim = image_emb @ text_emb.T
        i2t = float((text_labels[sim.argmax(1)] == labels).mean())
        t2i = float((labels[sim.argmax(0)] == text_labels).mean())
        return {"i2t R@1": i2t, "t2i R@1": t2i}

    def throughput(self, module, params, repeats: int = 5) -> float:
        """Image-tower images per second (the text side of zero-shot is computed once per prompt set)."""
        c = self.cfg
        x = jnp.zeros((c.eval.throughput_batch, c.model.image_size, c.model.image_size, 3), jnp.float32)
        fn = lambda p: module.apply({"params": p}, x, method="encode_image")
        return measure_throughput(fn, params, x.shape[0], repeats)

    def save_assets(self, directory) -> None:
        """The text tower's tokenizer goes with every saved model."""
        from spp_jax.tokenizer import save_tokenizer

        tok, special = self.tokenizer()
        save_tokenizer(directory, tok, special)

    # -- dense model -----------------------------------------------------------------------------------
    def prepare_dense(self, ctx: TaskContext, params: dict) -> dict:
        """LiT: frozen pretrained towers, projections + temperature fitted on cached features (module
        docstring)."""
        from spp_jax.models.bert import BertEncoder
        from spp_jax.models.vit import VisionTransformer

        config = ctx.adapter.config
        img_feats, labels = self.features(
            ctx, params["image"], ctx.train_src, VisionTransformer(config.image), lambda b: (b["image"],)
        )
        ids, mask = self.caption_tokens("train")
        txt_feats = np.asarray(BertEncoder(config.text).apply({"params": params["text"]}, ids, mask))
        return fit_projections(self.cfg, params, img_feats, labels, txt_feats, self._text_labels("train"))


def fit_projections(
    cfg, params: dict, img_feats: np.ndarray, labels: np.ndarray, txt_feats: np.ndarray, text_labels
) -> dict:
    """AdamW on (image_proj, text_proj, logit_scale) of `params` with the multi-positive loss over cached
    tower features: minibatches of `search.batch_size` images (the batch the loss will see later), every
    caption each step, `dense.proj_steps` steps at `dense.proj_lr` (decay `dense.proj_weight_decay`)."""
    keys = ("image_proj", "text_proj", "logit_scale")
    trainable = {k: params[k] for k in keys}
    x, y, t = jnp.asarray(img_feats), jnp.asarray(labels), jnp.asarray(txt_feats)
    tx = optax.adamw(cfg.dense.proj_lr, weight_decay=cfg.dense.proj_weight_decay)

    def loss(p, xb, yb):
        img = _dense(p["image_proj"], xb)
        txt = _dense(p["text_proj"], t)
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
        return multi_positive_loss(jnp.exp(p["logit_scale"]) * img @ txt.T, yb, text_labels)

    @jax.jit
    def step(p, s, idx):
        g = jax.grad(loss)(p, x[idx], y[idx])
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(trainable)
    rng = np.random.default_rng(cfg.seed)
    batch = min(cfg.search.batch_size, len(x))
    for _ in range(cfg.dense.proj_steps):
        trainable, state = step(trainable, state, jnp.asarray(rng.choice(len(x), batch, replace=False)))
    return {**params, **jax.tree.map(np.asarray, trainable)}


def _dense(p: dict, x: jax.Array) -> jax.Array:
    return x @ p["kernel"] + p.get("bias", 0.0)
