"""CLO: the per-sample loss, batched == per-image optimization, independence of --batch-size."""
from __future__ import annotations

import pytest
import torch

from cao2core.method import clo
from cao2core.generators.host import Host
from cao2core.generators.seeding import unit_generators


def loop_loss(pred, target, lam, weight=None):
    """The reference code's loss, one sample at a time: mean((e)^2) + lam * max|e| (weighted variant)."""
    out = []
    for i in range(pred.shape[0]):
        e = pred[i] - target[i]
        if weight is None:
            out.append((e ** 2).mean() + lam * e.abs().max())
        else:
            w = torch.broadcast_to(weight[i], e.shape)
            out.append((w * e ** 2).sum() / w.sum() + lam * e.abs()[w > 0].max())
    return torch.stack(out)


@pytest.mark.parametrize("shape", [(3, 4, 8, 8), (5, 16, 7), (2, 1)])
@pytest.mark.parametrize("weighted", [False, True])
def test_clo_loss_matches_per_sample_loop(shape, weighted):
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(shape, generator=g, requires_grad=True)
    target = torch.randn(shape, generator=g)
    weight = (torch.rand(shape, generator=g) > 0.4).float() if weighted else None
    if weighted:
        weight.view(shape[0], -1)[:, 0] = 1.0      # every sample keeps at least one element
    ours = clo.clo_loss(pred, target, 10.0, weight)
    ref = loop_loss(pred, target, 10.0, weight)
    torch.testing.assert_close(ours, ref)
    g1, = torch.autograd.grad(ours.sum(), pred)
    g2, = torch.autograd.grad(ref.sum(), pred)
    torch.testing.assert_close(g1, g2)


def _setup(tiny_world):
    gen = Host().generator("dit")
    handle = gen.load(options={"model": str(tiny_world)}, device=torch.device("cpu"))
    return gen, handle


def _optimize(gen, handle, latents, labels, idx, settings, kinds):
    return clo.optimize(gen, handle, latents, labels, kinds, unit_generators(0, int(labels[0]), idx, "clo-noise"),
                        unit_generators(0, int(labels[0]), idx, "clo-level"), settings)


@pytest.mark.parametrize("kind", ["null", "class", "zero"])
def test_batched_clo_equals_per_image_clo(tiny_world, kind):
    gen, handle = _setup(tiny_world)
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.full((4,), 3)
    settings = clo.CLOSettings(iters=6, lr=5e-2, lam=10.0, level_min=1, level_max=500)
    batched = _optimize(gen, handle, latents, labels, range(4), settings, [kind] * 4)
    single = torch.cat([_optimize(gen, handle, latents[i:i + 1], labels[i:i + 1], [i], settings, [kind])
                        for i in range(4)])
    assert not torch.equal(batched, latents)          # it moved
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


def test_generator_weights_get_no_gradient(tiny_world):
    gen, handle = _setup(tiny_world)
    latents = torch.randn(2, 4, 8, 8)
    _optimize(gen, handle, latents, torch.tensor([1, 1]), [0, 1], clo.CLOSettings(iters=2, level_max=100), ["null"] * 2)
    assert all(p.grad is None and not p.requires_grad for p in handle.transformer.parameters())


def test_zero_condition_differs_from_null_and_class(tiny_world):
    gen, handle = _setup(tiny_world)
    x = torch.randn(3, 4, 8, 8)
    labels = torch.tensor([2, 2, 2])
    c = gen.condition(handle=handle, labels=labels, kinds=["class", "null", "zero"])
    corrupted = gen.corrupt(handle=handle, latents=x, levels=torch.tensor([50, 50, 50]), noise=torch.randn_like(x),
                            generators=[], level_max=224)
    # Same input for each row, three conditions: three different predictions.
    corrupted.inputs = corrupted.inputs[:1].expand(3, -1, -1, -1)
    with torch.no_grad():
        p = gen.predict(handle=handle, corrupted=corrupted, condition=c).pred
    assert not torch.allclose(p[0], p[1]) and not torch.allclose(p[1], p[2]) and not torch.allclose(p[0], p[2])
