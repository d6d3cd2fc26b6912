"""The samplers SiT and REPA report with, each in its own code's time direction, guidance and arithmetic.

SiT (``transport/transport.py``, ``transport/integrators.py``, ``sample.py``; data at t = 1):

* ``ode``: torchdiffeq's ``odeint`` from t0 to t1 (``sit_interval``), default ``dopri5`` with atol 1e-6, rtol 1e-3,
  on the velocity (or the drift of a noise/score model). An adaptive solver picks its steps from an error norm over
  the whole state, so each sample is integrated alone, as SiT integrates a batch of one: its state holds the
  conditional copy and, when guidance covers only some channels, the null copy, whose last channels follow the
  unconditional output and enter the step-size control. The solution is read at K + 1 evenly spaced times
  (snapshots); with an adaptive solver the end point does not depend on K.
* ``sde``: Euler-Maruyama on dX = [v + w_t s] dt + sqrt(2 w_t) dW over K - 1 steps of linspace(t0, t1, K), w_t the
  diffusion form (default sigma: w_t = sigma_t) and s the score derived from the output, then the last step
  (default ``Mean``: x + drift * 0.04 without noise), fp32 as SiT runs. SiT's code evaluates the model twice per
  step (drift and score) on the same input; once is the same number.
* guidance: ``forward_with_cfg`` on the doubled batch [x; x] with labels [y; 1000]: the first 3 output channels
  guided, the 4th conditional (``cfg_channels``), at every step when the scale is not 1.

REPA (``samplers.py``, ``generate.py``; data at t = 0), the state in float64, the model fed fp32:

* ``sde`` (``euler_maruyama_sampler``): times linspace(1, 0.04, K) then 0; K - 1 steps
  x + d dt + sqrt(2 t) sqrt(|dt|) eps with d = v - t s, and a last noiseless step from 0.04 to 0.
* ``ode`` (``euler_sampler``): K Euler steps on linspace(1, 0, K + 1), ``heun`` adds Heun's correction except on
  the last step.
* guidance on every channel of the drift, only at steps whose t_cur lies in [guidance_low, guidance_high]
  (REPA's guidance interval) and only for scales above 1; other steps run the conditional model alone.

Every random draw of sample i (its initial noise, each step's noise) comes from ``generators[i]`` on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torchdiffeq import odeint

from .paths import Path, sit_interval

SAMPLERS = ("sde", "ode")
LAST_STEPS = ("Mean", "Tweedie", "Euler", "none")        # SiT's --last-step (None written as none)
REPA_LAST_T = 0.04                                       # REPA's SDE: linspace(1, 0.04, K), then 0


@dataclass
class SamplerSettings:
    """What a sampler needs beyond the model: the family's sampler and its options."""

    family: str                     # sit | repa
    sampler: str                    # sde | ode
    steps: int
    guidance: float
    null_label: int
    path: Path
    prediction: str = "velocity"
    cfg_channels: int | None = None         # channels guidance applies to; None: all
    guidance_interval: tuple[float, float] = (0.0, 1.0)     # REPA's [guidance_low, guidance_high]
    # SiT's ODE
    ode_method: str = "dopri5"
    atol: float = 1e-6
    rtol: float = 1e-3
    # SiT's SDE
    diffusion_form: str = "sigma"
    diffusion_norm: float = 1.0
    last_step: str = "Mean"
    last_step_size: float = 0.04
    # REPA's ODE
    heun: bool = False


ModelCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]   # (x, t, labels) -> output


def _noise(generators: list, shape: tuple, device, dtype=torch.float32) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in generators]).to(device)


class _Steps:
    """Keeps the asked snapshots and moves the progress bar."""

    def __init__(self, wanted: dict, progress):
        self.wanted, self.progress, self.snapshots = wanted, progress, {}

    def record(self, step: int, state: torch.Tensor) -> None:
        if step in self.wanted:
            self.snapshots[self.wanted[step]] = state.float().clone()

    def tick(self) -> None:
        if self.progress is not None:
            self.progress()

    def done(self, step: int, state: torch.Tensor) -> None:
        self.record(step, state)
        self.tick()


def sample(call: ModelCall, labels: torch.Tensor, generators: list, s: SamplerSettings, latent_shape: tuple,
           snapshot_steps: dict | None = None, progress=None) -> tuple[torch.Tensor, dict]:
    """Latents (B, *latent_shape) fp32 and the snapshots {key: state after that 0-based step}."""
    x = _noise(generators, latent_shape, labels.device)
    run = {("sit", "sde"): _sit_sde, ("sit", "ode"): _sit_ode, ("repa", "sde"): _repa_sde,
           ("repa", "ode"): _repa_ode}[(s.family, s.sampler)]
    steps = _Steps(snapshot_steps or {}, progress)
    out = run(call, x, labels, generators, s, steps)
    return out.float(), steps.snapshots


# --- SiT ------------------------------------------------------------------------------------------------------

def sit_guided(call: ModelCall, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, s: SamplerSettings):
    """SiT's ``forward_with_cfg`` on [x; x] with [labels; null]: (conditional rows, null rows) of its output, the
    first ``cfg_channels`` channels guided in both, the rest each row's own."""
    if s.guidance == 1.0:
        out = call(x, t, labels)
        return out, out
    both = call(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, s.null_label)]))
    cond, uncond = both.chunk(2)
    k = s.cfg_channels or x.shape[1]
    guided = uncond[:, :k] + s.guidance * (cond[:, :k] - uncond[:, :k])
    return torch.cat([guided, cond[:, k:]], 1), torch.cat([guided, uncond[:, k:]], 1)


def _sit_sde_drift(call, x, t, labels, s: SamplerSettings):
    out = sit_guided(call, x, t, labels, s)[0]
    drift = s.path.ode_drift(out, x, t, s.prediction)
    return drift, out


def _sit_sde(call, x, labels, generators, s: SamplerSettings, steps: _Steps):
    last_size = 0.0 if s.last_step == "none" else s.last_step_size
    t0, t1 = sit_interval(s.path, s.prediction, sde=True, diffusion_form=s.diffusion_form, last_step_size=last_size)
    ts = torch.linspace(t0, t1, s.steps)
    dt = ts[1] - ts[0]
    b = x.shape[0]

    def sde_drift(x, t):
        drift, out = _sit_sde_drift(call, x, t, labels, s)
        w = s.path.diffusion(x, t, s.diffusion_form, s.diffusion_norm)
        return drift + w * s.path.score(out, x, t, s.prediction), w

    for step, ti in enumerate(ts[:-1]):
        t = torch.full((b,), float(ti), device=x.device)
        drift, w = sde_drift(x, t)
        dw = _noise(generators, x.shape[1:], x.device) * torch.sqrt(dt)
        x = (x + drift * dt) + torch.sqrt(2 * w) * dw
        steps.done(step, x)
    t = torch.full((b,), t1, device=x.device)
    if s.last_step == "Mean":
        x = x + sde_drift(x, t)[0] * last_size
    elif s.last_step == "Euler":
        x = x + _sit_sde_drift(call, x, t, labels, s)[0] * last_size
    elif s.last_step == "Tweedie":
        a, _, sig, _ = s.path.coefficients(t)
        out = sit_guided(call, x, t, labels, s)[0]
        x = x / a[0] + sig[0] ** 2 / a[0] * s.path.score(out, x, t, s.prediction)
    steps.done(s.steps - 1, x)
    return x


def _sit_ode(call, x, labels, generators, s: SamplerSettings, steps: _Steps):
    t0, t1 = sit_interval(s.path, s.prediction, sde=False)
    ts = torch.linspace(t0, t1, s.steps + 1, device=x.device)
    # the null copy matters only where guidance leaves channels to each row (its drift differs there)
    with_null = s.guidance != 1.0 and (s.cfg_channels or x.shape[1]) < x.shape[1]
    b, results = x.shape[0], []
    for i in range(b):
        y = labels[i:i + 1]

        def drift(t, state, y=y):
            tt = torch.ones(state.shape[0], device=state.device) * t
            cond, uncond = sit_guided(call, state[:1], tt[:1], y, s)
            out = torch.cat([cond, uncond]) if with_null else cond
            return s.path.ode_drift(out, state, tt, s.prediction)
        state0 = torch.cat([x[i:i + 1], x[i:i + 1]]) if with_null else x[i:i + 1]
        solution = odeint(drift, state0, ts, method=s.ode_method, atol=[s.atol], rtol=[s.rtol])
        results.append(solution[1:, 0])             # (K, C, H, W): the conditional row at each reported time
        # the bar moves as samples finish: the steps within a sample are the solver's own
        for _ in range((i + 1) * s.steps // b - i * s.steps // b):
            steps.tick()
    states = torch.stack(results, 1)                # (K, B, C, H, W)
    for step in range(s.steps):
        steps.record(step, states[step])
    return states[-1]


# --- REPA -----------------------------------------------------------------------------------------------------

def _repa_guided(call, x, t_model: float, labels, s: SamplerSettings, drift=None, t_decide: float | None = None):
    """REPA's model call at ``t_model``, guided when the scale is above 1 and ``t_decide`` (default t_model) lies in
    the guidance interval; ``drift(v, x_in, t_in)`` maps the output to what is guided (REPA's SDE guides its drift,
    the ODE the velocity)."""
    lo, hi = s.guidance_interval
    t_decide = t_model if t_decide is None else t_decide
    guided = s.guidance > 1.0 and lo <= t_decide <= hi
    x_in = torch.cat([x, x]) if guided else x
    y_in = torch.cat([labels, torch.full_like(labels, s.null_label)]) if guided else labels
    t_in = torch.ones(x_in.shape[0], dtype=torch.float64, device=x.device) * t_model
    v = call(x_in.float(), t_in.float(), y_in).double()
    d = drift(v, x_in, t_in) if drift is not None else v
    if not guided:
        return d
    cond, uncond = d.chunk(2)
    k = s.cfg_channels or x.shape[1]
    return torch.cat([uncond[:, :k] + s.guidance * (cond[:, :k] - uncond[:, :k]), cond[:, k:]], 1)


def _repa_sde(call, x, labels, generators, s: SamplerSettings, steps: _Steps):
    ts = torch.cat([torch.linspace(1.0, REPA_LAST_T, s.steps, dtype=torch.float64),
                    torch.zeros(1, dtype=torch.float64)]).tolist()
    x = x.double()

    def drift(v, x_in, t_in):
        diffusion = 2 * t_in.reshape(-1, *([1] * (v.ndim - 1)))
        return v - 0.5 * diffusion * s.path.score_from_velocity(v, x_in, t_in)

    for step in range(s.steps - 1):
        t_cur, t_next = ts[step], ts[step + 1]
        dt = torch.tensor(t_next - t_cur, dtype=torch.float64)
        diffusion = torch.tensor(2 * t_cur, dtype=torch.float64)
        deps = _noise(generators, x.shape[1:], x.device, torch.float64) * torch.sqrt(torch.abs(dt))
        d = _repa_guided(call, x, t_cur, labels, s, drift)
        x = x + d * dt + torch.sqrt(diffusion) * deps
        steps.done(step, x)
    t_cur, t_next = ts[-2], ts[-1]
    x = x + (t_next - t_cur) * _repa_guided(call, x, t_cur, labels, s, drift)      # the mean, no noise
    steps.done(s.steps - 1, x)
    return x


def _repa_ode(call, x, labels, generators, s: SamplerSettings, steps: _Steps):
    ts = torch.linspace(1.0, 0.0, s.steps + 1, dtype=torch.float64).tolist()
    x = x.double()
    for step in range(s.steps):
        t_cur, t_next = ts[step], ts[step + 1]
        d = _repa_guided(call, x, t_cur, labels, s)
        x_next = x + (t_next - t_cur) * d
        if s.heun and step < s.steps - 1:
            # REPA decides the correction's guidance by t_cur, not t_next
            d_prime = _repa_guided(call, x_next, t_next, labels, s, t_decide=t_cur)
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d_prime)
        x = x_next
        steps.done(step, x)
    return x
