"""Loading a Stable Diffusion folder: strict, safetensors only, the shipped dtypes and scheduler, sha256 of what was
read, and one-line errors for the user's mistakes."""
from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from cao2core.cli import main
from cao2core.errors import UserError
from cao2core.generators.conformance import GeneratorUnderTest
from sd_tiny import SCHEDULER, make_sd, shapes_file


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-loading")
    return make_sd(root / "sd"), shapes_file(root / "shapes.txt")


@pytest.fixture
def copy(base, tmp_path):
    """A fresh copy of the tiny pipeline to damage."""
    return Path(shutil.copytree(base[0], tmp_path / "sd"))


def load(model, dataset, **options) -> GeneratorUnderTest:
    return GeneratorUnderTest("sd", {"model": str(model), "dataset": str(dataset), "sample_steps": 2, **options})


def edit_weights(path: Path, fn) -> None:
    state = load_file(str(path))
    fn(state)
    save_file(state, str(path), metadata={"format": "pt"})


def one_line_error(model, dataset, match, **options) -> str:
    with pytest.raises(UserError) as info:
        load(model, dataset, **options)
    text = str(info.value)
    assert "\n" not in text and match in text, text
    return text


def test_describe_records_the_sha256_of_the_files_read(base):
    model, shapes = base
    k = load(model, shapes)
    d = k.gen.describe(handle=k.handle)
    unet_file = model / "unet" / "diffusion_pytorch_model.safetensors"
    assert d["unet"]["sha256"] == hashlib.sha256(unet_file.read_bytes()).hexdigest()
    assert d["text_encoder"]["sha256"] == hashlib.sha256((model / "text_encoder" / "model.safetensors").read_bytes()
                                                         ).hexdigest()
    assert d["scheduler"]["sha256"] == hashlib.sha256((model / "scheduler" / "scheduler_config.json").read_bytes()
                                                      ).hexdigest()
    assert all(len(d[c]["sha256"]) == 64 for c in ("vae", "tokenizer"))
    assert d["scheduler"]["class"] == "DDIMScheduler" and d["prediction_type"] == "epsilon"
    assert d["scheduler"]["config"] == json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    json.dumps(d)


def test_the_shipped_scheduler_and_dtypes_are_kept(copy, base):
    EulerDiscreteScheduler.from_config(SCHEDULER).save_pretrained(copy / "scheduler")
    edit_weights(copy / "text_encoder" / "model.safetensors",
                 lambda s: s.update({k: v.to(torch.bfloat16) for k, v in s.items()}))
    edit_weights(copy / "vae" / "diffusion_pytorch_model.safetensors",
                 lambda s: s.update({k: v.half() for k, v in s.items()}))
    k = load(copy, base[1])
    d = k.gen.describe(handle=k.handle)
    assert k.handle.scheduler_class is EulerDiscreteScheduler and d["sampler"] == "EulerDiscreteScheduler"
    assert k.handle.text_encoder.dtype == torch.bfloat16 and d["text_encoder"]["stored_dtype"] == "bfloat16"
    # fp16 files compute in fp32 on a CPU (exact: every fp16 value is an fp32 value); the record says what shipped
    assert d["vae"]["stored_dtype"] == "float16" and d["dtype"]["vae"] == "float32"
    assert d["dtype"]["unet"] == "float32"
    assert torch.isfinite(k.sample(k.labels(2), [0, 1]).latents).all()


@pytest.mark.parametrize("component,edit,match", [
    ("unet", lambda s: s.pop(next(iter(s))), "missing keys"),
    ("unet", lambda s: s.update({"extra.weight": torch.zeros(2)}), "unexpected keys"),
    ("vae", lambda s: s.update({"decoder.conv_out.bias": torch.zeros(5)}), "mismatched keys"),
    ("text_encoder", lambda s: s.pop("final_layer_norm.weight"), "missing keys"),
])
def test_loading_is_strict(copy, base, component, edit, match):
    stem = "model" if component == "text_encoder" else "diffusion_pytorch_model"
    edit_weights(copy / component / f"{stem}.safetensors", edit)
    one_line_error(copy, base[1], match)


def test_non_floating_weights_are_refused(copy, base):
    edit_weights(copy / "vae" / "diffusion_pytorch_model.safetensors",
                 lambda s: s.update({"decoder.conv_out.bias": s["decoder.conv_out.bias"].to(torch.int8)}))
    one_line_error(copy, base[1], "not floating point")


def test_pickled_weights_are_not_read(copy, base):
    path = copy / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(path)), copy / "unet" / "diffusion_pytorch_model.bin")
    path.unlink()
    one_line_error(copy, base[1], "cao2 does not read pickled weights")


def test_a_pipeline_that_is_not_sd_text_to_image_is_refused(copy, base):
    torch.manual_seed(0)
    config = UNet2DConditionModel.load_config(copy / "unet")
    UNet2DConditionModel.from_config({**config, "in_channels": 9}).save_pretrained(copy / "unet")
    one_line_error(copy, base[1], "an inpainting or image-conditioned UNet")


def test_a_hub_id_is_fetched_with_safetensors_only(base, monkeypatch):
    import huggingface_hub
    from cao2core.generators import weights
    asked = {}

    def fake_download(repo, allow_patterns, cache_dir=None, local_files_only=False):
        if local_files_only:
            raise FileNotFoundError("not cached")
        asked.update(repo=repo, patterns=allow_patterns)
        return str(base[0])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setattr(weights, "hub_listing", lambda repo: set())      # the hub answers
    k = load("someone/tiny-sd", base[1])
    assert asked["repo"] == "someone/tiny-sd" and k.gen.describe(handle=k.handle)["model"] == str(base[0])
    fetched = lambda name: any(fnmatch.fnmatch(name, p) for p in asked["patterns"])    # noqa: E731
    assert fetched("unet/diffusion_pytorch_model.safetensors") and fetched("text_encoder/model.safetensors")
    assert not fetched("unet/diffusion_pytorch_model.bin") and not fetched("text_encoder/pytorch_model.bin")
    assert not fetched("safety_checker/model.safetensors")
    assert not fetched("unet/diffusion_pytorch_model.fp16.safetensors")       # another variant than the one asked


def test_a_cached_hub_id_loads_without_the_network(base, monkeypatch):
    import huggingface_hub
    from cao2core.generators import weights

    def cached_only(repo, allow_patterns, cache_dir=None, local_files_only=False):
        assert local_files_only, "went to the network for a cached pipeline"
        return str(base[0])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached_only)
    monkeypatch.setattr(weights, "hub_listing", lambda repo: pytest.fail("asked the hub"))
    k = load("someone/tiny-sd", base[1])
    assert k.gen.describe(handle=k.handle)["model"] == str(base[0])


def test_a_cached_sharded_part_missing_a_shard_is_not_taken_as_cached(copy, monkeypatch):
    """An interrupted download of a sharded UNet: the index and one of its two shards. Taken as cached, loading
    would fail at the missing shard; it is fetched again (here: offline, so the one line saying it is not cached)."""
    import huggingface_hub
    from cao2_sd import loading as sd_loading
    from cao2core.generators import weights
    unet = copy / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    shards = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"a.weight": shards[0], "b.weight": shards[1]}}))
    (unet / shards[0]).write_bytes(b"partial")
    assert not sd_loading.shards_present(copy)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, allow_patterns, cache_dir=None, local_files_only=False: str(copy))

    def offline(repo):
        raise weights.HubMiss("HF_HUB_OFFLINE is set")
    monkeypatch.setattr(weights, "hub_listing", offline)
    with pytest.raises(UserError) as info:
        sd_loading.resolve("someone/tiny-sd")
    assert "is not in the Hugging Face cache" in str(info.value) and "\n" not in str(info.value)
    (unet / shards[1]).write_bytes(b"rest")
    assert sd_loading.shards_present(copy)
    assert sd_loading.resolve("someone/tiny-sd") == copy         # complete: the cached snapshot, no network


def test_an_uncached_hub_id_offline_is_one_quick_line(base, tmp_path, monkeypatch):
    import time
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(UserError) as info:
        GeneratorUnderTest("sd", {"model": "someone/tiny-sd", "dataset": str(base[1])})
    message = str(info.value)
    assert time.perf_counter() - start < 5 and "\n" not in message
    assert "Stable Diffusion pipeline someone/tiny-sd is not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE is set" in message and "pass the local folder with --model" in message


@pytest.mark.parametrize("options,match", [
    ({"prompt": "a photo"}, "the template names no class"),
    ({"prompt": "a photo of {label}"}, "unknown field {label}"),
    ({"size": "15"}, "multiples of 2"),
    ({"size": "big"}, "--gen-opt size=big"),
    ({"profile": "reference"}, "there is none for Stable Diffusion"),
    ({"sampler": "nope"}, "unknown --sampler 'nope' for sd"),
    ({"dataset": None}, "pass --dataset"),
    ({"model": "/no/such/folder"}, "no such folder"),
])
def test_user_mistakes_are_one_line(base, options, match):
    opts = {"model": str(base[0]), "dataset": str(base[1]), **options}
    with pytest.raises(UserError) as info:
        GeneratorUnderTest("sd", opts)
    assert "\n" not in str(info.value) and match in str(info.value), str(info.value)


def test_cli_refuses_an_unknown_gen_opt_in_one_line(base, tmp_path, capsys):
    rc = main(["run", "--generator", "sd", "--model", str(base[0]), "--dataset", str(base[1]), "--gen-opt", "colour=1",
               "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "unknown --gen-opt colour for sd" in err
    assert not (tmp_path / "out").exists()


def test_more_sample_steps_than_the_schedule_is_refused_before_the_weights_load(base, monkeypatch):
    from cao2_sd import loading as sd_loading

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the step count was checked")
    monkeypatch.setattr(sd_loading, "load_diffusers", refuse)
    model, shapes = base
    one_line_error(model, shapes, "--sample-steps 5000: the scheduler of", sample_steps=5000)
    one_line_error(model, shapes, f"give 1 to {SCHEDULER.get('num_train_timesteps', 1000)}", sample_steps=5000)
