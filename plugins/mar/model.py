"""MAR (masked autoregressive model without vector quantization): the MAE encoder/decoder and the DiffLoss head.

One config dataclass, :class:`MARConfig`; the published models and the embedded world's model are only preset
instances of it. Parameter and key names follow the published checkpoints, so their ``model_ema`` state dict
loads strictly with no key conversion. Randomness never comes from here: callers pass masks, orders and noise.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

LN_EPS = 1e-6


@dataclass(frozen=True)
class MARConfig:
    img_size: int = 256
    vae_stride: int = 16              # pixels per latent cell
    patch_size: int = 1               # latent cells per token side
    vae_embed_dim: int = 16           # latent channels
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_depth: int = 12
    decoder_num_heads: int = 12
    mlp_ratio: float = 4.0
    class_num: int = 1000
    buffer_size: int = 64             # leading positions, all holding the class embedding
    diffloss_d: int = 6               # DiffLoss MLP depth (ResBlocks)
    diffloss_w: int = 1024            # DiffLoss MLP width
    mask_ratio_min: float = 0.7       # training mask ratio: truncated normal on [min, 1], mean 1, std below
    mask_ratio_std: float = 0.25
    label_drop_prob: float = 0.1
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1

    @property
    def seq_h(self) -> int:
        return self.img_size // self.vae_stride // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.seq_h * self.seq_h

    @property
    def token_dim(self) -> int:
        return self.vae_embed_dim * self.patch_size ** 2

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.img_size // self.vae_stride
        return (self.vae_embed_dim, side, side)

    def to_dict(self) -> dict:
        return asdict(self)


def _sizes(width: int, depth: int, heads: int, dl_d: int, dl_w: int) -> dict:
    return dict(encoder_embed_dim=width, encoder_depth=depth, encoder_num_heads=heads, decoder_embed_dim=width,
                decoder_depth=depth, decoder_num_heads=heads, diffloss_d=dl_d, diffloss_w=dl_w)


# The published models with the DiffLoss sizes their checkpoints were trained with; ``mnist_small`` is the
# embedded MNIST world's model (32 px, 4x8x8 latents, 2x2 patches -> 16 tokens of 16 dims).
PRESETS: dict[str, MARConfig] = {
    "mar_base": MARConfig(**_sizes(768, 12, 12, 6, 1024)),
    "mar_large": MARConfig(**_sizes(1024, 16, 16, 8, 1280)),
    "mar_huge": MARConfig(**_sizes(1280, 20, 16, 12, 1536)),
    "mnist_small": MARConfig(img_size=32, vae_stride=4, patch_size=2, vae_embed_dim=4, class_num=10, buffer_size=4,
                             mask_ratio_min=0.1, mask_ratio_std=0.5, attn_dropout=0.0, proj_dropout=0.0,
                             **_sizes(128, 3, 4, 3, 128)),
}


def preset(name: str, **overrides) -> MARConfig:
    return replace(PRESETS[name], **overrides)


# ------------------------------------------------------------------------------------------------ transformer
class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (rows [q; k; v], each split into heads).

    ``attn_mask``: optional bool mask broadcastable to (B, heads, N, N), True = the query may attend to the key."""

    def __init__(self, dim: int, heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.heads, self.attn_drop = heads, attn_drop
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm ViT block (no layer scale, no drop path)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, attn_drop: float, proj_drop: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads, attn_drop, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


# ------------------------------------------------------------------------------------------------ DiffLoss head
def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps: cos first, then sin."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.in_ln = nn.LayerNorm(width, eps=LN_EPS)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x, y):
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=LN_EPS)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, y):
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """Per-token denoiser: (x_t rows, timesteps, conditioning rows) -> [eps (C), variance interpolation v (C)]."""

    def __init__(self, in_channels: int, width: int, out_channels: int, z_channels: int, depth: int):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_channels, width)
        self.input_proj = nn.Linear(in_channels, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, out_channels)

    def forward(self, x, t, c):
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


class DiffLoss(nn.Module):
    """Holds the denoiser under the name ``net`` (the published key prefix is ``diffloss.net.``)."""

    def __init__(self, token_dim: int, z_channels: int, depth: int, width: int):
        super().__init__()
        self.net = SimpleMLPAdaLN(token_dim, width, 2 * token_dim, z_channels, depth)


# ------------------------------------------------------------------------------------------------ MAR
class MAR(nn.Module):
    def __init__(self, cfg: MARConfig):
        super().__init__()
        self.cfg = cfg
        d_enc, d_dec, L, buf = cfg.encoder_embed_dim, cfg.decoder_embed_dim, cfg.seq_len, cfg.buffer_size
        self.class_emb = nn.Embedding(cfg.class_num, d_enc)
        self.fake_latent = nn.Parameter(torch.zeros(1, d_enc))
        self.z_proj = nn.Linear(cfg.token_dim, d_enc, bias=True)
        self.z_proj_ln = nn.LayerNorm(d_enc, eps=LN_EPS)
        self.encoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buf + L, d_enc))
        self.encoder_blocks = nn.ModuleList(
            Block(d_enc, cfg.encoder_num_heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout)
            for _ in range(cfg.encoder_depth))
        self.encoder_norm = nn.LayerNorm(d_enc, eps=LN_EPS)
        self.decoder_embed = nn.Linear(d_enc, d_dec, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d_dec))
        self.decoder_pos_embed_learned = nn.Parameter(torch.zeros(1, buf + L, d_dec))
        self.decoder_blocks = nn.ModuleList(
            Block(d_dec, cfg.decoder_num_heads, cfg.mlp_ratio, cfg.attn_dropout, cfg.proj_dropout)
            for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(d_dec, eps=LN_EPS)
        self.diffusion_pos_embed_learned = nn.Parameter(torch.zeros(1, L, d_dec))
        self.diffloss = DiffLoss(cfg.token_dim, d_dec, cfg.diffloss_d, cfg.diffloss_w)

    def init_weights(self) -> None:
        """Training initialisation (loading a checkpoint overwrites everything)."""
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.encoder_pos_embed_learned,
                  self.decoder_pos_embed_learned, self.diffusion_pos_embed_learned):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        net = self.diffloss.net
        nn.init.normal_(net.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(net.time_embed.mlp[2].weight, std=0.02)
        for block in net.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (net.final_layer.adaLN_modulation[-1], net.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    # layout: image-shaped latents (B, C, H, W) <-> tokens (B, L, C*p*p) in raster order, channel-major per token
    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = self.cfg.patch_size
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        p, s, c = self.cfg.patch_size, self.cfg.seq_h, self.cfg.vae_embed_dim
        x = x.reshape(b, s, s, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, s * p, s * p)

    def condition_embedding(self, labels: torch.Tensor, kinds: list[str]) -> torch.Tensor:
        """(B, d_enc): ``class`` = class embedding, ``null`` = learned fake_latent, ``zero`` = zeros."""
        emb = self.class_emb(labels.clamp(0, self.cfg.class_num - 1))
        null = torch.tensor([k == "null" for k in kinds], device=emb.device)[:, None]
        zero = torch.tensor([k == "zero" for k in kinds], device=emb.device)[:, None]
        emb = torch.where(null, self.fake_latent.expand_as(emb), emb)
        return torch.where(zero, torch.zeros_like(emb), emb)

    def forward_mae(self, tokens: torch.Tensor, mask: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """tokens (B, L, D), mask (B, L) bool (True = masked; rows may mask different counts), cond (B, d_enc)
        -> per-token conditioning z (B, L, d_dec) for the DiffLoss head.

        The encoder sees only each row's kept positions (buffer + visible tokens) in position order. Rows with
        fewer kept positions are padded to the longest and the padding is hidden from attention as keys, so a
        row's result does not depend on the other rows (up to float summation order)."""
        b, L, _ = tokens.shape
        buf = self.cfg.buffer_size
        x = self.z_proj(tokens)
        # MAR writes the condition into an fp32 buffer that the (autocast) projection joins: it stays fp32
        x = torch.cat([cond[:, None, :].float().expand(b, buf, x.shape[-1]), x.float()], dim=1)
        x = self.z_proj_ln(x + self.encoder_pos_embed_learned)
        keep = torch.cat([torch.ones(b, buf, dtype=torch.bool, device=mask.device), ~mask.bool()], dim=1)
        counts = keep.sum(1)
        least, n = torch.stack(counts.aminmax()).tolist()  # one host sync
        if n == least:                                 # equal counts (sampling): no padding, no attention mask
            x, valid, attn_mask = x[keep].reshape(b, n, x.shape[-1]), None, None
        else:
            # a stable sort puts each row's kept positions first, in position order; the rest of the first n
            # slots is padding, zeroed so masked tokens never reach the encoder (not even through the gradient)
            idx = torch.sort((~keep).to(torch.uint8), dim=1, stable=True).indices[:, :n]
            valid = torch.arange(n, device=keep.device) < counts[:, None]
            x = torch.where(valid[..., None], x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1])), 0.0)
            # keys only: padded queries still see the row's buffer (>= 1 key), so they stay finite; dropped below
            attn_mask = valid[:, None, None, :]
        x = self.encoder_stack(x, attn_mask)
        if valid is not None:
            x = x[valid]                               # row-major, position order: the order of canvas[keep]
        canvas = self.mask_token.to(x.dtype).expand(b, buf + L, x.shape[-1]).clone()
        canvas[keep] = x.reshape(-1, x.shape[-1])
        x = self.decoder_stack(canvas + self.decoder_pos_embed_learned)[:, buf:]
        return x + self.diffusion_pos_embed_learned

    # the dense parts, apart from forward_mae's data-dependent gathers, so they can be compiled (see compile_parts)
    def encoder_stack(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> torch.Tensor:
        for block in self.encoder_blocks:
            x = block(x, attn_mask)
        return self.decoder_embed(self.encoder_norm(x))

    def decoder_stack(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_norm(x)

    def head(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The DiffLoss denoiser: noisy tokens (N, D), original timesteps (N,), conditioning (N, d_dec) ->
        (N, 2D) eps and variance range."""
        return self.diffloss.net(x, t, z)

    COMPILED_PARTS = ("encoder_stack", "decoder_stack", "head")

    def compile_parts(self, wrap: Callable[[Callable], Callable] | None) -> None:
        """Route the encoder and decoder stacks and the DiffLoss head through ``wrap`` (``torch.compile``), or
        back to the plain methods with ``None``. forward_mae's gathers and scatters stay eager (boolean indexing
        would break the graph); the parts see a new token count at every sampling step, which ``torch.compile``
        meets with one dynamic-shape graph from the second count on."""
        for name in self.COMPILED_PARTS:
            self.__dict__.pop(name, None)
            if wrap is not None:
                setattr(self, name, wrap(getattr(self, name)))
