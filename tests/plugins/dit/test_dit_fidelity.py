"""The DiT plugin runs published DiT weights as they were trained, and `--profile reference` reproduces the
official CaO2 loop step for step. Every expectation comes from the oracle in ``dit_original`` (the paper's
definitions), never from cao2's own converter or schedulers."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torchvision
from diffusers import AutoencoderKL
from safetensors.torch import load_file

import dit_original as dit
from cao2_dit import loading, sampling
from cao2core.cli import main
from cao2core.generators.seeding import unit_generator

HEADS = 2


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """A tiny learned-sigma DiT in the original layout (random weights), and a VAE for it."""
    root = tmp_path_factory.mktemp("dit-original")
    state = dit.random_state(depth=2, width=32, in_ch=4, out_ch=8, patch=2, grid=4, classes=10)
    torch.save(state, root / "DiT-tiny.pt")
    torch.manual_seed(0)
    from conftest import TINY_VAE
    AutoencoderKL(**{**TINY_VAE, "sample_size": 16}).save_pretrained(root / "vae")
    return state, root / "DiT-tiny.pt", root / "vae"


def test_timestep_embedding_is_dits_for_every_t(original):
    _, path, _ = original
    model = loading.load_transformer(str(path), num_heads=HEADS)
    loading.set_timestep_freqs(model, "dit")
    t = torch.arange(1000)
    expected = dit.timestep_embedding(t)
    for block in model.transformer_blocks:
        assert torch.allclose(block.norm1.emb.time_proj(t), expected, atol=1e-6, rtol=0)


def test_loaded_original_checkpoint_is_the_original_forward(original):
    state, path, _ = original
    from cao2_dit import cao2_load
    handle = cao2_load(options={"model": str(path), "vae": str(original[2]), "dataset": "mnist",
                               "num_heads": str(HEADS)},
                       device=torch.device("cpu"))
    assert handle.timestep_freqs == "dit"
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(4, 4, 8, 8, generator=g), torch.tensor([0, 11, 224, 999]), torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        ours = handle.transformer(x, timestep=t, class_labels=y).sample
        ref = dit.forward(state, x, t, y, HEADS)
    assert (ours - ref).abs().max() < 1e-5 * ref.abs().max()
    # diffusers' own frequencies (i / 127) are what this replaces: they are measurably off
    loading.set_timestep_freqs(handle.transformer, "diffusers")
    with torch.no_grad():
        assert (handle.transformer(x, timestep=t, class_labels=y).sample - ref).abs().max() > 1e-3


def test_the_mnist_world_keeps_the_frequencies_it_was_trained_with():
    from cao2_dit import cao2_describe, cao2_load
    handle = cao2_load(options={}, device=torch.device("cpu"))
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / (half - 1))    # diffusers' downscale_freq_shift=1
    t = torch.arange(1000)
    args = t[:, None].float() * freqs[None]
    expected = torch.cat([torch.cos(args), torch.sin(args)], -1)
    assert torch.allclose(handle.transformer.transformer_blocks[0].norm1.emb.time_proj(t), expected, atol=1e-6)
    assert cao2_describe(handle=handle)["timestep_freqs"] == "diffusers"


class _Recorder(torch.nn.Module):
    """A stand-in transformer that records the timesteps it is told and returns a fixed output."""

    def __init__(self, out: torch.Tensor, channels: int):
        super().__init__()
        self.out, self.told = out, []
        self.config = type("C", (), {"out_channels": out.shape[1], "in_channels": channels})()

    def forward(self, x, timestep, class_labels):
        self.told.append(int(timestep[0]))
        return type("O", (), {"sample": self.out[: len(x)]})()


def _draws(seed: int, shape, n: int):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


def test_the_sampler_visits_dits_50_step_grid():
    rec = _Recorder(torch.zeros(1, 8, 4, 4), 4)
    sampling.sample(rec, torch.tensor([0]), [torch.Generator().manual_seed(0)], null_label=10, guidance=1.0,
                    steps=50, sampler="ddpm", latent_shape=(4, 4, 4), dtype=torch.float32)
    assert rec.told == dit.space_timesteps(1000, 50)[::-1]
    assert rec.told[:5] == [999, 979, 958, 938, 917] and rec.told[-3:] == [41, 20, 0]


@pytest.mark.parametrize("step", [0, 37])
def test_one_ddpm_step_is_the_closed_form_on_the_respaced_betas(step):
    """Posterior mean and learned-range variance of DDPM (Ho et al.; Nichol & Dhariwal) at a kept step."""
    shape, g_seed = (4, 4, 4), 5
    out = torch.cat([torch.randn(1, 4, 4, 4) * 0.5, torch.rand(1, 4, 4, 4) * 2 - 1], dim=1)
    rec = _Recorder(out, 4)
    x_after = sampling.sample(rec, torch.tensor([0]), [torch.Generator().manual_seed(g_seed)], null_label=10,
                              guidance=1.0, steps=50, sampler="ddpm", latent_shape=shape, dtype=torch.float32,
                              snapshot_steps={step - 1: "before", step: "after"} if step else {0: "after"})[1]
    grid = dit.space_timesteps(1000, 50)[::-1]
    draws = _draws(g_seed, shape, step + 2)         # x_T, then one ancestral draw per step
    x = x_after["before"][0].double() if step else draws[0].double()
    abar = dit.alphas_cumprod()
    a_t, a_prev = abar[grid[step]], abar[grid[step + 1]]
    beta = 1 - a_t / a_prev                          # the respaced beta between two kept steps
    eps, v = out[0, :4].double(), out[0, 4:].double()
    x0 = x / a_t.sqrt() - (1 / a_t - 1).sqrt() * eps
    mean = beta * a_prev.sqrt() / (1 - a_t) * x0 + (1 - a_prev) * (1 - beta).sqrt() / (1 - a_t) * x
    posterior = beta * (1 - a_prev) / (1 - a_t)
    log_var = (v + 1) / 2 * beta.log() + (1 - (v + 1) / 2) * posterior.log()
    expected = mean + (0.5 * log_var).exp() * draws[step + 1].double()
    assert torch.allclose(x_after["after"][0].double(), expected, atol=2e-5, rtol=1e-4)


def test_one_ddim_step_is_the_closed_form_on_the_grid():
    shape = (4, 4, 4)
    eps = torch.randn(1, 4, 4, 4) * 0.5
    rec = _Recorder(eps, 4)
    snaps = sampling.sample(rec, torch.tensor([0]), [torch.Generator().manual_seed(3)], null_label=10,
                            guidance=1.0, steps=50, sampler="ddim", latent_shape=shape, dtype=torch.float32,
                            snapshot_steps={9: "before", 10: "after", 49: "last"})[1]
    grid = dit.space_timesteps(1000, 50)[::-1]
    abar = dit.alphas_cumprod()
    a_t, a_prev = abar[grid[10]], abar[grid[11]]
    x = snaps["before"][0].double()
    x0 = (x - (1 - a_t).sqrt() * eps[0].double()) / a_t.sqrt()
    expected = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps[0].double()     # DDIM, eta 0
    assert torch.allclose(snaps["after"][0].double(), expected, atol=1e-5, rtol=1e-4)
    assert rec.told == grid


def test_reference_guidance_is_dits_three_of_four_channels():
    """DiT's forward_with_cfg: eps channels 0-2 guided; channel 3 and the variance stay conditional."""
    cond, uncond = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    s = 2.7
    half_eps = uncond[:, :3] + s * (cond[:, :3] - uncond[:, :3])
    expected = torch.cat([half_eps, cond[:, 3:]], dim=1)
    assert torch.allclose(sampling.guide(torch.cat([cond, uncond]), 4, s, 3), expected)
    four = sampling.guide(torch.cat([cond, uncond]), 4, s, 4)
    assert torch.allclose(four[:, :4], uncond[:, :4] + s * (cond[:, :4] - uncond[:, :4]))


def _official_clo(state, z0, noise, levels, steps=50, lam=10.0, lr=6e-4, null=10):
    """The official CaO2 loop for one image: fresh Adam, fixed noise, noise at the respaced level's alpha-bar,
    the raw DiT told the respaced index, eps-hat = first C channels, mean + lambda * max."""
    grid = dit.space_timesteps(1000, steps)
    abar = dit.alphas_cumprod()
    latent = torch.nn.Parameter(z0.clone()[None])
    opt = torch.optim.Adam([latent], lr=lr)
    for k in levels:
        a = abar[grid[k]].float()
        noised = a.sqrt() * latent + (1 - a).sqrt() * noise
        eps_hat = dit.forward(state, noised, torch.tensor([k]), torch.tensor([null]), HEADS)[:, :noise.shape[1]]
        loss = ((noise - eps_hat) ** 2).mean() + lam * (noise - eps_hat).abs().max()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return latent.detach()[0]


def test_reference_profile_clo_is_the_official_loop(original, tmp_path):
    state, path, vae = original
    out = tmp_path / "ref"
    iters = 100
    assert main(["run", "--model", str(path), "--vae", str(vae), "--dataset", "mnist", "--classes", "2,7",
                 "--ipc", "2", "--pool-factor", "1", "--select", "none", "--profile", "reference",
                 "--clo-iters", str(iters), "--gen-opt", f"num_heads={HEADS}", "--seed", "4", "--out", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["profile"] == "reference" and m["config"]["clo_tmax"] == 11
    g = m["generator"]
    assert (g["timestep_convention"], g["cfg_channels"], g["timestep_freqs"]) == ("reference", 3, "dit")
    assert g["sampler_timesteps"] == dit.space_timesteps(1000, 50)[::-1]
    for cid, label in (("2", 2), ("7", 7)):
        t = load_file(str(out / "latents" / f"{cid}.safetensors"))
        for i in range(2):
            noise = torch.randn(4, 8, 8, generator=unit_generator(4, label, i, "clo-noise"))[None]
            lg = unit_generator(4, label, i, "clo-level")
            levels = [int(torch.randint(1, 12, (1,), generator=lg)) for _ in range(iters)]
            expected = _official_clo(state, t["latents_init"][i], noise, levels)
            assert (t["latents"][i] - expected).abs().max() < 1e-5
            assert (t["latents"][i] - t["latents_init"][i]).abs().max() > 1e-3    # CLO moved it


class _Spy(torch.nn.Module):
    """Wraps the classifier's network and keeps every batch it is given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


@pytest.mark.parametrize("profile", ["reference", "default"])
def test_reference_profile_classifier_sees_the_raw_decoder_output(tiny_world, tiny_classifier, tmp_path,
                                                                  monkeypatch, profile):
    import cao2core.method.engine as engine
    from cao2_dit import cao2_decode
    spies = []
    real = engine.load_classifier

    def spying(*a, **kw):
        clf = real(*a, **kw)
        clf.model = _Spy(clf.model)
        spies.append(clf)
        return clf
    monkeypatch.setattr(engine, "load_classifier", spying)
    out = tmp_path / profile
    assert main(["run", "--model", str(tiny_world), "--classifier", str(tiny_classifier), "--classes", "5",
                 "--ipc", "3", "--pool-factor", "1", "--clo-iters", "0", "--profile", profile, "--out", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    seen = torch.cat(spies[0].model.seen)[-3:]      # the pool of class 5 (after the preflight's two samples)
    t = load_file(str(out / "latents" / "5.safetensors"))
    from cao2_dit import cao2_load
    handle = cao2_load(options={"model": str(tiny_world)}, device=torch.device("cpu"))
    decoded = cao2_decode(handle=handle, latents=t["latents_init"])[t["pool_index"].argsort()]
    official = torchvision.transforms.Resize((32, 32))(decoded)     # the official scripts: Resize((224, 224))
    if profile == "reference":
        assert torch.allclose(seen, official, atol=1e-5)
        assert json.loads((out / "manifest.json").read_text())["classifier"]["input"] == "raw"
    else:       # clamped, mapped to [0, 1], normalized with the judge's mean 0.5 / std 0.5
        assert torch.allclose(seen, (official.clamp(-1, 1) + 1) / 2 * 2 - 1, atol=1e-5)


def test_raw_input_resizes_to_the_classifiers_size_without_crop_or_normalization():
    from cao2core.data.classifiers import Classifier
    import timm
    model = timm.create_model("mnist_cnn", num_classes=10)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (1, 48, 48)}
    clf = Classifier(model, None, "test", input="raw")
    pixels = torch.randn(2, 1, 32, 32) * 1.5           # decoder output overshoots [-1, 1]
    assert torch.allclose(clf.prepare(pixels), torchvision.transforms.Resize((48, 48))(pixels), atol=1e-6)


def test_jpeg_input_is_the_official_mar_buffer(tmp_path):
    """MAR's script: save_image to JPEG, read back, Resize(short side), ToTensor, Normalize."""
    from PIL import Image
    from cao2core.data.classifiers import Classifier
    import timm
    model = timm.create_model("mnist_cnn", num_classes=10, in_chans=3)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 24, 24), "mean": (0.485, 0.456, 0.406),
                            "std": (0.229, 0.224, 0.225)}
    clf = Classifier(model, None, "test", input="jpeg")
    pixels = torch.rand(2, 3, 32, 40) * 2.2 - 1.1
    got = clf.prepare(pixels)
    tf = torchvision.transforms
    for i in range(2):
        path = tmp_path / f"{i}.jpg"
        torchvision.utils.save_image(pixels[i], path, normalize=True, value_range=(-1, 1))
        img = Image.open(path).convert("RGB")
        expected = tf.Compose([tf.Resize(24), tf.ToTensor(), tf.Normalize(model.pretrained_cfg["mean"],
                                                                          model.pretrained_cfg["std"])])(img)
        assert got[i].shape == expected.shape == (3, 24, 30)
        assert torch.allclose(got[i], expected, atol=1e-5)
