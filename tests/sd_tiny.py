"""Tiny random Stable Diffusion pipelines in the published folder layout, built in-test the way diffusers' own
tests build dummy pipelines (CPU, a fraction of a second)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import timm
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import cao2core.data.classifiers  # noqa: F401  (registers mnist_cnn with timm)

SHAPES = [("circle", "round circle"), ("square", "square"), ("triangle", "triangle")]
WORDS = ["a", "photo", "of", "round", "circle", "square", "triangle", "cat", "dog", "red"]
MAX_TOKENS = 12
# SD 1.x's schedule (scaled_linear 0.00085-0.012, 1000 steps) and scheduler settings, on a 3-step DDIM
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def write_tokenizer(folder: Path) -> Path:
    """A CLIP BPE tokenizer in the published layout (vocab.json, merges.txt): letters and a few whole words."""
    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["<|startoftext|>", "<|endoftext|>"] + list(letters) + [c + "</w>" for c in letters]
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:      # merge left to right: w o r d</w> -> wo r d</w> -> wor d</w> -> word</w>
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in vocab:
                vocab.append(pieces[0])
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": MAX_TOKENS}))
    return folder


def make_sd(root: Path, seed: int = 0, prediction_type: str = "epsilon", scheduler=None) -> Path:
    """A StableDiffusionPipeline folder with random tiny weights: 16 px images, 4x8x8 latents."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, vocab_size=128,
                                                max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1,
                                                pad_token_id=1)).eval()
    with torch.no_grad():      # the zero-initialised output conv would make every prediction 0
        unet.conv_out.weight.normal_(0, 0.05)
    scratch = root.parent / f".{root.name}-tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(scratch))
    scheduler = scheduler or DDIMScheduler(**SCHEDULER, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(root, safe_serialization=True)
    shutil.rmtree(root / "tokenizer")              # the published layout: vocab.json + merges.txt
    shutil.move(str(scratch), str(root / "tokenizer"))
    return root


def load_pipeline(root: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(root, safety_checker=None, requires_safety_checker=False)


def shapes_file(path: Path) -> Path:
    path.write_text("".join(f"{i} {n}\n" for i, n in SHAPES))
    return path


def shapes_classifier(path: Path, seed: int = 0) -> Path:
    """A tiny timm classifier of the three shapes (random weights), as a user's own checkpoint with its classes."""
    torch.manual_seed(seed)
    model = timm.create_model("mnist_cnn", num_classes=len(SHAPES), in_chans=3)
    save_file(model.state_dict(), str(path), metadata={"arch": "mnist_cnn", "num_classes": str(len(SHAPES)),
                                                       "in_chans": "3", "classes": json.dumps([i for i, _ in SHAPES])})
    return path
