"""`cao2 export`: a finished run as a `datasets` imagefolder that the real library loads offline, RDED's numeric
folders that `cao2 eval --class-map` reads back, DD-Ranking's tensors; refusals write nothing."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cao2core
from cao2core.cli import main
from digits import write_val


@pytest.fixture(scope="module")
def finished_run(tiny_world, tiny_classifier, tmp_path_factory):
    """All ten classes of the tiny world, one image each (the rded round trip evaluates it on mnist)."""
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["run", "--model", str(tiny_world), "--classifier", str(tiny_classifier), "--ipc", "1",
                 "--pool-factor", "2", "--clo-iters", "2", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    return out


def test_hf_export_loads_with_datasets_offline(finished_run, tmp_path, monkeypatch, capsys):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    to = tmp_path / "hf"
    assert main(["export", str(finished_run), "--format", "hf", "--to", str(to)]) == 0
    assert "wrote 10 images as hf" in capsys.readouterr().out
    train = datasets.load_dataset("imagefolder", data_dir=str(to), split="train",
                                  cache_dir=str(tmp_path / "cache"))
    assert len(train) == 10
    assert {"image", "label", "class_id", "class_name", "confidence", "judge_class", "judge_probability", "seed",
            "pool_index"} <= set(train.features)
    manifest = json.loads((finished_run / "manifest.json").read_text())
    for row in train:
        cid = row["class_id"]
        latents = load_file(str(finished_run / "latents" / f"{cid}.safetensors"))
        assert row["confidence"] == pytest.approx(latents["scores"][0].item())
        assert row["pool_index"] == latents["pool_index"][0].item() and row["seed"] == 0
        kept = row["pool_index"]      # the judge's answer on the kept sample, from the pool record
        assert row["judge_probability"] == pytest.approx(latents["pool_pred_prob"][kept].item())
        target = manifest["classes"][cid]["pool_record"]["target"]
        assert (row["judge_class"] == cid) == (latents["pool_pred"][kept].item() == target)
        assert row["label"] == manifest["class_ids"].index(cid) and row["image"].size == (32, 32)
    card = (to / "README.md").read_text()
    header = card.split("---\n")[1]
    assert "license: other" in header and "task_categories:\n- image-classification" in header
    assert "split: train" in header
    assert manifest["generator"]["transformer"]["sha256"] in card and "clo_iters: `2`" in card
    assert "No evaluation was found" in card


def test_rded_export_reads_back_with_the_class_map(finished_run, tmp_path):
    to = tmp_path / "rded"
    result = cao2core.export(str(finished_run), "rded", str(to))
    assert sorted(p.name for p in to.iterdir() if p.is_dir()) == [f"{i:05d}" for i in range(10)]
    assert (to / "class_map.txt").read_text().splitlines()[1:3] == ["00000 0", "00001 1"]
    assert result.images == 10
    val = write_val(tmp_path / "val", per_class=1)
    out = tmp_path / "eval"
    assert main(["eval", "--data", str(to), "--class-map", str(to / "class_map.txt"), "--dataset", "mnist",
                 "--val", str(val), "--epochs", "1", "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["data"]["kind"] == "distilled" and report["data"]["per_class"] == [1] * 10
    assert report["data"]["classes"] == [str(i) for i in range(10)]


def test_tensor_export_loads_with_weights_only(finished_run, tmp_path):
    to = tmp_path / "tensors"
    cao2core.export(str(finished_run), "tensors", str(to))
    images = torch.load(to / "images.pt", weights_only=True)
    labels = torch.load(to / "labels.pt", weights_only=True)
    assert images.shape == (10, 1, 32, 32) and images.dtype == torch.float32
    assert 0 <= images.min() and images.max() <= 1
    assert labels.tolist() == list(range(10)) and labels.dtype == torch.long
    with Image.open(finished_run / "images" / "0" / "0.png") as png:
        first = torch.from_numpy(np.asarray(png).copy())
    assert torch.allclose(images[0, 0], first.float() / 255)


def test_bad_export_input_is_one_line_and_writes_nothing(finished_run, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    cases = [
        ([str(finished_run), "--format", "hf", "--to", str(finished_run / "shared")], "inside the run folder"),
        ([str(finished_run), "--format", "hf", "--to", str(finished_run)], "inside the run folder"),
        ([str(finished_run), "--format", "rded", "--to", str(full)], "is not an empty folder"),
        ([str(tmp_path / "nothing"), "--format", "hf", "--to", str(tmp_path / "x")], "is not a finished cao2 run"),
        ([str(finished_run), "--format", "rded", "--to", str(tmp_path / "x"), "--push", "me/set"], "--format hf"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv, match in cases:
        assert main(["export", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("cao2: error: ") and match in err and err.count("\n") == 1, (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not (finished_run / "shared").exists()
    assert [p.name for p in full.iterdir()] == ["keep.txt"]


def test_push_uploads_with_huggingface_hub(finished_run, tmp_path, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, repo_type, exist_ok):
            calls.append(("create", repo_id, repo_type))

        def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
            calls.append(("upload", folder_path, repo_id, repo_type))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(cao2core.UserError, match="needs a Hugging Face token"):
        cao2core.export(str(finished_run), "hf", str(tmp_path / "a"), push="me/set")
    assert not (tmp_path / "a").exists()
    result = cao2core.export(str(finished_run), "hf", str(tmp_path / "b"), push="me/set", token="t")
    assert result.pushed == "me/set"
    assert calls == [("token", "t"), ("create", "me/set", "dataset"), ("upload", str(tmp_path / "b"), "me/set",
                                                                      "dataset")]
