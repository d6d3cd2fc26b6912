"""`cao2 ablate` on a reduced MNIST-world setting: four variants on shared seeds, each scored, one table."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cao2core.cli import build_parser, main, study_eval_config
from cao2core.config import RunConfig
from cao2core.studies.ablate import VARIANTS, study_evaluation
from digits import write_val



def test_ablate_runs_four_variants_on_shared_seeds(tiny_args, tmp_path, capsys):
    val = write_val(tmp_path / "val")
    out = tmp_path / "out"
    args = tiny_args + ["--epochs", "2", "--repeat", "2", "--eval-every", "1", "--val", str(val)]
    assert main(["ablate", *args]) == 0
    text = capsys.readouterr().out
    result = json.loads((out / "ablation.json").read_text())
    assert [r["variant"] for r in result["variants"]] == ["pool", "oss", "clo", "oss+clo"]
    for r, v in zip(result["variants"], VARIANTS):
        assert (r["oss"], r["clo"]) == (v.oss, v.clo)
        s = r["summary"]
        assert s["repeats"] == 2 and len(s["final_acc"]["values"]) == 2 and 0 <= s["final_acc"]["mean"] <= 100
        assert (Path(r["out"]) / "eval" / "eval.json").is_file()
        assert f"| {r['variant']} | {s['final_acc']['mean']:.2f} ± {s['final_acc']['std']:.2f} |" in text
    assert Image.open(out / "ablation.png").size[0] > 100
    # same seeds: the raw pool is CLO's starting point, the selection is the same with and without CLO
    t = {v.name: load_file(str(out / v.name / "latents" / "3.safetensors")) for v in VARIANTS}
    assert torch.equal(t["pool"]["latents"], t["clo"]["latents_init"])
    assert torch.equal(t["oss"]["latents"], t["oss+clo"]["latents_init"])
    assert torch.equal(t["pool"]["latents"], t["pool"]["latents_init"])
    assert not torch.equal(t["oss+clo"]["latents"], t["oss"]["latents"])
    m = json.loads((out / "clo" / "manifest.json").read_text())
    assert m["config"]["select"] == "none" and m["config"]["clo_iters"] == 3
    # a rerun reuses the runs and their evaluations
    assert main(["ablate", *args]) == 0
    assert capsys.readouterr().out.count("reusing") == 4
    assert json.loads((out / "ablation.json").read_text())["variants"] == result["variants"]


def test_ablate_needs_both_parts_switched_on(tiny_args, tmp_path, capsys):
    assert main(["ablate", *tiny_args, "--select", "none"]) == 2
    assert "needs both" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,match", [
    (["--repeat", "0"], "--repeat must be at least 1"),
    (["--student", "bogus"], "unknown --student 'bogus'"),
    (["--protocol", "rded", "--teacher", "no-such-model"], "--teacher 'no-such-model' is neither a file nor"),
    (["--val", "nowhere"], "--val nowhere is not a folder"),
    (["--dataset", "mnist", "--student", "convnet6"], "cannot build student 'convnet6' for 1-channel 32px images"),
    (["--dry-run"], "--dry-run is for `cao2 run`"),
])
def test_bad_eval_option_fails_before_any_run(tiny_args, tmp_path, capsys, extra, match):
    assert main(["ablate", *tiny_args, *extra]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_eval_command_of_a_variant():
    args = build_parser().parse_args(["ablate", "--protocol", "rded", "--epochs", "5", "--eval-seed", "7"])
    argv = study_evaluation(study_eval_config(args, RunConfig(device="cpu")), "o/pool").to_argv()
    assert argv[:3] == ["eval", "--data", "o/pool"]
    assert argv[argv.index("--protocol") + 1] == "rded" and argv[argv.index("--epochs") + 1] == "5"
    assert argv[argv.index("--seed") + 1] == "7" and argv[argv.index("--repeat") + 1] == "3"
