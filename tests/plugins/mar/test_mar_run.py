"""`cao2 run --generator mar` end to end on a tiny MAR world: stability and confidence selection, determinism."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from cao2core.cli import main
from mar_tiny import make_mar_world, make_published


@pytest.fixture(scope="module")
def mar_world(tmp_path_factory):
    return make_mar_world(tmp_path_factory.mktemp("marworld"))


def mar_args(model, classifier, out, *extra):
    return ["run", "--generator", "mar", "--model", str(model), "--classifier", str(classifier), "--classes", "2,7",
            "--ipc", "2", "--pool-factor", "2", "--clo-iters", "3", "--out", str(out), "--no-progress",
            "--device", "cpu", *extra]


@pytest.mark.parametrize("select", ["stability", "confidence"])
def test_mar_run_writes_the_distilled_set(mar_world, tiny_classifier, tmp_path, capsys, select):
    out = tmp_path / select
    assert main(mar_args(mar_world, tiny_classifier, out, "--select", select, "--condition", "zero")) == 0
    assert "distilled 2 classes" in capsys.readouterr().out
    m = json.loads((out / "manifest.json").read_text())
    assert m["generator"]["name"] == "mar" and m["generator"]["family"] == "mar"
    assert m["config"]["clo_tmax"] == 999 and m["classes"]["7"]["condition"] == "zero"
    t = load_file(str(out / "latents" / "7.safetensors"))
    assert t["latents"].shape == t["latents_init"].shape == (2, 4, 8, 8)
    assert not torch.equal(t["latents"], t["latents_init"])
    if select == "stability":
        assert bool((t["scores"] > 0).all()) and bool((t["scores"] <= 1 + 1e-6).all()) and t["scores"][0] >= t["scores"][1]
    assert sorted(p.name for p in (out / "images" / "2").iterdir()) == ["0.png", "1.png"]


def test_mar_run_is_reproducible(mar_world, tiny_classifier, tmp_path):
    for name in ("a", "b"):
        assert main(mar_args(mar_world, tiny_classifier, tmp_path / name, "--clo-tmax", "500")) == 0
    ta, tb = (load_file(str(tmp_path / n / "latents" / "2.safetensors")) for n in ("a", "b"))
    assert all(torch.equal(ta[k], tb[k]) for k in ("latents", "latents_init", "pool_index"))


def test_mar_run_from_published_checkpoints(tmp_path, tiny_classifier):
    ckpt, vae, mar_json, vae_json, _ = make_published(tmp_path / "pub")
    out = tmp_path / "out"
    assert main(mar_args(ckpt, tiny_classifier, out, "--vae", str(vae), "--dataset", "mnist", "--sample-steps", "3",
                         "--gen-opt", f"preset={mar_json}", "--gen-opt", f"vae_config={vae_json}",
                         "--gen-opt", "diffloss_steps=4", "--gen-opt", "vb=1", "--guidance", "1.0")) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["generator"]["model"]["sha256"] and m["generator"]["clo"]["vb"] is True
    assert m["generator"]["sample_steps"] == 3 and m["generator"]["guidance"] == 1.0


def test_mar_refines_an_image_folder(mar_world, tiny_classifier, tmp_path):
    from digits import write_digits
    images = write_digits(tmp_path / "imgs", {"3": 3})
    out = tmp_path / "refined"
    assert main(["refine", "--generator", "mar", "--images", str(images), "--model", str(mar_world), "--classifier",
                 str(tiny_classifier), "--ipc", "2", "--clo-iters", "2", "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    t = load_file(str(out / "latents" / "3.safetensors"))
    assert t["latents"].shape == (2, 4, 8, 8) and not torch.equal(t["latents"], t["latents_init"])
