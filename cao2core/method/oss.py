"""Objective-guided sample selection (OSS): which ``ipc`` samples of a class's pool are kept.

``confidence`` keeps samples the classifier predicts as their class, ordered by the classifier's top-1
probability (``easy``: most confident first, as the reference does for low IPC; ``hard``: least confident
first), and fills any shortfall from the remaining (wrongly predicted) samples in the same order.
Ties keep pool order, so the result is deterministic.

``stability`` (CaO2-MAR) keeps the samples whose classifier probabilities agree best (cosine) between the
sampler's state one step before the end and the final sample; correctness is not checked. The official script
keeps ``argsort(cos)[-ipc:]``, least consistent of the kept first; ``--profile reference`` writes that order
(``official_stability_order``), the default the most consistent first.
"""
from __future__ import annotations

import torch

from ..config import ORDERS     # the orders the options table offers


def select_confidence(probs: torch.Tensor, target: int, ipc: int, order: str = "easy") -> torch.Tensor:
    """Pool indices to keep, in selection order. ``probs``: (P, K) softmax; ``target``: the class's output index."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}")
    confidence, pred = probs.max(dim=1)
    ranked = torch.sort(confidence, descending=(order == "easy"), stable=True).indices
    correct = pred[ranked] == target
    keep = torch.cat([ranked[correct], ranked[~correct]])
    return keep[:ipc]


def select_stability(probs_before: torch.Tensor, probs_final: torch.Tensor, ipc: int) -> torch.Tensor:
    """Pool indices of the ``ipc`` most step-consistent samples, most consistent first (ties: pool order)."""
    agreement = stability_of(probs_before, probs_final)
    return torch.sort(agreement, descending=True, stable=True).indices[:ipc]


def official_stability_order(keep: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``select_stability``'s kept indices (and their scores) in the official script's order, ascending
    agreement: ``argsort(cos)[-ipc:]``. The same samples; equal scores, which NumPy's default (unstable) sort
    leaves in no defined order, stay in reverse pool order."""
    return keep.flip(0), scores.flip(0)


def stability_of(probs_before: torch.Tensor, probs_final: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(probs_before.double(), probs_final.double(), dim=1).float()


def select_random(pool_size: int, ipc: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(pool_size, generator=generator)[:ipc]


def scores_of(probs: torch.Tensor, target: int) -> torch.Tensor:
    """Per-sample record for the store: the classifier's probability of the target class."""
    return probs[:, target]
