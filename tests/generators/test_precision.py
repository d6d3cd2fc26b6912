"""Precision defaults and TF32 (cao2core.generators.precision); the CUDA paths are tested through their device
argument, torch's TF32 flags being plain process settings that a CPU build holds too."""
from __future__ import annotations

import pytest
import torch

from cao2core.errors import UserError
from cao2core.generators import precision

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture
def tf32_flags():
    """Leave torch's TF32 flags as the test found them."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_default_autocast_is_bf16_on_cuda_only_for_the_default_profile_and_fp32_weights():
    assert precision.default_autocast(CUDA) == "bf16"
    assert precision.default_autocast(CUDA, "default", "fp32") == "bf16"
    assert precision.default_autocast(CPU) == "none"
    assert precision.default_autocast(CUDA, "reference") == "none"       # the official code: fp32 + TF32
    assert precision.default_autocast(CUDA, "default", "bf16") == "none"  # half weights compute in their dtype


def test_tf32_is_applied_on_cuda_and_reported(tf32_flags):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    assert precision.apply_tf32(CUDA, environ={}) == {"matmul": True, "cudnn": True}
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert precision.apply_tf32(CUDA, environ={"CAO2_TF32": "0"}) == {"matmul": False, "cudnn": False}
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_tf32_is_left_alone_on_a_cpu(tf32_flags):
    torch.backends.cuda.matmul.allow_tf32 = False
    assert precision.apply_tf32(CPU, environ={}) is None
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_a_bad_tf32_variable_is_one_line(tf32_flags):
    with pytest.raises(UserError, match="CAO2_TF32='yes'.*use 1 .* or 0"):
        precision.apply_tf32(CPU, environ={"CAO2_TF32": "yes"})


def test_selection_autocast_is_the_reference_one_on_cuda_only():
    assert precision.selection_autocast(CUDA, "reference", "fp16") is torch.float16
    assert precision.selection_autocast(CPU, "reference", "fp16") is None
    assert precision.selection_autocast(CUDA, "default", "fp16") is None
    assert precision.selection_autocast(CUDA, "reference", None) is None


def test_the_contract_checks_the_reference_selection_autocast():
    from cao2core.generators.contract import check_spec
    from cao2core.generators.hookspecs import LatentSpec
    spec = LatentSpec((4, 8, 8), 10, (1, 999), 999)
    assert spec.reference_selection_autocast is None and check_spec(spec) is None
    assert check_spec(LatentSpec((4, 8, 8), 10, (1, 999), 999, reference_selection_autocast="fp16")) is None
    assert "reference_selection_autocast should be None, 'fp16' or 'bf16', got 'fp8'" in check_spec(
        LatentSpec((4, 8, 8), 10, (1, 999), 999, reference_selection_autocast="fp8"))
