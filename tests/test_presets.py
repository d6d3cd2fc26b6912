"""Presets carry the official code's per-dataset settings (reference notes, section 2)."""
import json

import pytest

from cao2core.cli import main
from cao2core.presets import PRESETS


@pytest.mark.parametrize("name,pool,order,tmax,iters,cond", [
    ("woof", 4, "easy", 11, 100, "null"),
    ("nette", 2, "easy", 11, 0, "class"),
    ("in100", 2, "hard", 5, 100, "null"),
    ("in1k-dit", 4, "easy", 11, 100, "null"),
])
def test_dit_presets_match_the_official_scripts(name, pool, order, tmax, iters, cond):
    o = PRESETS[name].options
    assert (o["pool_factor"], o["order"], o["clo_tmax"], o["clo_iters"], o["condition"]) == (pool, order, tmax, iters, cond)
    assert o["timestep_convention"] == "reference" and o["guidance"] == 2.7 and o["sample_steps"] == 50
    assert o["clo_lr"] == 6e-4 and o["clo_lambda"] == 10.0


def test_mar_preset_and_paper_numbers():
    o = PRESETS["in1k-mar"].options
    assert (o["pool_factor"], o["select"], o["sample_steps"], o["guidance"], o["condition"]) == (2, "stability", 32, 2.9, "zero")
    assert PRESETS["woof"].paper == {"IPC10 (ResNet-18)": 45.6, "IPC50 (ResNet-18)": 68.9}
    assert PRESETS["nette-clo"].options["clo_iters"] == 100


def test_presets_command_lists_them(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(f"| {name} |" in out for name in PRESETS) and "45.6" in out


def test_preset_is_overridden_by_flags(tiny_args, tmp_path):
    assert main(["run", "--preset", "mnist", *tiny_args, "--ipc", "1"]) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["config"]["ipc"] == 1 and m["config"]["pool_factor"] == 2 and m["config"]["order"] == "easy"
