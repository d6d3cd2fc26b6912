"""How the classes are cut into work units: groups of consecutive classes that share forward passes.

A group's pool samples, selected latents and decodes are batched together in chunks of ``--batch-size``, so
that a small IPC still fills the device (IPC 1 at batch 64: 64 classes per CLO chunk). The groups depend only
on the class list, the per-class counts and the batch size, never on the number of ranks or on what a previous
run completed, so every chunk holds the same samples however the run is sharded or resumed: the files stay
bit-identical. Ranks take whole groups; a group with any incomplete class is computed again in full.
"""
from __future__ import annotations


def class_groups(keeps: list[int], batch_size: int) -> list[list[int]]:
    """Consecutive class positions, packed greedily while their kept latents fit one chunk (at least one
    class per group)."""
    groups: list[list[int]] = []
    filled = batch_size
    for pos, keep in enumerate(keeps):
        if filled + keep > batch_size:
            groups.append([])
            filled = 0
        groups[-1].append(pos)
        filled += keep
    return groups


def chunks(n: int, size: int) -> int:
    """How many chunks of ``size`` cover ``n`` items."""
    return -(-n // size)
