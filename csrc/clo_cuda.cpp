// Torch binding of the cao2 CUDA kernels: registers CUDA implementations of torch.ops.cao2.{clo_fwd, clo_bwd,
// adam_step} (defined by clo_cpu.cpp, which must be loaded first) and launches on the current CUDA stream.
// The kernels themselves are in clo_cuda_kernels.cu, which includes no torch headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "clo_cuda.h"

namespace cao2 {
namespace {

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: TORCH_CHECK(false, "cao2 CUDA kernels: dtype must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return DType::kFloat32;
}

void check_cuda(const at::Tensor& t, const at::Tensor& like, const char* name, const char* where) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device() && t.is_contiguous(), where, ": ", name,
              " must be a contiguous tensor on ", like.device());
}

void check_vec(const at::Tensor& t, const at::Tensor& like, int64_t n, at::ScalarType dt, const char* name,
               const char* where) {
  check_cuda(t, like, name, where);
  TORCH_CHECK(t.numel() == n && t.scalar_type() == dt, where, ": ", name, " must hold ", n, " ", dt, " values");
}

WeightPattern pattern(const at::Tensor& pred, const std::optional<at::Tensor>& weight, int64_t inner, int64_t mid,
                      int64_t wbstride, const char* where) {
  WeightPattern wp{nullptr, inner, mid, wbstride};
  if (weight.has_value()) {
    const auto& w = *weight;
    const int64_t B = pred.size(0), N = pred.size(1);
    check_cuda(w, pred, "weight", where);
    TORCH_CHECK(w.scalar_type() == at::kFloat, where, ": weight must be float32");
    TORCH_CHECK(inner >= 1 && mid >= 1 && N % (inner * mid) == 0, where, ": bad weight pattern");
    TORCH_CHECK(wbstride == 0 || wbstride == mid, where, ": weight batch stride must be 0 or mid");
    TORCH_CHECK(w.numel() >= (wbstride == 0 ? mid : B * mid), where, ": weight too small for its pattern");
    wp.w = w.data_ptr<float>();
  }
  return wp;
}

void check_inputs(const at::Tensor& pred, const at::Tensor& target, const char* where) {
  TORCH_CHECK(pred.dim() == 2 && target.sizes() == pred.sizes(), where, ": pred and target must be (B, N) of one shape");
  TORCH_CHECK(pred.scalar_type() == target.scalar_type(), where, ": pred and target must have one dtype");
  check_cuda(pred, pred, "pred", where);
  check_cuda(target, pred, "target", where);
}

void clo_fwd_cuda_op(const at::Tensor& pred, const at::Tensor& target, const std::optional<at::Tensor>& weight,
                     double lam, int64_t inner, int64_t mid, int64_t wbstride, at::Tensor& loss, at::Tensor& maxv,
                     at::Tensor& count, at::Tensor& argmax, at::Tensor& denom) {
  const char* where = "cao2::clo_fwd (CUDA)";
  check_inputs(pred, target, where);
  const int64_t B = pred.size(0), N = pred.size(1);
  TORCH_CHECK(N > 0, where, ": empty samples");
  const WeightPattern wp = pattern(pred, weight, inner, mid, wbstride, where);
  check_vec(loss, pred, B, at::kFloat, "loss", where);
  check_vec(maxv, pred, B, at::kFloat, "maxv", where);
  check_vec(count, pred, B, at::kLong, "count", where);
  check_vec(argmax, pred, B, at::kLong, "argmax", where);
  check_vec(denom, pred, B, at::kFloat, "denom", where);
  const c10::cuda::CUDAGuard guard(pred.device());
  at::Tensor ws = at::empty({static_cast<int64_t>(clo_fwd_workspace_bytes(B, N))},
                            pred.options().dtype(at::kByte));
  const cudaError_t err = clo_fwd_cuda(dtype_of(pred), pred.data_ptr(), target.data_ptr(), wp, B, N,
                                       static_cast<float>(lam), ws.data_ptr(), loss.data_ptr<float>(),
                                       maxv.data_ptr<float>(), count.data_ptr<int64_t>(), argmax.data_ptr<int64_t>(),
                                       denom.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, where, ": ", cudaGetErrorString(err));
}

void clo_bwd_cuda_op(const at::Tensor& grad_loss, const at::Tensor& pred, const at::Tensor& target,
                     const std::optional<at::Tensor>& weight, double lam, int64_t inner, int64_t mid, int64_t wbstride,
                     const at::Tensor& maxv, const at::Tensor& count, const at::Tensor& argmax,
                     const at::Tensor& denom, at::Tensor& grad) {
  const char* where = "cao2::clo_bwd (CUDA)";
  check_inputs(pred, target, where);
  const int64_t B = pred.size(0), N = pred.size(1);
  const WeightPattern wp = pattern(pred, weight, inner, mid, wbstride, where);
  check_vec(grad_loss, pred, B, at::kFloat, "grad_loss", where);
  check_vec(maxv, pred, B, at::kFloat, "maxv", where);
  check_vec(count, pred, B, at::kLong, "count", where);
  check_vec(argmax, pred, B, at::kLong, "argmax", where);
  check_vec(denom, pred, B, at::kFloat, "denom", where);
  check_cuda(grad, pred, "grad", where);
  TORCH_CHECK(grad.sizes() == pred.sizes() && grad.scalar_type() == pred.scalar_type(), where,
              ": grad must be like pred");
  const c10::cuda::CUDAGuard guard(pred.device());
  const cudaError_t err = clo_bwd_cuda(dtype_of(pred), grad_loss.data_ptr<float>(), pred.data_ptr(),
                                       target.data_ptr(), wp, B, N, static_cast<float>(lam), maxv.data_ptr<float>(),
                                       count.data_ptr<int64_t>(), argmax.data_ptr<int64_t>(), denom.data_ptr<float>(),
                                       grad.data_ptr(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, where, ": ", cudaGetErrorString(err));
}

void adam_step_cuda_op(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                       double beta1, double beta2, double eps, double weight_decay, double step_size,
                       double bc2_sqrt) {
  const char* where = "cao2::adam_step (CUDA)";
  const int64_t n = param.numel();
  check_vec(param, param, n, at::kFloat, "param", where);
  check_vec(grad, param, n, at::kFloat, "grad", where);
  check_vec(exp_avg, param, n, at::kFloat, "exp_avg", where);
  check_vec(exp_avg_sq, param, n, at::kFloat, "exp_avg_sq", where);
  const AdamScalars s = make_adam_scalars(beta1, beta2, eps, weight_decay, step_size, bc2_sqrt);
  const c10::cuda::CUDAGuard guard(param.device());
  const cudaError_t err = adam_cuda(param.data_ptr<float>(), grad.data_ptr<float>(), exp_avg.data_ptr<float>(),
                                    exp_avg_sq.data_ptr<float>(), n, s, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, where, ": ", cudaGetErrorString(err));
}

}  // namespace
}  // namespace cao2

TORCH_LIBRARY_IMPL(cao2, CUDA, m) {
  m.impl("clo_fwd", &cao2::clo_fwd_cuda_op);
  m.impl("clo_bwd", &cao2::clo_bwd_cuda_op);
  m.impl("adam_step", &cao2::adam_step_cuda_op);
}
