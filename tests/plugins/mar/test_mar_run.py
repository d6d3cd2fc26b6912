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


def test_reference_profile_writes_the_official_stability_order(mar_world, tiny_classifier, tmp_path, capsys):
    """The official script keeps argsort(cos)[-ipc:] (least consistent of the kept first) and selects under fp16
    autocast, which a CPU run cannot: it runs in fp32 and says so once."""
    out = tmp_path / "ref"
    assert main(mar_args(mar_world, tiny_classifier, out, "--select", "stability", "--pool-factor", "3",
                         "--profile", "reference")) == 0
    err = capsys.readouterr().err
    assert err.count("decodes and classifies the selection pool under fp16 autocast") == 1, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["precision"]["selection_autocast"] is None and m["precision"]["generator"]["autocast"] is None
    for cid in ("2", "7"):
        tensors = load_file(str(out / "latents" / f"{cid}.safetensors"))
        scores = tensors["scores"]
        assert scores.tolist() == sorted(scores.tolist()) and scores[0] < scores[-1]
        # the pool record ranks the kept samples in the order they were written (0.png first)
        ranked = sorted((int(r), i) for i, r in enumerate(tensors["pool_rank"].tolist()) if r >= 0)
        assert [i for _, i in ranked] == tensors["pool_index"].tolist()


def test_precision_per_profile_and_device():
    from cao2_mar import autocasts
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert autocasts({}, cuda) == (torch.bfloat16, torch.bfloat16)                  # the CUDA default
    assert autocasts({"profile": "reference"}, cuda) == (torch.float16, None)        # official: fp16 sampling, fp32 CLO
    assert autocasts({"autocast": "fp16"}, cuda) == (torch.float16, torch.float16)
    assert autocasts({"dtype": "bf16", "profile": "reference"}, cuda) == (torch.bfloat16, None)
    assert autocasts({"autocast": "bf16"}, cpu) == (None, None)                     # a GPU option


def test_clo_forward_under_autocast_keeps_fp32_latents_and_gradient(mar_world):
    from dataclasses import replace

    from cao2core.generators.host import Host
    gen = Host().generator("mar")
    handle = gen.load(options={"model": str(mar_world)}, device=torch.device("cpu"))
    latents = torch.randn(2, *gen.latent_spec(handle=handle).shape, generator=torch.Generator().manual_seed(0))
    preds = {}
    for name, amp in (("fp32", None), ("bf16", torch.bfloat16)):
        z = latents.clone().requires_grad_(True)
        h = replace(handle, clo_autocast=amp)
        corrupted = gen.corrupt(handle=h, latents=z, levels=torch.zeros(2, dtype=torch.long), noise=torch.zeros_like(z),
                                generators=[torch.Generator().manual_seed(s) for s in (1, 2)], level_max=999)
        p = gen.predict(handle=h, corrupted=corrupted, condition=gen.condition(handle=h, labels=torch.tensor([1, 2]),
                                                                               kinds=["null", "null"]))
        (p.pred.square() * p.weight).sum().backward()
        assert p.pred.dtype == torch.float32 and z.grad.dtype == torch.float32 and z.grad.abs().sum() > 0
        preds[name] = p.pred.detach()
    assert not torch.equal(preds["fp32"], preds["bf16"])                            # bf16 did run
    torch.testing.assert_close(preds["bf16"], preds["fp32"], rtol=0.1, atol=0.1)
