"""benchmarks/throughput.py: the ImageNet-1K projection scales each part of sampling by its own count, and the
random-weight models' scratch folder is gone after the script, also after Ctrl-C."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mar_row(transformer, head, rest, steps, diffloss=100, images=4, clo_batch=10.0):
    return {"images": images, "sample_parts": {"transformer": transformer, "head": head, "rest": rest},
            "steps_timed": steps, "diffloss_timed": diffloss, "head_timed": True, "clo_batch": clo_batch}


def test_mar_head_time_does_not_scale_with_the_ar_steps(throughput):
    # issue 26's FLOP counts of MAR-B: 3.94 TFLOP per image at K = 2 AR steps, 4.91 at K = 8. Linear in K, the
    # transformer costs (4.91 - 3.94) / 6 per AR step and the DiffLoss head the rest, whatever K.
    per_step = (4.91 - 3.94) / 6
    row = mar_row(transformer=2 * per_step, head=3.94 - 2 * per_step, rest=0.0, steps=2, images=1)
    assert throughput.sampling_seconds(row, 8, 100) == pytest.approx(4.91, rel=1e-3)
    assert throughput.sampling_seconds(row, 2, 100) == pytest.approx(3.94, rel=1e-3)
    # what scaling everything by the AR steps projected, 3.2x the measured cost at K = 8
    assert 3.94 * 8 / 2 > 3 * throughput.sampling_seconds(row, 8, 100)


def test_each_part_scales_by_its_own_count(throughput):
    row = mar_row(transformer=1.0, head=10.0, rest=0.5, steps=4, diffloss=50)
    # transformer x (32 / 4), head x (100 / 50), the rest (one round per AR step and DiffLoss step) x both
    assert throughput.sampling_seconds(row, 32, 100) == pytest.approx(1.0 * 8 + 10.0 * 2 + 0.5 * 16)


def test_in1k_projection_counts(throughput):
    mar = throughput.in1k_projection("mar-b", mar_row(transformer=2.0, head=6.0, rest=0.0, steps=32, images=4))
    assert mar["samples"] == 1000 * 10 * 2 and mar["steps"] == 32
    assert mar["sample_s"] == pytest.approx(20000 / 4 * 8.0)
    assert mar["clo_s"] == pytest.approx(1000 * 10 * 100 / 10.0)
    dit_row = {"images": 8, "sample_parts": {"transformer": 3.0, "head": 0.0, "rest": 0.0}, "steps_timed": 10,
               "diffloss_timed": 1, "head_timed": False, "clo_batch": 20.0}
    dit = throughput.in1k_projection("dit-xl", dit_row)
    assert dit["samples"] == 40000 and dit["sample_s"] == pytest.approx(40000 / 8 * 3.0 * 50 / 10)
    assert throughput.in1k_hours("dit-xl", dit_row) == pytest.approx((dit["sample_s"] + dit["clo_s"]) / 3600)
    assert "DiffLoss head" in throughput.describe_projection("mar-b", mar_row(2.0, 6.0, 0.0, 32))


def test_the_scratch_folder_is_removed_after_ctrl_c(throughput, monkeypatch, tmp_path):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(throughput.tempfile, "tempdir", None)      # tempfile caches the TMPDIR it read first
    seen = []

    def interrupted(name, args, device, scratch):
        (scratch / name).mkdir()
        (scratch / name / "mar.safetensors").write_bytes(b"0" * 1024)
        seen.append(scratch)
        raise KeyboardInterrupt
    monkeypatch.setattr(throughput, "bench", interrupted)
    monkeypatch.setattr(sys, "argv", ["throughput.py", "--models", "mar-s"])
    with pytest.raises(KeyboardInterrupt):
        throughput.main()
    assert seen and seen[0].parent == tmp_path and not seen[0].exists()
    assert list(tmp_path.iterdir()) == []


def test_the_head_timed_at_the_presets_shape_replaces_its_scaled_time(throughput):
    # small calls are bound by their number: one AR step's head calls at 32 AR steps, x 32
    row = {**mar_row(transformer=1.0, head=10.0, rest=0.0, steps=4), "head_round": (32, 0.75)}
    assert throughput.sampling_seconds(row, 32, 100) == pytest.approx(1.0 * 8 + 0.75 * 32)
    assert throughput.sampling_seconds(row, 8, 100) == pytest.approx(1.0 * 2 + 10.0)    # not timed at 8 steps
    assert "per AR step timed at the preset's shape x 32" in throughput.describe_projection("mar-b", row)
    timed_at_32 = {**row, "steps_timed": 32}        # the sample itself at 32 steps: its own head time counts
    assert throughput.sampling_seconds(timed_at_32, 32, 100) == pytest.approx(1.0 + 10.0)
