"""SiT (Ma et al. 2024) and REPA's SiT (Yu et al. 2025) written from the papers' definitions, as oracles for the tests.

Nothing here comes from cao2: random state dicts in the original layouts (willisma/SiT ``models.py``, sihyun-yu/REPA
``models/sit.py``, REPA's projectors and optional qk-norm included), the forward pass (DiT's backbone told the
interpolation time t in [0, 1] as it is), the interpolants with their time directions, and a fine fixed-step
integrator for the probability-flow ODE.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dit_original import sincos_2d

FREQ_DIM = 256


def time_embedding(t: torch.Tensor) -> torch.Tensor:
    """GLIDE's sinusoidal embedding of the raw time: cos then sin of t * 10000^(-i/128), i < 128."""
    freqs = 10000.0 ** (-torch.arange(128, dtype=torch.float64) / 128)
    args = t.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1).float()


def random_state(depth=2, width=32, in_ch=4, patch=2, grid=4, classes=10, learn_sigma=True, seed=0,
                 projector_dims=(), qk_norm=False, heads=2) -> dict:
    """A state dict in SiT's layout (REPA's with ``projector_dims``), every weight random and non-zero."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1] if len(shape) > 1 else 4)

    d, out = width, in_ch * (2 if learn_sigma else 1)
    sd = {"x_embedder.proj.weight": w(d, in_ch, patch, patch) * 0.5, "x_embedder.proj.bias": w(d),
          "pos_embed": sincos_2d(d, grid)[None], "t_embedder.mlp.0.weight": w(d, FREQ_DIM) * 4,
          "t_embedder.mlp.0.bias": w(d), "t_embedder.mlp.2.weight": w(d, d), "t_embedder.mlp.2.bias": w(d),
          "y_embedder.embedding_table.weight": w(classes + 1, d),
          "final_layer.adaLN_modulation.1.weight": w(2 * d, d), "final_layer.adaLN_modulation.1.bias": w(2 * d),
          "final_layer.linear.weight": w(patch * patch * out, d), "final_layer.linear.bias": w(patch * patch * out)}
    for i in range(depth):
        b = f"blocks.{i}."
        for name, shape in (("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)), ("mlp.fc1", (4 * d, d)),
                            ("mlp.fc2", (d, 4 * d)), ("adaLN_modulation.1", (6 * d, d))):
            sd[b + name + ".weight"], sd[b + name + ".bias"] = w(*shape), w(shape[0])
        if qk_norm:
            for n in ("q_norm", "k_norm"):
                sd[f"{b}attn.{n}.weight"] = 1 + 0.3 * w(d // heads)
                sd[f"{b}attn.{n}.bias"] = 0.3 * w(d // heads)
    for j, z in enumerate(projector_dims):     # REPA's build_mlp(hidden, projector_dim, z): Linear-SiLU x2-Linear
        p = f"projectors.{j}."
        sd[p + "0.weight"], sd[p + "0.bias"] = w(16, d), w(16)
        sd[p + "2.weight"], sd[p + "2.bias"] = w(16, 16), w(16)
        sd[p + "4.weight"], sd[p + "4.bias"] = w(z, 16), w(z)
    return sd


def _mod(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def _ln(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def forward(sd: dict, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, heads: int) -> torch.Tensor:
    """The network's output at interpolation times t: (B, C, H, W); a learned-sigma output is cut to its first C
    channels as SiT's forward does."""
    p = sd["x_embedder.proj.weight"].shape[-1]
    c_in = sd["x_embedder.proj.weight"].shape[1]
    b, _, hh, ww = x.shape
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    temb = F.linear(F.silu(F.linear(time_embedding(t), sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    d = h.shape[-1]
    hd = d // heads
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        pre = f"blocks.{i}."
        sa, ca, ga, sm, cm, gm = F.linear(F.silu(c), sd[pre + "adaLN_modulation.1.weight"],
                                          sd[pre + "adaLN_modulation.1.bias"]).chunk(6, dim=1)
        a = _mod(_ln(h), sa, ca)
        q, k, v = F.linear(a, sd[pre + "attn.qkv.weight"], sd[pre + "attn.qkv.bias"]).reshape(
            b, -1, 3, heads, hd).permute(2, 0, 3, 1, 4)
        if pre + "attn.q_norm.weight" in sd:        # timm's qk-norm: LayerNorm(head_dim), eps 1e-5, affine
            q = F.layer_norm(q, (hd,), sd[pre + "attn.q_norm.weight"], sd[pre + "attn.q_norm.bias"], eps=1e-5)
            k = F.layer_norm(k, (hd,), sd[pre + "attn.k_norm.weight"], sd[pre + "attn.k_norm.bias"], eps=1e-5)
        att = (q @ k.transpose(-2, -1) / math.sqrt(hd)).softmax(-1) @ v
        h = h + ga[:, None] * F.linear(att.transpose(1, 2).reshape(b, -1, d), sd[pre + "attn.proj.weight"],
                                       sd[pre + "attn.proj.bias"])
        m = _mod(_ln(h), sm, cm)
        m = F.linear(F.gelu(F.linear(m, sd[pre + "mlp.fc1.weight"], sd[pre + "mlp.fc1.bias"]), approximate="tanh"),
                     sd[pre + "mlp.fc2.weight"], sd[pre + "mlp.fc2.bias"])
        h = h + gm[:, None] * m
    shift, scale = F.linear(F.silu(c), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)
    h = F.linear(_mod(_ln(h), shift, scale), sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])
    out_ch = h.shape[-1] // (p * p)
    h = h.reshape(b, hh // p, ww // p, p, p, out_ch)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(b, out_ch, hh, ww)[:, :c_in]


# --- the interpolants, x_t = alpha_t x + sigma_t eps ----------------------------------------------------------

def sit_linear(t):
    """SiT's Linear path: data at t = 1 (alpha, alpha', sigma, sigma')."""
    return t, 1.0, 1 - t, -1.0


def sit_gvp(t):
    return math.sin(math.pi * t / 2), math.pi / 2 * math.cos(math.pi * t / 2), math.cos(math.pi * t / 2), \
        -math.pi / 2 * math.sin(math.pi * t / 2)


def repa_linear(t):
    """REPA's linear path: data at t = 0."""
    return 1 - t, -1.0, t, 1.0


def repa_cosine(t):
    return math.cos(math.pi * t / 2), -math.pi / 2 * math.sin(math.pi * t / 2), math.sin(math.pi * t / 2), \
        math.pi / 2 * math.cos(math.pi * t / 2)


def rk4(f, x: torch.Tensor, t0: float, t1: float, steps: int) -> torch.Tensor:
    """Classical Runge-Kutta on dx/dt = f(x, t) from t0 to t1 in ``steps`` equal steps (float64)."""
    x = x.double()
    h = (t1 - t0) / steps
    for i in range(steps):
        t = t0 + i * h
        k1 = f(x, t)
        k2 = f(x + h / 2 * k1, t + h / 2)
        k3 = f(x + h / 2 * k2, t + h / 2)
        k4 = f(x + h * k3, t + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x
