"""Autoregressive generation with the KV cache of `spp_jax.models.llama` (dense or pruned models).

One jitted prefill runs the prompt [B, P] through the model, filling the cache and choosing the first new
token; one jitted decode step feeds the last token [B, 1] and chooses the next. Both are compiled once per
(module, batch, prompt length, cache length): the cache length is P + max_new_tokens rounded up to a power
of two (at least 256, at most the model's `max_len`), so later calls with other lengths usually reuse them.
Tokens are chosen by argmax (temperature 0) or sampled from softmax(logits / temperature) with the key
fold_in(key(seed), position), so a seeded run is reproducible. With `eos_id`, a row that has produced it
keeps producing it, and decoding stops when every row has.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spp_jax.errors import ConfigError
from spp_jax.models.llama import Cache, Llama, init_cache


def _choose(logits: jax.Array, key: jax.Array, temperature: jax.Array) -> jax.Array:
    """Next tokens [B] from last-position logits [B, V]: argmax, or a sample at temperature > 0."""
    greedy = jnp.argmax(logits, axis=-1)
    sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def _compiled(module: Llama) -> tuple[Callable, Callable]:
    """(prefill, step), jitted once per module (modules of equal config and layers compare equal)."""

    def run(params, tokens, cache, key, temperature):
        position = cache["length"] + tokens.shape[1] - 1  # of the last input token
        logits, cache = module.apply({"params": params}, tokens, cache=cache)
        token = _choose(logits[:, -1], jax.random.fold_in(key, position), temperature)
        return token, cache

    prefill = jax.jit(run, donate_argnums=2)  # the cache buffers are updated in place
    step = jax.jit(
        lambda params, token, cache, key, temp: run(params, token[:, None], cache, key, temp),
        donate_argnums=2,
    )
    return prefill, step


def _cache_len(module: Llama, needed: int) -> int:
    max_len = module.config.max_len
    if needed > max_len:
        raise ConfigError(
            f"prompt + new tokens = {needed} exceeds the model's max_len {max_len}; generate fewer tokens"
        )
    return min(max(256, 1 << (needed - 1).bit_length()), max_len)


def _start(
    module: Llama, params: Any, prompt_ids: np.ndarray, max_new_tokens: int, seed: int, temperature: float
) -> tuple[jax.Array, Cache, jax.Array, jax.Array, Callable]:
    """Run the prefill: (first new token [B], cache, key, temperature, step function)."""
    prompt = np.asarray(prompt_ids, np.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ConfigError(f"prompt_ids has shape {prompt.shape}; give int tokens [batch, prompt_len >= 1]")
    b, p = prompt.shape
    config = module.config
    cache = init_cache(config, module.layers, b, _cache_len(module, p + max_new_tokens))
    prefill, step = _compiled(module)
    key, temp = jax.random.key(seed), jnp.float32(temperature)
    token, cache = prefill(params, jnp.asarray(prompt), cache, key, temp)
    return token, cache, key, temp, step


def generate(
    module: Llama,
    params: Any,
    prompt_ids: np.ndarray,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    eos_id: int | None = None,
) -> np.ndarray:
    """The prompt [B, P] followed by `max_new_tokens` generated tokens: int32 [B, P + max_new_tokens]
    (after every row has produced `eos_id`, the rest is filled with it)."""
    prompt = np.asarray(prompt_ids, np.int32)
    if max_new_tokens <= 0:
        return prompt
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} is negative; use 0 (greedy) or more")
    params = jax.device_put(params)
    token, cache, key, temp, step = _start(module, params, prompt, max_new_tokens, seed, temperature)
    out = [token]
    done = None if eos_id is None else token == eos_id
    for _ in range(max_new_tokens - 1):
        if done is not None and bool(done.all()):
            break
        token, cache = step(params, token, cache, key, temp)
        if done is not None:
            token = jnp.where(done, eos_id, token)
            done = done | (token == eos_id)
        out.append(token)
    new = np.stack([np.asarray(t) for t in out], axis=1)
    if new.shape[1] < max_new_tokens:
        new = np.pad(new, ((0, 0), (0, max_new_tokens - new.shape[1])), constant_values=eos_id)
    return np.concatenate([prompt, new.astype(np.int32)], axis=1)


def decode_tokens_per_second(
    module: Llama, params: Any, prompt_len: int, new_tokens: int, batch: int = 1, repeats: int = 3
) -> float:
    """Greedy decode throughput (generated tokens per second, all rows) after a `prompt_len`-token
    random prompt: the median over `repeats` timed runs of `new_tokens` decode steps (prefill not timed),
    after a warm-up run that compiles prefill and step."""
    if prompt_len < 1 or new_tokens < 1:
        raise ConfigError(f"prompt_len={prompt_len}, new_tokens={new_tokens}; both must be >= 1")
    prompt = np.random.default_rng(0).integers(0, module.config.vocab_size, (batch, prompt_len))
    params = jax.device_put(params)

    def timed() -> float:
        token, cache, key, temp, step = _start(module, params, prompt, new_tokens + 1, 0, 0.0)
        jax.block_until_ready((token, cache))
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            token, cache = step(params, token, cache, key, temp)
        jax.block_until_ready(token)
        return time.perf_counter() - t0

    timed()  # warm-up: compiles
    seconds = statistics.median(timed() for _ in range(max(1, repeats)))
    return batch * new_tokens / max(seconds, 1e-9)
