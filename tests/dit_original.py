"""The original DiT (Peebles & Xie 2023) written from the paper's definitions, as an oracle for the tests.

Nothing here comes from cao2 or diffusers: a random state dict in the facebookresearch layout, its forward pass
(patchify, 2-D sin-cos positions, sinusoidal timestep embedding, adaLN-Zero blocks, final adaLN layer), and the
linear noise schedule with DiT's respacing.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FREQ_DIM = 256          # DiT's timestep embedder: 256 sinusoidal features


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.reshape(-1, 1).double() * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D position embedding, which DiT uses: the first half encodes the column (w goes first)."""
    w, h = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="xy")
    return torch.cat([sincos_1d(dim // 2, w), sincos_1d(dim // 2, h)], dim=1).float()


def timestep_embedding(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """cos/sin of t * exp(-ln(max_period) * i / half), i < half, cos first: the embedding DiT was trained with."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def random_state(depth=2, width=32, in_ch=4, out_ch=8, patch=2, grid=4, classes=10, seed=0) -> dict:
    """A DiT state dict in the original layout, every weight random (adaLN-Zero's zeros would hide errors)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1] if len(shape) > 1 else 4)

    d = width
    sd = {"x_embedder.proj.weight": w(d, in_ch, patch, patch) * 0.5, "x_embedder.proj.bias": w(d),
          "pos_embed": sincos_2d(d, grid)[None], "t_embedder.mlp.0.weight": w(d, FREQ_DIM),
          "t_embedder.mlp.0.bias": w(d), "t_embedder.mlp.2.weight": w(d, d), "t_embedder.mlp.2.bias": w(d),
          "y_embedder.embedding_table.weight": w(classes + 1, d),
          "final_layer.adaLN_modulation.1.weight": w(2 * d, d), "final_layer.adaLN_modulation.1.bias": w(2 * d),
          "final_layer.linear.weight": w(patch * patch * out_ch, d), "final_layer.linear.bias": w(patch * patch * out_ch)}
    for i in range(depth):
        b = f"blocks.{i}."
        for name, shape in (("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)), ("mlp.fc1", (4 * d, d)),
                            ("mlp.fc2", (d, 4 * d)), ("adaLN_modulation.1", (6 * d, d))):
            sd[b + name + ".weight"], sd[b + name + ".bias"] = w(*shape), w(shape[0])
    return sd


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def _norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def forward(sd: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, heads: int) -> torch.Tensor:
    """DiT's forward: (B, C, H, W) latents, timesteps t, labels y -> (B, out channels, H, W)."""
    p = sd["x_embedder.proj.weight"].shape[-1]
    b, _, hh, ww = x.shape
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    temb = F.linear(F.silu(F.linear(timestep_embedding(t), sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    d = h.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        pre = f"blocks.{i}."
        mod = F.linear(F.silu(c), sd[pre + "adaLN_modulation.1.weight"], sd[pre + "adaLN_modulation.1.bias"])
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=1)
        a = _modulate(_norm(h), shift_a, scale_a)
        qkv = F.linear(a, sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"])
        q, k, v = qkv.reshape(b, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1) * (d // heads) ** -0.5).softmax(-1) @ v
        a = F.linear(att.transpose(1, 2).reshape(b, -1, d), sd[pre + "attn.proj.weight"], sd[pre + "attn.proj.bias"])
        h = h + gate_a[:, None] * a
        m = _modulate(_norm(h), shift_m, scale_m)
        m = F.linear(F.gelu(F.linear(m, sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"]), approximate="tanh"),
                     sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])
        h = h + gate_m[:, None] * m
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    h = F.linear(_modulate(_norm(h), shift, scale), sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    out_ch = h.shape[-1] // (p * p)
    h = h.reshape(b, hh // p, ww // p, p, p, out_ch)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(b, out_ch, hh, ww)


def alphas_cumprod() -> torch.Tensor:
    """DiT's linear schedule: betas linspace(1e-4, 0.02, 1000), alpha-bar their running product (float64)."""
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)


def space_timesteps(total: int, count: int) -> list[int]:
    """improved-diffusion's ``space_timesteps(total, str(count))``: a running sum of the stride, each rounded."""
    stride = (total - 1) / (count - 1) if count > 1 else 1
    cur, kept = 0.0, set()
    for _ in range(count):
        kept.add(round(cur))
        cur += stride
    return sorted(kept)
