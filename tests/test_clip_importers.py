"""The CLIP importer checked against transformers' CLIPModel (random weights, a tiny config): our normalised
image and text embeddings equal transformers' projected, normalised features, with padded text batches, the
legacy eos rule (eos_token_id 2: argmax of the ids) and another input size; bad directories give one-line
errors."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest

from spp_jax.errors import CheckpointMismatch, ConfigError
from spp_jax.importers.clip_hf import read_hf_clip
from spp_jax.models.clip import TwoTower

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
VOCAB, EOS = 99, 98
TEXT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    vocab_size=VOCAB,
    max_position_embeddings=20,
    eos_token_id=EOS,
    bos_token_id=97,
    pad_token_id=0,
)
VISION = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96, image_size=16,
              patch_size=4)  # fmt: skip


pytestmark = pytest.mark.slow  # compared with the reference packages: the full suite


def hf_clip(eos: int = EOS, hidden_act: str = "quick_gelu"):
    cfg = transformers.CLIPConfig(
        text_config={**TEXT, "eos_token_id": eos, "hidden_act": hidden_act},
        vision_config={**VISION, "hidden_act": hidden_act},
        projection_dim=24,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            norm = ("norm" in key or "layrnorm" in key) and key.endswith("weight")
            p.copy_(torch.randn_like(p) * (0.1 if norm else 0.2) + (1.0 if norm else 0.0))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(directory, model) of the saved default model."""
    d = tmp_path_factory.mktemp("clip")
    model = hf_clip()
    model.save_pretrained(d, safe_serialization=True)
    return d, model


def texts(eos: int = EOS) -> tuple[np.ndarray, np.ndarray]:
    """Three texts of lengths 12, 7 and 3 (bos ... eos), padded with 0 to 12."""
    rng = np.random.default_rng(0)
    ids = np.zeros((3, 12), np.int64)
    mask = np.zeros((3, 12), np.int64)
    for row, n in enumerate((12, 7, 3)):
        ids[row, :n] = np.concatenate([[97], rng.integers(3, 90, n - 2), [eos]])
        mask[row, :n] = 1
    return ids, mask


def images(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)


def hf_features(out) -> np.ndarray:
    feats = getattr(out, "pooler_output", out)  # transformers 5 returns an output object
    return (feats / feats.norm(dim=-1, keepdim=True)).numpy()


def hf_image(model, x: np.ndarray, interpolate: bool = False) -> np.ndarray:
    with torch.no_grad():
        return hf_features(
            model.get_image_features(pixel_values=torch.from_numpy(x), interpolate_pos_encoding=interpolate)
        )


def hf_text(model, ids: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    with torch.no_grad():
        m = None if mask is None else torch.from_numpy(mask)
        return hf_features(model.get_text_features(input_ids=torch.from_numpy(ids), attention_mask=m))


def ours(config, params, x, ids, mask):
    return TwoTower(config).apply({"params": params}, jax.numpy.asarray(x.transpose(0, 2, 3, 1)), ids, mask)


def test_image_and_padded_text_embeddings_match_transformers(saved):
    d, model = saved
    config, params = read_hf_clip(d)
    assert config.image.ln_pre and not config.image.patch_bias and config.image.activation == "quick_gelu"
    assert config.text.pool == "eos" and config.text.eos_token_id == EOS and config.text.causal
    assert config.embed_dim == 24 and config.text.seq_len == 20
    x = images(16)
    ids, mask = texts()
    img, txt, scale = ours(config, params, x, ids, mask)
    err_img = np.abs(np.asarray(img) - hf_image(model, x)).max()
    err_txt = np.abs(np.asarray(txt) - hf_text(model, ids, mask)).max()
    assert err_img < TOL, err_img
    assert err_txt < TOL, err_txt
    np.testing.assert_allclose(float(scale), float(model.logit_scale.detach().exp()), rtol=1e-6)
    # each padded row equals the same text alone, unpadded
    for row, n in enumerate((12, 7, 3)):
        alone = hf_text(model, ids[row : row + 1, :n], None)
        assert np.abs(np.asarray(txt)[row] - alone[0]).max() < TOL


def test_other_input_size_resamples_position_embeddings(saved):
    d, model = saved
    config, params = read_hf_clip(d, image_size=24, seq_len=12)
    assert config.image.image_size == 24 and config.image.posemb_grid == 4 and config.text.seq_len == 12
    x = images(24, seed=1)
    ids, mask = texts()
    img, _, _ = ours(config, params, x, ids, mask)
    err = np.abs(np.asarray(img) - hf_image(model, x, interpolate=True)).max()
    assert err < TOL, err


def test_legacy_eos_rule_and_gelu(tmp_path):
    model = hf_clip(eos=2, hidden_act="gelu")
    model.save_pretrained(tmp_path, safe_serialization=True)
    config, params = read_hf_clip(tmp_path)
    assert config.text.eos_token_id == 2 and config.text.activation == "gelu"
    ids, mask = texts(eos=EOS)  # the legacy rule pools at argmax(ids): the highest id (EOS here)
    x = images(16, seed=2)
    img, txt, _ = ours(config, params, x, ids, mask)
    assert np.abs(np.asarray(txt) - hf_text(model, ids, mask)).max() < TOL
    assert np.abs(np.asarray(img) - hf_image(model, x)).max() < TOL


# ------------------------------------------------------------------------------------------ bad input
def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bad_directories_give_one_line_errors(saved, tmp_path):
    d, _ = saved
    with pytest.raises(CheckpointMismatch) as e:
        read_hf_clip(tmp_path / "nope")
    assert "not a directory" in _one_line(e)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointMismatch) as e:
        read_hf_clip(empty)
    assert "config.json" in _one_line(e)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(d / "config.json", no_weights / "config.json")
    with pytest.raises(CheckpointMismatch) as e:
        read_hf_clip(no_weights)
    assert "model.safetensors" in _one_line(e)

    other = tmp_path / "other"
    shutil.copytree(d, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "siglip"}))
    with pytest.raises(ConfigError) as e:
        read_hf_clip(other)
    assert "not a CLIP model" in _one_line(e)

    wrong = tmp_path / "wrong"
    shutil.copytree(d, wrong)
    cfg["text_config"] = {**cfg["text_config"], "intermediate_size": 48}
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatch) as e:
        read_hf_clip(wrong)
    assert "has shape" in _one_line(e) and "fc1" in str(e.value)


def test_missing_and_extra_keys(saved, tmp_path):
    from safetensors.numpy import load_file, save_file

    d, _ = saved
    flat = load_file(d / "model.safetensors")
    for name, change in (
        ("missing", lambda f: f.pop("text_projection.weight")),
        ("extra", lambda f: f.update({"visual_projection.bias": np.zeros(24, np.float32)})),
    ):
        out = tmp_path / name
        shutil.copytree(d, out)
        f = dict(flat)
        change(f)
        save_file(f, out / "model.safetensors")
        with pytest.raises(CheckpointMismatch) as e:
            read_hf_clip(out)
        msg = _one_line(e)
        want = "missing key 'text_projection.weight'" if name == "missing" else "unexpected key"
        assert want in msg


def test_hf_entry_reads_the_directory(saved):
    import ml_collections

    from spp_jax.architectures.clip import ClipArchitecture

    d, _ = saved
    cfg = ml_collections.ConfigDict({"seed": 0})
    cfg.model = ml_collections.ConfigDict(
        dict(arch="clip", init="hf", init_path=str(d), variant="mu", image_size=24, seq_len=12, embed_dim=7,
             image_groups=("qk", "vo", "mlp"), text_groups=("qk", "vo", "mlp"))
    )  # fmt: skip
    arch = ClipArchitecture()
    adapter = arch.build_adapter(cfg, None)
    assert adapter.config == read_hf_clip(d, image_size=24, seq_len=12)[0]
    assert adapter.config.embed_dim == 24  # the checkpoint's projection_dim
    params = arch.load_pretrained(cfg, adapter)
    n = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
    assert n == adapter.arch_cost(adapter.dense_spec())[0] == adapter.mask_spec().total_params
