"""Each sampler's steps are the closed forms of SiT's and REPA's definitions, in each code's time direction, with
each code's guidance; the dopri5 ODE reaches the end point of a fine fixed-step integration of the oracle.

The model is the oracle forward of a tiny random SiT (``sit_original``); every expected value is computed here from
the interpolant (SiT: x_t = t x + (1 - t) eps, REPA: x_t = (1 - t) x + t eps) and the per-sample noise draws."""
from __future__ import annotations

import pytest
import torch
from torchdiffeq import odeint

import sit_original as so
from cao2_sit import cao2_load, cao2_sample, paths, sampling
from sit_files import HEADS, options, write_checkpoint, write_vae

SHAPE = (4, 8, 8)
NULL = 10
STATE = so.random_state(seed=0, heads=HEADS)


def call(x, t, y):
    return so.forward(STATE, x.float(), t.float(), y, HEADS)


def settings(family="sit", sampler="sde", **kw) -> sampling.SamplerSettings:
    base = dict(family=family, sampler=sampler, steps=6, guidance=1.0, null_label=NULL,
                path=paths.Path(family, "linear"))
    return sampling.SamplerSettings(**{**base, **kw})


def run(s, seeds=(3,), labels=(4,), snapshots=None):
    gens = [torch.Generator().manual_seed(k) for k in seeds]
    return sampling.sample(call, torch.tensor(labels), gens, s, SHAPE, snapshot_steps=snapshots)


def draws(seed, n, dtype=torch.float32):
    """The per-sample stream: the initial noise (fp32), then one draw per stochastic step."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(SHAPE, generator=g)
    return [first] + [torch.randn(SHAPE, generator=g, dtype=dtype) for _ in range(n)]


def sit_cfg(x, t, y, w, k):
    """SiT's forward_with_cfg: channels 0..k-1 uncond + w (cond - uncond), the rest conditional."""
    tt = torch.full((len(x),), float(t))
    c, u = call(x, tt, torch.tensor([y])).double(), call(x, tt, torch.tensor([NULL])).double()
    return torch.cat([u[:, :k] + w * (c[:, :k] - u[:, :k]), c[:, k:]], 1)


# --- SiT ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("step", [0, 3])
def test_one_sit_sde_step_is_euler_maruyama_with_sigma_diffusion(step):
    """dX = [v + w_t s] dt + sqrt(2 w_t) dW, w_t = sigma_t = 1 - t, s = -eps/sigma = (t v - x) / (1 - t),
    on linspace(0, 1 - 0.04, K)."""
    w, k, K = 2.5, 3, 6
    s = settings(steps=K, guidance=w, cfg_channels=k)
    snaps = run(s, snapshots={step - 1: "before", step: "after"} if step else {0: "after"})[1]
    noise = draws(3, K)
    x = snaps["before"][0].double()[None] if step else noise[0].double()[None]
    ts = torch.linspace(0, 0.96, K)
    t, dt = float(ts[step]), float(ts[1] - ts[0])
    v = sit_cfg(x, t, 4, w, k)
    score = (t * v - x) / (1 - t)
    expected = x + (v + (1 - t) * score) * dt + (2 * (1 - t) * dt) ** 0.5 * noise[step + 1].double()
    assert torch.allclose(snaps["after"][0].double(), expected[0], atol=2e-5, rtol=1e-4)


def test_sit_sdes_last_step_is_the_mean_step_of_size_0_04():
    K = 5
    s = settings(steps=K, guidance=1.0)
    out, snaps = run(s, snapshots={K - 2: "before"})
    x = snaps["before"].double()
    t = 0.96
    v = call(x, torch.full((1,), t), torch.tensor([4])).double()
    expected = x + (v + (1 - t) * (t * v - x) / (1 - t)) * 0.04       # no noise on the last step
    assert torch.allclose(out.double(), expected, atol=2e-5, rtol=1e-4)


def test_sit_ode_euler_step_and_grid():
    """With a fixed-step torchdiffeq method the ODE's steps are the reported times linspace(0, 1, K + 1)."""
    w, k, K = 2.0, 3, 4
    snaps = run(settings(sampler="ode", steps=K, guidance=w, cfg_channels=k, ode_method="euler"),
                snapshots={0: "first", 1: "second"})[1]
    x0 = draws(3, 0)[0].double()[None]
    x1 = x0 + 0.25 * sit_cfg(x0, 0.0, 4, w, k)
    assert torch.allclose(snaps["first"].double(), x1, atol=2e-5, rtol=1e-4)
    assert torch.allclose(snaps["second"].double(), x1 + 0.25 * sit_cfg(x1, 0.25, 4, w, k), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("guidance,channels", [(1.0, 4), (2.0, 3)])
def test_sit_dopri5_reaches_the_end_point_of_a_fine_fixed_step_integration(guidance, channels):
    """SiT's default ODE (dopri5, atol 1e-6, rtol 1e-3) against 64 RK4 steps of the oracle's guided velocity
    from t = 0 to 1 (converged to 1e-6 of the scale: 400 steps move it less): within 2e-3 of the end point's
    scale (measured: 2e-4 to 6e-4). The end point does not depend on how many times the solution is reported."""
    s = settings(sampler="ode", guidance=guidance, cfg_channels=channels)
    ends = [run(sampling.SamplerSettings(**{**vars(s), "steps": k}))[0] for k in (3, 250)]
    assert torch.equal(ends[0], ends[1])
    x0 = draws(3, 0)[0].double()[None]
    ref = so.rk4(lambda x, t: sit_cfg(x, t, 4, guidance, channels), x0, 0.0, 1.0, 64)
    assert (ends[0].double() - ref).abs().max() <= 2e-3 * ref.abs().max()


def test_sit_ode_is_sits_batch_of_one_with_the_null_copy_in_the_state():
    """SiT's sample.py integrates [x; x] with forward_with_cfg: the null copy's last channel follows the
    unconditional velocity and enters dopri5's error norm. Each cao2 sample is that solve alone."""
    w, k = 3.0, 3
    out = run(settings(sampler="ode", guidance=w, cfg_channels=k, steps=7), seeds=(3, 5), labels=(4, 2))[0]
    for i, (seed, y) in enumerate(((3, 4), (5, 2))):
        x0 = draws(seed, 0)[0][None]

        def forward_with_cfg(t, x, y=y):          # SiT models.py, on the first half duplicated
            tt = torch.ones(x.shape[0]) * t
            half = x[: len(x) // 2]
            o = call(torch.cat([half, half]), tt, torch.tensor([y, NULL]))
            eps, rest = o[:, :k], o[:, k:]
            c, u = eps.chunk(2)
            g = u + w * (c - u)
            return torch.cat([torch.cat([g, g]), rest], 1)
        ref = odeint(forward_with_cfg, torch.cat([x0, x0]), torch.linspace(0, 1, 250), method="dopri5",
                     atol=[1e-6], rtol=[1e-3])[-1][0]
        assert torch.allclose(out[i], ref, atol=1e-6, rtol=1e-5)


def test_sit_guidance_is_forward_with_cfg_on_three_channels():
    x, t, y = torch.randn(2, *SHAPE), torch.tensor([0.3, 0.8]), torch.tensor([1, 7])
    s = settings(guidance=4.0, cfg_channels=3)
    cond, null_rows = sampling.sit_guided(call, x, t, y, s)
    c, u = call(x, t, y), call(x, t, torch.full_like(y, NULL))
    assert torch.allclose(cond[:, :3], u[:, :3] + 4.0 * (c[:, :3] - u[:, :3]), atol=1e-5)
    assert torch.equal(cond[:, 3], c[:, 3]) and torch.equal(null_rows[:, 3], u[:, 3])


@pytest.mark.parametrize("path,prediction", [("gvp", "velocity"), ("linear", "noise"), ("vp", "score")])
def test_sit_drifts_of_other_paths_and_predictions_are_the_probability_flow(path, prediction):
    """Whatever the model predicts, SiT's ODE drift is the probability-flow velocity alpha' x1 + sigma' eps at
    x_t = alpha x1 + sigma eps when the prediction is exact."""
    p = paths.Path("sit", path)
    g = torch.Generator().manual_seed(0)
    x1, eps = torch.randn(3, *SHAPE, generator=g).double(), torch.randn(3, *SHAPE, generator=g).double()
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    x_t, velocity, sigma = p.interpolate(x1, eps, t)
    out = {"velocity": velocity, "noise": eps, "score": -eps / sigma}[prediction]
    assert torch.allclose(p.ode_drift(out, x_t, t, prediction), velocity, atol=1e-9)
    assert torch.allclose(p.score(out, x_t, t, prediction), -eps / sigma, atol=1e-9)


def test_sit_intervals_are_sits():
    lin, vp = paths.Path("sit", "linear"), paths.Path("sit", "vp")
    assert paths.sit_interval(lin, "velocity", sde=True, last_step_size=0.04) == (0.0, 0.96)
    assert paths.sit_interval(lin, "velocity", sde=False) == (0.0, 1.0)
    assert paths.sit_interval(lin, "noise", sde=False) == (1e-3, 1 - 1e-3)
    # SBDM moves t0 to sample_eps, which a velocity model on Linear does not have (0); a noise model does (1e-3)
    assert paths.sit_interval(lin, "velocity", sde=True, diffusion_form="SBDM", last_step_size=0.04) == (0.0, 0.96)
    assert paths.sit_interval(lin, "noise", sde=True, last_step_size=0.04) == (1e-3, 0.96)
    assert paths.sit_interval(vp, "velocity", sde=False) == (0.0, 1 - 1e-3)


# --- REPA -----------------------------------------------------------------------------------------------------

def repa_drift(x, t, y, w, guided):
    """REPA's SDE drift d = v - (1/2)(2t) s with s = -(x + (1 - t) v) / t, guided on all channels."""
    def d(label):
        v = call(x, torch.full((len(x),), float(t)), torch.tensor([label])).double()
        return v - t * (-(x + (1 - t) * v) / t)
    return d(NULL) + w * (d(y) - d(NULL)) if guided else d(y)


@pytest.mark.parametrize("step", [0, 2, 5])
def test_one_repa_sde_step_is_its_euler_maruyama_with_the_guidance_interval(step):
    """t on linspace(1, 0.04, K): x + d dt + sqrt(2 t) sqrt(|dt|) eps; guided only while t <= 0.7."""
    w, K = 1.8, 8
    s = settings("repa", steps=K, guidance=w, guidance_interval=(0.0, 0.7))
    snaps = run(s, snapshots={step - 1: "before", step: "after"} if step else {0: "after"})[1]
    noise = draws(3, K, torch.float64)
    x = snaps["before"].double() if step else noise[0].double()[None]
    ts = torch.linspace(1, 0.04, K, dtype=torch.float64)
    t, dt = float(ts[step]), float(ts[step + 1] - ts[step])
    assert (t <= 0.7) == (step == 5)
    expected = x + repa_drift(x, t, 4, w, t <= 0.7) * dt + (2 * t) ** 0.5 * abs(dt) ** 0.5 * noise[step + 1][None]
    # the state between steps is reported in fp32; REPA keeps it in fp64
    assert torch.allclose(snaps["after"].double(), expected, atol=3e-6, rtol=1e-5)


def test_repa_sdes_last_step_goes_from_0_04_to_0_without_noise():
    K = 4
    out, snaps = run(settings("repa", steps=K, guidance=1.8, guidance_interval=(0.0, 0.7)), snapshots={K - 2: "b"})
    x = snaps["b"].double()
    assert torch.allclose(out.double(), x - 0.04 * repa_drift(x, 0.04, 4, 1.8, True), atol=3e-6, rtol=1e-5)


@pytest.mark.parametrize("heun", [False, True])
def test_one_repa_ode_step_is_euler_or_heun_on_linspace_1_0(heun):
    w, K = 1.5, 5
    snaps = run(settings("repa", "ode", steps=K, guidance=w, heun=heun), snapshots={0: "a", K - 1: "end"})[1]
    x0 = draws(3, 0)[0].double()[None]

    def v(x, t):
        tt = torch.full((1,), t)
        c, u = call(x, tt, torch.tensor([4])).double(), call(x, tt, torch.tensor([NULL])).double()
        return u + w * (c - u)
    x1 = x0 - 0.2 * v(x0, 1.0)
    if heun:
        x1 = x0 - 0.2 * (0.5 * v(x0, 1.0) + 0.5 * v(x1, 0.8))
    assert torch.allclose(snaps["a"].double(), x1, atol=3e-6, rtol=1e-5)


def test_repa_guides_every_channel_and_not_at_scale_one():
    x = torch.randn(1, *SHAPE).double()
    s = settings("repa", guidance=1.8)
    got = sampling._repa_guided(call, x, 0.5, torch.tensor([4]), s)
    c = call(x, torch.full((1,), 0.5), torch.tensor([4])).double()
    u = call(x, torch.full((1,), 0.5), torch.tensor([NULL])).double()
    assert torch.allclose(got, u + 1.8 * (c - u), atol=1e-5, rtol=1e-5)
    one = sampling._repa_guided(call, x, 0.5, torch.tensor([4]), settings("repa", guidance=1.0))
    assert torch.equal(one, c)


# --- through the plugin -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def handles(tmp_path_factory):
    root = tmp_path_factory.mktemp("sit-sampling")
    vae = write_vae(root)
    return {kind: cao2_load(options=options(write_checkpoint(root, kind)[1], vae, sample_steps=4),
                            device=torch.device("cpu")) for kind in ("sit", "repa")}


@pytest.mark.parametrize("kind", ["sit", "repa"])
def test_samples_draw_only_from_their_own_generators(handles, kind):
    h = handles[kind]
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]      # noqa: E731
    batch = cao2_sample(handle=h, labels=torch.tensor([1, 2, 3]), generators=gens([7, 8, 9]), snapshot_steps=[-2])
    alone = cao2_sample(handle=h, labels=torch.tensor([2]), generators=gens([8]), snapshot_steps=[-2])
    assert torch.allclose(batch.latents[1:2], alone.latents, atol=1e-5, rtol=1e-5)
    assert torch.allclose(batch.snapshots[-2][1:2], alone.snapshots[-2], atol=1e-5, rtol=1e-5)
    assert not torch.equal(batch.snapshots[-2], batch.latents)
