"""`cao2 run` and `cao2 refine` with the sd generator on a label space of class names: a tiny pipeline, a file of
three names, no selection or a user's tiny classifier; batch independence, v-prediction, the shipped label spaces,
the presets, and a real SD 1.5 folder when one is given."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from cao2core.cli import build_parser, config_from_args, main
from cao2core.method.presets import PRESETS
from cao2core.generators.seeding import unit_generator
from cao2_sd import prompts
from sd_tiny import SHAPES, load_pipeline, make_sd, shapes_classifier, shapes_file

IDS = [i for i, _ in SHAPES]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-run")
    return {"eps": make_sd(root / "eps"), "v": make_sd(root / "v", prediction_type="v_prediction"),
            "shapes": shapes_file(root / "shapes.txt"), "classifier": shapes_classifier(root / "clf.safetensors")}


def run(world, out: Path, *extra, model="eps") -> Path:
    argv = ["run", "--generator", "sd", "--model", str(world[model]), "--dataset", str(world["shapes"]),
            "--ipc", "2", "--sample-steps", "3", "--guidance", "2", "--clo-iters", "2", "--gen-opt", "store_size=8",
            "--out", str(out), "--no-progress", "--device", "cpu", *extra]
    assert main(argv) == 0
    return out


def latents(out: Path, cid: str) -> dict:
    return load_file(str(out / "latents" / f"{cid}.safetensors"))


def test_a_label_space_of_names_without_selection(world, tmp_path):
    out = run(world, tmp_path / "out", "--select", "none", "--condition", "class")
    m = json.loads((out / "manifest.json").read_text())
    assert m["class_ids"] == IDS and m["class_names"][0] == "round circle" and m["generator_labels"] == [0, 1, 2]
    g = m["generator"]
    assert g["name"] == "sd" and g["family"] == "sd" and g["prompt"] == prompts.DEFAULT_TEMPLATE
    assert g["store_size"] == [8, 8] and g["size"] == [16, 16] and len(g["unet"]["sha256"]) == 64
    assert m["config"]["clo_tmax"] == 299 and m["identity"]["files"]["generator.unet"] == g["unet"]["sha256"]
    for cid in IDS:
        assert sorted(p.name for p in (out / "images" / cid).iterdir()) == ["0.png", "1.png"]
        image = Image.open(out / "images" / cid / "0.png")
        assert image.size == (8, 8) and image.mode == "RGB"
        t = latents(out, cid)
        assert t["latents"].shape == (2, 4, 8, 8) and not torch.equal(t["latents"], t["latents_init"])


def test_selection_with_a_tiny_classifier_of_the_label_space(world, tmp_path):
    out = run(world, tmp_path / "out", "--classifier", str(world["classifier"]), "--pool-factor", "2",
              "--classes", "square,triangle")
    m = json.loads((out / "manifest.json").read_text())
    assert m["class_ids"] == ["square", "triangle"] and m["generator_labels"] == [1, 2]
    assert m["classes"]["square"]["pool"] == 4 and m["classes"]["square"]["kept"] == 2
    t = latents(out, "triangle")
    assert set(t["pool_index"].tolist()) <= {0, 1, 2, 3} and torch.isfinite(t["scores"]).all()


def test_output_does_not_depend_on_the_batch(world, tmp_path):
    """Every draw of a sample comes from its own generator: batch size 1 and 4 write the same files."""
    a = run(world, tmp_path / "b1", "--select", "none", "--batch-size", "1", "--sampler", "euler_a")
    b = run(world, tmp_path / "b4", "--select", "none", "--batch-size", "4", "--sampler", "euler_a")
    for cid in IDS:
        ta, tb = latents(a, cid), latents(b, cid)
        assert torch.allclose(ta["latents_init"], tb["latents_init"], atol=1e-5)
        assert torch.allclose(ta["latents"], tb["latents"], atol=1e-4)


def test_v_prediction_with_stability_selection(world, tmp_path):
    out = run(world, tmp_path / "out", "--select", "stability", "--classifier", str(world["classifier"]),
              "--pool-factor", "2", "--condition", "zero", model="v")
    m = json.loads((out / "manifest.json").read_text())
    assert m["generator"]["prediction_type"] == "v_prediction" and m["classes"]["circle"]["condition"] == "zero"
    assert all(m["classes"][c]["status"] == "complete" for c in IDS)


def test_the_velocity_targets_gradient_passes_every_kernel_backend(world, tmp_path):
    """The v target depends on the latent; the fused CLO kernels give it the same gradient as torch's autograd."""
    a = run(world, tmp_path / "torch", "--select", "none", "--clo-iters", "4", "--kernels", "torch", model="v")
    b = run(world, tmp_path / "auto", "--select", "none", "--clo-iters", "4", model="v")
    for cid in IDS:
        ta, tb = latents(a, cid), latents(b, cid)
        assert torch.allclose(ta["latents"], tb["latents"], atol=1e-6)
        assert not torch.equal(ta["latents"], ta["latents_init"])


def test_refine_encodes_the_stored_images_through_the_vae(world, tmp_path):
    """refine without selection or CLO: the latents are the VAE posterior samples of the images brought back to
    the sampling size (each from its own generator), and the written images their decodes at store size."""
    made = run(world, tmp_path / "made", "--select", "none", "--clo-iters", "0")
    out = tmp_path / "refined"
    assert main(["refine", "--generator", "sd", "--model", str(world["eps"]), "--dataset", str(world["shapes"]),
                 "--images", str(made / "images"), "--select", "none", "--clo-iters", "0", "--ipc", "all",
                 "--gen-opt", "store_size=8", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    vae = load_pipeline(world["eps"]).vae
    for label, cid in enumerate(IDS):
        t = latents(out, cid)
        for i in range(2):
            png = np.asarray(Image.open(made / "images" / cid / f"{i}.png"), dtype=np.float32)
            pixels = torch.from_numpy(png).permute(2, 0, 1)[None] / 127.5 - 1
            up = F.interpolate(pixels, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
            with torch.no_grad():
                dist = vae.encode(up).latent_dist
            eps = torch.randn(dist.mean.shape[1:], generator=unit_generator(0, label, i, "encode"))
            want = (dist.mean + dist.std * eps) * vae.config.scaling_factor
            assert torch.allclose(t["latents"][i], want[0], atol=1e-4)
            with torch.no_grad():
                decoded = vae.decode(want / vae.config.scaling_factor).sample
            small = F.interpolate(decoded, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
            expect = ((small[0].clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()
            got = np.asarray(Image.open(out / "images" / cid / f"{i}.png"), dtype=np.float32)
            assert np.abs(got - expect).max() <= 1


def test_the_shipped_label_spaces():
    spaces = prompts.shipped_spaces()
    assert [i for i, _ in spaces["cifar10"]] == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                 "horse", "ship", "truck"]
    c100 = spaces["cifar100"]
    assert len(c100) == 100 and [i for i, _ in c100] == sorted(i for i, _ in c100)   # CIFAR-100's label order
    assert dict(c100)["aquarium_fish"] == "aquarium fish" and c100[-1] == ("worm", "worm")


def test_prompts_of_imagenet_and_own_label_spaces(tmp_path):
    nette = prompts.ClassNames.of_dataset("nette")
    assert len(nette) == 1000 and nette.prompt("a photo of a {name}", 0) == "a photo of a tench"
    assert nette.prompt("{synonyms}", 0) == "tench, Tinca tinca"
    own = tmp_path / "dogs.txt"
    own.write_text("n02085620 small dog\nn02085782\n")     # ImageNet wnids: a name of one's own or the shipped one
    dogs = prompts.ClassNames.of_dataset(str(own))
    assert dogs.prompt("{name}", 151) == "small dog" and dogs.prompt("{name}", 152) == "Japanese spaniel"
    cifar = prompts.ClassNames.of_dataset("cifar100")
    assert cifar.prompt("a photo of a {name}", 1) == "a photo of a aquarium fish"


def test_cifar_presets_take_the_sd_generator(world, tmp_path):
    for name in ("cifar10-sd", "cifar100-sd"):
        o = PRESETS[name].options
        assert o["generator"] == "sd" and "store_size=32" in o["gen_opt"] and o["select"] == "confidence"
    cfg = config_from_args(build_parser().parse_args(["run", "--preset", "cifar10-sd", "--model", "m"]))
    assert (cfg.generator, cfg.dataset, cfg.clo_tmax) == ("sd", "cifar10", None)
    # the preset on the tiny pipeline: two CIFAR-10 classes stored at 32 px (the tiny model samples 16 px)
    out = tmp_path / "cifar"
    assert main(["run", "--preset", "cifar10-sd", "--model", str(world["eps"]), "--select", "none", "--classes",
                 "cat,dog", "--ipc", "1", "--sample-steps", "2", "--clo-iters", "1", "--out", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    assert Image.open(out / "images" / "cat" / "0.png").size == (32, 32)


@pytest.mark.checkpoint
def test_a_real_sd15_folder(tmp_path):
    """CAO2_SD15 = a Stable Diffusion 1.5 folder in the diffusers layout: the plugin's samples are the pipeline's."""
    folder = os.environ.get("CAO2_SD15")
    if not folder:
        pytest.skip("set CAO2_SD15 to a Stable Diffusion 1.5 folder (diffusers layout) to run this")
    from cao2core.generators.conformance import Loaded, check_generator
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    options = {"model": folder, "dataset": "cifar10", "sample_steps": 10, "size": "256"}
    k = Loaded("sd", options, device)
    assert k.spec.shape == (4, 32, 32) and k.spec.default_level_max == 299
    z = k.gen.sample(handle=k.handle, labels=torch.tensor([3], device=device),
                     generators=[torch.Generator().manual_seed(0)], snapshot_steps=[]).latents
    pipe = load_pipeline(Path(folder)).to(device)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(["a photo of a cat"], num_inference_steps=10, height=256, width=256, output_type="latent",
               generator=[torch.Generator().manual_seed(0)]).images
    assert torch.allclose(z, ref, atol=1e-3, rtol=1e-3)
    assert not check_generator("sd", {**options, "sample_steps": 2}, device)
    assert main(["run", "--generator", "sd", "--model", folder, "--dataset", "cifar10", "--classes", "cat",
                 "--ipc", "1", "--select", "none", "--sample-steps", "10", "--clo-iters", "5", "--gen-opt", "size=256",
                 "--gen-opt", "store_size=32", "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    assert Image.open(tmp_path / "o" / "images" / "cat" / "0.png").size == (32, 32)
