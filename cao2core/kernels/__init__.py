"""Fused CLO kernels: the per-sample CLO loss (forward + backward) and the batched latent Adam step.

Backends (``BACKENDS``):

* ``torch``  -- the plain-torch reference (:mod:`cao2core.kernels.reference`); defines the semantics.
* ``cpp``    -- C++ CPU kernels from ``csrc/clo_cpu.cpp`` (``torch.ops.cao2.*``, parallel with at::parallel_for).
* ``cuda``   -- CUDA kernels from ``csrc/clo_cuda_kernels.cu`` (no torch headers) bound by ``csrc/clo_cuda.cpp``.
* ``triton`` -- Triton kernels (:mod:`cao2core.kernels._triton`) for CUDA tensors (CPU tensors only under
  ``TRITON_INTERPRET=1``, set before the first use).
* ``auto``   -- CUDA tensors: triton, else cuda, else torch; CPU tensors: cpp, else torch (with one warning).
  The environment variable ``CAO2_KERNELS`` (one of the names above) overrides ``auto``; a backend named
  there or passed explicitly that cannot run raises :class:`KernelUnavailable`.

Native code is taken from a library built by ``CAO2_BUILD_EXT=1 pip install -e . --no-build-isolation``, or
JIT-compiled with ninja on first use (see ``docs/kernels.md``).
"""
from __future__ import annotations

import math
import os
import re
import warnings

import torch
from torch.autograd.function import once_differentiable

from ..config import KERNEL_BACKENDS
from . import reference
from ._build import cache_dir  # noqa: F401  (re-exported for docs and tools)

__all__ = ["BACKENDS", "ENV_VAR", "KernelUnavailable", "resolve", "clo_loss", "adam_step", "LatentAdam",
           "weight_pattern", "clo_forward", "clo_backward", "reference"]

BACKENDS = KERNEL_BACKENDS      # the table of options lists them (no torch import for --help)
ENV_VAR = "CAO2_KERNELS"
_HALF_TYPES = (torch.float32, torch.bfloat16, torch.float16)
_WARNED: set[str] = set()


class KernelUnavailable(RuntimeError):
    """A backend was asked for (argument or CAO2_KERNELS) that cannot run here."""


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _builds(loader: str) -> tuple[bool, str]:
    """Whether the native extension behind ``_build.<loader>`` builds and loads (and why not)."""
    from . import _build
    try:
        getattr(_build, loader)()
    except RuntimeError as exc:
        return False, str(exc)
    return True, ""


def _usable(name: str, dev: torch.device) -> tuple[bool, str]:
    if name == "torch":
        return True, ""
    if name == "cpp":
        if dev.type != "cpu":
            return False, f"the C++ kernels take CPU tensors, not {dev.type}"
        return _builds("load_cpu")
    if name == "cuda":
        if dev.type != "cuda":
            return False, f"the CUDA kernels take CUDA tensors, not {dev.type}"
        if not torch.cuda.is_available():
            return False, "torch.cuda.is_available() is False"
        return _builds("load_cuda")
    if name == "triton":
        interp = os.environ.get("TRITON_INTERPRET", "") == "1"
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                return False, "torch.cuda.is_available() is False"
            if not interp and torch.cuda.get_device_capability(dev) < (7, 0):
                return False, "Triton needs a GPU of compute capability 7.0 or newer"
        elif not (dev.type == "cpu" and interp):
            return False, (f"Triton runs on {dev.type} tensors only under its interpreter "
                           "(TRITON_INTERPRET=1 set before the kernels are first used)")
        try:
            from . import _triton  # noqa: F401
        except Exception as exc:  # noqa: BLE001  (ImportError, or a broken triton install)
            return False, f"triton unavailable: {type(exc).__name__}: {exc}"
        return True, ""
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def _resolve(backend: str, device) -> tuple[str, bool]:
    """(backend name, forced?) for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
    dev = torch.device(device)
    forced = backend != "auto"
    if not forced:
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"{ENV_VAR}={env!r}: expected one of {BACKENDS}")
            backend, forced = env, True
    if forced:
        ok, why = _usable(backend, dev)
        if not ok:
            raise KernelUnavailable(f"kernel backend {backend!r} cannot run on {dev.type} tensors here: {why}")
        return backend, True
    order = ("triton", "cuda") if dev.type == "cuda" else ("cpp",) if dev.type == "cpu" else ()
    reasons = []
    for name in order:
        ok, why = _usable(name, dev)
        if ok:
            return name, False
        reasons.append(f"{name}: {why}")
    if reasons:
        _warn_once(f"fallback-{dev.type}", "cao2 kernels: no native backend for " + dev.type + " tensors ("
                   + "; ".join(reasons) + "); using the plain-torch reference")
    return "torch", False


def resolve(backend: str = "auto", device="cpu") -> str:
    """The backend that ``backend`` means for tensors on ``device`` (builds the native code if needed).

    ``auto``: triton for CUDA tensors where Triton runs, else cuda, else cpp for CPU tensors, else torch;
    ``CAO2_KERNELS`` overrides ``auto``. A named backend that cannot run raises KernelUnavailable.
    """
    return _resolve(backend, device)[0]


# --------------------------------------------------------------------------------------------- CLO loss

def weight_pattern(weight: torch.Tensor, shape) -> tuple[torch.Tensor, int, int, int]:
    """Compact form of a weight broadcastable to ``shape`` = (B, ...): (w, inner, mid, wbstride).

    Element i (flat index inside sample b) has weight ``w.view(-1)[b * wbstride + (i // inner) % mid]``, with w
    a contiguous float32 tensor of (1 or B) x mid values. Weights repeated over leading dims ((B,1,H,W) for a
    (B,C,H,W) prediction), over trailing dims ((B,N,1) token masks) or over the batch stay compact; any other
    broadcast is materialized to (B, N).
    """
    shape = tuple(int(s) for s in shape)
    if tuple(torch.broadcast_shapes(tuple(weight.shape), shape)) != shape:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not broadcast to {shape}")
    w = weight.detach().float()
    B, N = shape[0], math.prod(shape[1:])
    ws = (1,) * (len(shape) - w.dim()) + tuple(w.shape)
    w = w.reshape(ws)
    kinds = "".join("F" if ws[k] == shape[k] else "R" for k in range(1, len(shape)) if shape[k] != 1)
    m = re.fullmatch(r"(R*)(F*)(R*)", kinds)
    if m is not None:
        dims = [shape[k] for k in range(1, len(shape)) if shape[k] != 1]
        lead, full = len(m.group(1)), len(m.group(2))
        mid = math.prod(dims[lead:lead + full])
        inner = math.prod(dims[lead + full:])
        compact = w[(slice(None),) + tuple(slice(None) if ws[k] != 1 else 0 for k in range(1, len(shape)))]
    else:
        inner, mid = 1, N
        compact = torch.broadcast_to(w, (ws[0],) + shape[1:])
    compact = compact.reshape(ws[0], mid).contiguous()
    wbstride = mid if (ws[0] == B and B > 1) else 0
    return compact, inner, mid, wbstride


def _native(backend: str):
    if backend == "triton":
        from . import _triton
        return _triton.clo_fwd, _triton.clo_bwd
    from . import _build
    if backend == "cuda":
        _build.load_cuda()
    elif backend == "cpp":
        _build.load_cpu()
    else:
        raise ValueError(f"not a native kernel backend: {backend!r}")
    return torch.ops.cao2.clo_fwd, torch.ops.cao2.clo_bwd


def clo_forward(pred2d: torch.Tensor, target2d: torch.Tensor, lam: float, wpat=None, backend: str = "cpp",
                out=None):
    """Low-level forward on (B, N) contiguous tensors of one dtype: (loss, maxv, count, argmax, denom).

    ``wpat`` is :func:`weight_pattern`'s result or None; ``out`` optional preallocated outputs in that order
    (the tests poison them). ``backend`` must be a concrete native backend (cpp, cuda or triton).
    """
    B = pred2d.shape[0]
    dev = pred2d.device
    if out is None:
        f = torch.empty((2, B), device=dev, dtype=torch.float32)   # saved statistics share two buffers
        i = torch.empty((2, B), device=dev, dtype=torch.int64)
        out = (torch.empty(B, device=dev, dtype=torch.float32), f[0], i[0], i[1], f[1])
    w, inner, mid, wbs = wpat if wpat is not None else (None, 1, 1, 0)
    fwd, _ = _native(backend)
    fwd(pred2d, target2d, w, float(lam), inner, mid, wbs, *out)
    return out


def clo_backward(grad_loss: torch.Tensor, pred2d: torch.Tensor, target2d: torch.Tensor, lam: float, wpat, stats,
                 backend: str = "cpp", out: torch.Tensor | None = None) -> torch.Tensor:
    """Low-level backward: d(sum_b grad_loss[b] * loss[b]) / d pred2d, in pred2d's dtype (one pass)."""
    if out is None:
        out = torch.empty_like(pred2d)
    w, inner, mid, wbs = wpat if wpat is not None else (None, 1, 1, 0)
    maxv, count, argmax, denom = stats
    _, bwd = _native(backend)
    g = grad_loss.detach().to(torch.float32).contiguous()
    bwd(g, pred2d, target2d, w, float(lam), inner, mid, wbs, maxv, count, argmax, denom, out)
    return out


_CUDA_GRID_Y = 65535   # the CUDA and Triton backward grids put samples on grid dimension y


class _CLOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p2, t2, lam, wpat, backend):
        if backend in ("triton", "cuda") and p2.shape[0] > _CUDA_GRID_Y:
            parts = [_CLOLoss._fwd_rows(p2, t2, lam, wpat, backend, s) for s in range(0, p2.shape[0], _CUDA_GRID_Y)]
            stats = tuple(torch.cat(x) for x in zip(*parts))
        else:
            stats = clo_forward(p2, t2, lam, wpat, backend)
        loss, maxv, count, argmax, denom = stats
        w = wpat[0] if wpat is not None else None
        ctx.save_for_backward(p2, t2, w, maxv, count, argmax, denom)
        ctx.lam, ctx.backend = lam, backend
        ctx.pat = wpat[1:] if wpat is not None else None
        return loss

    @staticmethod
    def _fwd_rows(p2, t2, lam, wpat, backend, s):
        e = s + _CUDA_GRID_Y
        if wpat is not None and wpat[3] != 0:
            wpat = (wpat[0][s:e],) + tuple(wpat[1:])
        return clo_forward(p2[s:e], t2[s:e], lam, wpat, backend)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        p2, t2, w, maxv, count, argmax, denom = ctx.saved_tensors
        wpat = (w,) + ctx.pat if w is not None else None
        grad = torch.empty_like(p2)
        B = p2.shape[0]
        step = _CUDA_GRID_Y if ctx.backend in ("triton", "cuda") else max(B, 1)
        for s in range(0, B, step):
            e = s + step
            wp = wpat
            if wp is not None and wp[3] != 0:
                wp = (wp[0][s:e],) + tuple(wp[1:])
            clo_backward(grad_loss[s:e], p2[s:e], t2[s:e], ctx.lam, wp,
                         (maxv[s:e], count[s:e], argmax[s:e], denom[s:e]), ctx.backend, out=grad[s:e])
        grad_t = grad.neg() if ctx.needs_input_grad[1] else None
        return (grad if ctx.needs_input_grad[0] else None), grad_t, None, None, None


def clo_loss(pred: torch.Tensor, target: torch.Tensor, lam: float, weight: torch.Tensor | None = None,
             backend: str = "auto") -> torch.Tensor:
    """Per-sample CLO loss (B,) float32: sum(w e^2)/sum(w) + lam * max_{w>0} |e|, e = pred - target.

    Autograd-capable (gradients w.r.t. pred and target; a weight that requires grad is only supported by the
    ``torch`` backend). Equal to :func:`cao2core.kernels.reference.clo_loss` for every backend; tied maxima
    share the L-infinity gradient equally (torch.amax's rule).
    """
    name, forced = _resolve(backend, pred.device)
    if name == "torch":
        return reference.clo_loss(pred, target, lam, weight)
    why = None
    if pred.shape != target.shape:
        why = f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape"
    elif pred.dim() < 2 or pred.numel() == 0:
        why = f"needs a non-empty (B, ...) tensor with at least 2 dims, got {tuple(pred.shape)}"
    elif target.device != pred.device or (weight is not None and weight.device != pred.device):
        why = "pred, target and weight must be on one device"
    elif weight is not None and weight.requires_grad and torch.is_grad_enabled():
        why = "a weight that requires grad (only the torch backend differentiates w.r.t. the weight)"
    if why is not None:
        if forced:
            raise KernelUnavailable(f"kernel backend {name!r}: {why}")
        return reference.clo_loss(pred, target, lam, weight)
    if pred.dtype == target.dtype and pred.dtype in _HALF_TYPES:
        p, t = pred, target
    else:  # mixed or other dtypes: the reference's own first step is to compute in float32
        p, t = pred.float(), target.float()
    B = p.shape[0]
    p2 = p.reshape(B, -1).contiguous()
    t2 = t.reshape(B, -1).contiguous()
    wpat = weight_pattern(weight, pred.shape) if weight is not None else None
    return _CLOLoss.apply(p2, t2, float(lam), wpat, name)


# --------------------------------------------------------------------------------------------- Adam

def adam_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
              lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
              backend: str = "auto") -> None:
    """One torch.optim.Adam step in place on param, exp_avg and exp_avg_sq (``step`` counts from 1).

    Native backends take contiguous float32 tensors of one shape and device; under ``auto`` anything else runs
    the reference, a named backend raises.
    """
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    name, forced = _resolve(backend, param.device)
    if name != "torch":
        if grad.dtype == param.dtype and not grad.is_contiguous():
            grad = grad.contiguous()
        ts = (param, grad, exp_avg, exp_avg_sq)
        if not all(t.dtype == torch.float32 and t.is_contiguous() and t.shape == param.shape
                   and t.device == param.device for t in ts):
            if forced:
                raise KernelUnavailable(f"kernel backend {name!r}: adam_step takes contiguous float32 tensors of "
                                        "one shape and device")
            name = "torch"
    if name == "torch":
        reference.adam_step(param, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, eps, weight_decay)
        return
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    bc2_sqrt = bias_correction2 ** 0.5
    args = (float(beta1), float(beta2), float(eps), float(weight_decay), float(step_size), float(bc2_sqrt))
    if name == "triton":
        from . import _triton
        _triton.adam_step(param.detach(), grad.detach(), exp_avg, exp_avg_sq, *args)
    else:
        with torch.no_grad():
            torch.ops.cao2.adam_step(param.detach(), grad.detach(), exp_avg, exp_avg_sq, *args)


class LatentAdam(torch.optim.Optimizer):
    """torch.optim.Adam (L2 weight decay, no amsgrad) whose update runs the fused kernel of ``backend``.

    Same state layout as torch.optim.Adam (``step`` as a float32 CPU tensor, ``exp_avg``, ``exp_avg_sq``), so
    the engine can swap one for the other; meant for the CLO latents (one tensor) but takes any float params.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, backend: str = "auto"):
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid betas: {betas}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown kernel backend {backend!r}; expected one of {BACKENDS}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, backend=backend))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LatentAdam does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                adam_step(p, p.grad, state["exp_avg"], state["exp_avg_sq"], int(state["step"].item()), group["lr"],
                          beta1, beta2, group["eps"], group["weight_decay"], backend=group["backend"])
        return loss
