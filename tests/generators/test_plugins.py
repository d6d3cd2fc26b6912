"""The pluggy host: validation, discovery through entry points, per-generator hook calls, hook wrappers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from cao2core.generators import hookspecs
from cao2core.cli import main
from cao2core.errors import UserError
from cao2core.generators.hookspecs import hookimpl
from cao2core.generators.host import Host

ROOT = Path(__file__).resolve().parents[2]


def module(name, **hooks):
    m = types.ModuleType(name)
    for k, v in hooks.items():
        setattr(m, k, hookimpl(v))
    return m


def test_builtin_dit_is_registered_through_its_entry_point():
    host = Host()
    assert "dit" in host.pending and "dit" not in host.generators     # found, imported only when used
    host.generator("dit")
    assert "dit" in host.generators
    info = {p.name: p for p in host.describe()}["dit"]
    assert info.kind == "generator" and info.version == "0.1.0"
    assert set(hookspecs.REQUIRED_HOOKS) <= set(info.hooks)


def test_hookimpl_with_wrong_arguments_is_refused():
    host = Host(load_entry_points=False)
    bad = module("bad", cao2_decode=lambda handle, latents, colour: None)
    with pytest.raises(UserError, match="plugin 'bad' does not match the cao2 hookspecs"):
        host.register(bad, "bad")
    assert not host.pm.has_plugin("bad")


def test_unknown_hook_name_is_refused():
    host = Host(load_entry_points=False)
    bad = module("typo", cao2_decod=lambda handle, latents: None)
    with pytest.raises(UserError, match="typo"):
        host.register(bad, "typo")


def test_generator_missing_required_hooks_is_refused():
    host = Host(load_entry_points=False)
    half = module("half", cao2_decode=lambda handle, latents: latents)
    with pytest.raises(UserError, match="lacks required hooks: cao2_load"):
        host.register(half, "half", kind="generator")


def test_unknown_generator_names_installed_ones(capsys):
    assert main(["run", "--generator", "nope", "--out", "unused"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown generator 'nope'" in err[0] and "dit" in err[0]
    assert not Path("unused").exists()


def test_hooks_of_one_generator_do_not_reach_another(tiny_world):
    import torch
    host = Host()
    calls = []
    other = module("other", **{h: (lambda *a, **k: calls.append(1)) for h in ()})
    for h in hookspecs.REQUIRED_HOOKS:
        spec_args = getattr(hookspecs, h).__code__.co_varnames[:getattr(hookspecs, h).__code__.co_argcount]
        fn = eval(f"lambda {', '.join(spec_args)}: calls.append('{h}')")
        setattr(other, h, hookimpl(fn))
    host.register(other, "other", kind="generator")
    gen = host.generator("dit")
    handle = gen.load(options={"model": str(tiny_world)}, device=torch.device("cpu"))
    assert type(handle).__name__ == "DiTHandle" and calls == []


def test_hookwrapper_plugin_wraps_the_generator(tiny_world):
    import torch
    host = Host()
    seen = []

    class Tracer:
        @hookimpl(wrapper=True)
        def cao2_decode(self, handle, latents):
            out = yield
            seen.append(tuple(out.shape))
            return out

    host.register(Tracer(), "tracer", kind="plugin")
    gen = host.generator("dit")
    handle = gen.load(options={"model": str(tiny_world)}, device=torch.device("cpu"))
    gen.decode(handle=handle, latents=torch.randn(2, 4, 8, 8))
    assert seen == [(2, 1, 32, 32)]


@pytest.fixture(scope="module")
def installed_toy(tmp_path_factory):
    """pip-install the example third-party plugin into its own folder (no change to the cao2 install)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT / "examples" / "toy_generator")], check=True,
                   capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(target))
    return env


def _cao2(env, *args):
    return subprocess.run([sys.executable, "-m", "cao2core.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_installed_third_party_plugin_is_discovered_and_runs(installed_toy, tmp_path):
    listing = _cao2(installed_toy, "plugins")
    assert listing.returncode == 0 and "toy 0.1.0 [generator]" in listing.stdout
    out = tmp_path / "toy-out"
    res = _cao2(installed_toy, "run", "--generator", "toy", "--select", "none", "--classes", "2,7", "--ipc", "3",
                "--condition", "class", "--clo-iters", "20", "--clo-lr", "0.05", "--out", str(out), "--no-progress",
                "--device", "cpu")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generator"]["name"] == "toy"
    assert sorted(p.name for p in (out / "images" / "7").iterdir()) == ["0.png", "1.png", "2.png"]
    # CLO lowered each latent's denoising loss under its own fixed noise (exact Gaussian denoiser).
    import torch
    from safetensors.torch import load_file

    from cao2core.method.clo import clo_loss
    from cao2core.generators.seeding import unit_generator
    sys.path.insert(0, str(ROOT / "examples" / "toy_generator"))
    import cao2_toy
    toy, t = cao2_toy.Toy("cpu"), load_file(str(out / "latents" / "7.safetensors"))
    noise = torch.stack([torch.randn(1, 32, 32, generator=unit_generator(0, 7, i, "clo-noise")) for i in range(3)])
    levels = torch.arange(1, 201, 10)

    def mean_loss(z):
        losses = []
        for lv in levels:
            a = toy.alphas_cumprod[lv]
            x_t = a.sqrt() * z + (1 - a).sqrt() * noise
            eps_hat = (1 - a).sqrt() * (x_t - a.sqrt() * toy.means[7]) / (a * cao2_toy.STD ** 2 + 1 - a)
            losses.append(clo_loss(eps_hat, noise, 10.0))
        return torch.stack(losses).mean(0)

    assert (mean_loss(t["latents"]) < mean_loss(t["latents_init"])).all()


def test_broken_generator_is_an_error_only_when_asked_for(monkeypatch, capsys):
    import importlib.metadata as md
    import cao2core.generators.host as plugins
    real = md.entry_points

    def entry_points(group):
        eps = list(real(group=group))
        if group == plugins.GENERATOR_GROUP:
            eps.append(md.EntryPoint("ghost", "cao2_no_such_module", group))
        return eps
    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", entry_points)
    host = Host()
    host.generator("dit")
    assert "dit" in host.generators and "ghost" not in host.broken      # never imported: never in the way
    with pytest.raises(UserError, match="'ghost' .* failed to import"):
        host.generator("ghost")
    assert main(["plugins"]) == 0
    assert "ghost [generator, BROKEN]" in capsys.readouterr().out
