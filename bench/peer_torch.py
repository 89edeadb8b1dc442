"""The PyTorch restatement of the reference search step that bench/peer_step.py times and checks spp_jax
against (docs/algorithm.md §3.2, the official form; bench/peer_step.py's docstring says what it restates):
`TorchViT` and `TorchLlama` load spp_jax params and take the same masks, `TorchOfficialStep` is the step.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spp_jax.models.llama import rope_inv_freq


def to_torch(x) -> torch.Tensor:
    """A float32 torch tensor of an array (a copy)."""
    return torch.from_numpy(np.array(x, np.float32))


class TorchViTBlock(nn.Module):
    def __init__(self, d: int, h: int, mlp: int, eps: float, attn: str):
        super().__init__()
        self.h, self.hd, self.attn = h, d // h, attn
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x, qk, vo, mlp):
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, N, hd]
        q, k, v = q * qk, k * qk, v * vo
        if self.attn == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, scale=self.hd**-0.5)
        else:
            o = ((q * self.hd**-0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
        x = x + self.proj(o.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)) * mlp))


class TorchViT(nn.Module):
    """The spp_jax ViT of `config` (class token, cls pooling, no LayerScale, no position resampling)."""

    def __init__(self, config, attn: str = "sdpa"):
        super().__init__()
        c = self.config = config
        grid = c.image_size // c.patch_size
        assert c.pool == "cls" and c.cls_token and c.posemb_cls and not c.layerscale and not c.ln_pre
        assert (
            c.posemb_grid == grid and c.activation is None and not c.gelu_approximate and c.mlp_mask_pre_act
        )
        d = c.width
        self.patch = nn.Conv2d(3, d, c.patch_size, c.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.zeros(1, grid * grid + 1, d))
        self.blocks = nn.ModuleList(
            TorchViTBlock(d, c.num_heads, c.mlp_dim, c.ln_eps, attn) for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(d, eps=c.ln_eps)
        self.head = nn.Linear(d, c.num_classes)
        self.masks = nn.ParameterDict(
            {
                "qk": torch.ones(c.depth, c.head_dim),
                "vo": torch.ones(c.depth, c.head_dim),
                "mlp": torch.ones(c.depth, c.mlp_dim),
            }
        )

    def forward(self, images):  # images [B, 3, H, W]
        x = self.patch(images).flatten(2).transpose(1, 2) + self.pos[:, 1:]
        cls = (self.cls + self.pos[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], 1)
        m = self.masks
        for i, blk in enumerate(self.blocks):
            x = blk(x, m["qk"][i], m["vo"][i], m["mlp"][i])
        return self.head(self.norm(x)[:, 0])

    @torch.no_grad()
    def load(self, params) -> TorchViT:
        """Copy spp_jax VisionTransformer params (flax layout) in."""
        c = self.config
        d = c.width
        self.patch.weight.copy_(to_torch(params["embedding"]["kernel"]).permute(3, 2, 0, 1))
        self.patch.bias.copy_(to_torch(params["embedding"]["bias"]))
        self.cls.copy_(to_torch(params["cls"]))
        self.pos.copy_(to_torch(params["pos_embedding"]))
        for i, blk in enumerate(self.blocks):
            p = params[f"encoderblock_{i}"]
            a = p["attn"]
            for ln, name in ((blk.norm1, "ln1"), (blk.norm2, "ln2")):
                ln.weight.copy_(to_torch(p[name]["scale"]))
                ln.bias.copy_(to_torch(p[name]["bias"]))
            blk.qkv.weight.copy_(
                torch.cat([to_torch(a[n]["kernel"]).reshape(d, d).T for n in ("query", "key", "value")])
            )
            blk.qkv.bias.copy_(
                torch.cat([to_torch(a[n]["bias"]).reshape(d) for n in ("query", "key", "value")])
            )
            blk.proj.weight.copy_(to_torch(a["out"]["kernel"]).reshape(d, d).T)
            blk.proj.bias.copy_(to_torch(a["out"]["bias"]))
            for lin, name in ((blk.fc1, "fc1"), (blk.fc2, "fc2")):
                lin.weight.copy_(to_torch(p["mlp"][name]["kernel"]).T)
                lin.bias.copy_(to_torch(p["mlp"][name]["bias"]))
        self.norm.weight.copy_(to_torch(params["encoder_norm"]["scale"]))
        self.norm.bias.copy_(to_torch(params["encoder_norm"]["bias"]))
        self.head.weight.copy_(to_torch(params["head"]["kernel"]).T)
        self.head.bias.copy_(to_torch(params["head"]["bias"]))
        return self


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight


class TorchLlamaBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        d, hd = c.width, c.head_dim
        self.c = c
        self.attn_norm, self.mlp_norm = nn.Parameter(torch.ones(d)), nn.Parameter(torch.ones(d))
        self.q = nn.Linear(d, c.num_heads * hd, bias=False)
        self.k = nn.Linear(d, c.num_kv_heads * hd, bias=False)
        self.v = nn.Linear(d, c.num_kv_heads * hd, bias=False)
        self.o = nn.Linear(c.num_heads * hd, d, bias=False)
        self.gate = nn.Linear(d, c.mlp_dim, bias=False)
        self.up = nn.Linear(d, c.mlp_dim, bias=False)
        self.down = nn.Linear(c.mlp_dim, d, bias=False)

    def forward(self, x, cos, sin, qk, vo, mlp):
        c = self.c
        b, t, _ = x.shape
        p = c.head_dim // 2
        y = rms_norm(x, self.attn_norm, c.rms_eps)
        q = self.q(y).view(b, t, c.num_heads, c.head_dim)
        k = self.k(y).view(b, t, c.num_kv_heads, c.head_dim)
        v = self.v(y).view(b, t, c.num_kv_heads, c.head_dim) * vo

        def rope(z):  # rotate-half: dim i pairs with dim i + p
            z1, z2 = z[..., :p], z[..., p:]
            return torch.cat([z1 * cos - z2 * sin, z2 * cos + z1 * sin], -1)

        mqk = torch.cat([qk, qk])
        q, k = rope(q) * mqk, rope(k) * mqk
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True,
            scale=c.head_dim**-0.5,
        )  # fmt: skip
        x = x + self.o(o.transpose(1, 2).reshape(b, t, -1))
        y = rms_norm(x, self.mlp_norm, c.rms_eps)
        return x + self.down(F.silu(self.gate(y)) * self.up(y) * mlp)


class TorchLlama(nn.Module):
    """The spp_jax Llama of `config` (tied embeddings), masks qk / vo / mlp."""

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        assert c.tie_embeddings
        self.embed = nn.Embedding(c.vocab_size, c.width)
        self.blocks = nn.ModuleList(TorchLlamaBlock(c) for _ in range(c.depth))
        self.final_norm = nn.Parameter(torch.ones(c.width))
        self.masks = nn.ParameterDict(
            {
                "qk": torch.ones(c.depth, c.head_dim // 2),
                "vo": torch.ones(c.depth, c.head_dim),
                "mlp": torch.ones(c.depth, c.mlp_dim),
            }
        )

    def forward(self, tokens):
        c = self.config
        inv_freq = torch.from_numpy(rope_inv_freq(range(c.head_dim // 2), c.head_dim, c.rope_theta))
        inv_freq = inv_freq.to(tokens.device)
        angle = torch.arange(tokens.shape[1], dtype=torch.float32, device=tokens.device)[:, None]
        angle = angle * inv_freq[None, :]
        cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
        x = self.embed(tokens)
        m = self.masks
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, m["qk"][i], m["vo"][i], m["mlp"][i])
        return rms_norm(x, self.final_norm, c.rms_eps) @ self.embed.weight.T

    @torch.no_grad()
    def load(self, params) -> TorchLlama:
        c = self.config
        self.embed.weight.copy_(to_torch(params["embed"]["embedding"]))
        self.final_norm.copy_(to_torch(params["final_norm"]["scale"]))
        for i, blk in enumerate(self.blocks):
            p = params[f"block_{i}"]
            blk.attn_norm.copy_(to_torch(p["attn_norm"]["scale"]))
            blk.mlp_norm.copy_(to_torch(p["mlp_norm"]["scale"]))
            for lin, name in ((blk.q, "query"), (blk.k, "key"), (blk.v, "value")):
                lin.weight.copy_(to_torch(p["attn"][name]["kernel"]).reshape(c.width, -1).T)
            blk.o.weight.copy_(to_torch(p["attn"]["out"]["kernel"]).reshape(-1, c.width).T)
            for lin, name in ((blk.gate, "gate"), (blk.up, "up"), (blk.down, "down")):
                lin.weight.copy_(to_torch(p["mlp"][name]["kernel"]).T)
        return self


class TorchOfficialStep:
    """The reference search step: backward through everything, AdamW on the masks, then Z / Gamma."""

    def __init__(self, model: nn.Module, lr=1e-3, lam=3.0, b1=0.9, b2=0.999, eps=1e-4, autocast=None):
        self.model, self.lr, self.lam, self.b1 = model, lr, lam, b1
        self.autocast = autocast  # None, or a torch dtype to run the forward pass under (AMP)
        for p in model.parameters():
            p.requires_grad_(True)  # as the reference: weights too, though only the masks are stepped
        self.masks = dict(model.masks.items())
        self.opt = torch.optim.AdamW(
            list(self.masks.values()), lr=lr, betas=(b1, b2), eps=eps, weight_decay=0.0
        )
        self.z = {k: torch.zeros_like(m) for k, m in self.masks.items()}
        self.gamma = {k: torch.zeros_like(m) for k, m in self.masks.items()}
        self.t = 0

    def loss(self, batch) -> torch.Tensor:
        amp = contextlib.nullcontext()
        if self.autocast is not None:
            amp = torch.autocast(next(self.model.parameters()).device.type, dtype=self.autocast)
        with amp:
            if isinstance(self.model, TorchViT):
                return F.cross_entropy(self.model(batch["image"]), batch["label"])
            tokens = batch["tokens"]
            logits = self.model(tokens[:, :-1])
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    def __call__(self, batch) -> torch.Tensor:
        self.model.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        self.opt.step()
        self.t += 1
        s = self.lr / (1.0 - self.b1**self.t)
        with torch.no_grad():
            for k, m in self.masks.items():
                self.z[k].add_(m - self.gamma[k], alpha=s)
                self.gamma[k].copy_((self.z[k] - self.lam).clamp_(min=0.0))
        return loss.detach()


def torch_batch(batch) -> dict[str, torch.Tensor]:
    if "image" in batch:
        return {
            "image": to_torch(batch["image"]).permute(0, 3, 1, 2).contiguous(),
            "label": torch.from_numpy(np.asarray(batch["label"]).astype(np.int64)),
        }
    return {"tokens": torch.from_numpy(np.asarray(batch["tokens"]).astype(np.int64))}


def torch_model(a, adapter, params, attn: str = "sdpa") -> nn.Module:
    if a.arch == "vit":
        return TorchViT(adapter.config, attn).load(params)
    return TorchLlama(adapter.config).load(params)
