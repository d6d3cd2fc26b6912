"""`cao2 run` end to end on a tiny world: outputs, determinism, batch-size independence, config, resume."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cao2core.cli import main
from cao2core.generators.hookspecs import hookimpl


def run_ok(args):
    assert main(["run", *args]) == 0


def out_of(args):
    return args[args.index("--out") + 1]


def test_run_writes_the_distilled_set(tiny_args, capsys):
    run_ok(tiny_args)
    out = Path(out_of(tiny_args))
    assert "distilled 2 classes" in capsys.readouterr().out
    for cid in ("0", "3"):
        pngs = sorted(p.name for p in (out / "images" / cid).iterdir())
        assert pngs == ["0.png", "1.png"]
        img = Image.open(out / "images" / cid / "0.png")
        assert img.size == (32, 32) and img.mode == "L"
        t = load_file(str(out / "latents" / f"{cid}.safetensors"))
        assert t["latents"].shape == t["latents_init"].shape == (2, 4, 8, 8)
        assert t["labels"].tolist() == [int(cid)] * 2 and t["scores"].shape == (2,)
        assert not torch.equal(t["latents"], t["latents_init"])      # CLO moved them
        # the loss terms per latent and iteration: the max |error| is at least the root mean square error
        assert t["clo_loss_mean"].shape == t["clo_loss_max"].shape == (2, 3)
        assert (t["clo_loss_max"] >= t["clo_loss_mean"].sqrt() - 1e-6).all()
    m = json.loads((out / "manifest.json").read_text())
    assert m["class_ids"] == ["0", "3"] and m["dataset"] == "mnist"
    assert m["classes"]["3"]["status"] == "complete" and m["classes"]["3"]["condition"] == "null"
    assert len(m["generator"]["transformer"]["sha256"]) == 64 and m["config"]["clo_tmax"] == 224
    assert m["classifier"]["sha256"] and m["versions"]["torch"]
    assert Image.open(out / "preview.png").size[1] > 2 * (32 + 2) + 2       # the label band above the rows
    assert not list(out.rglob(".*"))            # no temporary files left


def test_same_command_gives_identical_files(tiny_args, tmp_path):
    a = tiny_args
    b = a[:a.index("--out")] + ["--out", str(tmp_path / "again")] + a[a.index("--out") + 2:]
    run_ok(a)
    run_ok(b)
    for cid in ("0", "3"):
        for i in range(2):
            pa, pb = (f"{out_of(x)}/images/{cid}/{i}.png" for x in (a, b))
            assert np.array_equal(np.asarray(Image.open(pa)), np.asarray(Image.open(pb)))
        ta, tb = (load_file(f"{out_of(x)}/latents/{cid}.safetensors") for x in (a, b))
        assert all(torch.equal(ta[k], tb[k]) for k in ("latents", "latents_init", "pool_index"))


def test_output_does_not_depend_on_batch_size(tiny_world, tiny_classifier, tmp_path):
    common = ["--model", str(tiny_world), "--classifier", str(tiny_classifier), "--classes", "5", "--ipc", "3",
              "--pool-factor", "2", "--clo-iters", "4", "--no-progress", "--device", "cpu"]
    run_ok(common + ["--batch-size", "1", "--out", str(tmp_path / "b1")])
    run_ok(common + ["--batch-size", "4", "--out", str(tmp_path / "b4")])
    t1, t4 = (load_file(str(tmp_path / d / "latents" / "5.safetensors")) for d in ("b1", "b4"))
    assert torch.equal(t1["pool_index"], t4["pool_index"])
    torch.testing.assert_close(t1["latents_init"], t4["latents_init"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t1["latents"], t4["latents"], rtol=1e-5, atol=1e-5)


def test_rerun_skips_completed_classes(tiny_args, capsys):
    run_ok(tiny_args)
    out = out_of(tiny_args)
    before = {p: p.stat().st_mtime_ns for p in Path(out, "images").rglob("*.png")}
    capsys.readouterr()
    run_ok(tiny_args)
    assert "(2 already complete)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_config_file_with_cli_override(tiny_args, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('ipc = 1\nclo-iters = 2\norder = "hard"\n')
    args = list(tiny_args)
    del args[args.index("--ipc"):args.index("--ipc") + 2]       # ipc comes from the file ...
    args[args.index("--clo-iters") + 1] = "3"                    # ... clo-iters from the command line
    run_ok(["--config", str(cfg), *args])
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["config"]["ipc"] == 1 and m["config"]["clo_iters"] == 3 and m["config"]["order"] == "hard"


def test_auto_condition_uses_class_accuracy(tiny_world, tiny_classifier, tmp_path):
    # fixture accuracies: class 0 -> 0.95 (easy: class label), class 1 -> 0.4 (hard: null label)
    run_ok(["--model", str(tiny_world), "--classifier", str(tiny_classifier), "--classes", "0,1", "--ipc", "1",
            "--pool-factor", "1", "--clo-iters", "1", "--condition", "auto", "--out", str(tmp_path / "o"),
            "--no-progress", "--device", "cpu"])
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["classes"]["0"]["condition"] == "class" and m["classes"]["1"]["condition"] == "null"


@pytest.mark.parametrize("select", ["none", "random"])
def test_selection_without_classifier(tiny_world, tmp_path, select):
    run_ok(["--model", str(tiny_world), "--classifier", "no-such-file.safetensors", "--classes", "4", "--ipc", "2",
            "--select", select, "--clo-iters", "0", "--out", str(tmp_path / select), "--no-progress"])
    t = load_file(str(tmp_path / select / "latents" / "4.safetensors"))
    assert torch.equal(t["latents"], t["latents_init"])       # --clo-iters 0: selection only
    if select == "none":
        assert t["pool_index"].tolist() == [0, 1]


def test_reference_timestep_convention(tiny_args, tmp_path):
    args = tiny_args + ["--timestep-convention", "reference", "--sample-steps", "50"]
    run_ok(args)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["config"]["clo_tmax"] == 11 and m["generator"]["timestep_convention"] == "reference"
    assert m["generator"]["cfg_channels"] == 4 and m["generator"]["profile"] == "default"


@pytest.mark.parametrize("command", ["run", "refine"])
def test_help_explains_every_flag(capsys, command):
    from dataclasses import fields

    from cao2core.config import RunConfig
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in fields(RunConfig):
        assert (("--" + f.name.replace("_", "-")) in text) == (command in f.metadata["commands"])
    assert "(default: 100)" in text and "(default: 0.0006)" in text


def test_kernel_backends_give_the_same_result(tiny_args, tmp_path):
    outs = {}
    for backend in ("torch", "cpp"):
        args = list(tiny_args)
        args[args.index("--out") + 1] = str(tmp_path / backend)
        run_ok(args + ["--kernels", backend])
        m = json.loads((tmp_path / backend / "manifest.json").read_text())
        assert m["kernels"] == backend
        outs[backend] = load_file(str(tmp_path / backend / "latents" / "3.safetensors"))["latents"]
    torch.testing.assert_close(outs["torch"], outs["cpp"], rtol=1e-5, atol=1e-6)


def test_stability_selection_uses_the_snapshot_before_the_last_step(tiny_args, tmp_path):
    args = tiny_args + ["--select", "stability"]
    run_ok(args)
    t = load_file(f"{out_of(args)}/latents/3.safetensors")
    assert t["scores"].shape == (2,) and bool((t["scores"] > 0).all()) and bool((t["scores"] <= 1 + 1e-6).all())
    assert t["scores"][0] >= t["scores"][1]          # most step-consistent first


def test_stability_selection_needs_two_sampler_steps(tiny_args, tmp_path, capsys):
    assert main(["run", *tiny_args, "--select", "stability", "--sample-steps", "1"]) == 2
    assert "--select stability" in capsys.readouterr().err
    assert not Path(out_of(tiny_args)).exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tiny_args, capsys):
    assert main(["run", *tiny_args, "--dry-run", "2", "--batch-size", "2"]) == 0
    text = capsys.readouterr().out
    assert "dry run: 2 classes of mnist on 2 rank(s); IPC 2, pool 4 per class, CLO 3 iterations" in text
    assert "| 0 | 1 (0) | 4 | 6 |" in text and "| 1 | 1 (3) | 4 | 6 |" in text
    assert "2 group(s) of up to 1 classes" in text
    # at the default batch size both classes share one group: one rank has the work, the other is told idle
    assert main(["run", *tiny_args, "--dry-run", "2"]) == 0
    text = capsys.readouterr().out
    assert "| 0 | 2 (0, 3) | 8 | 12 |" in text and "(1 rank(s) idle: lower --batch-size)" in text
    flops = float(text.split("FLOPs (torch FLOP counter): ")[1].split(" GFLOP")[0])
    assert flops > 0 and "CLO latent-iterations/s" in text and "first call at these sizes" in text
    assert not Path(out_of(tiny_args)).exists()


class BatchSpy:
    """A cross-cutting plugin that records how many samples every generator call gets, and the classes of
    every CLO condition."""

    def __init__(self):
        self.sizes, self.condition_labels = [], []

    @hookimpl(wrapper=True)
    def cao2_sample(self, handle, labels, generators, snapshot_steps):
        self.sizes.append(("sample", len(labels)))
        return (yield)

    @hookimpl(wrapper=True)
    def cao2_decode(self, handle, latents):
        self.sizes.append(("decode", len(latents)))
        return (yield)

    @hookimpl(wrapper=True)
    def cao2_condition(self, handle, labels, kinds):
        self.sizes.append(("condition", len(labels)))
        self.condition_labels.append(sorted(set(labels.tolist())))
        return (yield)


def test_every_call_stays_within_the_batch_size_and_clo_chunks_span_classes(tiny_world, tiny_classifier, tmp_path,
                                                                             monkeypatch):
    from cao2core.method import engine
    from cao2core.generators.host import Host
    spy = BatchSpy()

    class SpiedHost(Host):
        def __init__(self):
            super().__init__()
            self.register(spy, "spy", kind="plugin")

    monkeypatch.setattr(engine, "Host", SpiedHost)
    run_ok(["--model", str(tiny_world), "--classifier", str(tiny_classifier), "--classes", "0-4", "--ipc", "3",
            "--pool-factor", "2", "--clo-iters", "2", "--batch-size", "7", "--out", str(tmp_path / "o"),
            "--no-progress", "--device", "cpu"])
    assert max(n for _, n in spy.sizes) <= 7       # the preview's decodes (before | after CLO) included
    # the preflight's 2 samples of class 0 first; then groups {0, 1} and {2, 3}, {4}: pools of 12 and 6 samples
    # in chunks of 7; CLO chunks of 6 and 3
    assert [n for k, n in spy.sizes if k == "sample"] == [2, 7, 5, 7, 5, 6]
    assert spy.condition_labels == [[0], [0, 1], [2, 3], [4]]
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["classes"]["1"]["group"] == ["0", "1"] and m["batch_size"] == 7
    # a batch below one class's IPC: every class is its own group, and the preview decodes in chunks too
    spy.sizes.clear()
    run_ok(["--model", str(tiny_world), "--classifier", str(tiny_classifier), "--classes", "0,1", "--ipc", "3",
            "--pool-factor", "2", "--clo-iters", "1", "--batch-size", "2", "--out", str(tmp_path / "b2"),
            "--no-progress", "--device", "cpu"])
    assert max(n for _, n in spy.sizes) <= 2 and [n for k, n in spy.sizes if k == "condition"] == [2, 2, 1, 2, 1]


def test_progress_to_a_file_is_a_line_per_stage(tiny_args, capsys):
    args = [a for a in tiny_args if a != "--no-progress"] + ["--progress"]
    assert main(["run", *args]) == 0              # capsys: stderr is not a terminal, as `make demo > log`
    err = capsys.readouterr().err
    assert "\r" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("cao2: ")]
    # each step and stage: a line when it starts, one when it ends (with its own seconds), in the run's order
    expected = [("load generator: dit ", " ..."), ("load generator: dit ", "s"), ("load classifier: ", " ..."),
                ("load classifier: ", "s"), ("hash: ", " ..."), ("hash: ", "s"), ("preflight: ", " ..."),
                ("preflight: ", "s"), ("sample pool: 8 img", " ..."), ("sample pool: 8/8 img in ", "s"),
                ("select: 8 img", " ..."), ("select: 8/8 img in ", "s"), ("CLO: 3 it", " ..."),
                ("CLO: 3/3 it in ", "s"), ("decode: 4 img", " ..."), ("decode: 4/4 img in ", "s")]
    assert len(lines) == len(expected), err
    for line, (start, end) in zip(lines, expected):
        assert line.startswith("cao2: " + start) and line.endswith(end), (line, start, end)


def test_each_stage_line_ends_when_its_own_work_does(tiny_args, capsys, monkeypatch):
    """A stage's closing line comes when its last unit is done, before the next stage starts, with its own time."""
    from cao2core.method import engine
    slow = engine.optimize_latents

    def optimize_slowly(*args, **kwargs):
        import time
        time.sleep(1.5)
        return slow(*args, **kwargs)
    monkeypatch.setattr(engine, "optimize_latents", optimize_slowly)
    args = [a for a in tiny_args if a != "--no-progress"] + ["--progress"]
    assert main(["run", *args]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cao2: ")]
    pool_end = next(i for i, line in enumerate(lines) if line.startswith("cao2: sample pool: 8/8"))
    assert lines[pool_end + 1].startswith("cao2: select: 8 img")
    seconds = {line.split(":")[1].strip(): float(line.rsplit(" in ", 1)[1][:-1]) for line in lines if " in " in line
               and "/" in line}
    assert seconds["CLO"] >= 1.5 and seconds["decode"] < 1.5 and seconds["select"] < 1.5, lines


def test_a_long_stage_says_it_is_alive_in_the_log(tiny_args, capsys, monkeypatch):
    """Between a stage's first and last line, a log gets a line at each tenth done once a stage runs long (here
    every wait is 0 s: every tenth that a unit crosses), with the count, the percent and the stage's own time."""
    from cao2core.method import engine
    monkeypatch.setattr(engine, "LOG_LINE_AFTER_S", 0.0)
    args = [a for a in tiny_args if a not in ("--no-progress", "3")] + ["--progress"]
    args[args.index("--clo-iters") + 1:args.index("--clo-iters") + 1] = ["5"]
    assert main(["run", *args]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cao2: CLO")]
    assert lines[0] == "cao2: CLO: 5 it ..." and lines[-1].startswith("cao2: CLO: 5/5 it in ")
    middle = lines[1:-1]
    assert [line.split(": ", 2)[2].split(",")[0] for line in middle] == [f"{i}/5 it ({20 * i}%)" for i in range(1, 5)]
    assert all(line.endswith("s so far") for line in middle), middle


def test_no_progress_prints_no_stage_lines(tiny_args, capsys):
    assert main(["run", *tiny_args]) == 0
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("cao2: ")]


def test_tf32_on_cuda_is_recorded_and_part_of_the_run_identity(tiny_args, tmp_path, monkeypatch):
    """On CUDA the run allows TF32 and records it (simulated here: apply_tf32 told the device is CUDA); a CPU run
    in fp32 records none and keeps the run id it had before precision was recorded."""
    from cao2core.generators import precision
    run_ok(tiny_args)
    plain = json.loads((Path(out_of(tiny_args)) / "manifest.json").read_text())
    assert plain["precision"]["tf32"] is None and plain["precision"]["autocast_default"] == "none"
    assert "precision" not in plain["identity"]
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    real = precision.apply_tf32
    monkeypatch.setattr(precision, "apply_tf32", lambda device, environ=None: real(torch.device("cuda"), environ))
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        args = [a if a != out_of(tiny_args) else str(tmp_path / "tf32") for a in tiny_args]
        run_ok(args)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    m = json.loads((tmp_path / "tf32" / "manifest.json").read_text())
    assert m["precision"]["tf32"] == {"matmul": True, "cudnn": True}
    assert m["identity"]["precision"]["tf32"] == {"matmul": True, "cudnn": True}
    assert m["run_id"] != plain["run_id"]


def test_selection_runs_under_the_selection_autocast(tiny_args, monkeypatch):
    """Under --profile reference on CUDA the selection's decode and classifier run under the generator's official
    autocast (simulated on the CPU with bf16, which CPU autocast supports)."""
    from cao2core.generators import precision
    from cao2core.method import engine
    seen, select = [], engine.select_samples

    def spy(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return select(*args, **kwargs)
    monkeypatch.setattr(engine, "select_samples", spy)
    monkeypatch.setattr(precision, "selection_autocast", lambda device, profile, reference: torch.bfloat16)
    run_ok(tiny_args)
    assert seen == [(True, torch.bfloat16)]


def test_manifest_is_the_same_for_identical_runs_and_times_are_the_groups(tiny_args, tmp_path):
    from cao2core.method.engine import settled
    described = {"transformer": {"config": {"_use_default_values": ["b", "c", "a"], "layers": [2, 1]}}}
    assert settled(described) == {"transformer": {"config": {"_use_default_values": ["a", "b", "c"],
                                                             "layers": [2, 1]}}}
    run_ok(tiny_args)
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    config = m["generator"]["transformer"]["config"]
    if "_use_default_values" in config:
        assert config["_use_default_values"] == sorted(config["_use_default_values"])
    for entry in m["classes"].values():
        assert "seconds" not in entry and set(entry["group_seconds"]) == {"sample", "select", "clo", "decode"}
        assert entry["group"] == ["0", "3"]       # the time of the group both classes share
