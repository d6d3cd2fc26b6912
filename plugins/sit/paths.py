"""The interpolants x_t = alpha_t * data + sigma_t * noise of SiT and REPA, each in its own time direction.

SiT (``transport/path.py``) puts the data at t = 1 and the noise at t = 0: Linear alpha = t, sigma = 1 - t; GVP
alpha = sin(pi t / 2), sigma = cos(pi t / 2); VP alpha = exp(-(1 - t)^2 (b1 - b0) / 4 - (1 - t) b0 / 2) with
b0 = 0.1, b1 = 20, sigma = sqrt(1 - alpha^2). REPA (``loss.py``, ``samplers.py``) runs the other way, data at t = 0:
linear alpha = 1 - t, sigma = t; cosine alpha = cos(pi t / 2), sigma = sin(pi t / 2). A velocity model predicts
d x_t / d t = alpha'_t data + sigma'_t noise in its own direction, so SiT's velocity points towards the data and
REPA's towards the noise.

Also here: the drift, score and SDE diffusion coefficients of SiT's sampler (``transport.py``), and the map from
CLO's integer levels to interpolation times (``level_times``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SIT_PATHS = ("linear", "gvp", "vp")
REPA_PATHS = ("linear", "cosine")
PREDICTIONS = ("velocity", "noise", "score")          # SiT's ModelType; REPA trains velocity only
DIFFUSION_FORMS = ("sigma", "SBDM", "constant", "linear", "decreasing")   # SiT's compute_diffusion
VP_BETA_MIN, VP_BETA_MAX = 0.1, 20.0                  # SiT's VPCPlan(sigma_min, sigma_max)
# CLO levels: DiT's 1000-step linear beta schedule, whose T-hat the presets state
DIT_STEPS, DIT_BETA_START, DIT_BETA_END = 1000, 1e-4, 0.02
CLO_TIMES = ("dit", "fraction")


def _col(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (x.ndim - 1)))


@dataclass(frozen=True)
class Path:
    """One interpolant: ``family`` sit (data at t = 1) or repa (data at t = 0), ``name`` as above."""

    family: str
    name: str

    @property
    def data_at(self) -> float:
        return 1.0 if self.family == "sit" else 0.0

    def coefficients(self, t: torch.Tensor):
        """(alpha_t, alpha'_t, sigma_t, sigma'_t), each shaped like ``t``."""
        one = torch.ones_like(t)
        if self.family == "sit":
            if self.name == "linear":
                return t, one, 1 - t, -one
            if self.name == "gvp":
                h = t * math.pi / 2
                return torch.sin(h), math.pi / 2 * torch.cos(h), torch.cos(h), -math.pi / 2 * torch.sin(h)
            if self.name == "vp":
                lmc, dlmc = self._vp_log_mean(t)
                alpha = torch.exp(lmc)
                sigma = torch.sqrt(1 - torch.exp(2 * lmc))
                return alpha, alpha * dlmc, sigma, torch.exp(2 * lmc) * (2 * dlmc) / (-2 * sigma)
        else:
            if self.name == "linear":
                return 1 - t, -one, t, one
            if self.name == "cosine":
                h = t * math.pi / 2
                return torch.cos(h), -math.pi / 2 * torch.sin(h), torch.sin(h), math.pi / 2 * torch.cos(h)
        raise ValueError(f"no path {self.name!r} for {self.family}")

    @staticmethod
    def _vp_log_mean(t: torch.Tensor):
        u = 1 - t
        lmc = -0.25 * u ** 2 * (VP_BETA_MAX - VP_BETA_MIN) - 0.5 * u * VP_BETA_MIN
        return lmc, 0.5 * u * (VP_BETA_MAX - VP_BETA_MIN) + 0.5 * VP_BETA_MIN

    def interpolate(self, data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
        """(x_t, velocity target alpha'_t data + sigma'_t noise, sigma_t) at per-row times ``t``."""
        a, da, s, ds = (_col(c, data) for c in self.coefficients(t))
        return a * data + s * noise, da * data + ds * noise, s

    # --- SiT's sampler terms (transport.py, path.py), in SiT's time ---------------------------------------

    def drift_terms(self, x: torch.Tensor, t: torch.Tensor):
        """SiT's ``compute_drift``: (-drift_mean, drift_var): the probability-flow drift is
        -drift_mean + drift_var * score."""
        tc = _col(t, x)
        if self.name == "vp":
            beta = VP_BETA_MIN + (1 - tc) * (VP_BETA_MAX - VP_BETA_MIN)
            return 0.5 * beta * x, beta / 2
        if self.name == "linear":
            ratio = 1 / tc
        else:       # gvp
            ratio = math.pi / (2 * torch.tan(tc * math.pi / 2))
        sigma, dsigma = _col(self.coefficients(t)[2], x), _col(self.coefficients(t)[3], x)
        return ratio * x, ratio * sigma ** 2 - sigma * dsigma

    def score_from_velocity(self, v: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Both codes' ``get_score_from_velocity``: (alpha/alpha' v - x) / (sigma^2 - alpha/alpha' sigma' sigma)."""
        a, da, s, ds = (_col(c, x) for c in self.coefficients(t))
        r = a / da
        return (r * v - x) / (s ** 2 - r * ds * s)

    def score(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, prediction: str) -> torch.Tensor:
        """SiT's ``get_score`` from the model's output ``out`` of type ``prediction``."""
        if prediction == "noise":
            return out / -_col(self.coefficients(t)[2], x)
        if prediction == "score":
            return out
        return self.score_from_velocity(out, x, t)

    def ode_drift(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, prediction: str) -> torch.Tensor:
        """SiT's ``get_drift``: the velocity itself, or -drift_mean + drift_var * score."""
        if prediction == "velocity":
            return out
        mean, var = self.drift_terms(x, t)
        return mean + var * self.score(out, x, t, prediction)

    def diffusion(self, x: torch.Tensor, t: torch.Tensor, form: str, norm: float) -> torch.Tensor:
        """SiT's ``compute_diffusion``: the SDE's w_t (the noise enters as sqrt(2 w_t dt))."""
        tc = _col(t, x)
        if form == "constant":
            return torch.full_like(tc, norm)
        if form == "SBDM":
            return norm * self.drift_terms(x, t)[1]
        if form == "sigma":
            return norm * _col(self.coefficients(t)[2], x)
        if form == "linear":
            return norm * (1 - tc)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(math.pi * tc) + 1) ** 2
        raise ValueError(f"unknown diffusion form {form!r}")


def sit_interval(path: Path, prediction: str, *, sde: bool, diffusion_form: str = "sigma",
                 last_step_size: float = 0.0) -> tuple[float, float]:
    """SiT's ``check_interval`` at sampling time (its sample_eps defaults: 1e-3 for VP and for noise or score
    models, 0 for a velocity model on Linear or GVP)."""
    eps = 1e-3 if path.name == "vp" or prediction != "velocity" else 0.0
    t0, t1 = 0.0, 1.0
    if path.name == "vp":
        t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
    elif prediction != "velocity" or sde:
        t0 = eps if (diffusion_form == "SBDM" and sde) or prediction != "velocity" else 0.0
        t1 = 1 - eps if (not sde or last_step_size == 0) else 1 - last_step_size
    return t0, t1


def dit_alphas_cumprod() -> torch.Tensor:
    """alpha-bar of DiT's linear schedule (float64), the scale CLO's levels are stated on."""
    betas = torch.linspace(DIT_BETA_START, DIT_BETA_END, DIT_STEPS, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def level_times(path: Path, mode: str) -> torch.Tensor:
    """The interpolation time of each CLO level k = 0..999 (float64, the model's own time direction).

    ``dit``: the time at which this path's noise-to-signal ratio sigma_t / alpha_t equals DiT's at its timestep
    k, sqrt((1 - alpha-bar_k) / alpha-bar_k): x_t is then DiT's noised latent up to a scale factor, so a level (and
    --clo-tmax) means the same corruption for both generators. ``fraction``: the time k / 1000 of the way from the
    data end to the noise end.
    """
    k = torch.arange(DIT_STEPS, dtype=torch.float64)
    if mode == "fraction":
        tau = k / DIT_STEPS
        return 1 - tau if path.family == "sit" else tau
    if mode != "dit":
        raise ValueError(f"clo_times must be one of {CLO_TIMES}")
    abar = dit_alphas_cumprod()
    r = torch.sqrt((1 - abar) / abar)
    if path.family == "sit":
        if path.name == "linear":                   # (1 - t) / t = r
            t = 1 / (1 + r)
        elif path.name == "gvp":                    # cot(pi t / 2) = r
            t = 2 / math.pi * torch.atan(1 / r)
        else:                                        # vp: alpha_t = sqrt(alpha-bar), solved for u = 1 - t
            a, b, c = 0.25 * (VP_BETA_MAX - VP_BETA_MIN), 0.5 * VP_BETA_MIN, 0.5 * torch.log(abar)
            t = 1 - (-b + torch.sqrt(b * b - 4 * a * c)) / (2 * a)
    else:
        if path.name == "linear":                   # t / (1 - t) = r
            t = r / (1 + r)
        else:                                        # cosine: tan(pi t / 2) = r
            t = 2 / math.pi * torch.atan(r)
    return t.clamp(0.0, 1.0)
