"""The conformance kit on cao2's own generators and the example plugin, and on a broken one."""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from cao2core.generators.hookspecs import SampleOutput, hookimpl
from cao2core.generators.conformance import GeneratorConformance, check_generator
from conftest import make_world
from mar_tiny import make_mar_world

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "toy_generator"))
import cao2_toy  # noqa: E402
from test_cao2_toy import TestToyConformance  # noqa: E402,F401  (the example's own tests, collected here too)



@pytest.fixture(scope="module", autouse=True)
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("kit")
    TestDiTConformance.options = {"model": str(make_world(root / "dit")), "sample_steps": 3}
    TestMARConformance.options = {"model": str(make_mar_world(root / "mar")), "sample_steps": 3}
    if HAS_TRANSFORMERS:
        from sd_tiny import make_sd, shapes_file
        shapes = str(shapes_file(root / "shapes.txt"))
        TestSDConformance.options = {"model": str(make_sd(root / "sd")), "dataset": shapes, "sample_steps": 2,
                                     "guidance": 2.0}
        # v-prediction, an ancestral sampler (per-sample noise every step) and images stored smaller
        TestSDAncestralConformance.options = {"model": str(make_sd(root / "sd-v", prediction_type="v_prediction")),
                                              "dataset": shapes, "sample_steps": 2, "guidance": 2.0,
                                              "sampler": "euler_a", "store_size": "8"}


class TestDiTConformance(GeneratorConformance):
    generator = "dit"


class TestMARConformance(GeneratorConformance):
    generator = "mar"


HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="the sd generator needs transformers (cao2[sd])")


@needs_transformers
class TestSDConformance(GeneratorConformance):
    generator = "sd"


@needs_transformers
class TestSDAncestralConformance(GeneratorConformance):
    generator = "sd"


def _broken(**hooks) -> types.ModuleType:
    m = types.ModuleType("broken")
    for name in [n for n in dir(cao2_toy) if n.startswith("cao2_")]:
        setattr(m, name, getattr(cao2_toy, name))
    for name, fn in hooks.items():
        setattr(m, name, hookimpl(fn))
    return m


def test_the_kit_names_what_a_broken_plugin_gets_wrong():
    def global_rng_sample(handle, labels, generators, snapshot_steps):
        return SampleOutput(latents=handle.means[labels] + 0.3 * torch.randn(len(labels), 1, 32, 32))

    def batch_coupled_predict(handle, corrupted, condition):
        p = cao2_toy.cao2_predict(handle, corrupted, condition)
        p.pred = p.pred + p.pred.mean(0, keepdim=True)
        return p
    failures = check_generator(_broken(cao2_sample=global_rng_sample, cao2_predict=batch_coupled_predict))
    text = "\n".join(failures)
    assert "check_sample_determinism: cao2_sample gave different latents for the same per-sample generators" in text
    assert "draws from torch's global RNG" in text
    assert "cao2_predict: row 0 of a batch differs from the same row alone" in text
    assert not any("check_decode" in f for f in failures)


def test_the_kit_reports_a_contract_violation_in_words():
    failures = check_generator(_broken(cao2_decode=lambda handle, latents: ((latents + 1) * 127.5).to(torch.uint8)))
    assert any("check_decode: generator plugin broken" in f and "cao2_decode decoded pixels" in f
               and "should be floating point" in f for f in failures), failures


def test_the_kit_and_the_run_apply_one_pixel_rule(tmp_path, capsys):
    """Pixels beyond [-1, 1] that a run clamps pass the kit too (with a warning); a channel count the run cannot
    write as a PNG fails both."""
    from cao2core.cli import main
    from cao2core.generators.host import Host
    from cao2core.method import engine
    overshoot = _broken(cao2_decode=lambda handle, latents: latents * 40)
    with pytest.warns(UserWarning, match="cao2 clamps them"):
        failures = check_generator(overshoot)
    assert not any("check_decode" in f for f in failures), failures
    four = _broken(cao2_decode=lambda handle, latents: latents.expand(-1, 4, -1, -1))
    assert any("check_decode" in f and "1 (grey) or 3 (RGB) channels, got 4" in f for f in check_generator(four))

    def host_with(module):
        def make():
            h = Host()
            h.register(module, "broken", kind="generator")
            return h
        return make
    args = ["run", "--generator", "broken", "--select", "none", "--classes", "2", "--ipc", "1", "--condition",
            "class", "--clo-iters", "1", "--no-progress", "--device", "cpu"]
    engine_host = engine.Host
    try:
        engine.Host = host_with(overshoot)
        assert main([*args, "--out", str(tmp_path / "a")]) == 0
        engine.Host = host_with(four)
        assert main([*args, "--out", str(tmp_path / "b")]) != 0
    finally:
        engine.Host = engine_host
    assert "1 (grey) or 3 (RGB) channels, got 4" in capsys.readouterr().err
