"""Swin importers checked against transformers' SwinForImageClassification and SwinModel (random weights).

- HF: a saved directory read by `read_hf_swin`; our logits equal transformers' at the config's input size
  and at other sizes: padding to whole windows with a shift, a map side equal to the window (no shift), an
  odd side before merging, and a window-7 model at 64 px (the 224 -> 256 case scaled down by 4).
- timm: timm needs torchvision, which is not a test dependency (its wheels must match the installed torch
  build). The timm layout (fused qkv, merging at the start of a stage, `head.fc`; and the older layout with
  merging at the end of a stage and `head`) is built from the HF weights by the key mapping documented in
  spp_jax.importers.swin_timm and must load to the very same params. Where timm imports, its own random
  model is checked as well.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spp_jax.errors import CheckpointMismatch, ConfigError
from spp_jax.importers.swin_hf import hf_swin_params, normalize_names, read_hf_swin
from spp_jax.importers.swin_timm import read_timm_swin
from spp_jax.models.swin import SwinConfig, SwinTransformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
MU = dict(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4)
W7 = dict(image_size=56, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=7)
CONFIGS = {"mu": MU, "w7": W7}


pytestmark = pytest.mark.slow  # compared with the reference packages: the full suite


def hf_swin(name: str, cls: str = "SwinForImageClassification", **extra):
    """A transformers Swin of CONFIGS[name] with every parameter randomized (the same for the same args).

    Build a fresh one per input size: HF's SwinLayer keeps the window and shift it clamped for a small
    input, so a later larger input would run without the shift."""
    cfg = transformers.SwinConfig(**CONFIGS[name], num_labels=5, **extra)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, cls)(cfg).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            norm = "norm" in key and key.endswith("weight")
            p.copy_(torch.randn_like(p) * (0.1 if norm else 0.2) + (1.0 if norm else 0.0))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (directory, config, params) of the saved classifier models, read by `read_hf_swin`."""
    out = {}
    for name in CONFIGS:
        d = tmp_path_factory.mktemp(name)
        hf_swin(name).save_pretrained(d, safe_serialization=True)
        out[name] = (d, *read_hf_swin(d))
    return out


@functools.cache
def _forward(config: SwinConfig):
    return jax.jit(lambda p, x: SwinTransformer(config).apply({"params": p}, x))


def ours(config: SwinConfig, params, x_nchw: np.ndarray) -> np.ndarray:
    return np.asarray(_forward(config)(params, jnp.asarray(x_nchw.transpose(0, 2, 3, 1))))


def images(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)


def torch_out(model, x: np.ndarray, pooled: bool = False) -> np.ndarray:
    with torch.no_grad():
        out = model(pixel_values=torch.from_numpy(x))
    return (out.pooler_output if pooled else out.logits).numpy()


# ------------------------------------------------------------------------------------------------ HF
@pytest.mark.parametrize(
    ("name", "size"),
    [("mu", 32), ("mu", 40), ("mu", 16), ("mu", 38), ("w7", 56), ("w7", 64)],
    ids=["mu-32", "mu-40-padded", "mu-16-window=side", "mu-38-odd-merge", "w7-56", "w7-64-padded"],
)
def test_hf_matches_transformers(saved, name, size):
    _, config, params = saved[name]
    assert config == SwinConfig(**{**CONFIGS[name], "num_classes": 5})
    x = images(size, seed=size)
    err = np.abs(ours(config, params, x) - torch_out(hf_swin(name), x)).max()
    assert err < TOL, err


def test_hf_swin_model_pooled_output(tmp_path):
    model = hf_swin("mu", "SwinModel")
    model.save_pretrained(tmp_path, safe_serialization=True)
    config, params = read_hf_swin(tmp_path)  # no `swin.` prefix, no classifier: a feature model
    assert config.num_classes == 0 and "head" not in params
    for size in (32, 40):
        x = images(size, seed=1)
        err = np.abs(ours(config, params, x) - torch_out(hf_swin("mu", "SwinModel"), x, pooled=True)).max()
        assert err < TOL, err


def test_hf_in_memory_names_and_no_qkv_bias(saved, tmp_path):
    _, config, params = saved["mu"]
    state = {k: v.numpy() for k, v in hf_swin("mu").state_dict().items()}  # recent names: q_proj, mlp.fc1
    again = hf_swin_params(normalize_names(state), config, "state dict")
    jax.tree.map(np.testing.assert_array_equal, again, params)
    model = hf_swin("mu", qkv_bias=False)
    model.save_pretrained(tmp_path, safe_serialization=True)
    config, params = read_hf_swin(tmp_path)
    assert not params["stage_1"]["block_1"]["attn"]["key"]["bias"].any()
    x = images(32, seed=2)
    assert np.abs(ours(config, params, x) - torch_out(model, x)).max() < TOL


def test_hf_errors(tmp_path):
    from safetensors.numpy import load_file, save_file

    with pytest.raises(CheckpointMismatch, match="not a directory"):
        read_hf_swin(tmp_path / "nope")
    with pytest.raises(CheckpointMismatch, match=r"no config\.json"):
        read_hf_swin(tmp_path)
    hf_swin("mu").save_pretrained(tmp_path, safe_serialization=True)
    cfg = json.loads((tmp_path / "config.json").read_text())

    def write(**changes):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **changes}))

    write(model_type="swinv2")
    with pytest.raises(ConfigError, match="only 'swin'"):
        read_hf_swin(tmp_path)
    write(use_absolute_embeddings=True)
    with pytest.raises(ConfigError, match="absolute position embeddings"):
        read_hf_swin(tmp_path)
    write(embed_dim=32)
    with pytest.raises(CheckpointMismatch, match=r"projection\.weight' has shape \(16, 3, 2, 2\)") as e:
        read_hf_swin(tmp_path)
    assert "\n" not in str(e.value)
    write(depths=[2, 3])
    with pytest.raises(CheckpointMismatch, match=r"missing key 'encoder\.layers\.1\.blocks\.2\."):
        read_hf_swin(tmp_path)
    write()
    weights = load_file(str(tmp_path / "model.safetensors"))
    save_file({**weights, "swin.embeddings.mask_token": np.zeros((1, 1, 16), np.float32)},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    with pytest.raises(CheckpointMismatch, match=r"unexpected key 'embeddings\.mask_token'"):
        read_hf_swin(tmp_path)


# ---------------------------------------------------------------------------------------------- timm
def hf_to_timm(directory, depths, old: bool = False) -> dict[str, np.ndarray]:
    """A saved HF Swin under timm's names: recent layout, or the older one (`old`) with the merging at the
    end of a stage, the head as `head` and the index/mask buffers it stored."""
    from safetensors.numpy import load_file

    f = {k.removeprefix("swin."): v for k, v in load_file(str(directory / "model.safetensors")).items()}
    pairs = {
        "patch_embed.proj": "embeddings.patch_embeddings.projection",
        "patch_embed.norm": "embeddings.norm",
        "norm": "layernorm",
        "head" if old else "head.fc": "classifier",
    }
    sd = {}
    for s, depth in enumerate(depths):
        if s > 0:
            merge = f"layers.{s - 1 if old else s}.downsample"
            pairs |= {f"{merge}.norm": f"encoder.layers.{s - 1}.downsample.norm"}
            sd[f"{merge}.reduction.weight"] = f[f"encoder.layers.{s - 1}.downsample.reduction.weight"]
        for i in range(depth):
            t, h = f"layers.{s}.blocks.{i}.", f"encoder.layers.{s}.blocks.{i}."
            qkv = [h + f"attention.self.{n}" for n in ("query", "key", "value")]
            for part in ("weight", "bias"):
                sd[f"{t}attn.qkv.{part}"] = np.concatenate([f[f"{k}.{part}"] for k in qkv])
            table = "attention.self.relative_position_bias_table"
            sd[t + "attn.relative_position_bias_table"] = f[h + table]
            pairs |= {t + "norm1": h + "layernorm_before", t + "norm2": h + "layernorm_after"}
            pairs |= {t + "attn.proj": h + "attention.output.dense", t + "mlp.fc1": h + "intermediate.dense"}
            pairs |= {t + "mlp.fc2": h + "output.dense"}
            if old:
                sd[t + "attn.relative_position_index"] = np.zeros((16, 16), np.float32)
                sd[t + "attn_mask"] = np.zeros((16, 16, 16), np.float32)
    for tm, hf in pairs.items():
        for part in ("weight", "bias"):
            sd[f"{tm}.{part}"] = f[f"{hf}.{part}"]
    return sd


@pytest.mark.parametrize("old", [False, True], ids=["recent-layout", "older-layout"])
def test_timm_layout_loads_the_same_params(saved, tmp_path, old):
    from safetensors.numpy import save_file

    directory, config, params = saved["mu"]
    sd = hf_to_timm(directory, config.depths, old)
    save_file(sd, str(tmp_path / "swin.safetensors"))
    got_config, got = read_timm_swin(tmp_path / "swin.safetensors", image_size=32)
    assert got_config == config
    jax.tree.map(np.testing.assert_array_equal, got, params)  # the HF test checks these against torch


def test_timm_errors(saved):
    directory, config, _ = saved["mu"]
    sd = hf_to_timm(directory, config.depths)
    broken = {k: v for k, v in sd.items() if k != "layers.1.blocks.0.mlp.fc2.bias"}
    with pytest.raises(CheckpointMismatch, match=r"missing key 'layers\.1\.blocks\.0\.mlp\.fc2\.bias'") as e:
        read_timm_swin(broken, 32)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointMismatch, match="unexpected key 'dist_token'"):
        read_timm_swin({**sd, "dist_token": np.zeros(3, np.float32)}, 32)
    with pytest.raises(CheckpointMismatch, match=r"missing key 'patch_embed\.proj\.weight'"):
        read_timm_swin({k: v for k, v in sd.items() if not k.startswith("patch_embed.proj")}, 32)
    no_head = {k: v for k, v in sd.items() if not k.startswith("head.")}
    assert read_timm_swin(no_head, 32)[0].num_classes == 0


def test_timm_importer_matches_timm():
    try:
        import timm
    except Exception as e:  # timm needs torchvision, and its build must match torch's
        pytest.skip(f"timm does not import here ({type(e).__name__}: {e})")
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=5, img_size=32, patch_size=2,
        embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4,
    ).eval()  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():
        for key, p in model.named_parameters():
            norm = "norm" in key and key.endswith("weight")
            p.copy_(torch.randn_like(p) * (0.1 if norm else 0.2) + (1.0 if norm else 0.0))
    config, params = read_timm_swin(model.state_dict(), image_size=32)
    x = images(32, seed=3)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(ours(config, params, x) - ref).max() < TOL
