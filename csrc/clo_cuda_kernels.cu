// cao2 CUDA kernels: kernels only, no torch headers (plain pointers + cudaStream_t); see clo_common.h for the
// semantics shared with the C++ CPU kernels.
//
// Forward: grid (chunks, samples); every thread keeps a running sum / max bits / tie count / first index over
// a grid-stride walk of its chunk, a block reduction combines them into one partial per (sample, chunk), and a
// small finalize kernel combines the partials of each sample in chunk order (deterministic).
// Backward: grid (element blocks, samples), one pass that writes the whole gradient.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "clo_cuda.h"

namespace cao2 {
namespace {

constexpr int kThreads = 256;
// Elements of one sample per block of the forward: small enough that a batch of 4096-element latents fills the GPU.
constexpr int64_t kCudaChunk = 2048;
constexpr int kMaxGridY = 65535;

__device__ __forceinline__ float load_f(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load_f(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float load_f(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store_f(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void store_f(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_f(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }

// Index of element i's weight in its sample's weight row (clo_common.h, WeightPattern).
__device__ __forceinline__ int64_t weight_index(const WeightPattern& wp, int64_t i) {
  if (wp.inner == 1) return i < wp.mid ? i : i % wp.mid;
  return (i / wp.inner) % wp.mid;
}

__device__ __forceinline__ void combine(CloPartial& a, const CloPartial& b) {
  a.sq += b.sq;
  a.ws += b.ws;
  clo_combine_max(a.mbits, a.count, a.arg, b.mbits, b.count, b.arg);
}

__device__ __forceinline__ CloPartial shfl_down(const CloPartial& p, int off) {
  CloPartial q;
  q.sq = __shfl_down_sync(0xffffffffu, p.sq, off);
  q.ws = __shfl_down_sync(0xffffffffu, p.ws, off);
  q.mbits = __shfl_down_sync(0xffffffffu, p.mbits, off);
  q.pad = 0;
  q.count = __shfl_down_sync(0xffffffffu, p.count, off);
  q.arg = __shfl_down_sync(0xffffffffu, p.arg, off);
  return q;
}

template <typename T, bool HAS_W>
__global__ void __launch_bounds__(kThreads) clo_fwd_partial_kernel(const T* __restrict__ pred,
                                                                    const T* __restrict__ target, WeightPattern wp,
                                                                    int64_t B, int64_t N, int64_t nchunk,
                                                                    CloPartial* __restrict__ parts) {
  __shared__ CloPartial warp_parts[kThreads / 32];
  const int64_t c = blockIdx.x;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int64_t i0 = c * kCudaChunk;
    const int64_t i1 = i0 + kCudaChunk < N ? i0 + kCudaChunk : N;
    const T* pb = pred + b * N;
    const T* tb = target + b * N;
    const float* wrow = HAS_W ? wp.w + b * wp.bstride : nullptr;
    CloPartial acc = clo_partial_empty();
    for (int64_t i = i0 + threadIdx.x; i < i1; i += kThreads) {
      const float e = load_f(pb, i) - load_f(tb, i);
      bool sel = true;
      if (HAS_W) {
        const float w = wrow[weight_index(wp, i)];
        acc.sq += w * (e * e);
        acc.ws += w;
        sel = w > 0.f;
      } else {
        acc.sq += e * e;
      }
      if (sel) clo_combine_max(acc.mbits, acc.count, acc.arg, clo_float_bits(fabsf(e)), 1, i);
    }
    for (int off = 16; off > 0; off >>= 1) {
      const CloPartial o = shfl_down(acc, off);
      combine(acc, o);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_parts[warp] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
      CloPartial tot = warp_parts[0];
      for (int k = 1; k < kThreads / 32; ++k) combine(tot, warp_parts[k]);
      parts[b * nchunk + c] = tot;
    }
    __syncthreads();
  }
}

__global__ void clo_fwd_finalize_kernel(const CloPartial* __restrict__ parts, int64_t B, int64_t N, int64_t nchunk,
                                        bool has_w, float lam, float* loss, float* maxv, int64_t* count,
                                        int64_t* argmax, float* denom) {
  for (int64_t b = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; b < B; b += (int64_t)gridDim.x * blockDim.x) {
    CloPartial tot = parts[b * nchunk];
    for (int64_t c = 1; c < nchunk; ++c) combine(tot, parts[b * nchunk + c]);
    const float den = has_w ? fmaxf(tot.ws, 1e-12f) : static_cast<float>(N);
    const float m = clo_max_value(tot.mbits);
    loss[b] = tot.sq / den + lam * m;
    maxv[b] = m;
    count[b] = tot.mbits < 0 ? 0 : tot.count;
    argmax[b] = tot.mbits < 0 ? -1 : tot.arg;
    denom[b] = den;
  }
}

template <typename T, bool HAS_W>
__global__ void __launch_bounds__(kThreads) clo_bwd_kernel(const float* __restrict__ grad_loss,
                                                            const T* __restrict__ pred, const T* __restrict__ target,
                                                            WeightPattern wp, int64_t B, int64_t N, float lam,
                                                            const float* __restrict__ maxv,
                                                            const int64_t* __restrict__ count,
                                                            const int64_t* __restrict__ argmax,
                                                            const float* __restrict__ denom, T* __restrict__ grad) {
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const float g = grad_loss[b];
    const float c = g / denom[b];
    const float m = maxv[b];
    const int64_t cnt = count[b];
    const int mode = clo_linf_mode(m, cnt);
    const float lin = mode == 3 ? m : (lam * g) / static_cast<float>(cnt > 0 ? cnt : 1);
    const int32_t mbits = clo_float_bits(m);
    const int64_t amax = argmax[b];
    const T* pb = pred + b * N;
    const T* tb = target + b * N;
    T* ob = grad + b * N;
    const float* wrow = HAS_W ? wp.w + b * wp.bstride : nullptr;
    for (int64_t i = blockIdx.x * (int64_t)kThreads + threadIdx.x; i < N; i += (int64_t)gridDim.x * kThreads) {
      const float e = load_f(pb, i) - load_f(tb, i);
      float gr;
      bool sel = true;
      if (HAS_W) {
        const float w = wrow[weight_index(wp, i)];
        gr = (c * w) * (2.f * e);
        sel = w > 0.f;
      } else {
        gr = c * (2.f * e);
      }
      bool hit = false;
      if (mode == 1) hit = i == amax;
      else if (mode == 2) hit = sel && clo_float_bits(fabsf(e)) == mbits;
      else if (mode == 3) hit = sel;
      if (hit) gr += lin * clo_sign(e);
      store_f(ob, i, gr);
    }
  }
}

__global__ void adam_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                            float* __restrict__ v, int64_t n, AdamScalars s) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    float pp = p[i], mm = m[i], vv = v[i];
    adam_update(pp, g[i], mm, vv, s);
    p[i] = pp;
    m[i] = mm;
    v[i] = vv;
  }
}

template <typename T>
cudaError_t launch_fwd(const void* pred, const void* target, WeightPattern wp, int64_t B, int64_t N, float lam,
                       void* workspace, float* loss, float* maxv, int64_t* count, int64_t* argmax, float* denom,
                       cudaStream_t stream) {
  const int64_t nchunk = (N + kCudaChunk - 1) / kCudaChunk;
  CloPartial* parts = static_cast<CloPartial*>(workspace);
  const dim3 grid(static_cast<unsigned>(nchunk), static_cast<unsigned>(B < kMaxGridY ? B : kMaxGridY));
  if (wp.w != nullptr) {
    clo_fwd_partial_kernel<T, true><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(pred),
                                                                   static_cast<const T*>(target), wp, B, N, nchunk,
                                                                   parts);
  } else {
    clo_fwd_partial_kernel<T, false><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(pred),
                                                                    static_cast<const T*>(target), wp, B, N, nchunk,
                                                                    parts);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t fblocks = (B + 127) / 128;
  clo_fwd_finalize_kernel<<<static_cast<unsigned>(fblocks < 4096 ? fblocks : 4096), 128, 0, stream>>>(
      parts, B, N, nchunk, wp.w != nullptr, lam, loss, maxv, count, argmax, denom);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const float* grad_loss, const void* pred, const void* target, WeightPattern wp, int64_t B,
                       int64_t N, float lam, const float* maxv, const int64_t* count, const int64_t* argmax,
                       const float* denom, void* grad, cudaStream_t stream) {
  int64_t bx = (N + kThreads - 1) / kThreads;
  if (bx > 65535) bx = 65535;  // grid-stride beyond
  const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(B < kMaxGridY ? B : kMaxGridY));
  if (wp.w != nullptr) {
    clo_bwd_kernel<T, true><<<grid, kThreads, 0, stream>>>(grad_loss, static_cast<const T*>(pred),
                                                           static_cast<const T*>(target), wp, B, N, lam, maxv, count,
                                                           argmax, denom, static_cast<T*>(grad));
  } else {
    clo_bwd_kernel<T, false><<<grid, kThreads, 0, stream>>>(grad_loss, static_cast<const T*>(pred),
                                                            static_cast<const T*>(target), wp, B, N, lam, maxv, count,
                                                            argmax, denom, static_cast<T*>(grad));
  }
  return cudaGetLastError();
}

}  // namespace

size_t clo_fwd_workspace_bytes(int64_t B, int64_t N) {
  const int64_t nchunk = (N + kCudaChunk - 1) / kCudaChunk;
  return static_cast<size_t>(B * nchunk) * sizeof(CloPartial);
}

cudaError_t clo_fwd_cuda(DType dt, const void* pred, const void* target, WeightPattern wp, int64_t B, int64_t N,
                         float lam, void* workspace, float* loss, float* maxv, int64_t* count, int64_t* argmax,
                         float* denom, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  switch (dt) {
    case DType::kFloat32:
      return launch_fwd<float>(pred, target, wp, B, N, lam, workspace, loss, maxv, count, argmax, denom, stream);
    case DType::kBFloat16:
      return launch_fwd<__nv_bfloat16>(pred, target, wp, B, N, lam, workspace, loss, maxv, count, argmax, denom,
                                       stream);
    case DType::kFloat16:
      return launch_fwd<__half>(pred, target, wp, B, N, lam, workspace, loss, maxv, count, argmax, denom, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t clo_bwd_cuda(DType dt, const float* grad_loss, const void* pred, const void* target, WeightPattern wp,
                         int64_t B, int64_t N, float lam, const float* maxv, const int64_t* count,
                         const int64_t* argmax, const float* denom, void* grad, cudaStream_t stream) {
  if (B == 0 || N == 0) return cudaSuccess;
  switch (dt) {
    case DType::kFloat32:
      return launch_bwd<float>(grad_loss, pred, target, wp, B, N, lam, maxv, count, argmax, denom, grad, stream);
    case DType::kBFloat16:
      return launch_bwd<__nv_bfloat16>(grad_loss, pred, target, wp, B, N, lam, maxv, count, argmax, denom, grad,
                                       stream);
    case DType::kFloat16:
      return launch_bwd<__half>(grad_loss, pred, target, wp, B, N, lam, maxv, count, argmax, denom, grad, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t adam_cuda(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n,
                      AdamScalars s, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  int64_t blocks = (n + kThreads - 1) / kThreads;
  if (blocks > 65535 * 8) blocks = 65535 * 8;
  adam_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(param, grad, exp_avg, exp_avg_sq, n, s);
  return cudaGetLastError();
}

}  // namespace cao2
