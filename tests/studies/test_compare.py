"""`cao2 compare`: a distilled set against random real images of the same IPC under hard and soft labels, in one
table whose sentence follows the measured numbers; and `cao2 eval --classes` for the baselines of a subset run."""
from __future__ import annotations

import json

import pytest

from cao2core.cli import main
from cao2core.studies.compare import sentence
from digits import write_val

QUICK = ["--epochs", "1", "--device", "cpu"]


def test_compare_scores_both_sets_under_both_protocols(tiny_args, tmp_path, capsys):
    assert main(["run", *tiny_args]) == 0               # classes 0 and 3, two images each
    run = tmp_path / "out"
    val = write_val(tmp_path / "val", per_class=2)
    args = ["compare", "--data", str(run), "--val", str(val), *QUICK, "--quiet"]
    capsys.readouterr()
    assert main(args) == 0
    text = capsys.readouterr().out
    out = run / "eval" / "compare"
    result = json.loads((out / "compare.json").read_text())
    assert [r["protocol"] for r in result["protocols"]] == ["hard", "rded"]
    assert result["ipc"] == 2 and result["classes"] == ["0", "3"]
    for row in result["protocols"]:
        p = row["protocol"]
        d = json.loads((out / f"distilled-{p}" / "eval.json").read_text())
        r = json.loads((out / f"random-real-{p}" / "eval.json").read_text())
        # the baseline: as many real images per class, of the run's classes only, the same budget
        assert r["data"]["kind"] == "random-real" and r["data"]["ipc"] == 2 and r["data"]["classes"] == ["0", "3"]
        assert len(r["repeats"][0]["data"]["subset"]) == 4
        assert d["data"]["kind"] == "distilled" and d["data"]["path"] == str(run)
        assert d["config"]["command"].startswith(f"cao2 eval --data {run} ")     # what it ran, not `cao2 compare`
        assert r["config"]["command"].startswith("cao2 eval --random-real 2 --dataset mnist --classes 0,3 ")
        assert d["config"]["settings"] == {**r["config"]["settings"]} and d["config"]["settings"]["protocol"] == p
        assert d["config"]["settings"]["epochs"] == 1
        a, b = d["summary"]["final_acc"]["mean"], r["summary"]["final_acc"]["mean"]
        assert row["difference"] == pytest.approx(a - b)
        name = "hard labels" if p == "hard" else "soft labels from the embedded MNIST judge (rded)"
        assert f"| {name} | {a:.2f} | {b:.2f} | {a - b:+.2f} |" in text
    assert (d["config"]["teacher"] or {}).get("sha256") and r["config"]["teacher"]["sha256"]
    assert "convnet3, 1 epoch, batch 100, 1 student per set and protocol" in text
    assert result["sentence"] in text and result["sentence"] == sentence(result)
    assert (out / "compare.md").read_text().strip() in text
    # a rerun reuses the four evaluations
    assert main(args) == 0
    assert capsys.readouterr().out.count("reusing") == 4


def _result(hard, soft, std=0.0, repeats=1):
    def fig(mean):
        return {"metric": "final", "mean": mean, "std": std, "values": [mean] * repeats}
    return {"teacher": "the embedded MNIST judge",
            "protocols": [{"protocol": "hard", "distilled": fig(80 + hard), "random_real": fig(80), "difference": hard},
                          {"protocol": "rded", "distilled": fig(85 + soft), "random_real": fig(85),
                           "difference": soft}]}


@pytest.mark.parametrize("hard,soft,words", [
    (-8.04, 1.26, ["Under hard labels the distilled set is 8.0 points below random real images",
                   "under soft labels (the embedded MNIST judge relabels every crop) the distilled set is 1.3 points "
                   "above random real images", "only when a teacher relabels the crops"]),
    (-8.0, -0.9, ["8.0 points below", "0.9 points below", "random real images train a better student under every"]),
    (2.0, 3.0, ["2.0 points above", "3.0 points above", "trains a better student than random real images under every"]),
    (2.0, -3.0, ["only under hard labels"]),
    (-2.0, 0.01, ["level with random real images"]),
])
def test_sentence_follows_the_numbers(hard, soft, words):
    text = sentence(_result(hard, soft))
    for w in words:
        assert w in text
    assert text.endswith("(--repeat measures it).") and text.count(".") >= 2
    if hard < 0 < soft and soft >= 0.05:
        assert "every protocol" not in text


def test_sentence_says_when_a_difference_is_within_the_spread():
    text = sentence(_result(-8.0, 1.0, std=0.8, repeats=3))
    assert "The rded difference is within the spread of the 3 students" in text and "--repeat" not in text


def test_bad_compare_input_fails_before_training(tmp_path, capsys):
    uneven = write_val(tmp_path / "uneven", per_class=2)
    (uneven / "3" / "1.png").unlink()
    cases = [
        (["--data", str(uneven), "--dataset", "mnist", "--out", str(tmp_path / "o")],
         "has 1 images in class 3 but 2 in class 0"),
        ([], "needs --data DIR"),
    ]
    even = write_val(tmp_path / "even", per_class=2)
    base = ["--data", str(even), "--dataset", "mnist", "--out", str(tmp_path / "o")]
    cases += [
        (base + ["--protocols", "hard,bogus"], "unknown protocol 'bogus'"),
        (base + ["--protocols", "hard,hard"], "names a protocol twice"),
        (base + ["--student", "bogus"], "unknown --student 'bogus'"),
        (base + ["--epochs", "0"], "--epochs must be at least 1"),
        (base + ["--val", str(tmp_path / "nowhere")], "is not a folder"),
        (base + ["--teacher", str(tmp_path / "t.safetensors")], "not found"),
        (["--data", str(even), "--dataset", "mnist"], "pass --out DIR"),
    ]
    for argv, match in cases:
        assert main(["compare", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("cao2: error: ") and match in err and err.count("\n") == 1, (argv, err)
        assert not (tmp_path / "o").exists()


def test_eval_random_real_on_a_subset_of_classes(tmp_path, capsys):
    val = write_val(tmp_path / "val", per_class=1)
    out = tmp_path / "rr"
    assert main(["eval", "--random-real", "1", "--dataset", "mnist", "--classes", "0,3", "--val", str(val),
                 "--out", str(out), "--quiet", *QUICK]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["data"]["classes"] == ["0", "3"] and len(report["repeats"][0]["data"]["subset"]) == 2
    assert report["data"]["val_images"] == 2
    assert main(["eval", "--data", str(val), "--classes", "0", "--out", str(tmp_path / "x"), *QUICK]) == 2
    assert "--classes is for the --random-real / --full-real baselines" in capsys.readouterr().err


def test_output_inside_the_data_or_read_only_is_refused(tiny_args, tmp_path, capsys, monkeypatch):
    import tempfile
    assert main(["run", *tiny_args]) == 0
    run = tmp_path / "out"
    before = sorted(p.name for p in run.iterdir())
    capsys.readouterr()
    for out, match in [(run, "--out"), (run / "images", "is inside --data"), (tmp_path, "is inside --out")]:
        assert main(["compare", "--data", str(run), "--out", str(out), *QUICK, "--quiet"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err
    assert sorted(p.name for p in run.iterdir()) == before

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", refuse)       # as on a read-only run folder
    assert main(["compare", "--data", str(run), *QUICK, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot be written" in err and "Permission denied" in err, err
    assert not (run / "eval").exists()
