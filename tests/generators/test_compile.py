"""``--gen-opt compile`` for both generators: the compiled parts give the eager results.

DiT compiles its transformer (rows with the ``zero`` condition run the eager module, whose embedders are hooked
per call); MAR its block stacks and DiffLoss head. The ``aot_eager`` backend (graph capture and AOT autograd, no
code generation) keeps this to seconds; the inductor modes compile the same captured graphs.
"""
from __future__ import annotations

import json

import pytest
import torch

from cao2core.method import clo
from cao2core.cli import main
from cao2core.errors import UserError
from cao2core.generators.host import Host
from cao2core.generators.seeding import unit_generators
from mar_tiny import make_mar_world

CPU = torch.device("cpu")
LEVEL_MAX = {"dit": 224, "mar": 999}


@pytest.fixture(scope="module")
def worlds(tiny_world, tmp_path_factory):
    return {"dit": tiny_world, "mar": make_mar_world(tmp_path_factory.mktemp("marworld"))}


def load(family, world, **opts):
    gen = Host().generator(family)
    return gen, gen.load(options={"model": str(world), "sample_steps": 3, **opts}, device=CPU)


def start():
    return torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))


def optimize(gen, handle, family, kinds):
    settings = clo.CLOSettings(iters=3, level_max=LEVEL_MAX[family], kernels="torch")
    return clo.optimize(gen, handle, start(), torch.tensor([1, 2, 3]), kinds,
                        unit_generators(0, 1, range(3), "clo-noise"), unit_generators(0, 1, range(3), "clo-level"),
                        settings)


def compiled_parts(family, handle) -> set:
    """What is compiled on the handle, by name."""
    if family == "dit":
        return {"transformer"} if handle.compiled is not None else set()
    return set(handle.model.__dict__) & set(handle.model.COMPILED_PARTS)


@pytest.mark.parametrize("family", ["dit", "mar"])
def test_compiled_sampling_and_clo_match_eager(worlds, family):
    torch._dynamo.reset()
    gen, eager = load(family, worlds[family])
    _, compiled = load(family, worlds[family], compile="aot_eager")
    assert not compiled_parts(family, eager) and compiled_parts(family, compiled)
    if family == "dit":
        assert compiled.forward_module(zero_rows=True) is compiled.transformer
    labels, gens = torch.tensor([4, 5, 6]), lambda: unit_generators(0, 4, range(3), "sample")
    a = gen.sample(handle=compiled, labels=labels, generators=gens(), snapshot_steps=[]).latents
    b = gen.sample(handle=eager, labels=labels, generators=gens(), snapshot_steps=[]).latents
    assert a.abs().sum() > 0
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # with a zero row DiT runs eager; MAR's rows mask different counts, so its encoder stack runs padded
    for kinds in (["null", "class", "null"], ["zero", "class", "null"]):
        c, e = optimize(gen, compiled, family, kinds), optimize(gen, eager, family, kinds)
        assert not torch.equal(e, start())
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)
    if family == "mar":
        compiled.model.compile_parts(None)           # back to the plain methods
        assert not compiled_parts(family, compiled)


@pytest.mark.parametrize("family", ["dit", "mar"])
def test_bad_compile_mode_is_a_user_error(worlds, family):
    with pytest.raises(UserError, match="compile=fast: use one of none, default, reduce-overhead"):
        load(family, worlds[family], compile="fast")


def test_unknown_options_are_user_errors(worlds):
    with pytest.raises(UserError, match="unknown --gen-opt colour for dit; known: autocast, cfg_channels, compile, num_heads, timestep_freqs"):
        load("dit", worlds["dit"], colour="red")


@pytest.mark.parametrize("family", ["dit", "mar"])
def test_run_records_the_compile_mode(worlds, tiny_classifier, tmp_path, family):
    torch._dynamo.reset()
    out = tmp_path / "out"
    assert main(["run", "--generator", family, "--model", str(worlds[family]), "--classifier", str(tiny_classifier),
                 "--classes", "2", "--ipc", "2", "--pool-factor", "2", "--clo-iters", "2", "--out", str(out),
                 "--no-progress", "--device", "cpu", "--gen-opt", "compile=aot_eager"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["generator"]["compile"] == "aot_eager" and m["config"]["gen_opt"] == ["compile=aot_eager"]
