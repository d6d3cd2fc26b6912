"""Tiny random components (diffusers-style dummy models) shared by the tests."""
from __future__ import annotations

import json
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the sha256 cache of weight files: the tests' temporary files stay out of the user's cache
os.environ.setdefault("CAO2_HASH_CACHE", os.path.join(tempfile.mkdtemp(prefix="cao2-test-"), "sha256.json"))

import pytest
import torch
from diffusers import AutoencoderKL, DiTTransformer2DModel
from safetensors.torch import save_file

import cao2core.data.classifiers  # noqa: F401  (registers mnist_cnn with timm)
import timm

TINY_DIT = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, num_layers=1,
                sample_size=8, patch_size=2, num_embeds_ada_norm=10)
TINY_VAE = dict(in_channels=1, out_channels=1, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
                norm_num_groups=4, sample_size=32, scaling_factor=0.7, shift_factor=-0.5)


def make_world(root, seed: int = 0, **dit_overrides):
    """A DiTPipeline-like folder (transformer/, vae/, cao2.json) with random tiny weights."""
    torch.manual_seed(seed)
    DiTTransformer2DModel(**{**TINY_DIT, **dit_overrides}).save_pretrained(root / "transformer")
    AutoencoderKL(**TINY_VAE).save_pretrained(root / "vae")
    (root / "cao2.json").write_text(json.dumps({"label_space": "mnist", "guidance": 2.0, "sample_steps": 3}))
    return root


def make_classifier(path, seed: int = 0, classes=None, accuracy=None):
    torch.manual_seed(seed)
    model = timm.create_model("mnist_cnn", num_classes=10)
    classes = classes or [str(i) for i in range(10)]
    meta = {"arch": "mnist_cnn", "num_classes": "10", "classes": json.dumps(classes)}
    if accuracy is not None:
        meta["class_accuracy"] = json.dumps(accuracy)
    save_file(model.state_dict(), str(path), metadata=meta)
    return path


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory):
    acc = [0.95, 0.4, 0.9, 0.9, 0.9, 0.5, 0.9, 0.9, 0.9, 0.9]
    return make_classifier(tmp_path_factory.mktemp("clf") / "judge.safetensors", accuracy=acc)


@pytest.fixture
def tiny_args(tiny_world, tiny_classifier, tmp_path):
    """Flags of a seconds-long run on the tiny world."""
    return ["--model", str(tiny_world), "--classifier", str(tiny_classifier), "--classes", "0,3", "--ipc", "2",
            "--pool-factor", "2", "--clo-iters", "3", "--out", str(tmp_path / "out"), "--no-progress",
            "--device", "cpu"]


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache and HF_HUB_OFFLINE=1, set where huggingface_hub reads them (its constants,
    read once at import); returns the cache folder (tests/hub_files.py fills it in the published layout)."""
    from huggingface_hub import constants
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
