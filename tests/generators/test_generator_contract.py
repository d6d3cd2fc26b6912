"""The same contract for every built-in generator (DiT and MAR), on tiny random worlds, through the same engine."""
from __future__ import annotations

import pytest
import torch

from cao2core.method import clo
from cao2core.generators.hookspecs import CONDITION_KINDS
from cao2core.generators.host import Host
from cao2core.generators.seeding import unit_generators
from mar_tiny import make_mar_world

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def mar_world(tmp_path_factory):
    return make_mar_world(tmp_path_factory.mktemp("marworld"))


@pytest.fixture(params=["dit", "mar"])
def loaded(request, tiny_world, mar_world):
    name = request.param
    gen = Host().generator(name)
    handle = gen.load(options={"model": str(tiny_world if name == "dit" else mar_world), "sample_steps": 3},
                      device=CPU)
    return gen, handle


def modules_of(handle):
    return [v for v in vars(handle).values() if isinstance(v, torch.nn.Module)]


def test_latent_spec(loaded):
    gen, handle = loaded
    spec = gen.latent_spec(handle=handle)
    assert len(spec.shape) == 3 and spec.num_classes == 10 and spec.label_space == "mnist"
    assert spec.sample_steps == 3 and spec.corruption in ("noise", "mask")
    lo, hi = spec.level_range
    assert 1 <= lo <= spec.default_level_max <= hi
    assert isinstance(gen.describe(handle=handle), dict)


def test_sampling_is_deterministic_per_sample(loaded):
    gen, handle = loaded
    spec = gen.latent_spec(handle=handle)
    labels = torch.tensor([1, 2, 3])
    a = gen.sample(handle=handle, labels=labels, generators=unit_generators(0, 1, range(3), "sample"),
                   snapshot_steps=[-2])
    b = gen.sample(handle=handle, labels=labels, generators=unit_generators(0, 1, range(3), "sample"),
                   snapshot_steps=[-2])
    assert a.latents.shape == (3, *spec.shape) and a.snapshots[-2].shape == (3, *spec.shape)
    assert torch.equal(a.latents, b.latents) and torch.equal(a.snapshots[-2], b.snapshots[-2])
    assert not torch.equal(a.latents[0], a.latents[1])


def test_decode_shape_and_range(loaded):
    gen, handle = loaded
    spec = gen.latent_spec(handle=handle)
    pixels = gen.decode(handle=handle, latents=torch.randn(2, *spec.shape, generator=torch.Generator().manual_seed(0)))
    assert pixels.shape == (2, 1, 32, 32) and torch.isfinite(pixels).all() and pixels.abs().max() < 100
    z = gen.encode(handle=handle, pixels=pixels.clamp(-1, 1), generators=unit_generators(0, 0, range(2), "sample"))
    assert z.shape == (2, *spec.shape)


@pytest.mark.parametrize("kind", CONDITION_KINDS)
def test_condition_kinds_corrupt_and_predict(loaded, kind):
    gen, handle = loaded
    spec = gen.latent_spec(handle=handle)
    z = torch.randn(2, *spec.shape, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    labels = torch.tensor([4, 5])
    cond = gen.condition(handle=handle, labels=labels, kinds=[kind, "class"])
    levels = torch.tensor([spec.default_level_max, spec.level_range[0]])
    corrupted = gen.corrupt(handle=handle, latents=z, levels=levels,
                            noise=torch.randn_like(z), generators=unit_generators(0, 4, range(2), "clo-noise"),
                            level_max=spec.default_level_max)
    p = gen.predict(handle=handle, corrupted=corrupted, condition=cond)
    assert p.pred.shape == p.target.shape and p.pred.shape[0] == 2 and not p.target.requires_grad
    if p.weight is not None:
        torch.broadcast_to(p.weight, p.pred.shape)
    loss = clo.clo_loss(p.pred, p.target, 10.0, p.weight)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert all(prm.grad is None and not prm.requires_grad for m in modules_of(handle) for prm in m.parameters())
    assert not any(m.training for m in modules_of(handle))


def test_the_engine_clo_loop(loaded):
    gen, handle = loaded
    spec = gen.latent_spec(handle=handle)
    z0 = torch.randn(2, *spec.shape, generator=torch.Generator().manual_seed(2))
    settings = clo.CLOSettings(iters=2, level_min=spec.level_range[0], level_max=spec.default_level_max,
                               kernels="torch")
    args = (torch.tensor([6, 7]), ["null", "zero"], unit_generators(0, 6, range(2), "clo-noise"),
            unit_generators(0, 6, range(2), "clo-level"), settings)
    a = clo.optimize(gen, handle, z0, *args)
    b = clo.optimize(gen, handle, z0, torch.tensor([6, 7]), ["null", "zero"],
                     unit_generators(0, 6, range(2), "clo-noise"), unit_generators(0, 6, range(2), "clo-level"),
                     settings)
    assert a.shape == z0.shape and torch.equal(a, b) and not torch.equal(a, z0)
