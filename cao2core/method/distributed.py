"""Class sharding over ``torchrun`` ranks with ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

Under ``torchrun --nproc-per-node N cao2 run ...`` every rank loads the generator, checks the inputs and the
files of the class groups (see ``workplan``) at positions ``rank, rank + N, ...``; the groups left to do, gathered
from all ranks, are dealt out again in turn, so a resumed run keeps every rank busy. Because every draw is seeded
per (run seed, class, index) and the groups do not depend on N, the files do not depend on N. Rank 0 creates
the output folder before the others start and writes the manifest once all ranks are done. Without torchrun (no ``WORLD_SIZE`` above 1) this is a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import UserError

DEFAULT_TIMEOUT_MIN = 60     # how long a rank waits for the others at a barrier (CAO2_DIST_TIMEOUT_MIN)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, positions) -> list[int]:
        """The positions ``rank, rank + N, ...``: what this rank checks."""
        return [p for p in positions if p % self.world_size == self.rank]

    def spread(self, items: list) -> list:
        """This rank's turn of ``items`` (the same list on every rank): items ``rank, rank + N, ...`` by place."""
        return items[self.rank::self.world_size]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def gather(self, value) -> list:
        """``value`` of every rank, in rank order (a barrier too)."""
        if self.world_size == 1:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def init(device: str) -> Ranks:
    """Join the torchrun process group if there is one (``device`` picks the backend). The environment is read
    here, not at import, so a bad variable is one UserError naming it rather than a crash of every command."""
    world = _env_int("WORLD_SIZE", 1, 1)
    if world <= 1:
        return Ranks()
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise UserError(f"WORLD_SIZE={world} says this is one of {world} torchrun processes, but {name} is not "
                            "set; launch the command with torchrun (which sets it), or unset WORLD_SIZE to run "
                            "in one process")
    ranks = Ranks(_env_int("RANK", 0, 0, world - 1), world, _env_int("LOCAL_RANK", 0, 0))
    if not dist.is_initialized():
        gpu = device != "cpu" and torch.cuda.is_available()
        if gpu:
            torch.cuda.set_device(ranks.local_rank)
        dist.init_process_group("nccl" if gpu else "gloo", timeout=timeout())
    return ranks


def timeout() -> timedelta:
    """How long a rank waits for the others: ``CAO2_DIST_TIMEOUT_MIN`` minutes (default 60)."""
    raw = os.environ.get("CAO2_DIST_TIMEOUT_MIN", "").strip()
    if not raw:
        return timedelta(minutes=DEFAULT_TIMEOUT_MIN)
    try:
        minutes = float(raw)
    except ValueError:
        minutes = float("nan")
    if not (0 < minutes < float("inf")):
        raise UserError(f"CAO2_DIST_TIMEOUT_MIN={raw} is not a positive number of minutes; set it to one (e.g. "
                        f"CAO2_DIST_TIMEOUT_MIN={DEFAULT_TIMEOUT_MIN}) or unset it")
    return timedelta(minutes=minutes)


def _env_int(name: str, default: int, low: int, high: int | None = None) -> int:
    """A whole number from the environment variable ``name`` (``default`` when unset or empty), within
    [low, high]; anything else is one UserError naming the variable."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"of {low} or more"
        raise UserError(f"{name}={raw} is not a whole number {bounds}; torchrun sets it for each process it "
                        f"starts: launch the command with torchrun, or unset {name} to run in one process")
    return value


def rank_device(name: str, ranks: Ranks) -> str:
    """``auto``/``cuda`` under torchrun: this rank's own GPU."""
    if ranks.world_size > 1 and name in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{ranks.local_rank}"
    return name


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
