// Argument checks shared by the CPU and CUDA kernels of the DPO log-ratio op (device checks stay
// with each kernel).
#pragma once

#include <torch/extension.h>

namespace dpo_logratio {

// A per-row fp32 vector: the statistics' columns, the incoming gradient.
inline void check_rows(const torch::Tensor& tensor, int64_t rows, const char* name) {
  TORCH_CHECK(tensor.scalar_type() == torch::kFloat && tensor.is_contiguous() &&
                  tensor.numel() == rows,
              name, ": contiguous float32 [rows]");
}

// backward's inputs besides the logits and targets, and its output.
inline void check_backward(const torch::Tensor& logits, const torch::Tensor& maxima,
                           const torch::Tensor& log_sums, const torch::Tensor& grad,
                           const torch::Tensor& grad_out) {
  const int64_t rows = logits.size(0);
  check_rows(maxima, rows, "max");
  check_rows(log_sums, rows, "log_sum");
  check_rows(grad, rows, "grad");
  TORCH_CHECK(grad_out.scalar_type() == logits.scalar_type() && grad_out.is_contiguous() &&
                  grad_out.sizes() == logits.sizes(),
              "grad_out: contiguous, the logits' shape and dtype");
}

}  // namespace dpo_logratio
