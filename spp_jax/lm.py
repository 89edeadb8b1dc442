"""Language-model conveniences over saved models: load one with its tokenizer, score a text's perplexity,
generate text. Used by launch/perplexity.py and launch/generate.py.

Perplexity of a token sequence x_1..x_N is exp(-1/(N-1) sum_{i=2..N} log p(x_i | x_<i)) (the Hugging Face
convention: the first token is never scored).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.errors import CheckpointMismatch, ConfigError


def load_lm(
    model_dir: str | Path | None, cfg: Any = None, target: str | None = None
) -> tuple[Any, dict, Any, dict]:
    """(module, params, tokenizer, special ids) of a saved causal-LM model directory (the member `target` of
    a weight family), or of the pretrained model `cfg` names when `model_dir` is None."""
    if model_dir is not None:
        from spp_jax.family import load_pruned
        from spp_jax.tokenizer import load_tokenizer

        module, params, _ = load_pruned(model_dir, target)
        if not (Path(model_dir) / "tokenizer.json").exists():
            raise CheckpointMismatch(
                f"{model_dir} has no tokenizer.json; give a model directory made by a causal-LM run"
            )
        tokenizer, special = load_tokenizer(model_dir)
        return module, params, tokenizer, special
    from spp_jax.architectures import build_architecture
    from spp_jax.run_config import validate_config

    if cfg is None:
        raise ConfigError("give a model directory or a causal-LM config")
    validate_config(cfg)
    if cfg.task != "causal_lm":
        raise ConfigError(f"the config's task is {cfg.task!r}; give a causal-LM config (configs/llama.py)")
    arch = build_architecture(cfg)
    adapter = arch.build_adapter(cfg, None)
    params = arch.load_pretrained(cfg, adapter)
    tokenizer, special = arch.tokenizer(cfg)
    return adapter.module(), params, tokenizer, special


def sequence_perplexity(module, params, tokenizer, text: str, max_tokens: int) -> tuple[float, int]:
    """(perplexity of the first `max_tokens` tokens of `text` as one sequence, tokens scored + 1)."""
    from spp_jax.task import next_token_nll

    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids[:max_tokens], np.int32)
    if len(ids) < 2:
        raise ConfigError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    max_len = getattr(getattr(module, "config", None), "max_len", None)
    if max_len is not None and len(ids) - 1 > max_len:
        raise ConfigError(
            f"--max_tokens={max_tokens} is longer than the model's {max_len}; use a smaller one"
        )
    logits = jax.jit(module.apply)({"params": params}, jnp.asarray(ids[None, :-1]))
    nll = next_token_nll(logits, jnp.asarray(ids[None, 1:]))
    return float(np.exp(float(nll.mean()))), len(ids)


def generate_text(
    module,
    params,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    eos_id: int | None = None,
) -> tuple[str, float]:
    """(the continuation of `prompt`, decode tokens/s of a second, timed generation after a warm-up one
    that compiles prefill and decode step)."""
    from spp_jax.generation import generate

    ids = np.asarray([tokenizer.encode(prompt, add_special_tokens=False).ids], np.int32)
    if ids.shape[1] == 0:
        raise ConfigError("the prompt is empty after tokenisation; give some text")
    run = lambda n: generate(module, params, ids, n, temperature=temperature, seed=seed, eos_id=eos_id)
    run(1)  # compiles prefill and the decode step
    t0 = time.perf_counter()
    run(1)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = np.asarray(run(max_new_tokens))
    seconds = time.perf_counter() - t0 - prefill
    new = out[0, ids.shape[1] :].tolist()
    if eos_id is not None and eos_id in new:
        new = new[: new.index(eos_id)]
    return tokenizer.decode(new), max(len(new) - 1, 1) / max(seconds, 1e-9)
