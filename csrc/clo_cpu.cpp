// cao2 CPU kernels: fused CLO loss (the forward saves max / tie count / argmax / denominator; the backward is
// one pass that writes the whole gradient) and the in-place latent Adam step, registered as torch.ops.cao2.*
// (the CUDA backend, clo_cuda.cpp + clo_cuda_kernels.cu, registers CUDA implementations of the same ops).
// Parallel over (sample, chunk of kChunk elements) tasks with at::parallel_for; the hot loops
// (clo_cpu_simd.h) are compiled for baseline x86-64/ARM and, on x86-64 with GCC or Clang, again for AVX2,
// chosen at run time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

#include "clo_common.h"

namespace cao2 {
namespace simd_base {
#define CAO2_VEC_BYTES 16
#include "clo_cpu_simd.h"
#undef CAO2_VEC_BYTES
}  // namespace simd_base
}  // namespace cao2

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CAO2_HAVE_AVX2_PATH 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2")
#endif
namespace cao2 {
namespace simd_avx2 {
#define CAO2_VEC_BYTES 32
#include "clo_cpu_simd.h"
#undef CAO2_VEC_BYTES
}  // namespace simd_avx2
}  // namespace cao2
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace cao2 {
namespace {

bool use_avx2() {
#if defined(CAO2_HAVE_AVX2_PATH)
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
#else
  return false;
#endif
}

template <typename T>
CloPartial fwd_task(const T* pb, const T* tb, const float* wrow, const WeightPattern& wp, int64_t i0, int64_t i1) {
#if defined(CAO2_HAVE_AVX2_PATH)
  if (use_avx2()) return simd_avx2::fwd_task<T>(pb, tb, wrow, wp, i0, i1);
#endif
  return simd_base::fwd_task<T>(pb, tb, wrow, wp, i0, i1);
}

template <typename T>
void bwd_task(const T* pb, const T* tb, const float* wrow, const WeightPattern& wp, int64_t i0, int64_t i1, float c,
              float m, float lin, int mode, int64_t argmax, T* ob) {
#if defined(CAO2_HAVE_AVX2_PATH)
  if (use_avx2()) return simd_avx2::bwd_task<T>(pb, tb, wrow, wp, i0, i1, c, m, lin, mode, argmax, ob);
#endif
  simd_base::bwd_task<T>(pb, tb, wrow, wp, i0, i1, c, m, lin, mode, argmax, ob);
}

void adam_range(float* P, const float* G, float* M, float* V, int64_t lo, int64_t hi, const AdamScalars& s) {
#if defined(CAO2_HAVE_AVX2_PATH)
  if (use_avx2()) return simd_avx2::adam_range(P, G, M, V, lo, hi, s);
#endif
  simd_base::adam_range(P, G, M, V, lo, hi, s);
}

void check_pattern(const at::Tensor& pred, const std::optional<at::Tensor>& weight, int64_t inner, int64_t mid,
                   int64_t wbstride, const char* where) {
  if (!weight.has_value()) return;
  const auto& w = *weight;
  const int64_t B = pred.size(0), N = pred.size(1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous(), where, ": weight must be contiguous float32");
  TORCH_CHECK(w.device() == pred.device(), where, ": weight on another device");
  TORCH_CHECK(inner >= 1 && mid >= 1 && inner * mid <= N && N % (inner * mid) == 0, where,
              ": bad weight pattern inner=", inner, " mid=", mid, " for N=", N);
  TORCH_CHECK(wbstride == 0 || wbstride == mid, where, ": weight batch stride must be 0 or mid");
  TORCH_CHECK(w.numel() >= (wbstride == 0 ? mid : B * mid), where, ": weight too small for its pattern");
}

void check_inputs(const at::Tensor& pred, const at::Tensor& target, const char* where) {
  TORCH_CHECK(pred.dim() == 2 && target.sizes() == pred.sizes(), where, ": pred and target must be (B, N) of one shape");
  TORCH_CHECK(pred.is_contiguous() && target.is_contiguous(), where, ": pred and target must be contiguous");
  TORCH_CHECK(pred.scalar_type() == target.scalar_type(), where, ": pred and target must have one dtype");
  TORCH_CHECK(pred.scalar_type() == at::kFloat || pred.scalar_type() == at::kBFloat16 || pred.scalar_type() == at::kHalf,
              where, ": dtype must be float32, bfloat16 or float16, got ", pred.scalar_type());
  TORCH_CHECK(pred.device().is_cpu() && target.device().is_cpu(), where, ": CPU tensors expected");
}

void check_out(const at::Tensor& t, int64_t n, at::ScalarType dt, const char* name, const char* where) {
  TORCH_CHECK(t.numel() == n && t.is_contiguous() && t.scalar_type() == dt && t.device().is_cpu(), where, ": ", name,
              " must be a contiguous ", dt, " CPU tensor of ", n, " elements");
}

// (chunks per sample, at::parallel_for grain): tasks of about 32k elements per grain.
std::pair<int64_t, int64_t> task_split(int64_t N) {
  const int64_t per_task = std::min(N, kChunk);
  return {(N + kChunk - 1) / kChunk, std::max<int64_t>(1, 32768 / std::max<int64_t>(per_task, 1))};
}

template <typename T>
void clo_fwd_impl(const at::Tensor& pred, const at::Tensor& target, const float* wptr, const WeightPattern& wp,
                  double lam, float* loss, float* maxv, int64_t* count, int64_t* argmax, float* denom) {
  const int64_t B = pred.size(0), N = pred.size(1);
  const T* P = pred.data_ptr<T>();
  const T* Tg = target.data_ptr<T>();
  const auto [nchunk, grain] = task_split(N);
  std::vector<CloPartial> parts(B * nchunk, clo_partial_empty());
  at::parallel_for(0, B * nchunk, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / nchunk, c = task % nchunk;
      const int64_t i0 = c * kChunk, i1 = std::min(N, i0 + kChunk);
      const T* pb = P + b * N;
      const T* tb = Tg + b * N;
      const float* wrow = wptr ? wptr + b * wp.bstride : nullptr;
      const CloPartial acc = fwd_task<T>(pb, tb, wrow, wp, i0, i1);
      parts[task] = acc;
    }
  });
  const float lamf = static_cast<float>(lam);
  for (int64_t b = 0; b < B; ++b) {
    float sq = 0.f, ws = 0.f;
    int32_t mbits = -1;
    int64_t cnt = 0, arg = -1;
    for (int64_t c = 0; c < nchunk; ++c) {
      const CloPartial& q = parts[b * nchunk + c];
      sq += q.sq;
      ws += q.ws;
      clo_combine_max(mbits, cnt, arg, q.mbits, q.count, q.arg);
    }
    const float den = wptr ? std::max(ws, 1e-12f) : static_cast<float>(N);
    const float m = clo_max_value(mbits);
    loss[b] = sq / den + lamf * m;
    maxv[b] = m;
    count[b] = mbits < 0 ? 0 : cnt;
    argmax[b] = mbits < 0 ? -1 : arg;
    denom[b] = den;
  }
}

template <typename T>
void clo_bwd_impl(const float* G, const at::Tensor& pred, const at::Tensor& target, const float* wptr,
                  const WeightPattern& wp, double lam, const float* maxv, const int64_t* count, const int64_t* argmax,
                  const float* denom, at::Tensor& grad) {
  const int64_t B = pred.size(0), N = pred.size(1);
  const T* P = pred.data_ptr<T>();
  const T* Tg = target.data_ptr<T>();
  T* O = grad.data_ptr<T>();
  const auto [nchunk, grain] = task_split(N);
  const float lamf = static_cast<float>(lam);
  at::parallel_for(0, B * nchunk, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t b = task / nchunk, ch = task % nchunk;
      const int64_t i0 = ch * kChunk, i1 = std::min(N, i0 + kChunk);
      const T* pb = P + b * N;
      const T* tb = Tg + b * N;
      T* ob = O + b * N;
      const float* wrow = wptr ? wptr + b * wp.bstride : nullptr;
      const float g = G[b];
      const float c = g / denom[b];
      const float m = maxv[b];
      const int mode = clo_linf_mode(m, count[b]);
      // amax backward: (lam * g) / count, then abs backward multiplies by sign(e)
      const float lin = mode == 3 ? m : (lamf * g) / static_cast<float>(count[b] > 0 ? count[b] : 1);
      bwd_task<T>(pb, tb, wrow, wp, i0, i1, c, m, lin, mode, argmax[b], ob);
    }
  });
}

WeightPattern make_pattern(const std::optional<at::Tensor>& weight, int64_t inner, int64_t mid, int64_t wbstride) {
  WeightPattern wp;
  wp.w = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  wp.inner = inner;
  wp.mid = mid;
  wp.bstride = wbstride;
  return wp;
}

void clo_fwd_cpu(const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& weight, double lam,
                 int64_t inner, int64_t mid, int64_t wbstride, at::Tensor& loss, at::Tensor& maxv, at::Tensor& count,
                 at::Tensor& argmax, at::Tensor& denom) {
  const char* where = "cao2::clo_fwd";
  check_inputs(pred, target, where);
  check_pattern(pred, weight, inner, mid, wbstride, where);
  const int64_t B = pred.size(0);
  TORCH_CHECK(pred.size(1) > 0, where, ": empty samples");
  check_out(loss, B, at::kFloat, "loss", where);
  check_out(maxv, B, at::kFloat, "maxv", where);
  check_out(count, B, at::kLong, "count", where);
  check_out(argmax, B, at::kLong, "argmax", where);
  check_out(denom, B, at::kFloat, "denom", where);
  const WeightPattern wp = make_pattern(weight, inner, mid, wbstride);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), "cao2_clo_fwd", [&] {
    clo_fwd_impl<scalar_t>(pred, target, wp.w, wp, lam, loss.data_ptr<float>(), maxv.data_ptr<float>(),
                           count.data_ptr<int64_t>(), argmax.data_ptr<int64_t>(), denom.data_ptr<float>());
  });
}

void clo_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& target,
                 const std::optional<at::Tensor>& weight, double lam, int64_t inner, int64_t mid, int64_t wbstride,
                 const at::Tensor& maxv, const at::Tensor& count, const at::Tensor& argmax, const at::Tensor& denom,
                 at::Tensor& grad) {
  const char* where = "cao2::clo_bwd";
  check_inputs(pred, target, where);
  check_pattern(pred, weight, inner, mid, wbstride, where);
  const int64_t B = pred.size(0);
  check_out(grad_loss, B, at::kFloat, "grad_loss", where);
  check_out(maxv, B, at::kFloat, "maxv", where);
  check_out(count, B, at::kLong, "count", where);
  check_out(argmax, B, at::kLong, "argmax", where);
  check_out(denom, B, at::kFloat, "denom", where);
  TORCH_CHECK(grad.sizes() == pred.sizes() && grad.is_contiguous() && grad.scalar_type() == pred.scalar_type() &&
                  grad.device().is_cpu(), where, ": grad must be a contiguous CPU tensor like pred");
  const WeightPattern wp = make_pattern(weight, inner, mid, wbstride);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pred.scalar_type(), "cao2_clo_bwd", [&] {
    clo_bwd_impl<scalar_t>(grad_loss.data_ptr<float>(), pred, target, wp.w, wp, lam, maxv.data_ptr<float>(),
                           count.data_ptr<int64_t>(), argmax.data_ptr<int64_t>(), denom.data_ptr<float>(), grad);
  });
}

void adam_step_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                   double beta1, double beta2, double eps, double weight_decay, double step_size, double bc2_sqrt) {
  const char* where = "cao2::adam_step";
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&param, &grad, &exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(), where,
                ": param, grad, exp_avg and exp_avg_sq must be contiguous float32 CPU tensors");
    TORCH_CHECK(t->numel() == param.numel(), where, ": size mismatch");
  }
  const AdamScalars s = make_adam_scalars(beta1, beta2, eps, weight_decay, step_size, bc2_sqrt);
  float* P = param.data_ptr<float>();
  const float* G = grad.data_ptr<float>();
  float* M = exp_avg.data_ptr<float>();
  float* V = exp_avg_sq.data_ptr<float>();
  at::parallel_for(0, param.numel(), 32768, [&](int64_t lo, int64_t hi) { adam_range(P, G, M, V, lo, hi, s); });
}

}  // namespace
}  // namespace cao2

TORCH_LIBRARY(cao2, m) {
  m.def("clo_fwd(Tensor pred, Tensor target, Tensor? weight, float lam, int inner, int mid, int wbstride, "
        "Tensor(a!) loss, Tensor(b!) maxv, Tensor(c!) count, Tensor(d!) argmax, Tensor(e!) denom) -> ()");
  m.def("clo_bwd(Tensor grad_loss, Tensor pred, Tensor target, Tensor? weight, float lam, int inner, int mid, "
        "int wbstride, Tensor maxv, Tensor count, Tensor argmax, Tensor denom, Tensor(a!) grad) -> ()");
  m.def("adam_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, float beta1, "
        "float beta2, float eps, float weight_decay, float step_size, float bias_correction2_sqrt) -> ()");
}

TORCH_LIBRARY_IMPL(cao2, CPU, m) {
  m.impl("clo_fwd", &cao2::clo_fwd_cpu);
  m.impl("clo_bwd", &cao2::clo_bwd_cpu);
  m.impl("adam_step", &cao2::adam_step_cpu);
}
