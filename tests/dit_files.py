"""Test files in the original facebookresearch DiT layout, built from a diffusers model."""
from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel


def to_original(model: DiTTransformer2DModel) -> dict:
    """diffusers -> original layout (block 0's embedders become the shared ones), for building test files."""
    sd = model.state_dict()
    emb = "transformer_blocks.0.norm1.emb."
    out = {"x_embedder.proj.weight": sd["pos_embed.proj.weight"], "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
           "y_embedder.embedding_table.weight": sd[emb + "class_embedder.embedding_table.weight"],
           "pos_embed": model.pos_embed.pos_embed.clone()}
    for s in ("weight", "bias"):
        out[f"t_embedder.mlp.0.{s}"] = sd[f"{emb}timestep_embedder.linear_1.{s}"]
        out[f"t_embedder.mlp.2.{s}"] = sd[f"{emb}timestep_embedder.linear_2.{s}"]
        out[f"final_layer.adaLN_modulation.1.{s}"] = sd[f"proj_out_1.{s}"]
        out[f"final_layer.linear.{s}"] = sd[f"proj_out_2.{s}"]
        for i in range(model.config.num_layers):
            b = f"transformer_blocks.{i}."
            out[f"blocks.{i}.attn.qkv.{s}"] = torch.cat([sd[f"{b}attn1.to_{x}.{s}"] for x in "qkv"])
            out[f"blocks.{i}.attn.proj.{s}"] = sd[f"{b}attn1.to_out.0.{s}"]
            out[f"blocks.{i}.mlp.fc1.{s}"] = sd[f"{b}ff.net.0.proj.{s}"]
            out[f"blocks.{i}.mlp.fc2.{s}"] = sd[f"{b}ff.net.2.{s}"]
            out[f"blocks.{i}.adaLN_modulation.1.{s}"] = sd[f"{b}norm1.linear.{s}"]
    return out
