"""Every bad input: one line on stderr, non-zero exit, nothing written."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cao2core.method import engine
from cao2core.cli import main
from cao2core.generators.hookspecs import hookimpl
from cao2core.generators.host import Host


def fails(args, capsys, match):
    rc = main(["run", *args])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and err.startswith("cao2: error: "), err
    assert match in err, err
    return err


def replace(args, flag, value):
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    return args


@pytest.mark.parametrize("flag,value,match", [
    ("--ipc", "0", "--ipc must be at least 1"),
    ("--pool-factor", "0", "--pool-factor must be at least 1"),
    ("--clo-iters", "-1", "--clo-iters must be 0 or more"),
    ("--clo-tmax", "5000", "outside this generator's range 1-999"),
    ("--clo-lr", "nan", "--clo-lr must be a positive number"),
    ("--classes", "12", "class position 12"),
    ("--classes", "seven", "unknown class 'seven'"),
    ("--dataset", "woof", "uses in1k labels but the generator was trained on mnist"),
    ("--dataset", "imagenet-2k", "unknown dataset"),
    ("--model", "/no/such/DiT-XL-2-256x256.pt", "not found"),
    ("--classifier", "/no/such/judge.safetensors", "classifier checkpoint"),
    ("--device", "cuda:3", "no GPU is visible"),
    ("--kernels", "cuda", "kernel backend 'cuda' cannot run"),
    ("--batch-size", "0", "--batch-size must be at least 1 or auto"),
])
def test_bad_flag(tiny_args, capsys, flag, value, match):
    args = replace(tiny_args, flag, value)
    if flag == "--device" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    fails(args, capsys, match)
    assert not Path(args[args.index("--out") + 1]).exists()


def test_truncated_checkpoint(tiny_args, tmp_path, capsys):
    ckpt = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save({"x_embedder.proj.weight": torch.randn(64, 4, 2, 2)}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    fails(replace(tiny_args, "--model", str(ckpt)), capsys, "truncated")
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_wrong_architecture(tiny_args, tiny_classifier, capsys, tmp_path):
    fails(replace(tiny_args, "--model", str(tiny_classifier)), capsys, "not a DiT checkpoint")
    assert not (tmp_path / "out").exists()


def test_classifier_of_wrong_class_order(tiny_args, tmp_path, capsys):
    from conftest import make_classifier
    other = make_classifier(tmp_path / "letters.safetensors", classes=list("abcdefghij"))
    fails(replace(tiny_args, "--classifier", str(other)), capsys, "has no output for class '0'")


def test_output_of_a_different_run(tiny_args, tmp_path, capsys):
    assert main(["run", *tiny_args]) == 0
    manifest = (tmp_path / "out" / "manifest.json").read_text()
    fails(replace(tiny_args, "--seed", "7"), capsys, "holds a run of other inputs (config.seed was 0, now 7)")
    assert (tmp_path / "out" / "manifest.json").read_text() == manifest


def test_output_folder_with_foreign_files(tiny_args, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    fails(tiny_args, capsys, "not a cao2 output folder")
    assert (tmp_path / "out" / "thesis.tex").read_text() == "precious"


def test_bad_config_key(tiny_args, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("ipcs = 3\n")
    fails(["--config", str(cfg)] + tiny_args, capsys, "unknown key 'ipcs'")


class NaNForClass3:
    """A cross-cutting plugin that makes the generator's prediction non-finite for the rows of class 3."""

    active = True

    @hookimpl(wrapper=True)
    def cao2_predict(self, handle, corrupted, condition):
        out = yield
        if self.active:
            rows = (condition.labels == 3).view(-1, *[1] * (out.pred.dim() - 1))
            out.pred = out.pred * torch.where(rows, float("nan"), 1.0)
        return out


def test_non_finite_latents_fail_that_class_only(tiny_args, tmp_path, capsys, monkeypatch):
    nan = NaNForClass3()

    class HostWithNaN(Host):
        def __init__(self):
            super().__init__()
            self.register(nan, "nan", kind="plugin")

    monkeypatch.setattr(engine, "Host", HostWithNaN)
    args = replace(replace(tiny_args, "--condition", "class"), "--classes", "0,3")
    fails(args, capsys, "class 3: non-finite latents")
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0"]
    assert not (out / "latents" / "3.safetensors").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert m["classes"]["0"]["status"] == "complete" and m["classes"]["3"]["status"] == "failed"
    assert m["classes"]["0"]["group"] == ["0", "3"]         # both classes shared the CLO chunk
    with_nan = load_file(str(out / "latents" / "0.safetensors"))["latents"]
    # Rerunning after the cause is gone redoes only the failed class (the same plugins: the same run).
    nan.active = False
    assert main(["run", *args]) == 0
    assert "1 classes (1 already complete)" in capsys.readouterr().out
    # class 3's NaN rows did not touch class 0's: a clean run gives class 0 the same latents
    clean = replace(args, "--out", str(tmp_path / "clean"))
    assert main(["run", *clean]) == 0
    torch.testing.assert_close(load_file(str(tmp_path / "clean" / "latents" / "0.safetensors"))["latents"],
                               with_nan, rtol=0, atol=0)


TORCHRUN = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}


@pytest.mark.parametrize("env,match", [
    ({**TORCHRUN, "CAO2_DIST_TIMEOUT_MIN": "abc"}, "CAO2_DIST_TIMEOUT_MIN=abc is not a positive number of minutes"),
    ({**TORCHRUN, "CAO2_DIST_TIMEOUT_MIN": "-5"}, "CAO2_DIST_TIMEOUT_MIN=-5 is not a positive number of minutes"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 says this is one of 2 torchrun processes, but RANK is not set"),
    ({**TORCHRUN, "MASTER_ADDR": ""}, "but MASTER_ADDR is not set"),
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE=abc is not a whole number of 1 or more"),
    ({**TORCHRUN, "RANK": "2"}, "RANK=2 is not a whole number from 0 to 1"),
    ({**TORCHRUN, "LOCAL_RANK": "x"}, "LOCAL_RANK=x is not a whole number of 0 or more"),
])
def test_a_bad_torchrun_environment_is_one_line(tiny_args, tmp_path, capsys, monkeypatch, env, match):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CAO2_DIST_TIMEOUT_MIN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    err = fails(tiny_args, capsys, match)
    assert "unset" in err or "set it" in err, err
    assert not (tmp_path / "out").exists()


def test_the_environment_never_breaks_the_import():
    import os
    import subprocess
    import sys
    env = dict(os.environ, CAO2_DIST_TIMEOUT_MIN="abc", WORLD_SIZE="abc")
    proc = subprocess.run([sys.executable, "-m", "cao2core.cli", "presets"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("accuracy,match", [
    ('{"0": NaN, "3": 0.5}', "class '0' has accuracy nan"),
    ('{"0": Infinity, "3": 0.5}', "class '0' has accuracy inf"),
    ('{"0": [1], "3": 0.5}', "class '0' has accuracy [1]"),
    ('{"0": {"a": 1}, "3": 0.5}', "class '0' has accuracy"),
    ('{"0": true, "3": 0.5}', "class '0' has accuracy True"),
    ('{"0": 95, "3": 0.5}', "give each class a number in [0, 1]"),
    ('[0.9, 0.5]', "is not a readable JSON object"),
])
def test_bad_class_accuracy(tiny_args, tmp_path, capsys, accuracy, match):
    (tmp_path / "acc.json").write_text(accuracy)
    fails(tiny_args + ["--condition", "auto", "--class-accuracy", str(tmp_path / "acc.json")], capsys, match)
    assert not (tmp_path / "out").exists()


def test_output_inside_the_refined_images_is_refused(tiny_args, tmp_path, capsys):
    src = tmp_path / "src"
    (src / "0").mkdir(parents=True)
    k = tiny_args.index("--pool-factor")
    args = tiny_args[:k] + tiny_args[k + 2:]            # refine has no pool
    for out, match in [(src / "out", "--out"), (src, "--out"), (tmp_path, "is inside --out")]:
        assert main(["refine", *replace(args, "--out", str(out)), "--images", str(src)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("cao2: error: ") and match in err, err
    assert [p.name for p in src.iterdir()] == ["0"]


def test_names_the_file_system_cannot_hold(tiny_args, tmp_path, capsys):
    long_out = tmp_path / ("o" * 300)
    fails(replace(tiny_args, "--out", str(long_out)), capsys, "longer than the 255 a file name can be")
    assert not os.path.exists(long_out)
    for cid, match in [("c" * 300, "a class folder name can be at most"), ("a\0b", "control character")]:
        (tmp_path / "classes.txt").write_text(f"{cid}\nzero\n")
        fails(replace(tiny_args, "--dataset", str(tmp_path / "classes.txt")), capsys, match)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv,match,prog", [
    (["run", "--ipc", "x"], "argument --ipc: expected a number or 'all', got 'x'", "cao2 run"),
    (["run", "--bogus"], "unrecognized arguments: --bogus", "cao2 run"),
    (["eval", "--protocol", "nope"], "argument --protocol: invalid choice: 'nope'", "cao2 eval"),
    (["ablate", "--protocol", "nope", "--out", "never-written"], "--protocol must be one of", None),
    (["nope"], "invalid choice: 'nope'", "cao2"),
    ([], "the following arguments are required: command", "cao2"),
])
def test_argument_errors_are_one_line(capsys, argv, match, prog):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cao2: error: ") and match in err, err
    assert "usage:" not in captured.err + captured.out and "cao2 eval" not in err.replace(prog or "-", "")
    if prog:
        assert err.endswith(f"run `{prog} --help` for its options"), err
    assert not Path("never-written").exists()
