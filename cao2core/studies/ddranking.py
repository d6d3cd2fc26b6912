"""DD-Ranking's scores of a distilled set (Li et al., "DD-Ranking: Rethinking the Evaluation of Dataset
Distillation", arXiv 2505.13300; github.com/NUS-HPC-AI-Lab/DD-Ranking), from accuracies ``cao2 compare`` measured.

    IOR  = Acc(distilled, protocol) - Acc(random real subset of the same size, same protocol)
    HLR  = Acc(full real data, hard labels) - Acc(distilled, hard labels)
    a    = w * IOR - (1 - w) * HLR          (IOR and HLR as fractions, so a lies in [-1, 1])
    DDRS = (exp(a) - exp(-1)) / (e - exp(-1))     in [0, 1]; w = 0.5 on DD-Ranking's leaderboard

IOR says what the set adds over random real images under the protocol it is scored with (soft labels raise
both); HLR how far hard labels on the set fall short of the whole training set. Written from the definition in
the paper and the repository's README; IOR and HLR are reported here in percentage points, as accuracies are.
"""
from __future__ import annotations

import math

DEFAULT_WEIGHT = 0.5       # DD-Ranking's leaderboard: IOR and HLR count equally
REFERENCE = "DD-Ranking (Li et al., arXiv 2505.13300)"


def ddrs(ior: float, hlr: float, weight: float = DEFAULT_WEIGHT) -> float:
    """The DD-Ranking score of IOR and HLR given in percentage points."""
    alpha = weight * ior / 100 - (1 - weight) * hlr / 100
    return (math.exp(alpha) - math.exp(-1)) / (math.e - math.exp(-1))


def scores(rows: list[dict], full_hard: float, weight: float = DEFAULT_WEIGHT) -> dict[str, dict]:
    """Per protocol of ``rows`` (compare.json's rows: protocol, distilled and random_real figures), its IOR,
    the set's HLR against ``full_hard`` (the full-data hard-label accuracy, %) and their DDRS. The hard-label
    accuracy of the distilled set comes from the ``hard`` row, which must be among ``rows``."""
    hard = next(r for r in rows if r["protocol"] == "hard")["distilled"]["mean"]
    hlr = full_hard - hard
    result = {}
    for row in rows:
        ior = row["distilled"]["mean"] - row["random_real"]["mean"]
        result[row["protocol"]] = {"ior": ior, "hlr": hlr, "ddrs": ddrs(ior, hlr, weight)}
    return result
