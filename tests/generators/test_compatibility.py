"""The plugin contract over releases: a plugin written for the first contract (the frozen package in old_plugin/)
runs unchanged, a plugin of another major version is set aside in one line, a new generic option reaches only the
plugins of its version, an option the user did not type is never blamed on the user, deprecations warn naming the
plugin, and the host's typed methods follow the hookspecs."""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from cao2core.cli import main
from cao2core.method import engine
from entry_points import install_entry_points
from cao2core.errors import UserError
from cao2core.generators import conformance, hookspecs
from cao2core.generators.conformance import GeneratorConformance, GeneratorUnderTest, check_generator
from cao2core.generators.contract import PluginError
from cao2core.generators.hookspecs import hookimpl
from cao2core.generators.host import Generator, Host

ROOT = Path(__file__).resolve().parents[2]
OLD_PLUGIN = Path(__file__).resolve().parent / "old_plugin"
sys.path.insert(0, str(ROOT / "examples" / "toy_generator"))
import cao2_toy  # noqa: E402

CPU = torch.device("cpu")
FIRST_GENERIC = {"model", "vae", "dataset", "sampler", "sample_steps", "guidance", "timestep_convention", "dtype"}


def _import_old_plugin() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("cao2_pixeldiff", OLD_PLUGIN / "cao2_pixeldiff.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pixeldiff = _import_old_plugin()


def plugin(name: str, contract=None, **hooks) -> types.ModuleType:
    """The toy generator as a plugin module ``name`` stating ``contract`` (None: states none), some hooks replaced."""
    m = types.ModuleType(name)
    for hook in [n for n in dir(cao2_toy) if n.startswith("cao2_")]:
        setattr(m, hook, getattr(cao2_toy, hook))
    for hook, fn in hooks.items():
        setattr(m, hook, hookimpl(fn))
    if contract is not None:
        m.CAO2_CONTRACT = contract
    return m


def recording(name: str, seen: dict, contract=None) -> types.ModuleType:
    """A plugin that records the options its ``cao2_load`` receives in ``seen[name]``."""
    def load(options, device):
        seen[name] = dict(options)
        return cao2_toy.Toy(device)
    return plugin(name, contract, cao2_load=load)


def every_generic(**gen_opts) -> dict:
    """Load options as ``cao2 run`` builds them: every generic option this cao2 passes, then --gen-opt pairs."""
    return {**dict.fromkeys(hookspecs.generic_options()), "profile": "default", **gen_opts}


@pytest.fixture
def install(monkeypatch):
    """Make ``engine.run``'s host hold a plugin module beside the installed generators."""
    def put(module, name, version, distribution):
        real = Host

        def host():
            h = real()
            h.register(module, name, kind="generator", version=version, distribution=distribution)
            return h
        monkeypatch.setattr(engine, "Host", host)
    return put


# the previous release's plugin, installed as its users install it

@pytest.fixture(scope="module")
def installed_pixeldiff(tmp_path_factory):
    """pip-install the frozen package (a copy: building writes into the source folder) into its own site."""
    root = tmp_path_factory.mktemp("pixeldiff")
    shutil.copytree(OLD_PLUGIN, root / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(root / "site"), str(root / "src")], check=True, capture_output=True)
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "site"), os.environ.get("PYTHONPATH", "")]))


def _cao2(env, *args):
    return subprocess.run([sys.executable, "-m", "cao2core.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_previous_releases_plugin_runs_unchanged(installed_pixeldiff, tmp_path):
    listing = _cao2(installed_pixeldiff, "plugins")
    assert listing.returncode == 0 and "pixeldiff 0.3.0 [generator] from cao2-pixeldiff" in listing.stdout
    assert "pixeldiff [generator, BROKEN]" not in listing.stdout
    out = tmp_path / "out"
    res = _cao2(installed_pixeldiff, "run", "--generator", "pixeldiff", "--classes", "2,7", "--ipc", "2",
                "--sample-steps", "3", "--clo-iters", "3", "--out", str(out), "--no-progress", "--device", "cpu")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["generator"]["name"] == "pixeldiff" and manifest["generator"]["version"] == "0.3.0"
    assert manifest["generator"]["family"] == "pixeldiff"
    for c in ("2", "7"):
        assert sorted(p.name for p in (out / "images" / c).iterdir()) == ["0.png", "1.png"]


def test_the_previous_releases_plugin_is_told_what_it_cannot_honour(install, tmp_path, capsys):
    install(pixeldiff, "pixeldiff", "0.3.0", "cao2-pixeldiff")
    out = tmp_path / "out"
    rc = main(["run", "--generator", "pixeldiff", "--profile", "reference", "--classes", "2", "--out", str(out),
               "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "--profile reference: generator pixeldiff (cao2-pixeldiff 0.3.0) is written for contract 1.0" in err
    assert not out.exists()


def test_the_frozen_plugin_is_the_one_that_broke():
    """It refuses every key it does not know, as the old guide said: given today's generic options unfiltered it
    fails exactly as the issue reports, so the run above proves the host's filtering."""
    with pytest.raises(UserError, match="unknown --gen-opt 'profile' for pixeldiff; known: channels, eta, init_seed"):
        pixeldiff.cao2_load(every_generic(), CPU)
    assert not hasattr(pixeldiff, hookspecs.CONTRACT_ATTRIBUTE)


def test_a_first_contract_plugin_receives_the_first_contracts_options():
    host = Host(load_entry_points=False)
    host.register(pixeldiff, "pixeldiff", version="0.3.0", distribution="cao2-pixeldiff")
    gen = host.generator("pixeldiff")
    assert gen.contract == hookspecs.FIRST_CONTRACT == (1, 0)
    assert set(gen.received_options(every_generic(size="8"))) == FIRST_GENERIC | {"size"}
    handle = gen.load(options=every_generic(size="8", sample_steps=2), device=CPU)
    assert gen.latent_spec(handle=handle).shape == (1, 8, 8)
    # a key the user typed is still the user's to fix, in the plugin's own words
    with pytest.raises(UserError, match="unknown --gen-opt 'colour' for pixeldiff") as info:
        gen.load(options=every_generic(colour="red"), device=CPU)
    assert not isinstance(info.value, PluginError)


class TestOldPluginConformance(GeneratorConformance):
    generator = pixeldiff
    options = {"sample_steps": 3, "size": "8"}


# growth that breaks nobody

def test_a_new_generic_option_reaches_only_plugins_of_its_version(monkeypatch):
    """A test-only minor version 1.2 adds the generic option ``shiny`` (neutral value: ``off``)."""
    monkeypatch.setattr(hookspecs, "CONTRACT", (1, 2))
    monkeypatch.setitem(hookspecs.GENERIC_OPTIONS_BY_VERSION, (1, 2), ("shiny",))
    monkeypatch.setitem(hookspecs.NEUTRAL_VALUES, "shiny", "off")
    seen = {}
    host = Host(load_entry_points=False)
    for name, contract in [("first", None), ("current", (1, 1)), ("newest", (1, 2)), ("ahead", "1.7")]:
        host.register(recording(name, seen, contract), name)
        host.generator(name).load(options=every_generic(shiny="off", size="8"), device=CPU)
    assert seen["first"] == {**dict.fromkeys(FIRST_GENERIC), "size": "8"}
    assert set(seen["current"]) == FIRST_GENERIC | {"profile", "size"}
    assert set(seen["newest"]) == set(seen["ahead"]) == FIRST_GENERIC | {"profile", "shiny", "size"}
    host.generator("newest").load(options=every_generic(shiny="on"), device=CPU)
    assert seen["newest"]["shiny"] == "on"
    with pytest.raises(UserError, match="--shiny on: generator first .* contract 1.0, which has no shiny"):
        host.generator("first").load(options=every_generic(shiny="on"), device=CPU)


def test_a_later_generic_option_an_older_plugin_cannot_honour_is_refused():
    host = Host(load_entry_points=False)
    host.register(recording("first", {}), "first", version="1.0", distribution="cao2-first")
    gen = host.generator("first")
    gen.load(options=every_generic(profile="default"), device=CPU)       # the neutral value: nothing asked
    gen.load(options=every_generic(profile=None), device=CPU)
    with pytest.raises(UserError, match=r"--profile reference: generator first \(cao2-first 1.0\) is written for "
                                        r"contract 1.0, which has no profile \(contract 1.1 added it\)"):
        gen.load(options=every_generic(profile="reference"), device=CPU)


def _strict_load(options, device):
    """A plugin stating 1.1 that still refuses keys itself, and does not know 1.1's ``profile``."""
    unknown = sorted(set(options) - FIRST_GENERIC)
    if unknown:
        raise UserError(f"unknown --gen-opt {unknown[0]!r} for strict; known: none")
    return cao2_toy.Toy(device)


def test_an_option_the_user_did_not_type_is_the_plugins_fault(install, tmp_path, capsys):
    install(plugin("strict", (1, 1), cao2_load=_strict_load), "strict", "2.0", "cao2-strict")
    out = tmp_path / "out"
    rc = main(["run", "--generator", "strict", "--select", "none", "--classes", "2", "--out", str(out),
               "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("cao2: error: generator plugin strict (cao2-strict 2.0), written for contract 1.1: "
                          "cao2_load refused 'profile', which cao2 passes from its own flags"), err
    assert "not a --gen-opt you typed" in err and "the plugin's fault" in err
    assert not out.exists()


def test_a_bad_flag_the_user_typed_stays_the_users():
    def picky(options, device):
        raise UserError(f"--sampler {options['sampler']}: picky has no such sampler")
    host = Host(load_entry_points=False)
    host.register(plugin("picky", (1, 1), cao2_load=picky), "picky")
    with pytest.raises(UserError, match="--sampler euler: picky has no such sampler") as info:
        host.generator("picky").load(options=every_generic(sampler="euler"), device=CPU)
    assert not isinstance(info.value, PluginError)


# contract versions

def test_a_plugin_of_a_future_major_version_is_set_aside_in_one_line(monkeypatch, tmp_path, capsys):
    # a hook contract 1 does not know: the version, not the hookspecs, is what the line names
    (tmp_path / "cao2_future.py").write_text("from cao2core.hookspecs import hookimpl\n\nCAO2_CONTRACT = (2, 0)\n\n\n"
                                             "@hookimpl\ndef cao2_render(handle):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    install_entry_points(monkeypatch, {"cao2.generators": [("future", "cao2_future", "cao2-future")]})
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert ("future [generator, BROKEN]\n  plugin 'future' (cao2-future 1.0) is written for contract 2, this cao2 "
            "speaks 1: upgrade cao2\n") in out
    assert "dit 0.1.0 [generator] from cao2" in out and "dit [generator, BROKEN]" not in out
    host = Host()
    with pytest.raises(UserError, match="written for contract 2, this cao2 speaks 1: upgrade cao2"):
        host.generator("future")
    assert host.generator("dit").contract == hookspecs.CONTRACT
    assert {p.name: p.contract for p in host.describe()}["mar"] == hookspecs.CONTRACT


def test_a_plugin_of_an_older_major_version_is_set_aside(monkeypatch):
    monkeypatch.setattr(hookspecs, "CONTRACT", (2, 0))
    host = Host(load_entry_points=False)
    with pytest.raises(UserError, match=r"plugin 'old' \(cao2-old 0.1\) is written for contract 1, this cao2 speaks "
                                        r"2: upgrade old \(or install a cao2 of contract 1\)"):
        host.register(plugin("old"), "old", version="0.1", distribution="cao2-old")
    assert not host.pm.has_plugin("old")


@pytest.mark.parametrize("stated", ["one", (1,), (1, 1, 0), (-1, 0)])
def test_a_malformed_contract_statement_is_one_line(stated):
    with pytest.raises(UserError, match=r"plugin 'odd' \(not installed unknown\) states CAO2_CONTRACT = .*; it "
                                        r"should be \(MAJOR, MINOR\)"):
        Host(load_entry_points=False).register(plugin("odd", stated), "odd")


def test_the_builtin_generators_state_the_current_contract():
    import cao2_dit
    import cao2_mar
    import cao2_sd
    assert cao2_dit.CAO2_CONTRACT == cao2_mar.CAO2_CONTRACT == cao2_sd.CAO2_CONTRACT == hookspecs.CONTRACT


# deprecations

def test_deprecations_warn_naming_the_plugin(monkeypatch):
    monkeypatch.setattr(hookspecs, "DEPRECATED", {"cao2_encode": "cao2 refine will decode instead",
                                                  "cao2_sample(snapshot_steps)": "return every step",
                                                  "options[guidance]": "read guidance_scale"})
    seen = {}
    host = Host(load_entry_points=False)
    with pytest.warns(DeprecationWarning) as record:
        host.register(recording("dep", seen), "dep", version="3.1", distribution="cao2-dep")
    messages = [str(w.message) for w in record]
    assert ("generator plugin 'dep' (cao2-dep 3.1): cao2_encode is deprecated: cao2 refine will decode instead; "
            "contract 2 removes it") in messages
    assert any("cao2_sample(snapshot_steps) is deprecated: return every step" in m for m in messages)

    def reads_guidance(options, device):
        return cao2_toy.Toy(device) if options.get("guidance") is None else None
    with pytest.warns(DeprecationWarning, match="'reader'"):
        host.register(plugin("reader", None, cao2_load=reads_guidance), "reader", version="1", distribution="cao2-r")
    with pytest.warns(DeprecationWarning, match=r"generator plugin reader \(cao2-r 1\): options\[guidance\] is "
                                                r"deprecated: read guidance_scale"):
        host.generator("reader").load(options=every_generic(), device=CPU)


# the typed interface

def test_every_hook_is_a_typed_method_of_the_generator():
    """One method per hook, keyword-only, with the hookspec's arguments and types (grep finds ``def sample``)."""
    assert "__getattr__" not in vars(Generator)
    for hook in hookspecs.REQUIRED_HOOKS + hookspecs.OPTIONAL_HOOKS:
        spec = inspect.signature(getattr(hookspecs, hook))
        method = inspect.signature(getattr(Generator, hook.removeprefix("cao2_")))
        params = list(method.parameters.values())[1:]
        assert [(p.name, p.annotation) for p in params] == [(p.name, p.annotation)
                                                            for p in spec.parameters.values()], hook
        assert all(p.kind is p.KEYWORD_ONLY for p in params), hook
        assert method.return_annotation == spec.return_annotation, hook


def test_hookwrappers_still_wrap_the_typed_methods():
    seen = []

    class Timer:
        @hookimpl(wrapper=True)
        def cao2_sample(self, labels):
            out = yield
            seen.append(len(labels))
            return out
    host = Host(load_entry_points=False)
    host.register(cao2_toy, "toy")
    host.register(Timer(), "timer", kind="plugin")
    gen = host.generator("toy")
    handle = gen.load(options=every_generic(), device=CPU)
    gen.sample(handle=handle, labels=torch.tensor([1, 2, 3]), generators=[torch.Generator() for _ in range(3)],
               snapshot_steps=[])
    assert seen == [3] and gen.wrapped_by == ["timer"]


# the conformance kit

def test_the_kit_skips_snapshots_for_a_sampler_without_steps():
    k = GeneratorUnderTest(plugin("plain"))
    with pytest.raises(pytest.skip.Exception, match="no step before the last"):
        conformance.check_snapshots(k)


def test_the_kit_skips_encode_for_a_plugin_without_it():
    m = plugin("no_encode")
    del m.cao2_encode
    k = GeneratorUnderTest(m)
    with pytest.raises(pytest.skip.Exception, match="no cao2_encode"):
        conformance.check_encode(k)
    assert check_generator(m) == []          # a skipped check is no failure


def test_the_kit_loads_with_the_options_of_every_minor_version():
    def needs_profile(options, device):
        return cao2_toy.Toy(device) if options["profile"] in ("default", None) else None

    def tolerates(options, device):
        return cao2_toy.Toy(device) if options.get("profile") in ("default", None) else None
    failures = check_generator(plugin("needy", (1, 1), cao2_load=needs_profile))
    assert len(failures) == 1 and failures[0].startswith("check_contract_versions: cao2_load with the options of "
                                                         "contract 1.0 (generic: model, vae"), failures
    assert "KeyError" in failures[0]
    assert check_generator(plugin("tolerant", (1, 1), cao2_load=tolerates)) == []


def test_the_kits_old_class_name_warns():
    with pytest.warns(DeprecationWarning, match="Loaded is renamed GeneratorUnderTest"):
        from cao2core.testing import Loaded
    assert Loaded is GeneratorUnderTest
