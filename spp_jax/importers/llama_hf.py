"""Hugging Face Llama checkpoints (`LlamaForCausalLM.save_pretrained` directories) into our `Llama`.

Directory layout read here:
  config.json                    model_type "llama"; hidden_size, num_hidden_layers, num_attention_heads,
                                 num_key_value_heads (GQA; default = heads), head_dim (default
                                 hidden/heads), intermediate_size, rms_norm_eps, vocab_size,
                                 tie_word_embeddings, max_position_embeddings, and the RoPE base:
                                 `rope_theta` (transformers 4.x) or `rope_parameters.rope_theta` (5.x)
  model.safetensors              one file, or shards listed by model.safetensors.index.json ("weight_map")
  tokenizer.json                 optional (`tokenizers` serialization)

The safetensors files are read without torch (BF16 included) by spp_jax.importers.safetensors_dir.

Names and layouts (torch Linear weights are [out, in]; our kernels are [in, ..., out]):
  model.embed_tokens.weight [V, D]                  -> embed.embedding
  model.layers.N.input_layernorm.weight             -> block_N.attn_norm.scale
  model.layers.N.self_attn.{q,k,v}_proj.weight      -> block_N.attn.{query,key,value}.kernel [D, heads, hd]
  model.layers.N.self_attn.o_proj.weight [D, H*hd]  -> block_N.attn.out.kernel [H, hd, D]
  model.layers.N.post_attention_layernorm.weight    -> block_N.mlp_norm.scale
  model.layers.N.mlp.{gate,up,down}_proj.weight     -> block_N.mlp.{gate,up,down}.kernel
  model.norm.weight                                 -> final_norm.scale
  lm_head.weight [V, D]                             -> lm_head.kernel [D, V] (untied models only)
HF Q/K rows are already in the rotate-half order our RoPE uses: no permutation (unlike GGUF).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from spp_jax.errors import CheckpointMismatch, ConfigError
from spp_jax.importers._common import Params
from spp_jax.importers.safetensors_dir import SafetensorsFile, open_weights
from spp_jax.models.llama import LlamaConfig
from spp_jax.tokenizer import TOKENIZER_FILE, as_token_id

SUPPORTED_ROPE = ("default", None)  # plain RoPE; scaled variants (linear, dynamic, yarn, llama3) are not


def hf_llama_config(cfg: dict[str, Any], source: str = "config.json") -> LlamaConfig:
    """`LlamaConfig` from a parsed HF `config.json`; `ConfigError` for what our model cannot represent."""
    if cfg.get("model_type", "llama") != "llama":
        raise ConfigError(f"{source}: model_type {cfg.get('model_type')!r} is not supported; only 'llama' is")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ConfigError(
            f"{source}: attention/MLP biases are not supported by our Llama; use a bias-free model"
        )
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {cfg.get('hidden_act')!r} is not supported; only 'silu' is")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type not in SUPPORTED_ROPE:
        raise ConfigError(
            f"{source}: RoPE type {rope_type!r} is not supported; supported: plain RoPE "
            "(rope_type 'default' or no rope_scaling)"
        )
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    try:
        width, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        return LlamaConfig(
            vocab_size=int(cfg["vocab_size"]),
            width=width,
            depth=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or width // heads),
            mlp_dim=int(cfg["intermediate_size"]),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_len=int(cfg.get("max_position_embeddings", 2048)),
        )
    except KeyError as e:
        raise ConfigError(f"{source}: missing key {e.args[0]!r}; it is not a Llama config") from e


def hf_llama_params(weights: dict[str, SafetensorsFile], config: LlamaConfig, source: str) -> Params:
    """Our param tree (numpy float32, kernels [in, ..., out]) from HF tensors; checks names and shapes."""
    D, H, KV, hd = config.width, config.num_heads, config.num_kv_heads, config.head_dim
    F, V = config.mlp_dim, config.vocab_size

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in weights:
            raise CheckpointMismatch(f"{source}: missing tensor {name!r} (expected shape {shape})")
        w = weights[name].get(name)
        if w.shape != shape:
            raise CheckpointMismatch(
                f"{source}: tensor {name!r} has shape {w.shape}, config.json implies {shape}"
            )
        return w

    def lin(name: str, n_out: int, n_in: int) -> np.ndarray:  # torch [out, in] -> [in, out]
        return np.ascontiguousarray(take(name, (n_out, n_in)).T)

    params: Params = {"embed": {"embedding": np.array(take("model.embed_tokens.weight", (V, D)))}}
    for i in range(config.depth):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        params[f"block_{i}"] = {
            "attn_norm": {"scale": np.array(take(p + "input_layernorm.weight", (D,)))},
            "attn": {
                "query": {"kernel": lin(a + "q_proj.weight", H * hd, D).reshape(D, H, hd)},
                "key": {"kernel": lin(a + "k_proj.weight", KV * hd, D).reshape(D, KV, hd)},
                "value": {"kernel": lin(a + "v_proj.weight", KV * hd, D).reshape(D, KV, hd)},
                "out": {"kernel": lin(a + "o_proj.weight", D, H * hd).reshape(H, hd, D)},
            },
            "mlp_norm": {"scale": np.array(take(p + "post_attention_layernorm.weight", (D,)))},
            "mlp": {
                "gate": {"kernel": lin(p + "mlp.gate_proj.weight", F, D)},
                "up": {"kernel": lin(p + "mlp.up_proj.weight", F, D)},
                "down": {"kernel": lin(p + "mlp.down_proj.weight", D, F)},
            },
        }
    params["final_norm"] = {"scale": np.array(take("model.norm.weight", (D,)))}
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": lin("lm_head.weight", V, D)}
    return params


def read_hf_llama(
    directory: str | os.PathLike,
) -> tuple[LlamaConfig, Params, Any, dict[str, int | None]]:
    """(config, params, tokenizer or None, special ids {"bos", "eos", "pad"}) of a HF Llama directory.

    Special ids come from config.json (None where absent; of an eos list, the first). The tokenizer is
    `tokenizer.json` loaded with `tokenizers`, or None when the directory has none.
    """
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointMismatch(f"{str(d)!r} is not a directory; give a Hugging Face Llama model directory")
    if not (d / "config.json").is_file():
        raise CheckpointMismatch(f"{d} has no config.json; it is not a Hugging Face model directory")
    cfg = json.loads((d / "config.json").read_text())
    config = hf_llama_config(cfg, source=str(d / "config.json"))
    params = hf_llama_params(open_weights(d), config, source=str(d))
    tok = None
    if (d / TOKENIZER_FILE).is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(d / TOKENIZER_FILE))
    special = {k: as_token_id(cfg.get(f"{k}_token_id")) for k in ("bos", "eos", "pad")}
    return config, params, tok, special


__all__ = ["SafetensorsFile", "hf_llama_config", "hf_llama_params", "read_hf_llama"]
