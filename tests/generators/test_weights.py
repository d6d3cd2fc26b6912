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
