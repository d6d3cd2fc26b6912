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

from dataclasses import dataclass, field

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


def official_stability_order(keep: torch.Tensor) -> torch.Tensor:
    """``select_stability``'s kept indices in the official script's order, ascending agreement:
    ``argsort(cos)[-ipc:]``. The same samples; equal scores, which NumPy's default (unstable) sort leaves in no
    defined order, stay in reverse pool order."""
    return keep.flip(0)


def stability_of(probs_before: torch.Tensor, probs_final: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(probs_before.double(), probs_final.double(), dim=1).float()


def select_random(pool_size: int, ipc: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(pool_size, generator=generator)[:ipc]


def scores_of(probs: torch.Tensor, target: int) -> torch.Tensor:
    """Per-sample record for the store: the classifier's probability of the target class."""
    return probs[:, target]


# --- the pool record: what OSS saw of every pool sample, stored with the class for `cao2 report` -------------------

POOL_THUMB_PX = 32          # the longest side of a pool thumbnail (uint8): 3,072 bytes for RGB, 1,024 for grey
POOL_THUMBS_MAX = 256       # thumbnails stored per class at most: 768 KiB of RGB; the kept samples come first
KEPT, WRONG_CLASS, RANKED_OUT = 0, 1, 2
REASONS = {KEPT: "kept", WRONG_CLASS: "wrong class", RANKED_OUT: "not in the kept quantile"}


@dataclass
class Selection:
    """One class's selection as the store takes it: the kept samples' scores (selection order) and, where the
    pool was classified, its record (``pool_record``'s tensors, and what the class's record says of them)."""

    scores: torch.Tensor
    pool: dict[str, torch.Tensor] = field(default_factory=dict)
    record: dict | None = None


def judged_selection(select: str, probs: torch.Tensor, target: int, keep: torch.Tensor, score: torch.Tensor,
                     thumbs: torch.Tensor) -> Selection:
    """The Selection of a class whose pool the judge classified (``select`` in ``JUDGED_STRATEGIES``): the kept
    samples' scores, the pool record (``pool_record``) and what the class's record says of it."""
    pool = pool_record(probs, target, keep, score, select == "confidence", thumbs)
    record = {"select": select, "fields": sorted(pool), "target": target,
              "reasons": {str(c): why for c, why in REASONS.items()},
              "thumbnails": len(pool["pool_thumb_index"]), "thumbnail_px": POOL_THUMB_PX,
              "capped": len(pool["pool_thumb_index"]) < len(score)}
    return Selection(score[keep], pool, record)


def pool_record(probs: torch.Tensor, target: int, keep: torch.Tensor, score: torch.Tensor, checks_class: bool,
                thumbs: torch.Tensor, thumbs_max: int | None = None) -> dict[str, torch.Tensor]:
    """Per pool sample (P of them): ``pool_score`` (what OSS ranked by), ``pool_pred`` and ``pool_pred_prob`` (the
    judge's top class and its probability, from ``probs`` (P, K)), ``pool_rank`` (position in the selection order,
    -1: rejected), ``pool_reason`` (``REASONS``: a rejected sample is ``WRONG_CLASS`` when the selection checks the
    class (``checks_class``: confidence) and the judge's top class is not ``target``, else ``RANKED_OUT``); and
    ``pool_thumbs`` (T, h, w, C) of the samples ``pool_thumb_index`` (ascending): the kept ones first, then the
    others in pool order, at most ``thumbs_max`` (default ``POOL_THUMBS_MAX``)."""
    limit = POOL_THUMBS_MAX if thumbs_max is None else thumbs_max
    size = len(probs)
    pred_prob, pred = probs.max(dim=1)
    rank = torch.full((size,), -1, dtype=torch.int32)
    rank[keep] = torch.arange(len(keep), dtype=torch.int32)
    wrong = (pred != target) & checks_class
    reason = torch.where(rank >= 0, KEPT, torch.where(wrong, WRONG_CLASS, RANKED_OUT)).to(torch.uint8)
    order = torch.cat([keep.long(), (rank < 0).nonzero().flatten()])[:limit]
    shown = torch.sort(order).values
    return {"pool_score": score.float(), "pool_pred": pred.int(), "pool_pred_prob": pred_prob.float(),
            "pool_rank": rank, "pool_reason": reason, "pool_thumbs": thumbs[shown].contiguous(),
            "pool_thumb_index": shown.int()}
