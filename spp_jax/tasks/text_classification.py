"""Text classification: tokenised texts with an attention mask on top of spp_jax.tasks.classification (loss,
accuracy, the probe-fitted head of the dense model).

Batches are `{"input_ids": int32 [B, L], "attention_mask": int32 [B, L], "label": int32 [B]}` (+ `"mask"`
[B] in eval batches, 0 for padding rows); the model reads (input_ids, attention_mask). L is the model's
`model.seq_len`: texts are truncated to it and padded. Data: the local `spp_bbc_news` tfds builder
(spp_jax.data.bbc_news: BBC News, 5 topics, a fixed 1,698 / 427 split), tokenised with the model's own
tokenizer (the architecture's `tokenizer(cfg)`). The dense model is the pretrained encoder with a
probe-fitted head (`dense.*`, as for images). The report carries a reference that needs no encoder: TF-IDF
features + logistic regression fitted on the same train split (`tfidf_reference`), so a reader sees what the
pretrained encoder adds. Config keys: `data.*`, `dense.*`, `eval.throughput_batch`, `model.seq_len`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from spp_jax.config_rules import Rule, one_of
from spp_jax.task import Batch
from spp_jax.tasks.classification import Classification, measure_throughput

DATASETS = ("bbc_news",)
FIELDS = ("input_ids", "attention_mask", "label")


class TextClassification(Classification):
    """The text classification task of a run config (module docstring)."""

    CONFIG_RULES: ClassVar[dict[str, Rule]] = {
        **Classification.CONFIG_RULES,
        "data.dataset": one_of(DATASETS),
    }
    name = "text_classification"
    throughput_unit = "seq/s"
    needs_tokenizer = True

    def __init__(self, cfg: Any = None, tokenizer: Any = None):
        super().__init__(cfg)
        self._tokenizer = tokenizer

    def inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        return (batch["input_ids"], batch["attention_mask"])

    # -- data ------------------------------------------------------------------------------------------
    def tokenizer(self) -> tuple[Any, dict]:
        """(tokenizer, special ids) of the run's model, as the task was built with (the run hands it the
        architecture's `tokenizer(cfg)`, spp_jax.stages.context)."""
        if self._tokenizer is None:
            raise ValueError(
                f"the {self.name} task reads text and was built without a tokenizer; build it with "
                "tokenizer=arch.tokenizer(cfg), as spp_jax.stages.context.make_context does"
            )
        return self._tokenizer

    def _source(self, split: str):
        from spp_jax.data.bbc_news import bbc_source

        tok, special = self.tokenizer()
        pad = special.get("pad") or 0
        return bbc_source(tok, self.cfg.model.seq_len, split, self.cfg.data.data_dir or None, pad_id=pad)

    def sources(self) -> tuple[Sequence, Sequence, Sequence]:
        d = self.cfg.data
        train = self._source(d.train_split)
        search = self._source(d.search_split) if d.get("search_split") else train
        return train, self._source(d.eval_split), search

    def num_classes(self) -> int:
        from spp_jax.data.bbc_news import TOPICS

        return len(TOPICS)

    def train_loader(self, src: Sequence, batch_size: int, seed: int, augment: bool) -> Iterator[dict]:
        from spp_jax.data.text import int_fields, make_record_loader

        del augment  # no augmentation of texts
        convert = functools.partial(int_fields, keys=FIELDS)
        return make_record_loader(src, global_batch_size=batch_size, seed=seed, convert=convert)

    def eval_batches(self, src: Sequence, limit: int | None = None) -> Iterable[dict]:
        from spp_jax.data.text import int_fields, iterate_record_eval

        convert = functools.partial(int_fields, keys=FIELDS)
        return iterate_record_eval(src, self.cfg.eval.batch_size, limit, convert=convert)

    def check_data(self, train_src: Sequence) -> None:
        """Nothing beyond what the builder checks (the corpus and the sequence length)."""

    def data_fingerprint(self) -> dict:
        d = self.cfg.data
        return {**{k: d.get(k, "") for k in ("dataset", "train_split", "search_split")},
                "seq_len": self.cfg.model.seq_len}  # fmt: skip

    def report_data(self) -> dict:
        d = self.cfg.data
        return {"dataset": d.dataset, "train_split": d.train_split, "eval_split": d.eval_split,
                "num_classes": self.num_classes(), "seq_len": self.cfg.model.seq_len}  # fmt: skip

    def references(self) -> dict[str, float]:
        """{"TF-IDF + logistic regression": accuracy} on the eval split, fitted on the train split."""
        from spp_jax.data.bbc_news import read_bbc

        d = self.cfg.data
        splits = read_bbc()
        return {"TF-IDF + logistic regression": tfidf_reference(
            _select(splits, d.train_split), _select(splits, d.eval_split))}  # fmt: skip

    # -- measurements ----------------------------------------------------------------------------------
    def throughput(self, module, params, repeats: int = 5) -> float:
        """Sequences per second of the jitted forward pass at `model.seq_len` tokens, no padding."""
        b, n = self.cfg.eval.throughput_batch, self.cfg.model.seq_len
        ids = jnp.ones((b, n), jnp.int32)
        fn = lambda p: module.apply({"params": p}, ids, jnp.ones_like(ids))
        return measure_throughput(fn, params, b, repeats)

    def save_assets(self, directory) -> None:
        """The tokenizer goes with every saved model, so `launch/embed.py` needs only the directory."""
        from spp_jax.tokenizer import save_tokenizer

        tok, special = self.tokenizer()
        save_tokenizer(directory, tok, special)


def _select(splits: dict[str, list], spec: str) -> list:
    """The rows of a tfds-style split spec over `splits` ("train", "train[:1200]", "test[50%:]")."""
    import tensorflow_datasets as tfds

    name = spec.split("[")[0]
    rows = splits[name]
    instr = tfds.core.ReadInstruction.from_spec(spec)
    (abs_instr,) = instr.to_absolute({name: tfds.core.SplitInfo(name, [len(rows)], 0)})
    return rows[abs_instr.from_ : abs_instr.to]


def tfidf_reference(train: Sequence[tuple[str, int]], test: Sequence[tuple[str, int]]) -> float:
    """Accuracy on `test` of scikit-learn's TfidfVectorizer (sublinear tf, unigrams + bigrams, min_df 2)
    + LogisticRegression (C=10) fitted on `train`: a bag-of-words reference with no pretrained encoder."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vec = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=2)
    x_train = vec.fit_transform([t for t, _ in train])
    clf = LogisticRegression(C=10.0, max_iter=2000).fit(x_train, [y for _, y in train])
    pred = clf.predict(vec.transform([t for t, _ in test]))
    return float((pred == [y for _, y in test]).mean())
