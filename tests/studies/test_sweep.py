"""`cao2 sweep` on the tiny world: a grid of CLO flags on shared seeds, measured from the written latents, scored,
resumed; bad grids and bad eval options fail before anything runs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cao2core.cli import main
from digits import write_val


def _without(args: list[str], flag: str) -> list[str]:
    i = args.index(flag)
    return args[:i] + args[i + 2:]


def _latents(point: Path, cid: str = "3") -> dict:
    return load_file(str(point / "latents" / f"{cid}.safetensors"))


def test_sweep_shares_seeds_measures_scores_and_resumes(tiny_args, tmp_path, capsys):
    val = write_val(tmp_path / "val", per_class=2)
    out = tmp_path / "out"
    args = _without(tiny_args, "--clo-iters") + ["--grid", "clo-lr=1e-3,5e-2", "--grid", "clo_iters=0,3",
                                                 "--epochs", "1", "--repeat", "1", "--val", str(val)]
    assert main(["sweep", *args]) == 0
    text = capsys.readouterr().out
    result = json.loads((out / "sweep.json").read_text())
    names = [p["point"] for p in result["points"]]
    assert names == ["clo-lr-1e-3_clo-iters-0", "clo-lr-1e-3_clo-iters-3", "clo-lr-5e-2_clo-iters-0",
                     "clo-lr-5e-2_clo-iters-3"]
    assert result["grid"] == {"clo-lr": [1e-3, 5e-2], "clo-iters": [0, 3]}
    assert "clo_lr" not in result["config"] and result["config"]["ipc"] == 2
    pts = {p["point"]: p for p in result["points"]}
    t = {n: _latents(out / n) for n in names}

    # shared seeds: every point starts CLO from the same selected pool samples
    for n in names:
        assert torch.equal(t[n]["latents_init"], t[names[0]]["latents_init"])
        assert torch.equal(t[n]["pool_index"], t[names[0]]["pool_index"])
        m = json.loads((out / n / "manifest.json").read_text())["config"]
        assert (m["clo_lr"], m["clo_iters"]) == tuple(pts[n]["values"].values())
    assert torch.equal(t["clo-lr-5e-2_clo-iters-0"]["latents"], t["clo-lr-5e-2_clo-iters-0"]["latents_init"])
    assert not torch.equal(t["clo-lr-1e-3_clo-iters-3"]["latents"], t["clo-lr-5e-2_clo-iters-3"]["latents"])

    # the measures follow the written latents: no CLO, no change; a larger lr moves further
    for n in names:
        m = pts[n]["measures"]
        disp = torch.cat([((z["latents"] - z["latents_init"]).double().flatten(1).norm(dim=1)
                           / z["latents_init"].double().flatten(1).norm(dim=1))
                          for z in (_latents(out / n, c) for c in ("0", "3"))])
        assert m["samples"] == 4 and m["displacement"]["mean"] == pytest.approx(float(disp.mean()), rel=1e-9)
        # before CLO the classifier sees what selection saw: the probability the run recorded per kept sample
        recorded = torch.cat([_latents(out / n, c)["scores"] for c in ("0", "3")])
        assert m["p_class"]["before"] == pytest.approx(float(recorded.mean()), abs=1e-5)
    for lr in ("1e-3", "5e-2"):
        still = pts[f"clo-lr-{lr}_clo-iters-0"]["measures"]
        assert still["displacement"]["max"] == 0 and still["pixel_change"]["mean"] < 1e-6
        assert still["p_class"]["after"] == pytest.approx(still["p_class"]["before"], abs=1e-6)
    small, large = (pts[f"clo-lr-{lr}_clo-iters-3"]["measures"] for lr in ("1e-3", "5e-2"))
    assert 0 < small["displacement"]["mean"] < large["displacement"]["mean"]
    assert 0 < large["pixel_change"]["mean"]
    # the loss curve: the samples' mean of each term per iteration, as the latents files hold it
    curves = torch.cat([_latents(out / "clo-lr-5e-2_clo-iters-3", c)["clo_loss_mean"] for c in ("0", "3")])
    assert large["loss"]["iterations"] == 3 and large["loss"]["mean"]["curve"] == pytest.approx(
        curves.double().mean(0).tolist(), abs=1e-6)
    assert still["loss"] == {"iterations": 0}

    # every point scored alike; the table shows what was measured
    for n in names:
        s = pts[n]["summary"]
        assert s["repeats"] == 1 and 0 <= s["final_acc"]["mean"] <= 100
        assert pts[n]["eval_settings"]["epochs"] == 1 and (out / n / "eval" / "eval.json").is_file()
        m = pts[n]["measures"]
        row = (f"| {pts[n]['values']['clo-lr']:g} | {pts[n]['values']['clo-iters']} | "
               f"{m['displacement']['mean']:.3g} ({m['displacement']['max']:.3g}) | "
               f"{m['p_class']['before']:.4f} → {m['p_class']['after']:.4f} |")
        assert row in text and f"{s['final_acc']['mean']:.2f} ± {s['final_acc']['std']:.2f} |" in text
    assert (out / "sweep.md").read_text().strip() in text
    assert Image.open(out / "sweep.png").size[0] > 300

    # a rerun redoes nothing: runs resume, evaluations and measures are reused
    stamps = {n: (out / n / "eval" / "sweep-measures.json").stat().st_mtime_ns for n in names}
    assert main(["sweep", *args]) == 0
    assert capsys.readouterr().out.count("reusing") == 4
    assert stamps == {n: (out / n / "eval" / "sweep-measures.json").stat().st_mtime_ns for n in names}
    assert json.loads((out / "sweep.json").read_text())["points"] == result["points"]


def test_sweep_without_students(tiny_args, tmp_path, capsys):
    assert main(["sweep", *tiny_args, "--grid", "condition=null,class", "--no-eval"]) == 0
    text = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [p["values"] for p in result["points"]] == [{"condition": "null"}, {"condition": "class"}]
    assert result["eval_command"] is None and all(p["summary"] is None for p in result["points"])
    assert not (tmp_path / "out" / "condition-null" / "eval" / "eval.json").exists()
    assert "final acc" not in text and "not scored by students (--no-eval)" in text
    a, b = (_latents(tmp_path / "out" / n) for n in ("condition-null", "condition-class"))
    assert torch.equal(a["latents_init"], b["latents_init"]) and not torch.equal(a["latents"], b["latents"])


def test_a_point_whose_clo_fails_is_reported_and_not_scored(tiny_args, tmp_path, capsys):
    val = write_val(tmp_path / "val", per_class=1)
    args = ["sweep", *tiny_args, "--grid", "clo-lr=1e-3,1e38", "--epochs", "1", "--repeat", "1", "--val", str(val)]
    assert main(args) == 0                  # an lr of 1e38 drives every latent to inf: a result, not an error
    text = capsys.readouterr().out
    ok, bad = json.loads((tmp_path / "out" / "sweep.json").read_text())["points"]
    assert not ok["failed"] and ok["summary"]["repeats"] == 1 and ok["measures"]["samples"] == 4
    assert sorted(bad["failed"]) == ["0", "3"] and bad["summary"] is None and bad["measures"] == {"samples": 0}
    assert "| 1e+38 | – [2 of 2 classes failed] | – | – | – | not scored: 2 class(es) failed |" in text
    assert not (tmp_path / "out" / bad["point"] / "eval" / "eval.json").exists()


@pytest.mark.parametrize("extra,match", [
    (["--grid", "clo-rate=1,2"], "'clo-rate' is not a `cao2 run` flag"),
    (["--grid", "clo-lr=1e-3,fast"], "--grid clo-lr: 'fast' is not a number"),
    (["--grid", "seed=0,1.5"], "--grid seed: '1.5' is not an integer"),
    (["--grid", "condition=null,maybe"], "'maybe' is not one of"),
    (["--grid", "clo-lr=0.1,1e-1"], "'0.1' and '1e-1' are the same value"),
    (["--grid", "clo-lr=1e-3,-1"], "--grid point clo-lr--1: --clo-lr must be a positive number"),
    (["--grid", "clo-lr=1e-3", "--grid", "clo-lr=1e-2"], "--grid clo-lr is given twice"),
    (["--grid", "clo-iters=1,2"], "--clo-iters is given both as a flag and in --grid"),
    (["--grid", "device=cpu,cuda"], "--device does not change what a run writes"),
    (["--grid", "clo-lr"], "is not KEY=V1,V2,..."),
    (["--grid", "clo-lr=1e-3,,1e-2"], "has an empty value"),
    ([], "needs at least one --grid"),
    (["--grid", "clo-lr=1e-3", "--no-eval", "--epochs", "2"], "--epochs sets how the points are scored"),
    (["--grid", "clo-lr=1e-3", "--student", "bogus"], "unknown --student 'bogus'"),
    (["--grid", "clo-lr=1e-3", "--protocol", "rded", "--teacher", "missing.safetensors"], "--teacher missing"),
    (["--grid", "clo-lr=1e-3", "--val", "nowhere"], "--val nowhere is not a folder"),
    (["--grid", "clo-lr=1e-3", "--dry-run"], "--dry-run is for `cao2 run`"),
    (["--grid", "clo-tmax=10,5000"], "--grid point clo-tmax-5000: --clo-tmax 5000 is outside this generator's range"),
    (["--grid", "dataset=mnist,woof"], "--grid point dataset-woof: dataset woof uses in1k labels"),
])
def test_bad_sweep_fails_before_any_run(tiny_args, tmp_path, capsys, extra, match):
    assert main(["sweep", *tiny_args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cao2: error: ") and match in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_presets_t_hat_follows_each_points_sampling_steps():
    from cao2core.config import resolve_run_config
    from cao2core.studies.sweep import point_config
    base = resolve_run_config("woof", None, profile="reference")
    assert base.clo_tmax == 11 and base.from_preset["clo_tmax"] == "woof"
    assert point_config(base, {"sample_steps": 100}, "o").clo_tmax == 24
    point = point_config(base, {"clo_tmax": 5}, "o")
    assert point.clo_tmax == 5 and "clo_tmax" not in point.from_preset
