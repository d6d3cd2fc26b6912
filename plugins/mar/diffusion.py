"""The DiffLoss head's own Gaussian diffusion: 1000-step cosine schedule, epsilon prediction, learned-range
variance, and respaced ancestral sampling that hands the net the *original* timestep index.

All schedule arrays are computed in float64 and indexed per row; nothing here draws random numbers itself:
callers pass timesteps and noise (each sample's from its own generator).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from cao2core.generators.respacing import space_timesteps

TRAIN_STEPS = 1000


def cosine_alpha_bar(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(steps: int = TRAIN_STEPS, max_beta: float = 0.999) -> torch.Tensor:
    return torch.tensor([min(1 - cosine_alpha_bar((i + 1) / steps) / cosine_alpha_bar(i / steps), max_beta)
                         for i in range(steps)], dtype=torch.float64)


class GaussianDiffusion:
    def __init__(self, betas: torch.Tensor, timestep_map: list[int] | None = None):
        self.betas = b = betas.double()
        self.num_timesteps = len(b)
        self.timestep_map = torch.tensor(timestep_map if timestep_map is not None else range(len(b)))
        acp = torch.cumprod(1 - b, 0)
        acp_prev = torch.cat([torch.ones(1, dtype=torch.float64), acp[:-1]])
        self.alphas_cumprod = acp
        self.sqrt_acp, self.sqrt_1m_acp = acp.sqrt(), (1 - acp).sqrt()
        self.sqrt_recip_acp, self.sqrt_recipm1_acp = (1 / acp).sqrt(), (1 / acp - 1).sqrt()
        var = b * (1 - acp_prev) / (1 - acp)
        self.posterior_log_var = torch.log(torch.cat([var[1:2], var[1:]]))
        self.log_betas = torch.log(b)
        self.coef1 = b * acp_prev.sqrt() / (1 - acp)
        self.coef2 = (1 - acp_prev) * (1 - b).sqrt() / (1 - acp)

    @classmethod
    def training(cls) -> "GaussianDiffusion":
        return cls(cosine_betas())

    @classmethod
    def respaced(cls, count: int) -> "GaussianDiffusion":
        """Keep ``count`` of the 1000 training steps; betas recomputed so the kept alpha-bars are unchanged."""
        base = cls.training()
        kept = space_timesteps(base.num_timesteps, count)
        last, betas = 1.0, []
        for t in kept:
            a = float(base.alphas_cumprod[t])
            betas.append(1 - a / last)
            last = a
        return cls(torch.tensor(betas, dtype=torch.float64), kept)

    @staticmethod
    def _at(arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return arr.to(t.device)[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_acp, t, x0) * x0 + self._at(self.sqrt_1m_acp, t, x0) * noise

    def p_mean_variance(self, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, clip_x0: float | None = None):
        """Net output [eps, v] at respaced index t -> (posterior mean, log variance) of x_{t-1}.

        ``clip_x0`` clamps the predicted x0 to [-clip_x0, clip_x0] (MAR itself does not clip). The first steps of
        the cosine schedule amplify eps errors enormously (1/sqrt(alpha-bar) ~ 2e4 at t = 999), which a small,
        briefly trained head cannot absorb.
        """
        c = x.shape[-1]
        eps, v = out[..., :c], out[..., c:]
        frac = (v + 1) / 2
        log_var = frac * self._at(self.log_betas, t, x) + (1 - frac) * self._at(self.posterior_log_var, t, x)
        x0 = self._at(self.sqrt_recip_acp, t, x) * x - self._at(self.sqrt_recipm1_acp, t, x) * eps
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        mean = self._at(self.coef1, t, x) * x0 + self._at(self.coef2, t, x) * x
        return mean, log_var

    def vb_terms(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Variational-bound term per row in bits, with the predicted mean detached (it trains only v).

        KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0; the discretized Gaussian NLL of x0 (1/255 bins) at t = 0.
        """
        c = x0.shape[-1]
        frozen = torch.cat([out[..., :c].detach(), out[..., c:]], dim=-1)
        mean, log_var = self.p_mean_variance(frozen, x_t, t)
        true_mean = self._at(self.coef1, t, x0) * x0 + self._at(self.coef2, t, x0) * x_t
        true_log_var = self._at(self.posterior_log_var, t, x0)
        kl = 0.5 * (-1 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                    + (true_mean - mean) ** 2 * torch.exp(-log_var))
        kl = kl.mean(-1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(-1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    @torch.no_grad()
    def sample(self, net: Callable, noise: torch.Tensor, draw: Callable[[], torch.Tensor],
               temperature: float = 1.0, clip_x0: float | None = None) -> torch.Tensor:
        """Ancestral sampling from ``noise`` (N, C). ``net(x, t_original)`` -> (N, 2C); ``draw()`` gives the
        noise added at each step (drawn only for steps with t > 0). Temperature scales only the added noise."""
        x = noise
        for i in reversed(range(self.num_timesteps)):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            out = net(x, self.timestep_map.to(x.device)[t]).float()
            mean, log_var = self.p_mean_variance(out, x.float(), t, clip_x0)
            x = mean if i == 0 else mean + torch.exp(0.5 * log_var) * draw() * temperature
        return x


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))))
