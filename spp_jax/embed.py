"""Sentence embeddings from a BERT-style encoder (the sentence-transformers convention). Used by
launch/embed.py.

embedding(text) = normalize(sum_t a_t h_t / sum_t a_t): the encoder's last hidden states h_t averaged over
the text's tokens (a_t = 1 for a token, 0 for padding; `[CLS]` and `[SEP]` included, as sentence-transformers
does), then scaled to unit L2 norm. Texts are tokenised with the model's own tokenizer (its special tokens),
truncated to `max_tokens` and padded only to the longest text of their batch; the attention mask keeps the
padding out of every valid token, so a text's embedding does not depend on its batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.errors import CheckpointMismatch, ConfigError


def encoder_for_embedding(module: Any, params: dict) -> tuple[Any, dict]:
    """(encoder returning mean-pooled features, its params): a text classifier loses its head."""
    from spp_jax.models.bert import BertEncoder

    if not isinstance(module, BertEncoder):
        raise CheckpointMismatch(
            f"the model is a {type(module).__name__}, not a BERT-style text encoder; give a directory "
            "made by a text-classification run (configs/bert.py)"
        )
    config = dataclasses.replace(module.config, num_classes=0, pool="mean")
    return BertEncoder(config, module.layers), {k: v for k, v in params.items() if k != "head"}


def load_encoder(
    model_dir: str | Path | None, cfg: Any = None, target: str | None = None
) -> tuple[Any, dict, Any, dict]:
    """(mean-pooling encoder, params, tokenizer, special ids) of a saved text model directory (dense/,
    extracted/<t>/, finetuned/<t>/ of a text-classification run, or the member `target` of its family/), or
    of the pretrained encoder `cfg` names when `model_dir` is None."""
    from spp_jax.family import load_pruned
    from spp_jax.tokenizer import load_tokenizer

    if model_dir is not None:
        module, params, _ = load_pruned(model_dir, target)
        if not (Path(model_dir) / "tokenizer.json").exists():
            raise CheckpointMismatch(
                f"{model_dir} has no tokenizer.json; give a model directory made by a text-classification run"
            )
        tokenizer, special = load_tokenizer(model_dir)
        return (*encoder_for_embedding(module, params), tokenizer, special)
    from spp_jax.architectures import build_architecture
    from spp_jax.run_config import validate_config

    if cfg is None:
        raise ConfigError("give a model directory or a text-encoder config (configs/bert.py)")
    validate_config(cfg)
    if cfg.model.get("arch") != "bert":
        raise ConfigError(f"the config's model.arch is {cfg.model.get('arch')!r}; give configs/bert.py")
    arch = build_architecture(cfg)
    adapter = arch.build_adapter(cfg, None, num_classes=0)
    params = arch.load_pretrained(cfg, adapter)
    tokenizer, special = arch.tokenizer(cfg)
    return (*encoder_for_embedding(adapter.module(), params), tokenizer, special)


def embed_texts(
    module: Any, params: dict, tokenizer: Any, texts: Sequence[str], max_tokens: int = 256,
    batch_size: int = 32, pad_id: int = 0,
) -> np.ndarray:  # fmt: skip
    """float32 [len(texts), width]: the unit-norm mean-pooled embedding of each text (module docstring)."""
    from spp_jax.data.bbc_news import encode_texts

    limit = module.config.max_len
    if not 2 <= max_tokens <= limit:
        raise ConfigError(
            f"max_tokens={max_tokens} is outside [2, {limit}] (the model's positions); use 2 to {limit}"
        )
    fwd = jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask))
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i : i + batch_size])
        ids, mask = encode_texts(tokenizer, chunk, max_tokens, pad_id)
        longest = int(mask.sum(1).max())
        # bucket the padded length to a multiple of 16: few jit shapes, and padding never changes a result
        width = min(max_tokens, -(-longest // 16) * 16)
        pooled = fwd(params, ids[:, :width], mask[:, :width])
        out.append(np.asarray(pooled / jnp.linalg.norm(pooled, axis=-1, keepdims=True)))
    return np.concatenate(out) if out else np.zeros((0, module.config.width), np.float32)
