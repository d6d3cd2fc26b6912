"""Tiny MAR worlds and checkpoints in the published layouts, built in-test (random weights, CPU, milliseconds)."""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import torch
from safetensors.torch import save_file

from cao2_mar.model import MAR, MARConfig
from cao2_mar.vae import MNIST_SMALL, AutoencoderKL, KLVAEConfig

# 32 px, 1 channel -> tiny LDM-layout KL VAE (stride 4, encoder attention at 8 px) -> 4x8x8 -> 16 tokens of 16 dims
TINY_MAR = MARConfig(img_size=32, vae_stride=4, patch_size=2, vae_embed_dim=4, encoder_embed_dim=32, encoder_depth=1,
                     encoder_num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, class_num=10,
                     buffer_size=4, diffloss_d=1, diffloss_w=32)
TINY_VAE = replace(MNIST_SMALL, ch=8, attn_resolutions=(8,), num_groups=4, scale_factor=0.8, shift_factor=0.1)
DEFAULTS = {"label_space": "mnist", "guidance": 2.0, "cfg_schedule": "linear", "sample_steps": 4,
            "diffloss_steps": 5, "temperature": 1.0}


def tiny_mar(seed: int = 0, cfg: MARConfig = TINY_MAR) -> MAR:
    torch.manual_seed(seed)
    model = MAR(cfg)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():       # the zero-initialised adaLN/output layers would make the head constant
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def tiny_vae(seed: int = 0, cfg: KLVAEConfig = TINY_VAE) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(cfg).eval()


def make_mar_world(root, seed: int = 0, **defaults):
    root.mkdir(parents=True, exist_ok=True)
    save_file(tiny_mar(seed).state_dict(), str(root / "mar.safetensors"))
    save_file(tiny_vae(seed).state_dict(), str(root / "vae.safetensors"))
    (root / "cao2.json").write_text(json.dumps({**DEFAULTS, "mar": TINY_MAR.to_dict(), "vae": TINY_VAE.to_dict(),
                                                **defaults}))
    return root


def write_config(path, cfg) -> str:
    path.write_text(json.dumps(cfg.to_dict()))
    return str(path)


def make_published(root, seed: int = 0, with_ema: bool = True):
    """checkpoint-last.pth ({model, model_ema, args}) and kl16-style {model: vae} files of the tiny MAR/VAE;
    returns (checkpoint, vae checkpoint, MAR config json, VAE config json, the EMA model)."""
    root.mkdir(parents=True, exist_ok=True)
    raw, ema = tiny_mar(seed), tiny_mar(seed + 1)
    mar_json = write_config(root / "tiny_mar.json", TINY_MAR)
    ckpt = {"model": raw.state_dict(), "args": argparse.Namespace(model=mar_json, diffloss_d=1, diffloss_w=32),
            "epoch": 399}
    if with_ema:
        ckpt["model_ema"] = ema.state_dict()
    torch.save(ckpt, root / "checkpoint-last.pth")
    torch.save({"model": tiny_vae(seed).state_dict()}, root / "kl16.ckpt")
    return root / "checkpoint-last.pth", root / "kl16.ckpt", mar_json, write_config(root / "tiny_vae.json", TINY_VAE), ema
