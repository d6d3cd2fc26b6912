"""DiT loading: hub models from the local cache with no network (and one quick line when they are not there), bf16
weights without diffusers' dtype-cast warning, and original checkpoints memory-mapped into the model."""
from __future__ import annotations

import logging
import os
import time

import pytest
import torch
from diffusers import AutoencoderKL
from huggingface_hub import constants

from cao2core.errors import UserError
from cao2core.generators.host import Host
from dit_files import to_original
from hub_files import add_to_hub_cache

import cao2_dit
from cao2_dit import loading

CPU = torch.device("cpu")


def load(options):
    gen = Host().generator("dit")
    return gen.load(options={"sample_steps": 3, **options}, device=CPU)


def test_an_uncached_default_vae_offline_is_one_quick_line(tiny_world, empty_hub):
    start = time.perf_counter()
    with pytest.raises(UserError) as info:
        load({"model": str(tiny_world / "transformer")})        # a transformer folder alone: the default VAE
    message = str(info.value)
    assert time.perf_counter() - start < 5
    assert "\n" not in message
    assert f"VAE {loading.DEFAULT_VAE} is not in the Hugging Face cache ({empty_hub})" in message
    assert "HF_HUB_OFFLINE is set" in message and "pass --vae with a local AutoencoderKL folder" in message


def test_an_unreachable_hub_is_one_quick_line(tiny_world, empty_hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")       # nothing listens on the discard port
    start = time.perf_counter()
    with pytest.raises(UserError) as info:
        load({"model": "facebook/DiT-XL-2-256"})
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "\n" not in message and "DiT transformer facebook/DiT-XL-2-256 is not in the Hugging Face cache" in message
    assert "the hub is unreachable" in message and "pass --model with a local DiT folder" in message


def test_a_cached_vae_loads_offline(tiny_world, empty_hub):
    vae = tiny_world / "vae"
    add_to_hub_cache(empty_hub, loading.DEFAULT_VAE, {"config.json": vae / "config.json",
                                                      "diffusion_pytorch_model.safetensors":
                                                          vae / "diffusion_pytorch_model.safetensors"})
    handle = load({"model": str(tiny_world / "transformer")})
    expected = AutoencoderKL.from_pretrained(vae).state_dict()
    for name, value in handle.vae.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert handle.sources["vae"] == loading.DEFAULT_VAE


def test_a_cached_pipeline_repo_loads_its_transformer_and_vae_offline(tiny_world, empty_hub):
    files = {f"{part}/{name}": tiny_world / part / name for part in ("transformer", "vae")
             for name in ("config.json", "diffusion_pytorch_model.safetensors")}
    add_to_hub_cache(empty_hub, "someone/tiny-dit", files)
    handle = load({"model": "someone/tiny-dit"})
    reference = load({"model": str(tiny_world)})
    for mine, theirs in ((handle.transformer, reference.transformer), (handle.vae, reference.vae)):
        for (name, value), other in zip(mine.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(value, other), name


@pytest.fixture
def diffusers_warnings():
    """What diffusers logs at WARNING and above while the test runs (its loggers do not reach pytest's caplog)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_bf16_weights_load_without_the_dtype_cast_warning(tiny_world, tmp_path, diffusers_warnings, recwarn):
    handle = load({"model": str(tiny_world), "dtype": "bf16"})
    assert {p.dtype for p in handle.transformer.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in handle.vae.parameters()} == {torch.float32}       # decoding stays fp32
    original = tmp_path / "DiT-tiny.pt"
    torch.save(to_original(cao2_dit.loading.load_transformer(str(tiny_world / "transformer"))), original)
    from_pt = load({"model": str(original), "vae": str(tiny_world / "vae"), "dtype": "bf16"})
    assert {p.dtype for p in from_pt.transformer.parameters()} == {torch.bfloat16}
    for name, value in from_pt.transformer.state_dict().items():
        assert torch.equal(value, handle.transformer.state_dict()[name]), name
    messages = [r.getMessage() for r in diffusers_warnings] + [str(w.message) for w in recwarn]
    assert not [m for m in messages if "float32" in m or "dtype" in m], messages


def test_an_original_checkpoint_is_mapped_into_the_model_and_survives_its_file(tiny_world, tmp_path):
    reference = loading.load_transformer(str(tiny_world / "transformer")).eval()
    path = tmp_path / "DiT-tiny.pt"
    torch.save(to_original(reference), path)
    model = loading.load_transformer(str(path)).eval()
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference.state_dict()[name]), name
    maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else None
    if maps is not None:
        assert str(path) in maps        # the parameters live in the file's pages, not in a copy
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([10, 500]), torch.tensor([1, 2])
    before = model(x, timestep=t, class_labels=y).sample
    # a new checkpoint written beside and renamed over it (how savers replace files), then deleted
    torch.manual_seed(1)
    other = tmp_path / "other.pt"
    torch.save({k: torch.randn_like(v) for k, v in to_original(reference).items()}, other)
    os.replace(other, path)
    path.unlink()
    assert torch.equal(model(x, timestep=t, class_labels=y).sample, before)
