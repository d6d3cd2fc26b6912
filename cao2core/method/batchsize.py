"""``--batch-size auto``: the largest chunk that fits the device's free memory.

On a GPU the peak memory of each stage (pool sampling, one CLO iteration with its backward and Adam state, VAE
decoding, and decoding followed by the selection classifier) is measured at two small batch sizes on the loaded generator; a line through the two peaks gives
the largest batch that stays within ``HEADROOM`` of the memory free after loading. Under torchrun every rank
measures and all take the smallest answer. On a CPU memory is not probed: ``CPU_BATCH`` is used (throughput
no longer grows beyond it there). The batch size fixes which samples share a chunk, so it is recorded in the
manifest, and a resumed ``auto`` run reuses the recorded size instead of probing again: the files stay the same.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ..store import MANIFEST

CPU_BATCH = 64
MAX_BATCH = 1024
HEADROOM = 0.85         # of the free memory; the rest absorbs fragmentation
PROBE_SIZES = (1, 2)


def recorded(out: Path, run_id: str) -> int | None:
    """The batch size an earlier run of this same configuration recorded in ``out``, if any."""
    try:
        manifest = json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None             # not a manifest cao2 wrote: the store's check says so in its own words
    size = manifest.get("batch_size") if manifest.get("run_id") == run_id else None
    return size if isinstance(size, int) and size >= 1 else None


def fit(peaks: list[tuple[int, int]], free: int) -> int:
    """Largest n with intercept + slope * n <= HEADROOM * free, from (batch size, peak bytes) at two sizes."""
    (n1, p1), (n2, p2) = peaks
    slope = max((p2 - p1) / (n2 - n1), 1.0)
    intercept = max(p1 - slope * n1, 0.0)
    n = int((HEADROOM * free - intercept) // slope)
    n = n // 8 * 8 if n >= 16 else n         # multiples of 8 suit the tensor cores
    return max(1, min(MAX_BATCH, n))


class CudaMeter:
    """Free and peak memory of one CUDA device."""

    def __init__(self, device: torch.device):
        self.device = device

    def free(self) -> int:
        return torch.cuda.mem_get_info(self.device)[0]

    def measure(self, fn: Callable[[], object]) -> int:
        """Peak bytes allocated while ``fn`` runs, above what was allocated before."""
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - base


def probe(stages: dict[str, Callable[[int], object]], meter) -> tuple[int, dict[str, int]]:
    """(batch size, the size each stage alone would allow), measured with ``meter``."""
    free = meter.free()
    fits = {name: fit([(n, meter.measure(lambda: fn(n))) for n in PROBE_SIZES], free) for name, fn in stages.items()}
    return min(fits.values()), fits


def workload_stages(work, clo_iters: int) -> dict[str, Callable[[int], object]]:
    """The run's stages on a ``dryrun.Workload``; one latent sampled first feeds CLO and decoding."""
    one = work.sample(1)

    def copies(n):
        return one.expand(n, *one.shape[1:]).contiguous()
    stages = {"sample": work.sample, "decode": lambda n: work.decode(copies(n))}
    if clo_iters:
        stages["CLO"] = lambda n: work.optimize(copies(n), 1)
    if work.classifier is not None:
        stages["classify"] = lambda n: work.classify(copies(n))
    return stages
