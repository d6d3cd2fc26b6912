"""A third-party generator's mistakes: one line naming the plugin and the hook, nothing written, the other
generators unaffected. The faulty plugins are the example toy generator with one thing wrong each."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from cao2core.method import engine
from entry_points import install_entry_points
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


def _nan_for_seven(handle, labels, generators, snapshot_steps):
    out = cao2_toy.cao2_sample(handle, labels, generators, snapshot_steps)
    return SampleOutput(latents=torch.where((labels == 7).view(-1, 1, 1, 1), float("nan"), out.latents))


def test_a_nan_pool_stops_the_run_blaming_the_sampler_not_clo(install, tmp_path, capsys):
    install(faulty(cao2_sample=_nan_for_seven))
    err, out = run_faulty(tmp_path, capsys, "--clo-iters", "1")
    assert ("non-finite samples from generator plugin faulty (cao2-faulty 9.9) cao2_sample" in err
            and "generator label 7" in err and "report it to the plugin's authors" in err), err
    assert "clo" not in err.lower(), err
    assert not (out / "images" / "7").exists() and not (out / "latents" / "7.safetensors").exists()


def test_a_nan_pool_at_a_sampling_flag_blames_the_flag(install, tmp_path, capsys):
    install(faulty(cao2_sample=_nan_for_seven))
    err, out = run_faulty(tmp_path, capsys, "--guidance", "1e30")
    assert "cao2_sample" in err and "at --guidance 1e+30: lower --guidance" in err, err
    _no_class_written(out)


def test_guidance_too_large_for_a_real_sampler_is_one_line_before_anything_is_written(tiny_args, capsys):
    out = Path(tiny_args[tiny_args.index("--out") + 1])
    assert main(["run", *tiny_args, "--guidance", "1e30"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "generator plugin dit" in err and "cao2_sample" in err, err
    assert "--guidance 1e+30: lower --guidance" in err and "--clo-lr" not in err, err
    _no_class_written(out)


def _decode_nan_for_seven(handle, latents):
    # the toy's latents are its pixels; class 7's mean sits at the top of the range
    pixels = cao2_toy.cao2_decode(handle, latents)
    return torch.where(pixels.flatten(1).mean(1).view(-1, 1, 1, 1) > 0.3, float("nan"), pixels)


@pytest.mark.parametrize("decode,match", [
    (lambda handle, latents: torch.full_like(latents, float("nan")), "returned NaN or Inf pixels for 2 of 2 finite"),
    (lambda handle, latents: latents.expand(-1, 2, -1, -1), "should have 1 (grey) or 3 (RGB) channels, got 2"),
    (lambda handle, latents: latents.expand(-1, 4, -1, -1), "should have 1 (grey) or 3 (RGB) channels, got 4"),
])
def test_a_decode_the_store_cannot_write_is_refused_before_anything_is_written(install, tmp_path, capsys, decode,
                                                                               match):
    install(faulty(cao2_decode=decode))
    err, out = run_faulty(tmp_path, capsys)
    assert "generator plugin faulty (cao2-faulty 9.9): cao2_decode" in err and match in err, err
    assert not (out / "manifest.json").exists()
    _no_class_written(out)


def test_decoding_latents_clo_broke_is_not_blamed_on_the_decoder(install, tmp_path, capsys):
    """CLO's own divergence fails its class (the engine's record), the decoder passes NaN in, NaN out."""
    from cao2core.generators.contract import pixel_problem
    latents = torch.zeros(3, 1, 4, 4)
    latents[1] = float("nan")
    assert pixel_problem(latents.clone(), latents) is None
    pixels = latents.clone()
    pixels[2] = float("inf")
    assert "for 1 of 3 finite latents" in pixel_problem(pixels, latents)


def test_a_nan_in_the_description_is_refused_naming_the_key(install, tmp_path, capsys):
    def describe(handle):
        return {"family": "toy", "sampler": {"steps": 3, "sigmas": [1.0, float("nan")]}}
    install(faulty(cao2_describe=describe))
    err, out = run_faulty(tmp_path, capsys)
    assert "cao2_describe returned NaN or Infinity at key 'sampler.sigmas[1]'" in err, err
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("error", [MemoryError(), torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate")])
def test_out_of_memory_in_a_hook_says_lower_the_batch_size(install, tmp_path, capsys, error):
    def predict(handle, corrupted, condition):
        raise error
    install(faulty(cao2_predict=predict))
    err, out = run_faulty(tmp_path, capsys)
    assert err == ("cao2: error: out of memory in faulty (cao2-faulty 9.9) cao2_predict: lower --batch-size "
                   "(--debug shows the traceback)"), err
    _no_class_written(out)


def test_sys_exit_in_a_hook_is_one_line_naming_plugin_and_hook(install, tmp_path, capsys):
    def sample(handle, labels, generators, snapshot_steps):
        sys.exit(3)
    install(faulty(cao2_sample=sample))
    err, out = run_faulty(tmp_path, capsys)
    assert "generator plugin faulty (cao2-faulty 9.9): cao2_sample called sys.exit(3)" in err, err
    _no_class_written(out)


class _OddError(Exception):
    pass


@pytest.mark.parametrize("error", [TypeError("unhashable"), KeyError("mode"), _OddError("no such preset")])
def test_an_option_parser_that_breaks_is_blamed_on_the_plugin(install, tmp_path, capsys, error):
    from cao2core.generators.hookspecs import GenOption

    def parse(text):
        raise error

    def options():
        return {"mode": GenOption("a mode", parse=parse)}
    install(faulty(cao2_options=options))
    err, out = run_faulty(tmp_path, capsys, "--gen-opt", "mode=fast")
    assert ("generator plugin faulty (cao2-faulty 9.9): the parser of --gen-opt mode raised "
            f"{type(error).__name__} on the value 'fast'") in err, err
    assert not out.exists()


def test_an_unreadable_option_value_is_still_the_users(install, tmp_path, capsys):
    from cao2core.generators.hookspecs import GenOption
    install(faulty(cao2_options=lambda: {"scale": GenOption("a scale", parse=float)}))
    err, _ = run_faulty(tmp_path, capsys, "--gen-opt", "scale=big")
    assert err.startswith("cao2: error: --gen-opt scale=big: faulty cannot read it"), err


def test_the_other_generators_keep_working_beside_a_broken_one(install, tiny_args, tmp_path):
    install(faulty(cao2_sample=_sample_bare))
    assert main(["run", *tiny_args]) == 0


def test_misspelled_argument_and_hook_names_get_a_hint():
    from cao2core.errors import UserError
    host = Host(load_entry_points=False)

    def cao2_sample(handle, lables, generators, snapshot_steps):       # the hook's own name, as a plugin writes it
        return None
    with pytest.raises(UserError) as info:
        host.register(faulty(cao2_sample=cao2_sample), "a")
    assert ("cao2_sample has no argument 'lables'; it takes handle, labels, generators, snapshot_steps, progress"
            in str(info.value) and "did you mean labels for 'lables'" in str(info.value)), info.value
    assert "did you mean cao2_sample" not in str(info.value)
    m = faulty("b")
    m.cao2_smaple = hookimpl(lambda handle, labels, generators, snapshot_steps: None)
    with pytest.raises(UserError, match="did you mean cao2_sample"):
        host.register(m, "b")
    m = faulty("c")
    m.cao2_decode = lambda handle, latents: latents          # not marked
    with pytest.raises(UserError, match="cao2_decode is defined but not marked"):
        host.register(m, "c")


def test_a_missing_hook_gets_a_hint_naming_it():
    from cao2core.errors import UserError
    host = Host(load_entry_points=False)
    m = faulty("d")
    del m.cao2_describe                     # cao2_decode, a hook it does implement, is no misspelling of it
    with pytest.raises(UserError) as info:
        host.register(m, "d")
    assert str(info.value) == ("generator plugin 'd' lacks required hooks: cao2_describe (add @hookimpl def "
                               "cao2_describe(handle): docs/plugins.md, The hooks)")
    m = faulty("e")
    del m.cao2_describe
    m.cao2_descibe = lambda handle: {}      # unmarked and misspelled
    with pytest.raises(UserError, match=r"misspelled\? cao2_describe \(found cao2_descibe\)"):
        host.register(m, "e")


def test_plugins_lists_the_others_when_a_listing_hook_raises(install, monkeypatch, capsys):
    import cao2core.generators.host as plugins

    def options():
        raise KeyError("presets")
    real = plugins.Host

    class WithFaulty(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.register(faulty(cao2_options=options), "faulty", version="9.9", distribution="cao2-faulty")
    monkeypatch.setattr(plugins, "Host", WithFaulty)
    assert main(["plugins", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "faulty [generator, BROKEN]" in out and "cao2_options raised KeyError: 'presets'" in out, out
    assert "dit 0.1.0 [generator]" in out and "mar 0.1.0 [generator]" in out, out


def test_sys_exit_at_import_is_set_aside(monkeypatch, tmp_path, capsys, tiny_args):
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    install_entry_points(monkeypatch, {"cao2.generators": [("quits", "exits_at_import", "cao2-quits")]})
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "quits [generator, BROKEN]" in out and "SystemExit" in out and "dit" in out
    assert main(["run", *tiny_args]) == 0


def test_broken_cross_cutting_plugin_is_reported_and_skipped(monkeypatch, tmp_path, capsys, tiny_args):
    (tmp_path / "bad_tracer.py").write_text("raise ImportError('tracing backend missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    install_entry_points(monkeypatch, {"cao2.plugins": [("tracer", "bad_tracer", "cao2-tracer")]})
    assert main(["run", *tiny_args]) == 0
    err = capsys.readouterr().err
    assert "cross-cutting plugin 'tracer' is skipped" in err and "tracing backend missing" in err



def test_a_broken_cross_cutting_plugin_is_listed_as_a_plugin(monkeypatch, tmp_path, capsys):
    (tmp_path / "bad_tracer.py").write_text("raise ImportError('tracing backend missing')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    install_entry_points(monkeypatch, {"cao2.plugins": [("tracer", "bad_tracer", "cao2-tracer")]})
    assert main(["plugins", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert "tracer [plugin, BROKEN]" in out and "tracer [generator, BROKEN]" not in out

def test_a_third_party_dit_does_not_replace_the_builtin(monkeypatch, tmp_path, capsys, tiny_args):
    (tmp_path / "fake_dit.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    install_entry_points(monkeypatch, {"cao2.generators": [("dit", "fake_dit", "cao2-pixeldiff")]})
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
