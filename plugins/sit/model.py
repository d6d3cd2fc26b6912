"""SiT's transformer (Ma et al. 2024), in the parameter layout of the original ``models.py`` so the published state
dicts load without renaming; REPA's SiT (Yu et al. 2025) is the same network plus training-only projectors.

The architecture is DiT's: patchify, fixed 2-D sin-cos positions (stored in the checkpoint), a sinusoidal embedding
of the time t (256 features, cos first, frequencies exp(-ln(10^4) i / 128), told t itself: both codes feed the
interpolation time in [0, 1] unscaled), a label table with one extra row (the null class, CFG), adaLN-Zero blocks
and a final adaLN layer. A learned-sigma SiT (``SiT-XL-2-256.pt``) has 2C output channels of which SiT's forward
keeps the first C; this module does the same. REPA's blocks may carry qk-norm (timm's LayerNorm over each head).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

FREQ_DIM = 256          # the timestep embedder's sinusoidal features, in both codes


@dataclass(frozen=True)
class SiTConfig:
    input_size: int          # latent side (32 for 256 px)
    patch_size: int
    in_channels: int
    hidden_size: int
    depth: int
    num_heads: int
    num_classes: int         # without the null row
    learn_sigma: bool        # 2C output channels, the second C unused at sampling
    mlp_hidden: int
    qk_norm: bool = False    # REPA's --qk-norm

    def to_dict(self) -> dict:
        return asdict(self)


def timestep_embedding(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """cos/sin of t * exp(-ln(max_period) * i / half), i < half, computed in fp32 as both codes do."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # timm's qk-norm: nn.LayerNorm(head_dim), affine, eps 1e-5
        self.q_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def _ada(dim: int, chunks: int) -> nn.Sequential:
    return nn.Sequential(nn.SiLU(), nn.Linear(dim, chunks * dim))


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class Block(nn.Module):
    def __init__(self, cfg: SiTConfig):
        super().__init__()
        d = cfg.hidden_size
        self.attn = Attention(d, cfg.num_heads, cfg.qk_norm)
        self.mlp = Mlp(d, cfg.mlp_hidden)
        self.adaLN_modulation = _ada(d, 6)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_a.unsqueeze(1) * self.attn(_modulate(_norm(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(_modulate(_norm(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, cfg: SiTConfig, out_channels: int):
        super().__init__()
        d = cfg.hidden_size
        self.linear = nn.Linear(d, cfg.patch_size ** 2 * out_channels)
        self.adaLN_modulation = _ada(d, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(_modulate(_norm(x), shift, scale))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: SiTConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)     # + the null class


class SiT(nn.Module):
    """SiT's forward: (B, C, H, W) at interpolation times t (B,), labels y (B,) -> (B, C, H, W)."""

    def __init__(self, cfg: SiTConfig):
        super().__init__()
        self.config = cfg
        grid = cfg.input_size // cfg.patch_size
        self.out_channels = cfg.in_channels * (2 if cfg.learn_sigma else 1)
        self.x_embedder = PatchEmbed(cfg)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size)
        # a frozen parameter in the originals (so it is in their state dicts); loaded as stored
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, cfg.hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg, self.out_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                zero: torch.Tensor | None = None) -> torch.Tensor:
        """``zero`` (B,) bool: rows whose label embedding is replaced by zeros (CLO's ``zero`` condition)."""
        dtype = self.pos_embed.dtype
        h = self.x_embedder(x.to(dtype)) + self.pos_embed
        label = self.y_embedder.embedding_table(y)
        if zero is not None:
            label = label * (~zero).to(label.dtype)[:, None]
        c = self.t_embedder(t) + label
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c)
        out = self._unpatchify(h)
        return out[:, : self.config.in_channels]       # SiT's forward drops the learned-sigma half

    def _unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        p, c = self.config.patch_size, self.out_channels
        g = self.config.input_size // p
        h = h.reshape(h.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(h.shape[0], c, g * p, g * p)
