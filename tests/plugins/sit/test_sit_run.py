"""The sit generator under the contract: the conformance kit on both families and both samplers, `cao2 run
--generator sit` end to end (no selection, and a tiny classifier), resume and batch-size identity, the presets,
and the published checkpoints when the environment points to them."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sit_original as so
from cao2core.cli import build_parser, config_from_args, main
from cao2core.method.presets import PRESETS
from cao2core.generators.conformance import GeneratorConformance
from sit_files import HEADS, write_checkpoint, write_vae

CLASSES = "0,3"


@pytest.fixture(scope="module", autouse=True)
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sit-run")
    vae = str(write_vae(root))
    sit, repa = (str(write_checkpoint(root, k)[1]) for k in ("sit", "repa"))
    base = {"vae": vae, "num_heads": str(HEADS), "sample_steps": 3}
    TestSiTSDEConformance.options = {**base, "model": sit}
    # guidance on 3 of 4 channels: each sample's dopri5 state carries the null copy
    TestSiTODEConformance.options = {**base, "model": sit, "sampler": "ode", "guidance": 2.0}
    TestREPASDEConformance.options = {**base, "model": repa}
    TestREPAODEConformance.options = {**base, "model": repa, "sampler": "ode", "heun": "true",
                                      "guidance_high": "0.5"}
    return {"sit": sit, "repa": repa, "vae": vae}


class TestSiTSDEConformance(GeneratorConformance):
    generator = "sit"


class TestSiTODEConformance(GeneratorConformance):
    generator = "sit"


class TestREPASDEConformance(GeneratorConformance):
    generator = "sit"


class TestREPAODEConformance(GeneratorConformance):
    generator = "sit"


def run_args(tiny, out: Path, *extra, kind="sit") -> list[str]:
    return ["run", "--generator", "sit", "--model", tiny[kind], "--vae", tiny["vae"], "--dataset", "mnist",
            "--classes", CLASSES, "--ipc", "2", "--pool-factor", "2", "--sample-steps", "4", "--clo-iters", "3",
            "--gen-opt", f"num_heads={HEADS}", "--out", str(out), "--no-progress", "--device", "cpu", *extra]


def files_of(out: Path) -> dict:
    """Every file a run writes but the manifest and the records (timings), latents by value (as JSON: the scores of
    an unselected pool are NaN)."""
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
             if p.is_file() and p.name != "manifest.json" and p.parent.name != "records"
             and p.suffix != ".safetensors"}
    for p in sorted((out / "latents").glob("*.safetensors")):
        files[str(p.relative_to(out))] = json.dumps({k: v.tolist() for k, v in load_file(str(p)).items()})
    return files


@pytest.fixture(scope="module")
def straight(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "out"
    assert main(run_args(tiny, out, "--select", "none")) == 0
    return out


def test_run_without_selection_writes_the_classes(straight):
    m = json.loads((straight / "manifest.json").read_text())
    g = m["generator"]
    assert (g["family"], g["code"], g["sampler"]["name"], g["sampler"]["steps"]) == ("sit", "sit", "sde", 4)
    assert g["clo"]["level_scale"] == "dit" and m["config"]["clo_tmax"] == 224
    for cid in CLASSES.split(","):
        assert sorted(p.name for p in (straight / "images" / cid).iterdir()) == ["0.png", "1.png"]
        t = load_file(str(straight / "latents" / f"{cid}.safetensors"))
        assert t["latents"].shape == (2, 4, 8, 8) and (t["latents"] - t["latents_init"]).abs().max() > 0


def test_resume_gives_the_same_files(tiny, straight, tmp_path, capsys):
    out = tmp_path / "resumed"
    assert main(run_args(tiny, out, "--select", "none")) == 0
    (out / "records" / "3.json").unlink()          # class 3 left undone
    capsys.readouterr()
    assert main(run_args(tiny, out, "--select", "none")) == 0
    assert "distilled 1 classes (1 already complete)" in capsys.readouterr().out
    assert files_of(out) == files_of(straight)


def test_batch_size_does_not_change_the_latents(tiny, straight, tmp_path):
    out = tmp_path / "bs1"
    assert main(run_args(tiny, out, "--select", "none", "--batch-size", "1")) == 0
    for cid in CLASSES.split(","):
        a, b = (load_file(str(d / "latents" / f"{cid}.safetensors")) for d in (straight, out))
        for key in ("latents_init", "latents"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,extra", [("sit", ["--sampler", "ode", "--guidance", "2"]),
                                        ("repa", ["--gen-opt", "guidance_high=0.7"])])
def test_run_with_a_classifier(tiny, tiny_classifier, tmp_path, kind, extra):
    out = tmp_path / kind
    assert main(run_args(tiny, out, "--classifier", str(tiny_classifier), *extra, kind=kind)) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["generator"]["code"] == kind and m["config"]["select"] == "confidence"
    for cid in CLASSES.split(","):
        t = load_file(str(out / "latents" / f"{cid}.safetensors"))
        assert t["latents"].shape == (2, 4, 8, 8) and len(t["pool_index"]) == 2


@pytest.mark.parametrize("name,family,pool,iters,cond,guidance", [
    ("woof-sit", "sit", 4, 100, "null", 1.5), ("nette-sit", "sit", 2, 0, "class", 1.5),
    ("in1k-sit", "sit", 4, 100, "null", 1.5), ("woof-repa", "repa", 4, 100, "null", 1.8),
    ("nette-repa", "repa", 2, 0, "class", 1.8), ("in1k-repa", "repa", 4, 100, "null", 1.8),
])
def test_presets_take_the_dit_presets_settings_and_the_papers_sampler(name, family, pool, iters, cond, guidance):
    o = PRESETS[name].options
    # the DiT preset under the default profile: its T-hat on the 1000-step scale
    dit = PRESETS[{"woof": "woof", "nette": "nette", "in1k": "in1k-dit"}[name.split("-")[0]]].options_for(None)
    for key in ("select", "order", "clo_lr", "clo_lambda", "dataset", "clo_tmax"):
        assert o[key] == dit[key], key
    assert (o["pool_factor"], o["clo_iters"], o["condition"]) == (pool, iters, cond)
    assert (o["generator"], o["sampler"], o["sample_steps"], o["guidance"]) == ("sit", "sde", 250, guidance)
    assert f"family={family}" in o["gen_opt"] and (("guidance_high=0.7" in o["gen_opt"]) == (family == "repa"))
    cfg = config_from_args(build_parser().parse_args(["run", "--preset", name, "--profile", "reference"]))
    assert cfg.clo_tmax == 224 and cfg.timestep_convention is None


def test_a_preset_refuses_the_other_codes_checkpoint(tiny, tmp_path, capsys):
    assert main(["run", "--preset", "woof-sit", "--model", tiny["repa"], "--vae", tiny["vae"], "--gen-opt",
                 f"num_heads={HEADS}", "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "use --gen-opt family=repa (or a -repa preset)" in capsys.readouterr().err


# --- the published checkpoints --------------------------------------------------------------------------------

@pytest.mark.checkpoint
@pytest.mark.parametrize("env,family", [("CAO2_SIT_XL", "sit"), ("CAO2_REPA_XL", "repa")])
def test_published_sit_xl2_checkpoints(env, family):
    if not os.environ.get(env):
        pytest.skip(f"set {env} to {'SiT-XL-2-256.pt' if family == 'sit' else 'REPA’s SiT-XL/2 last.pt'}")
    from cao2_sit import loading
    path = os.environ[env]
    model, got, aside = loading.load_model(path, family)
    cfg = model.config
    assert got == family and (cfg.depth, cfg.hidden_size, cfg.patch_size, cfg.num_heads, cfg.input_size,
                              cfg.num_classes) == (28, 1152, 2, 16, 32, 1000)
    assert cfg.learn_sigma == (family == "sit") and bool(aside) == (family == "repa")
    state = loading.read_state_dict(Path(path))
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 4, 32, 32, generator=g), torch.tensor([0.1, 0.9]), torch.tensor([207, 1000])
    with torch.no_grad():
        ours = model(x, t, y)
        ref = so.forward(state, x, t, y, 16)
    assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_the_documented_woof_command_on_a_tiny_imagenet_sit(tmp_path):
    """`cao2 run --generator sit --model SiT-XL-2-256.pt --preset woof-sit` with tiny stand-ins: a 1000-class
    learned-sigma SiT in the original layout, an RGB VAE, a classifier whose outputs are ImageNet wnids."""
    import timm
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from cao2core.data.labels import imagenet1k, label_space
    torch.save(so.random_state(classes=1000, heads=HEADS), tmp_path / "SiT-XL-2-256.pt")
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
                  norm_num_groups=4, sample_size=32).save_pretrained(tmp_path / "vae")
    clf = timm.create_model("mnist_cnn", num_classes=1000, in_chans=3)
    save_file(clf.state_dict(), str(tmp_path / "clf.safetensors"),
              metadata={"arch": "mnist_cnn", "num_classes": "1000", "classes": json.dumps(imagenet1k()[0])})
    out = tmp_path / "woof"
    assert main(["run", "--generator", "sit", "--model", str(tmp_path / "SiT-XL-2-256.pt"), "--preset", "woof-sit",
                 "--vae", str(tmp_path / "vae"), "--classifier", str(tmp_path / "clf.safetensors"),
                 "--gen-opt", f"num_heads={HEADS}", "--classes", "0,9", "--ipc", "1", "--sample-steps", "3",
                 "--clo-iters", "2", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    woof = label_space("woof")
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted([woof.ids[0], woof.ids[9]])
    m = json.loads((out / "manifest.json").read_text())
    g = m["generator"]
    assert m["generator_labels"] == [woof.generator_labels[0], woof.generator_labels[9]]
    assert (g["code"], g["null_label"], g["sampler"]["guidance"], g["sampler"]["cfg_channels"]) == ("sit", 1000, 1.5, 3)
    assert (m["config"]["pool_factor"], m["config"]["clo_tmax"], m["config"]["condition"]) == (4, 224, "null")
