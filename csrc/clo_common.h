// Shared, dependency-free pieces of the cao2 kernels: compiled by g++ (clo_cpu.cpp) and by nvcc
// (clo_cuda_kernels.cu). No torch headers here.
//
// Semantics (the plain-torch reference in cao2core/kernels/reference.py defines them):
//   per sample b, e = float(pred) - float(target) over the N elements of the sample,
//   loss[b]  = sum(w * e^2) / max(sum(w), 1e-12) + lam * max_{w > 0} |e|      (no weight: w = 1)
//   grad     = (g/den * w) * (2e) + [|e| is a maximum] * (lam * g / count) * sign(e)
// where count is the number of maxima (torch.amax's rule: tied maxima share the gradient equally).
// The max is tracked on the IEEE bit pattern of |e| (a non-negative float orders like its int32 bits,
// and NaN's bits are above +inf's), so a NaN among the selected elements wins the max and propagates.
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__)
#define CAO2_HD __host__ __device__ __forceinline__
#else
#define CAO2_HD inline
#endif

namespace cao2 {

// Elements of one sample that one CPU task / one CUDA block reduces before the partials are combined.
constexpr int64_t kChunk = 16384;

// The weight of element i (flat index inside a sample) is w[b * wbstride + (i / inner) % mid]:
// covers a full weight (inner 1, mid N), a weight repeated over trailing dims ((B,N,1) token masks:
// inner = D), over leading dims ((B,1,H,W) masks: inner 1, mid H*W) and shared over the batch (wbstride 0).
struct WeightPattern {
  const float* w;    // nullptr: no weight
  int64_t inner;
  int64_t mid;
  int64_t bstride;
};

// Partial reduction of part of one sample.
struct CloPartial {
  float sq;       // sum of w * e^2
  float ws;       // sum of w
  int32_t mbits;  // bit pattern of the largest selected |e|; -1 when no element is selected
  int32_t pad;
  int64_t count;  // number of selected elements whose |e| has exactly those bits
  int64_t arg;    // first such element (flat index in the sample), -1 if none
};

CAO2_HD CloPartial clo_partial_empty() {
  CloPartial p;
  p.sq = 0.f; p.ws = 0.f; p.mbits = -1; p.pad = 0; p.count = 0; p.arg = -1;
  return p;
}

// Combine the max part of b into a (a covers earlier elements than b, or the same range order does
// not matter for count and the smaller index wins for arg).
CAO2_HD void clo_combine_max(int32_t& mbits, int64_t& count, int64_t& arg, int32_t bbits, int64_t bcount, int64_t barg) {
  if (bbits > mbits) {
    mbits = bbits; count = bcount; arg = barg;
  } else if (bbits == mbits && bbits >= 0) {
    count += bcount;
    if (barg >= 0 && (arg < 0 || barg < arg)) arg = barg;
  }
}

CAO2_HD int32_t clo_float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(x);
#else
  int32_t i;
  std::memcpy(&i, &x, sizeof(i));
  return i;
#endif
}

CAO2_HD float clo_bits_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float x;
  std::memcpy(&x, &i, sizeof(x));
  return x;
#endif
}

CAO2_HD float clo_sign(float e) { return e > 0.f ? 1.f : (e < 0.f ? -1.f : 0.f); }

// Final max value of a sample from its bits: 0 when nothing was selected (torch.amax of the masked zeros).
CAO2_HD float clo_max_value(int32_t mbits) { return mbits < 0 ? 0.f : clo_bits_float(mbits); }

// How the backward pass assigns the L-infinity gradient in one sample.
//   0: no element (no selected element, or the max is 0: sign(0) = 0)
//   1: exactly the element `arg` (a unique maximum)
//   2: every selected element with |e| == max (ties share lam*g/count)
//   3: every selected element gets NaN (the max is NaN, as torch.amax's backward gives)
CAO2_HD int clo_linf_mode(float maxv, int64_t count) {
  if (maxv != maxv) return 3;
  if (count <= 0 || !(maxv > 0.f)) return 0;
  return count == 1 ? 1 : 2;
}

// Adam scalars, computed in double on the host exactly as torch.optim.Adam (single-tensor path) does,
// then rounded to float as torch's float kernels round their Python-scalar operands.
struct AdamScalars {
  float beta1_w;       // 1 - beta1 (lerp weight)
  float beta2;
  float one_minus_beta2;
  float eps;
  float weight_decay;
  float neg_step_size; // -lr / (1 - beta1^step)
  float bc2_sqrt;      // sqrt(1 - beta2^step)
};

// The host-side scalars of one Adam step (shared by the CPU and CUDA bindings).
inline AdamScalars make_adam_scalars(double beta1, double beta2, double eps, double weight_decay, double step_size,
                                     double bc2_sqrt) {
  AdamScalars s;
  s.beta1_w = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.weight_decay = static_cast<float>(weight_decay);
  s.neg_step_size = static_cast<float>(-step_size);
  s.bc2_sqrt = static_cast<float>(bc2_sqrt);
  return s;
}

// One element of torch.optim.Adam (L2 weight decay, no amsgrad), in the order of torch's ops:
//   g = grad + wd * p; m.lerp_(g, 1-b1); v.mul_(b2).addcmul_(g, g, 1-b2);
//   p.addcdiv_(m, sqrt(v) / bc2_sqrt + eps, -step_size)
// WD: weight_decay != 0; SMALL_W: the lerp weight 1-b1 < 0.5 (torch's lerp switches formula there).
template <bool WD, bool SMALL_W>
CAO2_HD void adam_update_t(float& p, float grad, float& m, float& v, const AdamScalars& s) {
  float g = grad;
  if (WD) g = g + s.weight_decay * p;
  if (SMALL_W) {
    m = m + s.beta1_w * (g - m);
  } else {
    m = g - (g - m) * (1.f - s.beta1_w);
  }
  v = v * s.beta2;
  v = v + s.one_minus_beta2 * g * g;
  const float den = sqrtf(v) / s.bc2_sqrt + s.eps;
  p = p + s.neg_step_size * m / den;
}

CAO2_HD void adam_update(float& p, float grad, float& m, float& v, const AdamScalars& s) {
  const bool wd = s.weight_decay != 0.f, small = s.beta1_w < 0.5f;
  if (wd && small) adam_update_t<true, true>(p, grad, m, v, s);
  else if (wd) adam_update_t<true, false>(p, grad, m, v, s);
  else if (small) adam_update_t<false, true>(p, grad, m, v, s);
  else adam_update_t<false, false>(p, grad, m, v, s);
}

}  // namespace cao2
