"""DiT under ``--gen-opt compile``: the compiled transformer gives the eager results; zero-label rows run eager.

The tests use the ``aot_eager`` backend (dynamo's graph capture and AOT autograd, no code generation), so they
take seconds; the inductor modes compile the same captured graphs.
"""
from __future__ import annotations

import json

import pytest
import torch

from cao2core import clo
from cao2core.cli import main
from cao2core.errors import UserError
from cao2core.plugins import Host
from cao2core.seeding import unit_generators

CPU = torch.device("cpu")


def load(world, **opts):
    gen = Host().generator("dit")
    return gen, gen.load(options={"model": str(world), "sample_steps": 3, **opts}, device=CPU)


def optimize(gen, handle, kinds):
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    settings = clo.CLOSettings(iters=3, level_max=224, kernels="torch")
    return clo.optimize(gen, handle, z, torch.tensor([1, 2, 3]), kinds, unit_generators(0, 1, range(3), "clo-noise"),
                        unit_generators(0, 1, range(3), "clo-level"), settings)


def test_compiled_clo_and_sampling_match_eager(tiny_world):
    torch._dynamo.reset()
    gen, eager = load(tiny_world)
    _, compiled = load(tiny_world, compile="aot_eager")
    assert compiled.forward_module() is compiled.compiled and compiled.forward_module(zero_rows=True) is compiled.transformer
    for kinds in (["null", "class", "null"], ["zero", "class", "null"]):      # the second one runs eager
        torch.testing.assert_close(optimize(gen, compiled, kinds), optimize(gen, eager, kinds), rtol=1e-5, atol=1e-5)
    labels, gens = torch.tensor([4, 5]), lambda: unit_generators(0, 4, range(2), "sample")
    a = gen.sample(handle=compiled, labels=labels, generators=gens(), snapshot_steps=[]).latents
    b = gen.sample(handle=eager, labels=labels, generators=gens(), snapshot_steps=[]).latents
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bad_compile_mode_and_unknown_options_are_user_errors(tiny_world):
    with pytest.raises(UserError, match="compile=fast: use one of none, default, reduce-overhead"):
        load(tiny_world, compile="fast")
    with pytest.raises(UserError, match="unknown --gen-opt colour for dit; known: autocast, compile, num_heads"):
        load(tiny_world, colour="red")


def test_run_records_the_compile_mode(tiny_args, tmp_path):
    torch._dynamo.reset()
    assert main(["run", *tiny_args, "--gen-opt", "compile=aot_eager"]) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["generator"]["compile"] == "aot_eager" and m["config"]["gen_opt"] == ["compile=aot_eager"]
