"""DD-Ranking's scores in `cao2 compare`: the arithmetic against numbers worked out by hand from the paper's
definition (arXiv 2505.13300), and the scores in compare.json and its table with a given or a measured full-data
accuracy."""
from __future__ import annotations

import json

import pytest

from cao2core.cli import main
from cao2core.studies.ddranking import ddrs, scores
from digits import write_val

E, INV_E = 2.718281828459045, 0.36787944117144233


def test_ddrs_at_the_ends_and_the_middle_of_its_range():
    # a = w IOR - (1-w) HLR with IOR, HLR as fractions; DDRS = (e^a - 1/e) / (e - 1/e)
    assert ddrs(100.0, 0.0, weight=1.0) == pytest.approx(1.0)          # a = 1
    assert ddrs(0.0, 100.0, weight=0.0) == pytest.approx(0.0)          # a = -1
    assert ddrs(0.0, 0.0) == pytest.approx(1 / (1 + E))                # a = 0: (1 - 1/e)/(e - 1/e) = 1/(1+e)
    # IOR 10 points, HLR 20 points, w 0.5: a = 0.05 - 0.10 = -0.05, e^-0.05 = 0.951229424500714
    assert ddrs(10.0, 20.0) == pytest.approx((0.951229424500714 - INV_E) / (E - INV_E))
    assert ddrs(10.0, 20.0) == pytest.approx(0.248192, abs=1e-6)


def test_scores_per_protocol_share_the_hard_label_gap():
    def fig(mean):
        return {"metric": "final", "mean": mean, "std": 0.0, "values": [mean]}
    rows = [{"protocol": "hard", "distilled": fig(85.0), "random_real": fig(90.0)},
            {"protocol": "rded", "distilled": fig(88.0), "random_real": fig(86.0)}]
    got = scores(rows, full_hard=99.0, weight=0.5)
    # HLR = 99 - 85 = 14 for both; IOR hard = -5, rded = +2
    assert got["hard"]["hlr"] == pytest.approx(14.0) and got["rded"]["hlr"] == pytest.approx(14.0)
    assert got["hard"]["ior"] == pytest.approx(-5.0) and got["rded"]["ior"] == pytest.approx(2.0)
    # a(hard) = -0.025 - 0.07 = -0.095, e^-0.095 = 0.909372934; a(rded) = 0.01 - 0.07 = -0.06, e^-0.06 = 0.941764534
    assert got["hard"]["ddrs"] == pytest.approx((0.909372934 - INV_E) / (E - INV_E), abs=1e-8)
    assert got["rded"]["ddrs"] == pytest.approx((0.941764534 - INV_E) / (E - INV_E), abs=1e-8)


def test_compare_reports_ior_hlr_and_ddrs(tiny_args, tmp_path, capsys):
    assert main(["run", *tiny_args]) == 0
    run = tmp_path / "out"
    val = write_val(tmp_path / "val", per_class=2)
    base = ["compare", "--data", str(run), "--val", str(val), "--train", str(val), "--protocols", "hard",
            "--epochs", "1", "--device", "cpu", "--quiet"]
    assert main([*base, "--full-real-acc", "99.5"]) == 0
    text = capsys.readouterr().out
    result = json.loads((run / "eval" / "compare" / "compare.json").read_text())
    row = result["protocols"][0]
    assert row["ior"] == pytest.approx(row["difference"])
    assert row["hlr"] == pytest.approx(99.5 - row["distilled"]["mean"])
    assert row["ddrs"] == pytest.approx(ddrs(row["ior"], row["hlr"]))
    assert result["ddranking"]["full_real_hard"]["mean"] == 99.5 and result["ddranking"]["weight"] == 0.5
    assert "| difference (IOR) | HLR | DDRS |" in text and f"{row['hlr']:+.2f} | {row['ddrs']:.3f} |" in text
    assert "arXiv 2505.13300" in text
    # measured: the same student on the whole --train folder, hard labels, in OUT/full-real-hard/
    assert main([*base, "--full-real"]) == 0
    full = json.loads((run / "eval" / "compare" / "full-real-hard" / "eval.json").read_text())
    assert full["data"]["kind"] == "full-real"
    result = json.loads((run / "eval" / "compare" / "compare.json").read_text())
    assert result["ddranking"]["full_real_hard"]["mean"] == full["summary"]["headline"]["mean"]
    assert result["protocols"][0]["hlr"] == pytest.approx(full["summary"]["headline"]["mean"]
                                                           - result["protocols"][0]["distilled"]["mean"])
    # the run folder with a full-real evaluation in it can still be replaced
    assert main(["run", *tiny_args, "--overwrite", "--seed", "1"]) == 0


@pytest.mark.parametrize("extra,match", [
    (["--full-real-acc", "99", "--full-real"], "not both"),
    (["--full-real-acc", "120"], "must be a test accuracy in percent"),
    (["--full-real-acc", "99", "--protocols", "rded"], "add hard to --protocols"),
    (["--ddrs-weight", "2"], "--ddrs-weight must be between 0 and 1"),
])
def test_bad_ddranking_input_is_one_line(tmp_path, capsys, extra, match):
    even = write_val(tmp_path / "even", per_class=2)
    out = tmp_path / "o"
    assert main(["compare", "--data", str(even), "--dataset", "mnist", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cao2: error: ") and match in err and err.count("\n") == 1
    assert not out.exists()
