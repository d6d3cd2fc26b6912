"""A third-party generator's mistakes: one line naming the plugin and the hook, nothing written, the other
generators unaffected. The faulty plugins are the example toy generator with one thing wrong each."""
from __future__ import annotations

import importlib.metadata as md
import sys
import types
from pathlib import Path

import pytest
import torch

from cao2core.method import engine
from cao2core.cli import main
from cao2core.generators.hookspecs import LatentSpec, SampleOutput, hookimpl
from cao2core.generators.host import Host

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples" / "toy_generator"))
import cao2_toy  # noqa: E402

HOOKS = [n for n in dir(cao2_toy) if n.startswith("cao2_")]


def faulty(name: str = "faulty", **overrides) -> types.ModuleType:
    """The toy plugin with some hooks replaced (already marked, or plain functions to mark)."""
    m = types.ModuleType(name)
    for hook in HOOKS:
        setattr(m, hook, getattr(cao2_toy, hook))
    for hook, fn in overrides.items():
        setattr(m, hook, fn if hasattr(fn, "cao2_impl") else hookimpl(fn))
    return m


@pytest.fixture
def install(monkeypatch):
    """Make ``engine.run``'s host hold the given plugin module as generator ``faulty`` beside the built-ins."""
    def put(module, name="faulty"):
        real = Host

        def host():
            h = real()
            h.register(module, name, kind="generator", version="9.9", distribution="cao2-faulty")
            return h
        monkeypatch.setattr(engine, "Host", host)
    return put


def run_faulty(tmp_path, capsys, *extra):
    out = tmp_path / "out"
    rc = main(["run", "--generator", "faulty", "--select", "none", "--classes", "2,7", "--ipc", "2",
               "--condition", "class", "--clo-iters", "2", "--out", str(out), "--no-progress", "--device", "cpu",
               *extra])
    err = capsys.readouterr().err.strip()
    assert rc != 0, err
    assert len(err.splitlines()) == 1 and err.startswith("cao2: error: "), err
    return err, out


def _no_class_written(out: Path):
    assert not (out / "images").exists() or not any((out / "images").iterdir())
    assert not (out / "latents").exists() or not any((out / "latents").iterdir())


def _sample_16(handle, labels, generators, snapshot_steps):
    return SampleOutput(latents=torch.stack([torch.randn(1, 16, 16, generator=g) for g in generators]))


def _sample_uint8(handle, labels, generators, snapshot_steps):
    x = cao2_toy.cao2_sample(handle, labels, generators, snapshot_steps).latents
    return SampleOutput(latents=((x.clamp(-1, 1) + 1) * 127.5).to(torch.uint8))


def _sample_short(handle, labels, generators, snapshot_steps):
    out = cao2_toy.cao2_sample(handle, labels, generators, snapshot_steps)
    return SampleOutput(latents=out.latents[:-1])


def _sample_bare(handle, labels, generators, snapshot_steps):
    return cao2_toy.cao2_sample(handle, labels, generators, snapshot_steps).latents


def _load_missing(options, device):
    raise FileNotFoundError(2, "No such file or directory", "weights/model.bin")


def _decode_no_channel(handle, latents):
    return latents[:, 0]


def _predict_no_grad(handle, corrupted, condition):
    with torch.no_grad():
        return cao2_toy.cao2_predict(handle, corrupted, condition)


@pytest.mark.parametrize("hook,fn,match", [
    ("cao2_sample", _sample_16, "cao2_sample SampleOutput.latents for 2 labels should have shape (2, 1, 32, 32), got (2, 1, 16, 16)"),
    ("cao2_sample", _sample_uint8, "should be floating point, got a uint8 tensor"),
    ("cao2_sample", _sample_short, "should have shape (2, 1, 32, 32), got (1, 1, 32, 32)"),
    ("cao2_sample", _sample_bare, "should return a cao2core.generators.hookspecs.SampleOutput, got a float32 tensor"),
    ("cao2_latent_spec", lambda handle: None, "cao2_latent_spec should return a cao2core.generators.hookspecs.LatentSpec"),
    ("cao2_load", _load_missing, "cao2_load raised FileNotFoundError"),
    ("cao2_decode", _decode_no_channel, "cao2_decode decoded pixels (B, C, H, W) should have shape"),
    ("cao2_predict", _predict_no_grad, "cao2_predict Prediction.pred carries no gradient"),
])
def test_a_broken_hook_is_one_line_naming_plugin_and_hook(install, tmp_path, capsys, hook, fn, match):
    install(faulty(**{hook: fn}))
    err, out = run_faulty(tmp_path, capsys)
    assert "generator plugin faulty (cao2-faulty 9.9)" in err and hook in err and match in err, err
    _no_class_written(out)


def test_debug_shows_the_traceback(install, tmp_path, capsys, monkeypatch):
    install(faulty(cao2_load=_load_missing))
    monkeypatch.setenv("CAO2_DEBUG", "1")
    with pytest.raises(Exception) as info:
        main(["run", "--generator", "faulty", "--out", str(tmp_path / "o"), "--no-progress"])
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_nan_pool_fails_the_class_and_names_the_generator(install, tmp_path, capsys):
    def nan_for_seven(handle, labels, generators, snapshot_steps):
        out = cao2_toy.cao2_sample(handle, labels, generators, snapshot_steps)
        return SampleOutput(latents=torch.where((labels == 7).view(-1, 1, 1, 1), float("nan"), out.latents))
    install(faulty(cao2_sample=nan_for_seven))
    err, out = run_faulty(tmp_path, capsys, "--clo-iters", "0")
    assert "class 7" in err and "cao2_sample" in err and "non-finite" in err and "--clo-lr" not in err, err
    assert sorted(p.name for p in (out / "images").iterdir()) == ["2"]          # the good class is written
    assert not (out / "images" / "7").exists()


def test_the_other_generators_keep_working_beside_a_broken_one(install, tiny_args, tmp_path):
    install(faulty(cao2_sample=_sample_bare))
    assert main(["run", *tiny_args]) == 0


def test_misspelled_argument_and_hook_names_get_a_hint():
    from cao2core.errors import UserError
    host = Host(load_entry_points=False)
    with pytest.raises(UserError, match=r"cao2_sample may take: handle, labels, generators, snapshot_steps"):
        host.register(faulty(cao2_sample=lambda handle, lables, generators, snapshot_steps: None), "a")
    m = faulty("b")
    m.cao2_smaple = hookimpl(lambda handle, labels, generators, snapshot_steps: None)
    with pytest.raises(UserError, match="did you mean cao2_sample"):
        host.register(m, "b")
    m = faulty("c")
    m.cao2_decode = lambda handle, latents: latents          # not marked
    with pytest.raises(UserError, match="cao2_decode is defined but not marked"):
        host.register(m, "c")


def _entry_points_with(monkeypatch, extra: dict):
    """Pretend more entry points are installed: {group: [(name, module, distribution name)]}."""
    import cao2core.generators.host as plugins
    real = md.entry_points

    class Dist:
        def __init__(self, name):
            self.metadata, self.version = {"Name": name}, "1.0"

    def entry_points(group):
        eps = list(real(group=group))
        for name, value, dist in extra.get(group, []):
            ep = md.EntryPoint(name, value, group)
            object.__setattr__(ep, "dist", Dist(dist))
            eps.append(ep)
        return eps
    monkeypatch.setattr(plugins.importlib.metadata, "entry_points", entry_points)


def test_sys_exit_at_import_is_set_aside(monkeypatch, tmp_path, capsys, tiny_args):
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _entry_points_with(monkeypatch, {"cao2.generators": [("quits", "exits_at_import", "cao2-quits")]})
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "quits [generator, BROKEN]" in out and "SystemExit" in out and "dit" in out
    assert main(["run", *tiny_args]) == 0


def test_broken_cross_cutting_plugin_is_reported_and_skipped(monkeypatch, tmp_path, capsys, tiny_args):
    (tmp_path / "bad_tracer.py").write_text("raise ImportError('tracing backend missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _entry_points_with(monkeypatch, {"cao2.plugins": [("tracer", "bad_tracer", "cao2-tracer")]})
    assert main(["run", *tiny_args]) == 0
    err = capsys.readouterr().err
    assert "cross-cutting plugin 'tracer' is skipped" in err and "tracing backend missing" in err



def test_a_broken_cross_cutting_plugin_is_listed_as_a_plugin(monkeypatch, tmp_path, capsys):
    (tmp_path / "bad_tracer.py").write_text("raise ImportError('tracing backend missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _entry_points_with(monkeypatch, {"cao2.plugins": [("tracer", "bad_tracer", "cao2-tracer")]})
    assert main(["plugins", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "tracer [plugin, BROKEN]" in out and "tracer [generator, BROKEN]" not in out

def test_a_third_party_dit_does_not_replace_the_builtin(monkeypatch, tmp_path, capsys, tiny_args):
    (tmp_path / "fake_dit.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    _entry_points_with(monkeypatch, {"cao2.generators": [("dit", "fake_dit", "cao2-pixeldiff")]})
    assert main(["run", *tiny_args]) == 0
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "BROKEN" in out and "cao2-pixeldiff" in out and "cao2 0.1.0" in out


def test_the_pool_bar_moves_per_sampler_step():
    from cao2core.method.pools import StepProgress

    class Bar:
        n = 0

        def update(self, k):
            self.n += k
    bar = Bar()
    p = StepProgress(bar, samples=8, steps=4)
    seen = []
    for _ in range(4):
        p()
        seen.append(bar.n)
    p.done()
    assert seen == [2, 4, 6, 8] and bar.n == 8
    quiet = StepProgress(bar := Bar(), samples=5, steps=None)      # a generator that reports no steps
    quiet.done()
    assert bar.n == 5
