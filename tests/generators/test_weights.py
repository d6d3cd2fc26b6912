"""Weight files: the dtype check that refuses quantized weights but takes a float model's integer buffers, and the
sha256 cache, which refuses a folder for its file and leaves no temporary file behind."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from cao2core.cli import main
from cao2core.errors import UserError
from cao2core.generators import weights


def test_integer_buffers_the_model_declares_are_accepted():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    state = model.state_dict()
    assert state["1.num_batches_tracked"].dtype == torch.int64
    with pytest.raises(UserError, match="'1.num_batches_tracked' is int64"):
        weights.require_floating(state, "m.pt")             # without the model: nothing says it is a counter
    weights.require_floating(state, "m.pt", model)


@pytest.mark.parametrize("name,dtype", [("0.weight", torch.int8), ("1.weight", torch.int32),
                                        ("1.running_var", torch.int64), ("0.bias", torch.bool)])
def test_integer_parameters_and_float_buffers_stay_refused(name, dtype):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    state = dict(model.state_dict())
    state[name] = state[name].to(dtype)
    with pytest.raises(UserError) as info:
        weights.require_floating(state, "m.pt", model)
    assert f"weight {name!r} is {str(dtype).removeprefix('torch.')}, not floating point" in str(info.value)


def test_a_hash_cache_that_is_a_folder_is_one_line_and_leaves_nothing(tiny_args, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "cache"
    folder.mkdir()
    monkeypatch.setenv("CAO2_HASH_CACHE", str(folder))
    before = sorted(os.listdir(tmp_path))
    assert main(["run", *tiny_args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cao2: error: CAO2_HASH_CACHE="), err
    assert f"{folder} is a folder; set it to a file path" in err, err
    assert sorted(os.listdir(tmp_path)) == before and not any(folder.iterdir())   # no .cache.*.tmp, no --out


def test_a_cache_that_cannot_be_written_leaves_no_temporary_file(tmp_path, monkeypatch):
    cache = tmp_path / "sha256.json"
    monkeypatch.setenv("CAO2_HASH_CACHE", str(cache))
    weight_file = tmp_path / "w.bin"
    weight_file.write_bytes(b"weights")

    def refuse(*args, **kwargs):
        raise OSError(30, "Read-only file system")
    monkeypatch.setattr(weights.os, "replace", refuse)
    assert weights.file_sha256(weight_file) == weights.stream_sha256(weight_file)    # hashed all the same
    assert sorted(os.listdir(tmp_path)) == ["w.bin"]
    monkeypatch.undo()
    monkeypatch.setenv("CAO2_HASH_CACHE", str(cache))
    weights.file_sha256(weight_file)
    assert sorted(os.listdir(tmp_path)) == ["sha256.json", "w.bin"]


def test_torch_checkpoints_are_mapped_and_read_exactly(tmp_path):
    torch.manual_seed(0)
    state = {"a.weight": torch.randn(64, 32), "a.bias": torch.randn(64).half(), "n": torch.tensor(3)}
    path = tmp_path / "m.pt"
    torch.save(state, path)
    loaded = weights.torch_load(path)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype
                                             for k, v in state.items())
    if os.path.exists("/proc/self/maps"):
        assert str(path) in open("/proc/self/maps").read()      # read through a mapping, not into a copy
    legacy = tmp_path / "legacy.pt"                             # torch's pre-1.6 format cannot be mapped
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    assert all(torch.equal(weights.torch_load(legacy)[k], v) for k, v in state.items())


def test_load_into_assigns_the_tensors_in_the_models_dtype(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    torch.manual_seed(1)
    state = {k: torch.randn_like(v.float()).to(v.dtype) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    state["0.weight"] = state["0.weight"].half()                # an fp16 entry goes in as fp32, as a copy would
    kept = state["0.bias"]
    weights.load_into(model, state)
    assert model[0].weight.dtype == torch.float32 and torch.equal(model[0].weight, state["0.weight"].float())
    assert model[0].bias.data_ptr() == kept.data_ptr()          # assigned, not copied: one copy in memory
    assert model[0].bias.requires_grad                          # the module's parameter flags stay
    with pytest.raises(RuntimeError, match="Missing key"):
        weights.load_into(model, {k: v for k, v in state.items() if k != "1.running_mean"})


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_files_come_from_the_cache_without_the_network(hub_cache, tmp_path, monkeypatch):
    from hub_files import add_to_hub_cache
    (tmp_path / "w.bin").write_bytes(b"weights")
    (tmp_path / "c.json").write_text("{}")
    add_to_hub_cache(hub_cache, "owner/model", {"sub/config.json": tmp_path / "c.json",
                                                "sub/diffusion_pytorch_model.bin": tmp_path / "w.bin"})
    monkeypatch.setattr(weights, "hub_listing", lambda repo: pytest.fail("asked the hub for a cached model"))
    files = weights.hub_files("owner/model", [("sub/config.json", "sub/diffusion_pytorch_model.safetensors"),
                                              ("sub/config.json", "sub/diffusion_pytorch_model.bin")])
    assert [f.name for f in files] == ["config.json", "diffusion_pytorch_model.bin"]
    assert files[1].read_bytes() == b"weights"


@pytest.mark.parametrize("repo,offline,why", [
    ("owner/model", True, "HF_HUB_OFFLINE is set"),
    ("owner/model", False, "the hub is unreachable"),
    ("not a repo id!", False, "neither a local path nor a hub model id"),
])
def test_a_hub_model_not_at_hand_is_a_quick_miss(hub_cache, monkeypatch, repo, offline, why):
    import time
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")       # nothing listens on the discard port
    start = time.perf_counter()
    with pytest.raises(weights.HubMiss, match=why) as info:
        weights.hub_files(repo, [("model.safetensors",)])
    assert time.perf_counter() - start < 5
    line = weights.hub_miss_message("classifier", repo, info.value, "pass --classifier FILE")
    assert "\n" not in line and f"is not in the Hugging Face cache ({hub_cache})" in line
