"""Fused CLO kernels (cao2core.kernels): every backend against the plain-torch reference.

CPU: the C++ ops (built once per machine into the kernel cache: tens of seconds the first time), the Triton
kernels under the interpreter (subprocess, tiny shapes), the Triton kernels compiled ahead of time for sm_90 and the
CUDA kernels compiled with nvcc (no GPU needed). GPU tests are marked ``gpu``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cao2core.method import clo
from cao2core import kernels as K
from cao2core.kernels import _build, reference

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HAS_CXX = shutil.which(os.environ.get("CXX", "c++")) is not None or shutil.which("g++") is not None
needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="no C++ compiler on PATH: the C++ kernels cannot be built here")


@pytest.fixture(scope="module")
def cpp():
    """The C++ ops, built (or loaded from the cache) once; a build failure fails the tests that need it."""
    _build.load_cpu()
    return "cpp"


def make(shape, dtype=torch.float32, weight_shape=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(shape, generator=g) + 0.1       # random, never zero
    target = torch.randn(shape, generator=g) - 0.1
    w = None
    if weight_shape is not None:
        w = (torch.rand(weight_shape, generator=g) > 0.3).float() * (0.5 + torch.rand(weight_shape, generator=g))
        w.view(w.shape[0], -1)[:, 0] = 1.0             # every sample keeps an element
    pred, target = pred.to(device, dtype), target.to(device, dtype)
    return pred, target, (w.to(device) if w is not None else None)


def with_ties(shape, dtype=torch.float32, device="cpu"):
    """Errors in (-1, 1) plus exact ties of |e| = 2.5 at chosen positions (signs mixed), per sample:
    sample 0 unique max, sample 1 two ties (one negative), sample 2 four ties spread over the sample
    (across SIMD lanes, blocks and, for long samples, chunks), sample 3 all errors zero."""
    B, N = shape[0], int(torch.tensor(shape[1:]).prod())
    g = torch.Generator().manual_seed(3)
    target = (torch.randint(-8, 8, (B, N), generator=g).float() / 4)          # exact in bf16/fp16
    e = (torch.randint(-3, 4, (B, N), generator=g).float() / 4)                 # |e| <= 0.75
    pos = {0: [(N // 3, 1)], 1: [(1, 1), (N - 1, -1)], 2: [(0, -1), (7, 1), (N // 2, 1), (N - 2, -1)]}
    for b, lst in pos.items():
        for i, s in lst:
            e[b % B, i % N] = 2.5 * s
    if B > 3:
        e[3] = 0.0
    pred = target + e
    return (pred.reshape(shape).to(device, dtype), target.reshape(shape).to(device, dtype))


def check_against_reference(backend, pred, target, lam, weight, loss_tol=None, target_grad=True):
    p1 = pred.clone().requires_grad_()
    t1 = target.clone().requires_grad_(target_grad)
    p2 = pred.clone().requires_grad_()
    t2 = target.clone().requires_grad_(target_grad)
    ours = K.clo_loss(p1, t1, lam, weight, backend=backend)
    ref = reference.clo_loss(p2, t2, lam, weight)
    assert ours.dtype == torch.float32 and ours.shape == (pred.shape[0],)
    torch.testing.assert_close(ours, ref, **(loss_tol or dict(rtol=1e-5, atol=1e-5)))
    gl = torch.rand(pred.shape[0], generator=torch.Generator().manual_seed(9)).to(pred.device) + 0.5
    grads1 = torch.autograd.grad((ours * gl).sum(), [p1, t1] if target_grad else [p1])
    grads2 = torch.autograd.grad((ref * gl).sum(), [p2, t2] if target_grad else [p2])
    for a, b in zip(grads1, grads2):
        assert a.dtype == b.dtype == pred.dtype
        torch.testing.assert_close(a, b)


def poisoned_call(backend, pred, target, lam, weight):
    """Low-level forward and backward into NaN-filled outputs: every element must be written, and right."""
    B = pred.shape[0]
    p2, t2 = pred.reshape(B, -1), target.reshape(B, -1)
    wpat = K.weight_pattern(weight, pred.shape) if weight is not None else None
    dev = pred.device
    out = (torch.full((B,), float("nan"), device=dev), torch.full((B,), float("nan"), device=dev),
           torch.full((B,), -777, dtype=torch.int64, device=dev), torch.full((B,), -777, dtype=torch.int64, device=dev),
           torch.full((B,), float("nan"), device=dev))
    K.clo_forward(p2, t2, 10.0, wpat, backend, out=out)
    loss, maxv, count, argmax, denom = out
    rm, rc, ra, rd = reference.clo_stats(pred.cpu(), target.cpu(), weight.cpu() if weight is not None else None)
    torch.testing.assert_close(loss.cpu(), reference.clo_loss(pred, target, 10.0, weight).cpu(), rtol=1e-5, atol=1e-5)
    assert torch.equal(maxv.cpu(), rm) and torch.equal(count.cpu(), rc) and torch.equal(argmax.cpu(), ra)
    torch.testing.assert_close(denom.cpu(), rd)
    grad = torch.full_like(p2, float("nan"))
    gl = torch.ones(B, device=dev)
    K.clo_backward(gl, p2, t2, 10.0, wpat, (maxv, count, argmax, denom), backend, out=grad)
    assert torch.isfinite(grad).all()
    p = pred.clone().requires_grad_()
    ref_grad, = torch.autograd.grad(reference.clo_loss(p, target, 10.0, weight).sum(), p)
    torch.testing.assert_close(grad.reshape(pred.shape), ref_grad)


# --------------------------------------------------------------------------------------------- reference

@pytest.mark.parametrize("weighted", [False, True])
def test_reference_is_the_clo_loss_of_cao2core_clo(weighted):
    pred, target, w = make((4, 4, 6, 6), weight_shape=(4, 1, 6, 6) if weighted else None)
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    a, b = reference.clo_loss(p1, target, 10.0, w), clo.clo_loss(p2, target, 10.0, w)
    assert torch.equal(a, b)
    assert torch.equal(torch.autograd.grad(a.sum(), p1)[0], torch.autograd.grad(b.sum(), p2)[0])


@pytest.mark.parametrize("shape,wshape", [((3, 4, 5, 6), (3, 1, 5, 6)), ((3, 4, 5, 6), (3, 4, 5, 6)),
                                          ((2, 7, 5), (2, 7, 1)), ((3, 4, 5, 6), (1, 4, 1, 1)),
                                          ((3, 4, 5, 6), (4, 1, 6)), ((3, 4, 1, 6), (3, 1, 1, 6)),
                                          ((3, 4, 5, 6), ()), ((3, 4, 5, 6), (3, 1, 1, 1))])
def test_weight_pattern_indexes_the_broadcast_weight(shape, wshape):
    w = torch.rand(wshape) if wshape else torch.tensor(0.7)
    compact, inner, mid, wbs = K.weight_pattern(w, shape)
    B, N = shape[0], int(torch.tensor(shape[1:]).prod())
    i = torch.arange(N)
    idx = torch.arange(B)[:, None] * wbs + (i[None, :] // inner) % mid
    assert torch.equal(compact.view(-1)[idx], torch.broadcast_to(w, shape).reshape(B, N))
    assert compact.numel() <= B * N


# --------------------------------------------------------------------------------------------- C++

CPP_CASES = [((4, 4, 8, 8), None), ((4, 4, 8, 8), (4, 1, 8, 8)), ((4, 4, 8, 8), (1, 4, 1, 8)),
             ((3, 16, 7), (3, 16, 1)), ((5, 33), (5, 33)), ((2, 1), None), ((2, 3, 80, 80), (2, 1, 80, 80))]


@needs_cxx
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape,wshape", CPP_CASES)
def test_cpp_loss_and_grad_match_reference(cpp, shape, wshape, dtype):
    pred, target, w = make(shape, dtype, wshape)
    check_against_reference(cpp, pred, target, 10.0, w)


@needs_cxx
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape,wshape", [((4, 4, 8, 8), None), ((3, 16, 7), (3, 16, 1)),
                                          ((2, 3, 80, 80), (2, 1, 80, 80))])
def test_cpp_writes_every_output(cpp, shape, wshape, dtype):
    pred, target, w = make(shape, dtype, wshape, seed=1)
    poisoned_call(cpp, pred, target, 10.0, w)


@needs_cxx
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", [(4, 4, 8, 8), (4, 2, 100, 100)])   # the second spans two chunks
def test_cpp_ties_share_the_gradient_like_amax(cpp, shape, dtype):
    pred, target = with_ties(shape, dtype)
    n = pred[0].numel()
    rm, rc, ra, _ = reference.clo_stats(pred, target)
    assert rc.tolist() == [1, 2, 4, n] and rm[3] == 0     # sample 3: every element ties at 0 (sign(0) = 0)
    poisoned_call(cpp, pred, target, 10.0, None)
    check_against_reference(cpp, pred, target, 10.0, None)
    # a masked-out element does not tie: sample 1 keeps one of its two maxima
    w = torch.ones(shape)
    w.view(shape[0], -1)[1, 1] = 0.0
    assert reference.clo_stats(pred, target, w)[1].tolist() == [1, 1, 4, n]
    poisoned_call(cpp, pred, target, 10.0, w)
    check_against_reference(cpp, pred, target, 10.0, w)


@needs_cxx
def test_cpp_edge_samples(cpp):
    pred, target, _ = make((3, 2, 5, 5))
    w = torch.ones(3, 1, 5, 5)
    w[1] = 0.0                       # nothing selected: mse 0/1e-12 -> 0, max 0
    w[2, 0, :2] = -0.5               # negative weights count in the mean, never in the max
    check_against_reference(cpp, pred, target, 10.0, w)
    poisoned_call(cpp, pred, target, 10.0, w)


@needs_cxx
def test_cpp_nan_propagates_like_the_reference(cpp):
    pred, target, _ = make((3, 4, 8))
    pred[1, 2, 3] = float("nan")
    p1, p2 = pred.clone().requires_grad_(), pred.clone().requires_grad_()
    ours, ref = K.clo_loss(p1, target, 10.0, backend=cpp), reference.clo_loss(p2, target, 10.0)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref)) and torch.isnan(ours).tolist() == [False, True, False]
    g1, = torch.autograd.grad(ours.sum(), p1)
    g2, = torch.autograd.grad(ref.sum(), p2)
    assert torch.equal(torch.isnan(g1), torch.isnan(g2))
    torch.testing.assert_close(g1[[0, 2]], g2[[0, 2]])


@needs_cxx
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_cpp_adam_matches_torch_adam(cpp, weight_decay):
    g = torch.Generator().manual_seed(5)
    z0 = torch.randn(16, 4, 8, 8, generator=g)
    ours, theirs = z0.clone().requires_grad_(), z0.clone().requires_grad_()
    opt1 = K.LatentAdam([ours], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay, backend=cpp)
    opt2 = torch.optim.Adam([theirs], lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=weight_decay)
    for _ in range(6):
        grad = torch.randn(z0.shape, generator=g)
        opt1.zero_grad(set_to_none=True)
        opt2.zero_grad(set_to_none=True)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt1.step()
        opt2.step()
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt1.state[ours][key], opt2.state[theirs][key], rtol=1e-5, atol=1e-7)
        assert float(opt1.state[ours]["step"]) == float(opt2.state[theirs]["step"])


@needs_cxx
def test_cpp_adam_step_updates_in_place(cpp):
    g = torch.Generator().manual_seed(6)
    p, grad = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    m, v = torch.randn(1000, generator=g) * 0.1, torch.rand(1000, generator=g) * 0.01
    ref = [x.clone() for x in (p, m, v)]
    ptrs = [x.data_ptr() for x in (p, m, v)]
    K.adam_step(p, grad, m, v, 7, 3e-3, 0.8, 0.95, 1e-6, 0.1, backend=cpp)
    reference.adam_step(ref[0], grad, ref[1], ref[2], 7, 3e-3, 0.8, 0.95, 1e-6, 0.1)
    assert [x.data_ptr() for x in (p, m, v)] == ptrs
    for a, b in zip((p, m, v), ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@needs_cxx
def test_clo_loop_with_fused_kernels_matches_plain_torch(cpp):
    """A few CLO iterations (loss summed over the batch, Adam on the latents): fused == torch.optim.Adam + reference."""
    g = torch.Generator().manual_seed(7)
    z0, target = torch.randn(8, 4, 8, 8, generator=g), torch.randn(8, 4, 8, 8, generator=g)
    a, b = z0.clone().requires_grad_(), z0.clone().requires_grad_()
    oa, ob = K.LatentAdam([a], lr=6e-2, backend=cpp), torch.optim.Adam([b], lr=6e-2)
    for _ in range(5):
        for z, o, f in ((a, oa, lambda p: K.clo_loss(p, target, 10.0, backend=cpp)),
                        (b, ob, lambda p: reference.clo_loss(p, target, 10.0))):
            o.zero_grad(set_to_none=True)
            f(torch.tanh(z) * 2).sum().backward()
            o.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- LatentAdam, dispatch

def test_latent_adam_torch_backend_is_torch_adam_bitwise():
    g = torch.Generator().manual_seed(8)
    z0 = torch.randn(4, 3, 5, generator=g)
    a, b = z0.clone().requires_grad_(), z0.clone().requires_grad_()
    oa, ob = K.LatentAdam([a], lr=1e-2, weight_decay=0.01, backend="torch"), torch.optim.Adam([b], lr=1e-2,
                                                                                                weight_decay=0.01)
    for _ in range(4):
        grad = torch.randn(z0.shape, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        oa.step()
        ob.step()
    assert torch.equal(a, b)
    oa.zero_grad(set_to_none=True)
    assert a.grad is None
    # same state layout: torch.optim.Adam's state loads into LatentAdam
    oc = K.LatentAdam([c := z0.clone().requires_grad_()], lr=1e-2, weight_decay=0.01, backend="torch")
    oc.load_state_dict(ob.state_dict())
    assert torch.equal(oc.state[c]["exp_avg"], ob.state[b]["exp_avg"])


def test_dispatch_rules(monkeypatch):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError):
        K.resolve("fastest", "cpu")
    assert K.resolve("torch", "cpu") == "torch"
    with pytest.raises(K.KernelUnavailable):
        K.resolve("cuda", "cpu")
    with pytest.raises(K.KernelUnavailable, match="interpreter"):
        K.resolve("triton", "cpu")
    monkeypatch.setenv(K.ENV_VAR, "torch")
    assert K.resolve("auto", "cpu") == "torch"
    monkeypatch.setenv(K.ENV_VAR, "cuda")              # the variable forces: an impossible choice is an error
    with pytest.raises(K.KernelUnavailable):
        K.clo_loss(torch.ones(2, 3), torch.zeros(2, 3), 1.0)
    monkeypatch.setenv(K.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=K.ENV_VAR):
        K.resolve("auto", "cpu")
    monkeypatch.setenv(K.ENV_VAR, "bogus")
    assert K.resolve("torch", "cpu") == "torch"       # an explicit backend is not overridden


@needs_cxx
def test_auto_picks_cpp_on_cpu(cpp, monkeypatch):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    assert K.resolve("auto", "cpu") == "cpp"
    monkeypatch.setenv(K.ENV_VAR, "auto")
    assert K.resolve("auto", torch.device("cpu")) == "cpp"


def test_auto_falls_back_with_one_warning_when_nothing_builds(monkeypatch):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    monkeypatch.setitem(_build._STATE, "cpu", RuntimeError("cao2 C++ kernels unavailable: simulated"))
    monkeypatch.setattr(K, "_WARNED", set())
    pred, target, w = make((3, 4, 5), weight_shape=(3, 4, 1))
    with pytest.warns(RuntimeWarning, match="plain-torch reference"):
        assert K.resolve("auto", "cpu") == "torch"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = K.clo_loss(pred, target, 10.0, w)                          # warned once already
        z = torch.zeros(3)
        K.adam_step(z, torch.ones(3), torch.zeros(3), torch.zeros(3), 1, 0.1)
    assert torch.equal(out, reference.clo_loss(pred, target, 10.0, w))
    with pytest.raises(K.KernelUnavailable, match="simulated"):
        K.clo_loss(pred, target, 10.0, w, backend="cpp")


@needs_cxx
def test_unsupported_inputs_fall_back_under_auto_and_fail_when_forced(cpp, monkeypatch):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    p = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    # float64 loss: computed in float32 like the reference (its first step is .float())
    check_against_reference("cpp", p.detach(), torch.randn(4, 6, dtype=torch.float64), 10.0, None)
    # a weight that requires grad: only the reference differentiates w.r.t. it
    w = torch.rand(4, 6, requires_grad=True)
    K.clo_loss(p, torch.zeros(4, 6), 1.0, w).sum().backward()
    assert w.grad is not None
    with pytest.raises(K.KernelUnavailable):
        K.clo_loss(p, torch.zeros(4, 6), 1.0, w, backend="cpp")
    # float64 Adam: the reference under auto, an error when forced
    z, grad = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    ref = z.clone()
    K.adam_step(z, grad, torch.zeros_like(z), torch.zeros_like(z), 1, 0.1)
    reference.adam_step(ref, grad, torch.zeros_like(ref), torch.zeros_like(ref), 1, 0.1)
    assert torch.equal(z, ref)
    with pytest.raises(K.KernelUnavailable):
        K.adam_step(z, grad, torch.zeros_like(z), torch.zeros_like(z), 1, 0.1, backend="cpp")


# --------------------------------------------------------------------------------------------- Triton

TRITON_SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"          # before triton sees any kernel
    import torch
    sys_path = os.environ["CAO2_TEST_DIR"]
    import sys; sys.path.insert(0, sys_path)
    from test_kernels import make, with_ties, check_against_reference, poisoned_call
    from cao2core import kernels as K
    from cao2core.kernels import reference
    assert K.resolve("triton", "cpu") == "triton"
    for shape, dtype, wshape in [((3, 4, 4, 4), torch.float32, None), ((2, 6, 5), torch.bfloat16, (2, 6, 1)),
                                 ((2, 3, 4, 4), torch.float16, (2, 1, 4, 4)), ((2, 40), torch.float32, (2, 40))]:
        pred, target, w = make(shape, dtype, wshape)
        check_against_reference("triton", pred, target, 10.0, w)
        poisoned_call("triton", pred, target, 10.0, w)
    for dtype in (torch.float32, torch.bfloat16):
        pred, target = with_ties((4, 2, 5, 5), dtype)
        check_against_reference("triton", pred, target, 10.0, None)
        poisoned_call("triton", pred, target, 10.0, None)
    for wd in (0.0, 0.1):
        z0 = torch.randn(3, 50)
        a, b = z0.clone().requires_grad_(), z0.clone().requires_grad_()
        oa = K.LatentAdam([a], lr=1e-2, weight_decay=wd, backend="triton")
        ob = torch.optim.Adam([b], lr=1e-2, weight_decay=wd)
        for _ in range(3):
            grad = torch.randn(z0.shape)
            a.grad, b.grad = grad.clone(), grad.clone()
            oa.step(); ob.step()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    print("TRITON-INTERPRETER-OK")
""")


def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "CAO2_TEST_DIR": str(Path(__file__).parent), "TRITON_INTERPRET": "1"}
    env.pop(K.ENV_VAR, None)
    r = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], env=env, capture_output=True, text=True, timeout=600,
                       cwd=ROOT)
    assert r.returncode == 0 and "TRITON-INTERPRETER-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-6000:]


def test_triton_kernels_compile_for_sm90_without_a_gpu():
    """Ahead-of-time compilation to a cubin catches type errors the interpreter lets through."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 in this process: the kernels are interpreter kernels")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from cao2core.kernels import _triton as KT
    target = GPUTarget("cuda", 90, 32)
    common = {"W": "*fp32", "N": "i64", "inner": "i64", "mid": "i64", "wbstride": "i64", "lam": "fp32"}
    fwd = {"P": "*bf16", "T": "*bf16", "LOSS": "*fp32", "MAXV": "*fp32", "COUNT": "*i64", "ARGMAX": "*i64",
           "DENOM": "*fp32", "Nf": "fp32", **common}
    bwd = {"G": "*fp32", "P": "*fp16", "T": "*fp16", "MAXV": "*fp32", "COUNT": "*i64", "ARGMAX": "*i64",
           "DENOM": "*fp32", "OUT": "*fp16", **common}
    adam = {"P": "*fp32", "G": "*fp32", "M": "*fp32", "V": "*fp32", "n": "i64", **{k: "fp32" for k in (
        "beta1_w", "beta2", "one_minus_beta2", "eps", "weight_decay", "neg_step_size", "bc2_sqrt")}}
    jobs = [(KT._clo_fwd_kernel, fwd, {"HAS_W": True, "BLOCK": 1024}),
            (KT._clo_bwd_kernel, bwd, {"HAS_W": True, "RNE_BF16": False, "BLOCK": 1024}),
            (KT._adam_kernel, adam, {"HAS_WD": True, "SMALL_W": True, "BLOCK": 1024})]
    for fn, sig, consts in jobs:
        sig = {name: sig.get(name, "constexpr") for name in fn.arg_names}
        kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target)
        assert kernel.asm["cubin"]


# --------------------------------------------------------------------------------------------- CUDA

def test_cuda_kernels_compile_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH: the CUDA kernels cannot be compiled here")
    cmd = [nvcc, "-c", "-std=c++17", "-O3", "-fmad=false", "-arch=sm_90", "-I", str(ROOT / "csrc"),
           str(ROOT / "csrc" / "clo_cuda_kernels.cu"), "-o", str(tmp_path / "clo_cuda_kernels.o")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert (tmp_path / "clo_cuda_kernels.o").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CAO2_TEST_CUDA_BUILD") != "1",
                    reason="builds the whole CUDA extension (minutes): set CAO2_TEST_CUDA_BUILD=1")
def test_cuda_extension_builds_and_loads(tmp_path):
    code = ("from cao2core.kernels import _build; _build.load_cuda(); import torch; "
            "assert torch.ops.cao2.clo_fwd is not None; print('CUDA-EXT-OK')")
    env = {**os.environ, "CAO2_KERNELS_CACHE": str(tmp_path)}
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=1800)
    assert "CUDA-EXT-OK" in r.stdout, r.stderr[-6000:]


# --------------------------------------------------------------------------------------------- GPU

@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape,wshape", [((64, 4, 32, 32), None), ((64, 4, 32, 32), (64, 1, 32, 32)),
                                          ((32, 256, 16), (32, 256, 1)), ((3, 2, 120, 120), (3, 2, 120, 120))])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_loss_and_grad_match_reference(backend, shape, wshape, dtype):
    pred, target, w = make(shape, dtype, wshape, device="cuda")
    check_against_reference(backend, pred, target, 10.0, w)
    poisoned_call(backend, pred, target, 10.0, w)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("shape", [(4, 4, 8, 8), (4, 2, 100, 100)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_ties(backend, shape):
    pred, target = with_ties(shape, device="cuda")
    check_against_reference(backend, pred, target, 10.0, None)
    poisoned_call(backend, pred, target, 10.0, None)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_adam_matches_torch_adam(backend, weight_decay):
    g = torch.Generator().manual_seed(5)
    z0 = torch.randn(64, 4, 32, 32, generator=g).cuda()
    a, b = z0.clone().requires_grad_(), z0.clone().requires_grad_()
    oa = K.LatentAdam([a], lr=1e-2, weight_decay=weight_decay, backend=backend)
    ob = torch.optim.Adam([b], lr=1e-2, weight_decay=weight_decay)
    for _ in range(5):
        grad = torch.randn(z0.shape, generator=g).cuda()
        a.grad, b.grad = grad.clone(), grad.clone()
        oa.step()
        ob.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_auto_prefers_triton_then_cuda(monkeypatch):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    assert K.resolve("auto", "cuda") in ("triton", "cuda")
