"""DiT under ``--gen-opt autocast``: bf16 compute in the transformer, fp32 weights, latents, outputs and gradients.

CPU autocast supports bf16, so all of this runs without a GPU. Tolerance: bf16 keeps 8 significant bits
(unit roundoff 2^-9 = 0.2%); through the tiny DiT's one block the relative L2 error of predictions, sampled
latents and latent gradients measures 0.5-0.8%, so ``REL_TOL`` = 3% leaves room without admitting a wrong result.
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

CPU = torch.device("cpu")
REL_TOL = 3e-2
LABELS = torch.tensor([1, 2, 3])


def load(world, autocast=None):
    options = {"model": str(world), "sample_steps": 3, **({"autocast": autocast} if autocast else {})}
    gen = Host().generator("dit")
    return gen, gen.load(options=options, device=CPU)


def rel_err(ref: torch.Tensor, x: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm()).item()


def predict(gen, handle, requires_grad=False):
    """(prediction, gradient of the squared error w.r.t. the fp32 latents) on fixed random inputs."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(3, 4, 8, 8, generator=g).requires_grad_(requires_grad)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    corrupted = gen.corrupt(handle=handle, latents=z, levels=torch.tensor([10, 100, 224]), noise=noise,
                            generators=[], level_max=224)
    condition = gen.condition(handle=handle, labels=LABELS, kinds=["class", "null", "zero"])
    p = gen.predict(handle=handle, corrupted=corrupted, condition=condition)
    if requires_grad:
        (p.pred - p.target).square().sum().backward()
    return p.pred, z.grad


def sample(gen, handle):
    return gen.sample(handle=handle, labels=LABELS, generators=unit_generators(0, 1, range(3), "sample"),
                      snapshot_steps=[]).latents


def linear_output_dtypes(handle):
    seen = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for m in handle.transformer.modules() if isinstance(m, torch.nn.Linear)]
    return seen, hooks


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_linear_layers_compute_in_half_while_outputs_stay_fp32(tiny_world, name, dtype):
    gen, handle = load(tiny_world, name)
    assert handle.transformer.dtype == torch.float32          # weights keep --dtype
    assert gen.describe(handle=handle)["autocast"] == str(dtype).removeprefix("torch.")
    seen, hooks = linear_output_dtypes(handle)
    pred, _ = predict(gen, handle)
    assert seen == {dtype} and pred.dtype == torch.float32
    seen.clear()
    latents = sample(gen, handle)
    assert seen == {dtype} and latents.dtype == torch.float32
    for h in hooks:
        h.remove()


def test_default_is_fp32_and_unchanged(tiny_world):
    gen, handle = load(tiny_world)
    assert handle.autocast is None and gen.describe(handle=handle)["autocast"] is None
    seen, hooks = linear_output_dtypes(handle)
    predict(gen, handle)
    assert seen == {torch.float32}
    for h in hooks:
        h.remove()
    _, explicit = load(tiny_world, "none")
    assert torch.equal(sample(gen, handle), sample(gen, explicit))


def test_bf16_is_close_to_fp32_but_not_identical(tiny_world):
    gen, h32 = load(tiny_world)
    _, hbf = load(tiny_world, "bf16")
    for ref, x in ((predict(gen, h32)[0], predict(gen, hbf)[0]), (sample(gen, h32), sample(gen, hbf))):
        assert torch.isfinite(x).all() and not torch.equal(ref, x)
        assert rel_err(ref, x) < REL_TOL


def test_gradients_reach_fp32_latents_through_autocast(tiny_world):
    gen, h32 = load(tiny_world)
    _, hbf = load(tiny_world, "bf16")
    (_, g32), (_, gbf) = predict(gen, h32, requires_grad=True), predict(gen, hbf, requires_grad=True)
    assert gbf.dtype == torch.float32 and torch.isfinite(gbf).all() and not torch.equal(g32, gbf)
    assert rel_err(g32, gbf) < REL_TOL


def test_clo_under_autocast_moves_fp32_latents_like_fp32(tiny_world):
    gen, h32 = load(tiny_world)
    _, hbf = load(tiny_world, "bf16")
    z0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    settings = clo.CLOSettings(iters=2, level_max=224, kernels="torch")

    def run(handle):
        return clo.optimize(gen, handle, z0, LABELS, ["class"] * 3, unit_generators(0, 1, range(3), "clo-noise"),
                            unit_generators(0, 1, range(3), "clo-level"), settings)
    z32, zbf = run(h32), run(hbf)
    assert zbf.dtype == torch.float32 and torch.isfinite(zbf).all() and not torch.equal(zbf, z0)
    # Adam normalizes every element's step, so the few elements whose near-zero gradient bf16 rounding flips
    # move the other way (about 1% of them here); the displacement as a whole points the same way
    step32, stepbf = (z32 - z0).flatten(), (zbf - z0).flatten()
    assert torch.nn.functional.cosine_similarity(step32, stepbf, dim=0) > 0.99
    assert ((step32 - stepbf).abs() > 0.1 * step32.abs()).float().mean() < 0.05


@pytest.mark.parametrize("value", ["fp8", "float32", "BF16"])
def test_unknown_autocast_is_a_user_error(tiny_world, value):
    with pytest.raises(UserError, match=f"autocast={value}: use fp16, bf16 or none"):
        load(tiny_world, value)


def test_run_with_autocast_on_the_embedded_world(tmp_path):
    out = tmp_path / "amp"
    assert main(["run", "--gen-opt", "autocast=bf16", "--classes", "0,1", "--ipc", "1", "--pool-factor", "2",
                 "--clo-iters", "2", "--sample-steps", "4", "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["generator"]["autocast"] == "bfloat16" and m["generator"]["dtype"] == "float32"
    assert sorted(p.name for p in (out / "images").iterdir()) == ["0", "1"]
