"""Triton kernels (CUDA tensors; CPU tensors only under the interpreter, ``TRITON_INTERPRET=1`` set before this
module is imported). Same semantics and saved statistics as the C++/CUDA kernels; see ``clo_common.h``.

Forward: one program per sample, looping over the sample in BLOCK-wide steps; every lane keeps its own running
max / tie count / first index, reduced across lanes at the end (no reduction inside the loop). Backward: a 2-D grid
(element blocks x samples), one pass that writes the whole gradient. Divisions and square roots use the
IEEE-rounded forms (div_rn, sqrt_rn) as torch's kernels do.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"   # read by @triton.jit at import time, as here


@triton.jit
def _clo_fwd_kernel(P, T, W, LOSS, MAXV, COUNT, ARGMAX, DENOM, N, Nf, inner, mid, wbstride, lam,
                    HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = b * N
    lanes = tl.arange(0, BLOCK)
    sq = tl.zeros([BLOCK], dtype=tl.float32)
    ws = tl.zeros([BLOCK], dtype=tl.float32)
    mv = tl.full([BLOCK], -1.0, tl.float32)
    cnt = tl.zeros([BLOCK], dtype=tl.int32)
    arg = tl.full([BLOCK], -1, tl.int64)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, N, BLOCK):
        offs = start + lanes.to(tl.int64)
        valid = offs < N
        p = tl.load(P + base + offs, mask=valid, other=0.0).to(tl.float32)
        t = tl.load(T + base + offs, mask=valid, other=0.0).to(tl.float32)
        e = p - t
        if HAS_W:
            w = tl.load(W + b * wbstride + (offs // inner) % mid, mask=valid, other=0.0)
            sq += w * (e * e)
            ws += w
            sel = valid & (w > 0.0)
        else:
            sq += tl.where(valid, e * e, 0.0)
            sel = valid
        a = tl.where(sel, tl.abs(e), -1.0)
        nan = nan | (sel & (a != a)).to(tl.int32)
        gt = a > mv
        eq = (a == mv) & sel
        cnt = tl.where(gt, 1, tl.where(eq, cnt + 1, cnt))
        arg = tl.where(gt, offs, arg)
        mv = tl.where(gt, a, mv)
    m = tl.max(mv, 0)
    top = (mv == m) & (mv >= 0.0)
    count = tl.sum(tl.where(top, cnt, 0), 0).to(tl.int64)
    first = tl.min(tl.where(top, arg, N), 0)
    none = m < 0.0
    m = tl.where(none, 0.0, m)
    m = tl.where(tl.max(nan, 0) > 0, float("nan"), m)
    if HAS_W:
        den = tl.maximum(tl.sum(ws, 0), 1e-12)
    else:
        den = Nf
    loss = tl.div_rn(tl.sum(sq, 0), den) + lam * m
    tl.store(LOSS + b, loss)
    tl.store(MAXV + b, m)
    tl.store(COUNT + b, tl.where(none, 0, count))
    tl.store(ARGMAX + b, tl.where(none, -1, first))
    tl.store(DENOM + b, den)


@triton.jit
def _clo_bwd_kernel(G, P, T, W, MAXV, COUNT, ARGMAX, DENOM, OUT, N, inner, mid, wbstride, lam,
                    HAS_W: tl.constexpr, RNE_BF16: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < N
    base = b * N
    p = tl.load(P + base + offs, mask=valid, other=0.0).to(tl.float32)
    t = tl.load(T + base + offs, mask=valid, other=0.0).to(tl.float32)
    e = p - t
    g = tl.load(G + b)
    c = tl.div_rn(g, tl.load(DENOM + b))
    m = tl.load(MAXV + b)
    count = tl.load(COUNT + b)
    amax = tl.load(ARGMAX + b)
    if HAS_W:
        w = tl.load(W + b * wbstride + (offs // inner) % mid, mask=valid, other=0.0)
        gr = (c * w) * (2.0 * e)
        sel = w > 0.0
    else:
        gr = c * (2.0 * e)
        sel = valid
    # modes of clo_common.h: 1 unique max -> only argmax; 2 ties -> every selected |e| == max;
    # 3 NaN max -> every selected element; 0 nothing (no selected element, or max 0 where sign(0) = 0)
    mode = tl.where(m != m, 3, tl.where(m > 0.0, tl.where(count == 1, 1, tl.where(count > 1, 2, 0)), 0))
    hit = tl.where(mode == 1, offs == amax,
                   tl.where(mode == 2, sel & (tl.abs(e) == m), tl.where(mode == 3, sel, offs < 0)))
    lin = tl.div_rn(lam * g, tl.maximum(count, 1).to(tl.float32))
    lin = tl.where(mode == 3, m, lin)
    sign = tl.where(e > 0.0, 1.0, tl.where(e < 0.0, -1.0, 0.0))
    gr = tl.where(hit, gr + lin * sign, gr)
    if RNE_BF16:
        # The interpreter truncates float32 -> bfloat16; round to nearest even by hand as the GPU cast does.
        bits = gr.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        hi = tl.where(gr != gr, 0x7FC0, bits >> 16).to(tl.uint16)
        tl.store(OUT + base + offs, hi.to(tl.bfloat16, bitcast=True), mask=valid)
    else:
        tl.store(OUT + base + offs, gr.to(OUT.dtype.element_ty), mask=valid)


@triton.jit
def _adam_kernel(P, G, M, V, n, beta1_w, beta2, one_minus_beta2, eps, weight_decay, neg_step_size, bc2_sqrt,
                 HAS_WD: tl.constexpr, SMALL_W: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < n
    p = tl.load(P + offs, mask=valid, other=0.0)
    g = tl.load(G + offs, mask=valid, other=0.0)
    m = tl.load(M + offs, mask=valid, other=0.0)
    v = tl.load(V + offs, mask=valid, other=0.0)
    if HAS_WD:
        g = g + weight_decay * p
    if SMALL_W:
        m = m + beta1_w * (g - m)
    else:
        m = g - (g - m) * (1.0 - beta1_w)
    v = v * beta2
    v = v + one_minus_beta2 * g * g
    den = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + tl.div_rn(neg_step_size * m, den)
    tl.store(P + offs, p, mask=valid)
    tl.store(M + offs, m, mask=valid)
    tl.store(V + offs, v, mask=valid)


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(int(n), 1))))


def clo_fwd(pred, target, weight, lam, inner, mid, wbstride, loss, maxv, count, argmax, denom):
    B, N = pred.shape
    w = weight if weight is not None else pred  # dummy pointer when HAS_W is False
    _clo_fwd_kernel[(B,)](pred, target, w, loss, maxv, count, argmax, denom, N, float(N), inner, mid, wbstride,
                          float(lam), HAS_W=weight is not None, BLOCK=_block(N, 1024))


def clo_bwd(grad_loss, pred, target, weight, lam, inner, mid, wbstride, maxv, count, argmax, denom, grad):
    B, N = pred.shape
    w = weight if weight is not None else pred
    block = _block(N, 1024)
    _clo_bwd_kernel[(triton.cdiv(N, block), B)](grad_loss, pred, target, w, maxv, count, argmax, denom, grad, N,
                                                inner, mid, wbstride, float(lam), HAS_W=weight is not None,
                                                RNE_BF16=_INTERPRET and grad.dtype == torch.bfloat16, BLOCK=block)


def adam_step(param, grad, exp_avg, exp_avg_sq, beta1, beta2, eps, weight_decay, step_size, bc2_sqrt):
    n = param.numel()
    block = _block(n, 1024)
    _adam_kernel[(triton.cdiv(n, block),)](param, grad, exp_avg, exp_avg_sq, n, 1.0 - beta1, beta2, 1.0 - beta2,
                                           eps, weight_decay, -step_size, bc2_sqrt,
                                           HAS_WD=weight_decay != 0, SMALL_W=(1.0 - beta1) < 0.5, BLOCK=block)
