"""--batch-size auto: the memory fit, the CPU default, and a resume that reuses the recorded size."""
from __future__ import annotations

import json

import pytest
import torch

from cao2core.method import batchsize
from cao2core.cli import main

GiB = 1 << 30


def test_fit_is_the_largest_batch_under_the_headroom():
    # 2 GiB fixed + 1 GiB per sample, 80 GiB free: (0.85 * 80 - 2) / 1 = 66 -> 64 (a multiple of 8)
    assert batchsize.fit([(1, 3 * GiB), (2, 4 * GiB)], 80 * GiB) == 64
    assert batchsize.fit([(1, 3 * GiB), (2, 4 * GiB)], 10 * GiB) == 6          # small answers are not rounded
    assert batchsize.fit([(1, 50 * GiB), (2, 90 * GiB)], 80 * GiB) == 1        # never below one
    assert batchsize.fit([(1, 100), (2, 100)], 80 * GiB) == batchsize.MAX_BATCH  # flat peaks: capped


class FakeMeter:
    """A device with ``free`` bytes free, on which each stage's peak is what the stage returns."""

    def __init__(self, free):
        self._free = free

    def free(self):
        return self._free

    def measure(self, fn):
        return fn()


def test_probe_takes_the_tightest_stage():
    meter = FakeMeter(40 * GiB)
    stages = {"sample": lambda n: GiB + n * GiB // 4, "CLO": lambda n: 2 * GiB + n * GiB, "decode": lambda n: n * GiB // 2}
    size, fits = batchsize.probe(stages, meter)
    assert fits == {"sample": 128, "CLO": 32, "decode": 64} and size == 32


def test_auto_on_cpu_and_resumed_with_the_recorded_size(tiny_args, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", *tiny_args, "--batch-size", "3"]) == 0
    assert json.loads((out / "manifest.json").read_text())["batch_size"] == 3
    capsys.readouterr()
    assert main(["run", *tiny_args, "--batch-size", "auto"]) == 0
    io = capsys.readouterr()
    assert "--batch-size auto = 3 (as recorded by the run in" in io.err
    assert "distilled 0 classes (2 already complete)" in io.out

    fresh = [*tiny_args[:tiny_args.index("--out")], "--out", str(tmp_path / "fresh"), "--batch-size", "auto"]
    fresh += tiny_args[tiny_args.index("--out") + 2:]
    assert main(["run", *fresh]) == 0
    assert "--batch-size auto = 64 (the CPU default" in capsys.readouterr().err
    assert json.loads((tmp_path / "fresh" / "manifest.json").read_text())["batch_size"] == 64


def test_batch_size_word_is_checked(tiny_args, capsys):
    assert main(["run", *tiny_args, "--batch-size", "big"]) == 2
    assert "expected a number or 'auto'" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_probes_the_gpu(tiny_args, tmp_path, capsys):
    args = [*tiny_args[:tiny_args.index("--device")], "--device", "cuda", "--batch-size", "auto"]
    assert main(["run", *args]) == 0
    err = capsys.readouterr().err
    assert "largest that fits the free memory" in err and "CLO" in err
    size = json.loads((tmp_path / "out" / "manifest.json").read_text())["batch_size"]
    assert 1 <= size <= batchsize.MAX_BATCH


def test_the_probed_stages_are_the_runs_own(tiny_world, tiny_classifier):
    from cao2core.method import clo
    from cao2core.data.classifiers import load_classifier
    from cao2core.config import RunConfig
    from cao2core.method.dryrun import Workload
    from cao2core.data.labels import label_space
    from cao2core.generators.host import Host
    cpu = torch.device("cpu")
    gen = Host().generator("dit")
    handle = gen.load(options={"model": str(tiny_world), "sample_steps": 2}, device=cpu)
    space = label_space("mnist")
    classifier = load_classifier(str(tiny_classifier), space, cpu, None, None)
    work = Workload(RunConfig(), gen, handle, space, clo.CLOSettings(iters=1, level_max=224, kernels="torch"), cpu,
                    classifier)
    stages = batchsize.workload_stages(work, clo_iters=1)
    assert sorted(stages) == ["CLO", "classify", "decode", "sample"]
    probs = stages["classify"](3)
    assert probs.shape[0] == 3 and torch.allclose(probs.sum(1), torch.ones(3), atol=1e-5)
    assert stages["CLO"](2).shape == (2, 4, 8, 8) and stages["sample"](2).shape == (2, 4, 8, 8)
