"""CLO on an interpolant: the loss is the model's training target error at the interpolation time of each level,
levels map to the times with DiT's noise-to-signal ratio, and a `cao2 run` equals a plain per-image oracle loop.
Expectations come from the interpolants' definitions (``sit_original``) and DiT's schedule (``dit_original``)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import dit_original as dit
import sit_original as so
from cao2_sit import cao2_condition, cao2_corrupt, cao2_load, cao2_predict, paths
from cao2core.cli import main
from cao2core.method.clo import clo_loss
from cao2core.generators.seeding import unit_generator
from sit_files import HEADS, options, write_checkpoint, write_vae

CPU = torch.device("cpu")
ORACLE_PATHS = {("sit", "linear"): so.sit_linear, ("sit", "gvp"): so.sit_gvp, ("repa", "linear"): so.repa_linear,
                ("repa", "cosine"): so.repa_cosine}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sit-clo")
    return {k: write_checkpoint(root, k) for k in ("sit", "repa")}, write_vae(root)


def dit_ratio(k: int) -> float:
    """DiT's noise-to-signal ratio sqrt((1 - alpha-bar_k) / alpha-bar_k) at timestep k."""
    a = float(dit.alphas_cumprod()[k])
    return math.sqrt((1 - a) / a)


@pytest.mark.parametrize("family,path", [("sit", "linear"), ("sit", "gvp"), ("sit", "vp"), ("repa", "linear"),
                                         ("repa", "cosine")])
def test_a_level_is_the_time_with_dits_noise_to_signal_ratio(family, path):
    times = paths.level_times(paths.Path(family, path), "dit")
    for k in (1, 11, 100, 224, 500, 900):
        t = float(times[k])
        if path == "vp":     # SiT's VPCPlan: alpha = exp(-(1 - t)^2 (20 - 0.1) / 4 - (1 - t) 0.1 / 2)
            alpha = math.exp(-0.25 * (1 - t) ** 2 * 19.9 - 0.5 * (1 - t) * 0.1)
            sigma = math.sqrt(1 - alpha ** 2)
        else:
            alpha, _, sigma, _ = ORACLE_PATHS[(family, path)](t)
        assert sigma / alpha == pytest.approx(dit_ratio(k), rel=1e-6)
        # SiT's data is at t = 1, REPA's at t = 0: a low level is near each one's data end
        assert (t > 0.5) == (family == "sit") if k <= 100 else True


def test_the_noised_latent_is_dits_up_to_a_scale():
    """On the linear paths x_t (sqrt(a) + sqrt(1 - a)) = sqrt(a) z + sqrt(1 - a) eps, DiT's q_sample at the same
    level: CLO sees exactly DiT's corruption there."""
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(4, 4, 8, 8, generator=g).double(), torch.randn(4, 4, 8, 8, generator=g).double()
    levels = torch.tensor([1, 11, 224, 700])
    a = dit.alphas_cumprod()[levels].view(-1, 1, 1, 1)
    dit_x = a.sqrt() * z + (1 - a).sqrt() * eps
    for family in ("sit", "repa"):
        p = paths.Path(family, "linear")
        x_t = p.interpolate(z, eps, paths.level_times(p, "dit")[levels])[0]
        assert torch.allclose(x_t * (a.sqrt() + (1 - a).sqrt()), dit_x, atol=1e-12)


def test_default_range_and_the_fraction_scale():
    sit, repa = paths.Path("sit", "linear"), paths.Path("repa", "linear")
    t = paths.level_times(sit, "dit")
    assert float(t[224]) == pytest.approx(1 / (1 + dit_ratio(224)))         # about 0.545: 45% of the way to noise
    assert 0.54 < float(t[224]) < 0.55 and float(t[1]) > 0.985
    assert torch.allclose(paths.level_times(sit, "fraction")[[1, 224]], torch.tensor([0.999, 0.776], dtype=torch.float64))
    assert torch.allclose(paths.level_times(repa, "fraction")[[1, 224]], torch.tensor([0.001, 0.224], dtype=torch.float64))


@pytest.mark.parametrize("kind,extra", [
    ("sit", {}), ("repa", {}), ("repa", {"path": "cosine"}), ("sit", {"path": "gvp", "prediction": "noise"}),
    ("sit", {"prediction": "score"}), ("sit", {"clo_times": "fraction"}),
])
def test_the_loss_is_the_interpolants_training_target_error(files, kind, extra):
    state, path = files[0][kind]
    handle = cao2_load(options=options(path, files[1], **extra), device=CPU)
    family, path_name = handle.family, extra.get("path", "linear")
    prediction = extra.get("prediction", "velocity")
    g = torch.Generator().manual_seed(2)
    z0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    levels, labels, kinds = torch.tensor([1, 57, 224]), torch.tensor([3, 3, 9]), ["class", "null", "class"]

    z = z0.clone().requires_grad_(True)
    corrupted = cao2_corrupt(handle=handle, latents=z, levels=levels, noise=noise)
    p = cao2_predict(handle=handle, corrupted=corrupted, condition=cao2_condition(handle=handle, labels=labels,
                                                                                 kinds=kinds))
    ours = clo_loss(p.pred, p.target, 10.0)                       # what the host computes from the Prediction
    ours.sum().backward()

    zo = z0.clone().requires_grad_(True)
    expected, y = [], torch.tensor([3, 10, 9])
    for i, k in enumerate(levels.tolist()):
        if extra.get("clo_times") == "fraction":
            t = 1 - k / 1000
        else:       # the time whose sigma/alpha is DiT's at k, solved from the oracle's path by bisection
            lo, hi = 0.0, 1.0
            for _ in range(100):
                mid = (lo + hi) / 2
                a, _, s, _ = ORACLE_PATHS[(family, path_name)](mid)
                ratio_above = (s / a > dit_ratio(k)) if a > 0 else True
                lo, hi = (mid, hi) if ratio_above == (family == "sit") else (lo, mid)
            t = (lo + hi) / 2
        a, da, s, ds = ORACLE_PATHS[(family, path_name)](t)
        x_t = a * zo[i] + s * noise[i]
        out = so.forward(state, x_t[None], torch.tensor([t]), y[i:i + 1], HEADS)[0]
        pred, target = {"velocity": (out, da * zo[i] + ds * noise[i]), "noise": (out, noise[i]),
                        "score": (out * s, -noise[i])}[prediction]
        err = pred - target
        expected.append((err ** 2).mean() + 10.0 * err.abs().max())
    expected = torch.stack(expected)
    expected.sum().backward()
    assert torch.allclose(ours, expected, rtol=1e-5, atol=1e-6)
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert (z.grad - zo.grad).abs().max() <= 1e-4 * zo.grad.abs().max()


def _oracle_clo(state, z0, noise, levels, label, lam=10.0, lr=6e-4):
    """Per image, a fresh Adam: x_t = t z + (1 - t) eps at the level's time (SiT), the oracle told t under the
    null label, mean + lambda max of the velocity error (z - eps)."""
    times = [1 / (1 + dit_ratio(k)) for k in levels]
    z = torch.nn.Parameter(z0.clone()[None])
    opt = torch.optim.Adam([z], lr=lr)
    for t in times:
        out = so.forward(state, t * z + (1 - t) * noise, torch.tensor([t]), torch.tensor([label]), HEADS)
        err = out - (z - noise)
        loss = (err ** 2).mean() + lam * err.abs().max()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return z.detach()[0]


def test_a_run_is_the_oracle_clo_loop(files, tmp_path):
    state, path = files[0]["sit"]
    out, iters = tmp_path / "run", 30
    assert main(["run", "--generator", "sit", "--model", str(path), "--vae", str(files[1]), "--dataset", "mnist",
                 "--classes", "2,7", "--ipc", "2", "--pool-factor", "1", "--select", "none", "--clo-iters", str(iters),
                 "--sample-steps", "3", "--gen-opt", f"num_heads={HEADS}", "--seed", "4", "--out", str(out),
                 "--no-progress", "--device", "cpu"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["clo_tmax"] == 224 and m["generator"]["clo"]["level_scale"] == "dit"
    for cid in (2, 7):
        t = load_file(str(out / "latents" / f"{cid}.safetensors"))
        for i in range(2):
            noise = torch.randn(4, 8, 8, generator=unit_generator(4, cid, i, "clo-noise"))[None]
            lg = unit_generator(4, cid, i, "clo-level")
            levels = [int(torch.randint(1, 225, (1,), generator=lg)) for _ in range(iters)]
            expected = _oracle_clo(state, t["latents_init"][i], noise, levels, label=10)
            assert (t["latents"][i] - expected).abs().max() < 1e-5
            assert (t["latents"][i] - t["latents_init"][i]).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["sit", "repa"])
def test_the_velocity_error_is_the_implied_noise_error_over_alpha(family):
    """docs/sit.md: v_hat - (alpha' z + sigma' eps) = -(eps_hat - eps) / alpha_t on the linear paths (up to the sign
    of the direction), eps_hat the noise the model's velocity implies: velocity CLO is DiT's eps-CLO reweighted."""
    g = torch.Generator().manual_seed(0)
    z, eps, v_hat = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    p = paths.Path(family, "linear")
    x_t, u, sigma = p.interpolate(z, eps, t)
    alpha = (t if family == "sit" else 1 - t).view(-1, 1, 1, 1)
    # the model's data and noise predictions from its velocity (x_t = x + sigma * (noise - data) on both paths)
    x_hat = x_t + sigma * v_hat if family == "sit" else x_t - sigma * v_hat
    eps_hat = (x_t - alpha * x_hat) / sigma
    sign = -1 if family == "sit" else 1
    assert torch.allclose(v_hat - u, sign * (eps_hat - eps) / alpha, atol=1e-10)
