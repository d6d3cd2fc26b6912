"""Key conversion from the original facebookresearch DiT checkpoint layout to diffusers' DiTTransformer2DModel.

The original has one timestep embedder and one label table shared by all blocks; diffusers gives every
block's AdaLayerNormZero its own copy, and splits the fused qkv projection. The original's fixed sin-cos
``pos_embed`` has no diffusers parameter (diffusers recomputes it); the loader checks it against that buffer.
"""
from __future__ import annotations

import math
import re

import torch

from cao2core.errors import UserError

# Heads are not recoverable from weights; the published DiT sizes (S, B, L, XL) by width.
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16}
DEFAULT_HEAD_DIM = 64

_BLOCK_MAP = {  # original per-block name -> diffusers per-block name (weight and bias each)
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm1.linear",
}
_SHARED_MAP = {  # original shared module -> diffusers per-block copy
    "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
}
_TOP_MAP = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
            "final_layer.linear": "proj_out_2"}


def is_original_layout(state: dict) -> bool:
    return "x_embedder.proj.weight" in state and "y_embedder.embedding_table.weight" in state


def depth_of(state: dict) -> int:
    idx = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def infer_config(state: dict, num_heads: int | None = None) -> dict:
    """DiTTransformer2DModel keyword arguments for an original-layout state dict."""
    try:
        w = state["x_embedder.proj.weight"]
        width, in_ch, patch = w.shape[0], w.shape[1], w.shape[-1]
        out_ch = state["final_layer.linear.weight"].shape[0] // (patch * patch)
        num_classes = state["y_embedder.embedding_table.weight"].shape[0] - 1
        grid = math.isqrt(state["pos_embed"].shape[1])
    except KeyError as exc:
        raise UserError(f"not a DiT checkpoint: entry {exc.args[0]!r} is missing") from None
    heads = num_heads or HEADS_BY_WIDTH.get(width) or max(1, width // DEFAULT_HEAD_DIM)
    if width % heads:
        raise UserError(f"DiT width {width} is not divisible by {heads} heads; pass --gen-opt num_heads=N")
    return dict(num_attention_heads=heads, attention_head_dim=width // heads, in_channels=in_ch,
                out_channels=out_ch, num_layers=depth_of(state), sample_size=grid * patch, patch_size=patch,
                num_embeds_ada_norm=num_classes)


def convert_original(state: dict) -> tuple[dict, torch.Tensor]:
    """Return (diffusers state dict, original pos_embed). Refuses checkpoints with entries it would not use."""
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise UserError(f"not a DiT checkpoint in the original layout: entry {key!r} is missing")
        used.add(key)
        return state[key]

    out: dict[str, torch.Tensor] = {}
    for src, dst in _TOP_MAP.items():
        for s in ("weight", "bias"):
            out[f"{dst}.{s}"] = take(f"{src}.{s}")
    table = take("y_embedder.embedding_table.weight")
    for i in range(depth_of(state)):
        p = f"transformer_blocks.{i}."
        for src, dst in _SHARED_MAP.items():
            for s in ("weight", "bias"):
                out[f"{p}{dst}.{s}"] = take(f"{src}.{s}")
        out[f"{p}norm1.emb.class_embedder.embedding_table.weight"] = table
        for s in ("weight", "bias"):
            q, k, v = take(f"blocks.{i}.attn.qkv.{s}").chunk(3, dim=0)
            out[f"{p}attn1.to_q.{s}"], out[f"{p}attn1.to_k.{s}"], out[f"{p}attn1.to_v.{s}"] = q, k, v
            for src, dst in _BLOCK_MAP.items():
                out[f"{p}{dst}.{s}"] = take(f"blocks.{i}.{src}.{s}")
    pos_embed = take("pos_embed")
    unused = sorted(set(state) - used)
    if unused:
        raise UserError(f"DiT checkpoint has {len(unused)} entries this converter does not know "
                        f"(first: {unused[0]!r}); it is not a plain DiT checkpoint")
    return out, pos_embed
