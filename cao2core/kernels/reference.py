"""Plain-torch reference kernels: they define the semantics every other backend is tested against.

``clo_loss`` is the CLO loss of ``cao2core.method.clo`` (same expression, same autograd graph), ``adam_step`` is one
step of ``torch.optim.Adam`` (single-tensor path, L2 weight decay, no amsgrad) on one tensor, and
``clo_stats`` is what the fused forward saves for its backward (max, tie count, first argmax, denominator).
"""
from __future__ import annotations


import torch


def clo_loss(pred: torch.Tensor, target: torch.Tensor, lam: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss (B,): (weighted) mean of squared error + lam * max |pred - target| over each sample.

    With a weight (e.g. MAR's token mask), the mean is sum(w * e^2) / sum(w) and the max runs over elements
    with w > 0. The max's gradient follows ``torch.amax``: ties share the gradient equally.
    """
    mse, linf = clo_terms(pred, target, weight)
    return mse + lam * linf


def clo_terms(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of ``clo_loss`` per sample: the (weighted) mean squared error and the max |pred - target|."""
    diff = (pred.float() - target.float()).flatten(1)
    if weight is None:
        return diff.square().mean(1), diff.abs().amax(1)
    w = torch.broadcast_to(weight.float(), pred.shape).flatten(1)
    mse = (w * diff.square()).sum(1) / w.sum(1).clamp_min(1e-12)
    return mse, torch.where(w > 0, diff.abs(), torch.zeros_like(diff)).amax(1)


@torch.no_grad()
def clo_stats(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None):
    """(max, count, argmax, denom) per sample, as the fused forward saves them.

    max: the largest |e| over elements with w > 0 (0 if there is none); count: how many such elements equal
    it (0 if none); argmax: the first of them (-1 if none); denom: sum(w) clamped at 1e-12, or N.
    """
    diff = (pred.float() - target.float()).flatten(1)
    a = diff.abs()
    if weight is None:
        sel = torch.ones_like(a, dtype=torch.bool)
        denom = torch.full((a.shape[0],), float(a.shape[1]))
    else:
        w = torch.broadcast_to(weight.float(), pred.shape).flatten(1)
        sel = w > 0
        denom = w.sum(1).clamp_min(1e-12)
    masked = torch.where(sel, a, torch.full_like(a, -1.0))
    m = masked.amax(1)
    hit = masked == m[:, None]
    count = hit.sum(1)
    idx = torch.arange(a.shape[1]).expand_as(a)
    argmax = torch.where(hit, idx, torch.full_like(idx, a.shape[1])).amin(1)
    none = m < 0
    return (m.clamp_min(0), torch.where(none, 0, count), torch.where(none, -1, argmax), denom)


@torch.no_grad()
def adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
              lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
              weight_decay: float = 0.0) -> None:
    """One torch.optim.Adam step (``step`` counts from 1), in place, with torch's own op sequence."""
    if weight_decay != 0:
        grad = grad.add(param, alpha=weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / bias_correction2 ** 0.5).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)
