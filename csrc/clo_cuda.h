// Launchers of the cao2 CUDA kernels (clo_cuda_kernels.cu). Plain pointers and a cudaStream_t: this header and
// the .cu file include no torch headers, so nvcc compiles them in seconds; clo_cuda.cpp binds them to torch.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

#include "clo_common.h"

namespace cao2 {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Workspace bytes clo_fwd_cuda needs for B samples of N elements (per-chunk partials).
size_t clo_fwd_workspace_bytes(int64_t B, int64_t N);

// Forward: loss/maxv/denom (float), count/argmax (int64), one value per sample; pred/target are (B, N)
// contiguous of dtype `dt`; wp.w (float32) may be null.
cudaError_t clo_fwd_cuda(DType dt, const void* pred, const void* target, WeightPattern wp, int64_t B, int64_t N,
                         float lam, void* workspace, float* loss, float* maxv, int64_t* count, int64_t* argmax,
                         float* denom, cudaStream_t stream);

// Backward: grad (B, N) of dtype `dt` = d(sum_b grad_loss[b] * loss[b]) / d pred.
cudaError_t clo_bwd_cuda(DType dt, const float* grad_loss, const void* pred, const void* target, WeightPattern wp,
                         int64_t B, int64_t N, float lam, const float* maxv, const int64_t* count,
                         const int64_t* argmax, const float* denom, void* grad, cudaStream_t stream);

// In-place Adam over n float32 elements.
cudaError_t adam_cuda(float* param, const float* grad, float* exp_avg, float* exp_avg_sq, int64_t n,
                      AdamScalars s, cudaStream_t stream);

}  // namespace cao2
