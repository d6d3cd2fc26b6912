"""MAR sampling and CLO through the plugin hooks: determinism, snapshots, batch size, gradients, conditions."""
from __future__ import annotations

import pytest
import torch

from cao2_mar.masking import masked_after_steps
from cao2core.method import clo
from cao2core.generators.host import Host
from mar_tiny import make_mar_world

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def mar(tmp_path_factory):
    gen = Host().generator("mar")
    return gen, gen.load(options={"model": str(make_mar_world(tmp_path_factory.mktemp("w")))}, device=CPU)


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def sample(mar, labels, seeds, snapshot_steps=(), **overrides):
    gen, handle = mar
    for k, v in overrides.items():
        setattr(handle, k, v)
    return gen.sample(handle=handle, labels=torch.tensor(labels), generators=gens(*seeds),
                      snapshot_steps=list(snapshot_steps))


def test_same_seed_same_sample_and_batch_independence(mar):
    a = sample(mar, [1, 2, 3], [7, 8, 9]).latents
    b = sample(mar, [1, 2, 3], [7, 8, 9]).latents
    assert torch.equal(a, b)
    alone = sample(mar, [2], [8]).latents
    # a sample does not depend on its batch (up to float summation order, which may change with the batch size)
    torch.testing.assert_close(alone[0], a[1], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a[0], sample(mar, [1], [70]).latents[0])


def test_global_rng_is_not_touched(mar):
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    sample(mar, [4], [1])
    assert torch.equal(torch.rand(3), before)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_guidance_keeps_the_batch_size(mar, guidance):
    gen, handle = mar
    old = handle.guidance
    try:
        out = sample(mar, [0, 1, 2, 3, 4], range(5), guidance=guidance)
    finally:
        handle.guidance = old
    assert out.latents.shape == (5, 4, 8, 8) and torch.isfinite(out.latents).all()


def test_snapshot_before_the_last_step_has_zeros_at_unfilled_tokens(mar):
    gen, handle = mar
    out = sample(mar, [5, 6], [3, 4], snapshot_steps=[-2, 0])
    K, L = handle.steps, handle.model.cfg.seq_len
    left = masked_after_steps(L, K)
    for step, key in ((K - 2, -2), (0, 0)):
        snap_tokens = handle.model.patchify(out.snapshots[key])
        empty = snap_tokens.abs().sum(-1) == 0
        assert empty.sum(1).tolist() == [left[step]] * 2
        final = handle.model.patchify(out.latents)
        assert torch.equal(snap_tokens[~empty], final[~empty])          # filled tokens never change
    with pytest.raises(Exception, match="does not exist"):
        sample(mar, [5], [3], snapshot_steps=[K])


def corrupt_predict(mar, latents, kinds=("class", "class"), levels=(999, 999), seeds=(1, 2)):
    gen, handle = mar
    labels = torch.tensor([3, 4][:len(latents)])
    cond = gen.condition(handle=handle, labels=labels, kinds=list(kinds)[:len(latents)])
    corrupted = gen.corrupt(handle=handle, latents=latents, levels=torch.tensor(levels[:len(latents)]),
                            noise=torch.randn_like(latents), generators=gens(*seeds[:len(latents)]), level_max=999)
    return corrupted, gen.predict(handle=handle, corrupted=corrupted, condition=cond)


def test_clo_gradient_reaches_only_visible_tokens(mar):
    gen, handle = mar
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    corrupted, p = corrupt_predict(mar, z)
    mask = corrupted.extras["mask"]
    assert p.pred.shape == p.target.shape == (2, 16, 16) and p.weight.shape == (2, 16, 1)
    assert not p.target.requires_grad and p.aux_loss is None
    assert mask.sum(1).tolist() == [16, 15]         # each sample's own ratio in [0.7, 1]: mixed counts, padded
    clo.clo_loss(p.pred, p.target, 10.0, p.weight).sum().backward()
    grad = handle.model.patchify(z.grad).abs().sum(-1)
    assert torch.equal(grad[mask], torch.zeros_like(grad[mask]))
    if (~mask).any():
        assert bool((grad[~mask] > 0).all())
    assert all(p.grad is None for p in handle.model.parameters())


def test_corrupt_draws_of_a_sample_do_not_depend_on_its_batch(mar):
    """Sample i's mask, timesteps and eps are its own generator's draws, bit for bit, alone or in any batch."""
    gen, handle = mar
    seeds, levels = (3, 0, 1, 11), (999, 500, 999, 20)        # mask ratios give 12, 14, 16 and 13 masked tokens
    z = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    batch = gen.corrupt(handle=handle, latents=z, levels=torch.tensor(levels), noise=torch.randn_like(z),
                        generators=gens(*seeds), level_max=999)
    assert batch.extras["mask"].sum(1).tolist() == [12, 14, 16, 13]
    for i in (3, 1, 0, 2):
        alone = gen.corrupt(handle=handle, latents=z[i:i + 1], levels=torch.tensor(levels[i:i + 1]),
                            noise=torch.randn_like(z[i:i + 1]), generators=gens(seeds[i]), level_max=999)
        assert torch.equal(alone.target[0], batch.target[i])
        assert all(torch.equal(alone.extras[k][0], batch.extras[k][i]) for k in ("mask", "t", "x_t"))


def test_engine_clo_of_a_sample_does_not_depend_on_its_batch(mar):
    gen, handle = mar
    z0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    labels, kinds, noise_seeds = [3, 4, 5], ["class", "zero", "null"], (3, 0, 11)
    settings = clo.CLOSettings(iters=4, lr=1e-2, level_min=1, level_max=999, kernels="torch")
    together = clo.optimize(gen, handle, z0, torch.tensor(labels), kinds, gens(*noise_seeds), gens(7, 8, 9), settings)
    assert not torch.equal(together, z0)
    for i, level_seed in zip(range(3), (7, 8, 9)):
        alone = clo.optimize(gen, handle, z0[i:i + 1], torch.tensor(labels[i:i + 1]), kinds[i:i + 1],
                             gens(noise_seeds[i]), gens(level_seed), settings)
        torch.testing.assert_close(alone[0], together[i], rtol=1e-5, atol=1e-5)


def test_all_masked_draw_gives_zero_gradient(mar):
    gen, handle = mar
    old = handle.mask_ratio
    handle.mask_ratio = (1.0, 1.0)
    try:
        z = torch.randn(1, 4, 8, 8, requires_grad=True)
        corrupted, p = corrupt_predict(mar, z)
        clo.clo_loss(p.pred, p.target, 10.0, p.weight).sum().backward()
    finally:
        handle.mask_ratio = old
    assert bool(corrupted.extras["mask"].all()) and torch.equal(z.grad, torch.zeros_like(z.grad))


def test_tokens_draw_timesteps_up_to_t_hat_and_draws_are_fresh(mar):
    gen, handle = mar
    z = torch.randn(2, 4, 8, 8)
    g = gens(1, 2)

    def corrupt(generators, levels=(5, 999), level_max=999):
        return gen.corrupt(handle=handle, latents=z, levels=torch.tensor(levels), noise=torch.zeros_like(z),
                           generators=generators, level_max=level_max)
    a, b = corrupt(g), corrupt(g)
    assert int(a.extras["t"].max()) > 900 and int(a.extras["t"].min()) < 100   # every token on 0..T-hat
    assert not torch.equal(a.target, b.target)                  # fresh eps every iteration
    # the engine's per-sample levels do not matter; T-hat caps every token
    assert torch.equal(corrupt(gens(1, 2), levels=(999, 1)).extras["t"], corrupt(gens(1, 2)).extras["t"])
    assert int(corrupt(gens(1, 2), level_max=20).extras["t"].max()) <= 20
    t = torch.cat([corrupt(gens(s, s + 1)).extras["t"].flatten() for s in range(0, 200, 2)]).float()
    assert abs(t.mean().item() - 499.5) < 15                    # uniform on 0..999 (3200 draws: 3 sd), as CaO2-MAR
    c = gen.corrupt(handle=handle, latents=z, levels=torch.tensor([5, 999]), noise=torch.zeros_like(z),
                    generators=gens(1, 2), level_max=999)
    assert torch.equal(a.target, c.target) and torch.equal(a.extras["mask"], c.extras["mask"])


def test_vb_term_is_an_optional_aux_loss(mar):
    gen, handle = mar
    handle.vb = True
    try:
        _, p = corrupt_predict(mar, torch.randn(2, 4, 8, 8))
    finally:
        handle.vb = False
    assert p.aux_loss.shape == (2,) and torch.isfinite(p.aux_loss).all()


def test_condition_kinds(mar):
    gen, handle = mar
    m = handle.model
    c = gen.condition(handle=handle, labels=torch.tensor([3, 3, 3]), kinds=["class", "null", "zero"])
    assert torch.equal(c[0], m.class_emb.weight[3]) and torch.equal(c[1], m.fake_latent[0])
    assert torch.equal(c[2], torch.zeros_like(c[2]))


def test_clo_loss_decreases_with_fixed_draws(mar):
    """With the same mask, timesteps and eps every iteration the objective is fixed, and Adam lowers it."""
    gen, handle = mar
    z = sample(mar, [3, 4], [11, 12]).latents.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=1e-2)
    losses, old = [], handle.mask_ratio
    handle.mask_ratio = (0.5, 0.5)                  # half the tokens visible
    try:
        for _ in range(20):
            _, p = corrupt_predict(mar, z, ("null", "null"), seeds=(5, 6))     # fresh generators: identical draws
            loss = clo.clo_loss(p.pred, p.target, 1.0, p.weight).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        handle.mask_ratio = old
    assert losses[-1] < losses[0]


def test_engine_clo_runs_on_mar(mar):
    gen, handle = mar
    z0 = sample(mar, [3, 4], [11, 12]).latents
    settings = clo.CLOSettings(iters=3, level_min=1, level_max=999, kernels="torch")
    z = clo.optimize(gen, handle, z0, torch.tensor([3, 4]), ["zero", "class"], gens(5, 6), gens(7, 8), settings)
    assert z.shape == z0.shape and not torch.equal(z, z0) and torch.isfinite(z).all()
