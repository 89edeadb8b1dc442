"""Causal language modelling: next-token cross-entropy, perplexity, fixed-length token blocks of books.

Batches are `{"tokens": int32 [B, L + 1]}` (+ `"mask"` [B] in eval batches, 0 for padding rows): the model
reads tokens[:, :-1] and is scored on tokens[:, 1:], so every block contributes L predictions, each given
its prefix inside the block. The loss is the mean next-token cross-entropy over the batch's predictions;
the metric is perplexity = exp(sum of NLL / number of predicted tokens) over the eval blocks, the Hugging
Face convention (the first token of a sequence is never scored). Lower is better.

Data: the local `spp_books` tfds builder (spp_jax.data.books): the King James Bible and Jane Austen's six
novels, each book one split, tokenised with the model's own tokenizer into blocks of `data.block_len`
tokens. Search and fine-tuning read `data.train_split`, the eval split holds other books, so perplexity is
measured on text the search and the fine-tuning never saw. The dense model is the pretrained one as loaded
(`dense.finetune_steps` > 0 fine-tunes it first, spp_jax.stages.dense). Throughput is greedy decode
tokens/s with the KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp

from spp_jax.config_rules import Rule, positive_int
from spp_jax.task import Batch, TaskContext, TaskDefaults, softmax_kl
from spp_jax.task import next_token_nll as next_token_nll  # re-exported: the task's public name

if TYPE_CHECKING:
    import ml_collections


class CausalLM(TaskDefaults):
    """The causal language-modelling task of a run config (module docstring)."""

    CONFIG_RULES: ClassVar[dict[str, Rule]] = {
        "data.block_len": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 2,
                           "an integer >= 2 (tokens per block; the model reads block_len - 1)"),
        "eval.max_blocks": positive_int,
        "eval.decode_prompt": positive_int,
        "eval.decode_tokens": positive_int,
    }  # fmt: skip
    name = "causal_lm"
    metric = "perplexity"
    higher_is_better = False
    throughput_unit = "tok/s"
    needs_tokenizer = True

    def __init__(self, cfg: ml_collections.ConfigDict | None = None, tokenizer: Any = None):
        self.cfg = cfg
        self._tokenizer = tokenizer

    # -- pure parts (traced in jit) -------------------------------------------------------------------
    def inputs(self, batch: Batch) -> tuple[jax.Array, ...]:
        return (batch["tokens"][:, :-1],)

    def loss(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
        targets = batch["tokens"][:, 1:]
        acc = (outputs.argmax(-1) == targets).mean()
        return next_token_nll(outputs, targets).mean(), acc

    def eval_sums(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, jax.Array]:
        targets = batch["tokens"][:, 1:]
        valid = batch.get("mask", jnp.ones(targets.shape[:1], jnp.float32))
        nll = next_token_nll(outputs, targets).sum(-1)
        return (nll * valid).sum(), valid.sum() * targets.shape[1]

    def finalize(self, num: float, den: float) -> float:
        return float(math.exp(num / max(den, 1.0)))

    def distill_loss(self, student: jax.Array, teacher: jax.Array, batch: Batch, temp: float) -> jax.Array:
        return softmax_kl(student, teacher, temp)

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
        from spp_jax.data.books import books_source

        d = self.cfg.data
        # No BOS token: a book is one stream of text, as the perplexity CLI scores a file
        return books_source(self.tokenizer()[0], d.block_len, split, d.data_dir or None)

    def sources(self) -> tuple[Sequence, Sequence, Sequence]:
        d = self.cfg.data
        train = self._source(d.train_split)
        search = self._source(d.search_split) if d.get("search_split") else train
        return train, self._source(d.eval_split), search

    def train_loader(self, src: Sequence, batch_size: int, seed: int, augment: bool) -> Iterator[dict]:
        from spp_jax.data.text import make_token_loader

        del augment  # no augmentation of text blocks
        return make_token_loader(src, global_batch_size=batch_size, seed=seed)

    def eval_batches(self, src: Sequence, limit: int | None = None) -> Iterable[dict]:
        """The first `eval.max_blocks` blocks of `src` (or `limit`, if smaller), every one once."""
        from spp_jax.data.text import iterate_token_eval

        c = self.cfg
        n = c.eval.max_blocks if limit is None else min(limit, c.eval.max_blocks)
        return iterate_token_eval(src, batch_size=c.eval.batch_size, limit=n)

    def check_data(self, train_src: Sequence) -> None:
        """Nothing beyond what the books builder checks (its splits and the block length)."""

    def data_fingerprint(self) -> dict:
        d = self.cfg.data
        return {k: d.get(k, "") for k in ("dataset", "train_split", "search_split", "block_len")}

    def report_data(self) -> dict:
        d = self.cfg.data
        return {"dataset": d.dataset, "train_split": d.train_split, "eval_split": d.eval_split,
                "block_len": d.block_len, "eval_blocks": self.cfg.eval.max_blocks}  # fmt: skip

    # -- dense model -----------------------------------------------------------------------------------
    def prepare_dense(self, ctx: TaskContext, params: dict) -> dict:
        """The pretrained language model is the task model as loaded."""
        return params

    def throughput(self, module, params) -> float:
        """Greedy decode tokens/s (batch 1, KV cache) after an `eval.decode_prompt`-token prompt."""
        from spp_jax.generation import decode_tokens_per_second

        e = self.cfg.eval
        return decode_tokens_per_second(module, params, e.decode_prompt, e.decode_tokens)

    def save_assets(self, directory) -> None:
        """The tokenizer goes with every saved model, so `launch/generate.py` needs only the directory."""
        from spp_jax.tokenizer import save_tokenizer

        tok, special = self.tokenizer()
        save_tokenizer(directory, tok, special)
