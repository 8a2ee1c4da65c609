// CPU kernels of the batched DPO log-ratio op (megatron_sip/ops/dpo.py).
//
// For N rows of logits over this rank's vocabulary shard [vocab_start, vocab_start + V):
//   stats:    per row (max, sum of exp(x - max), the target's logit or 0 when another shard holds
//             it), fp32 accumulation from fp32 or bf16 loads; one pass for the max, one for the sum.
//   backward: grad[n, v] = g[n] * (onehot(y[n])[v] - exp((x[n, v] - max[n]) - logsum[n])), written
//             in the logits' dtype, with no fp32 copy of the logits and no stored softmax. The max
//             and the log-sum stay apart: their sum (the lse) would be rounded at the magnitude of
//             the logits, and that error would reach every gradient element.
// Rows are split over threads with at::parallel_for; the inner loops run over contiguous memory
// as SIMD loops (OpenMP simd reductions) with a branch-free exp the compiler can vectorise.
#include <torch/extension.h>

#include "dpo_logratio_checks.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>
#include <cstdint>
#include <bit>
#include <limits>

namespace {

inline float load(const float value) { return value; }

// bf16 travels as its uint16_t bits (a struct type would keep the loops scalar).
inline float load(const uint16_t value) {
  // bf16 is the high half of an fp32: widen by a shift.
  return std::bit_cast<float>(static_cast<uint32_t>(value) << 16);
}

inline void store(float* out, const float value) { *out = value; }

inline void store(uint16_t* out, const float value) {
  // Round to nearest even by bit arithmetic; the values here are finite.
  uint32_t bits = std::bit_cast<uint32_t>(value);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  *out = static_cast<uint16_t>(bits >> 16);
}

// exp(x) for x <= 0 (the only arguments here: logits minus their max, then the log-sum), branch-free:
// x = (n + f) ln 2 with n = round(x / ln 2), |f| <= 1/2, 2^f by its Taylor series to degree 7
// (relative error < 1e-8, below fp32 rounding), 2^n through the exponent bits.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;  // exp(-87) ~ 1.6e-38: the smallest normal range, ~0 here
  const float t = x * 1.44269504088896341f;
  const float n = std::floor(t + 0.5f);
  const float f = (t - n) * 0.693147180559945309f;
  float p = 1.98412698412698413e-4f;  // 1/7!
  p = p * f + 1.38888888888888889e-3f;
  p = p * f + 8.33333333333333333e-3f;
  p = p * f + 4.16666666666666667e-2f;
  p = p * f + 1.66666666666666667e-1f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

template <typename scalar_t>
void stats_rows(const scalar_t* logits, const int64_t* targets, int64_t rows, int64_t vocab,
                int64_t vocab_start, float* out) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* row = logits + n * vocab;
      float maximum = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : maximum)
      for (int64_t v = 0; v < vocab; ++v) {
        const float x = load(row[v]);
        maximum = x > maximum ? x : maximum;
      }
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t v = 0; v < vocab; ++v) {
        sum += exp_nonpositive(load(row[v]) - maximum);
      }
      const int64_t local = targets[n] - vocab_start;
      out[3 * n] = maximum;
      out[3 * n + 1] = sum;
      out[3 * n + 2] = (local >= 0 && local < vocab) ? load(row[local]) : 0.f;
    }
  });
}

template <typename scalar_t>
void backward_rows(const scalar_t* logits, const int64_t* targets, const float* maxima,
                   const float* log_sums, const float* grad, int64_t rows, int64_t vocab,
                   int64_t vocab_start, scalar_t* out) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const scalar_t* __restrict__ row = logits + n * vocab;
      scalar_t* __restrict__ grad_row = out + n * vocab;
      const float g = grad[n];
      const float maximum = maxima[n];
      const float log_sum = log_sums[n];
      if (g == 0.f) {
        for (int64_t v = 0; v < vocab; ++v) store(grad_row + v, 0.f);
        continue;
      }
#pragma omp simd
      for (int64_t v = 0; v < vocab; ++v) {
        const float x = load(row[v]);
        store(grad_row + v, -g * exp_nonpositive((x - maximum) - log_sum));
      }
      const int64_t local = targets[n] - vocab_start;
      if (local >= 0 && local < vocab) {
        store(grad_row + local,
              g * (1.f - exp_nonpositive((load(row[local]) - maximum) - log_sum)));
      }
    }
  });
}

void check(const torch::Tensor& logits, const torch::Tensor& targets) {
  TORCH_CHECK(logits.device().is_cpu() && targets.device().is_cpu(), "CPU tensors expected");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "logits: contiguous [rows, vocab]");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) &&
                  targets.scalar_type() == torch::kLong && targets.is_contiguous(),
              "targets: contiguous int64 [rows]");
  TORCH_CHECK(logits.scalar_type() == torch::kFloat || logits.scalar_type() == torch::kBFloat16,
              "logits must be float32 or bfloat16");
}

}  // namespace

// stats_out[n] = (max, sum exp(x - max), target logit or 0): the row's local statistics.
void stats(const torch::Tensor& logits, const torch::Tensor& targets, int64_t vocab_start,
           torch::Tensor& stats_out) {
  check(logits, targets);
  TORCH_CHECK(stats_out.scalar_type() == torch::kFloat && stats_out.is_contiguous() &&
                  stats_out.numel() == 3 * logits.size(0),
              "stats_out: contiguous float32 [rows, 3]");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  if (logits.scalar_type() == torch::kFloat) {
    stats_rows(logits.data_ptr<float>(), targets.data_ptr<int64_t>(), rows, vocab, vocab_start,
               stats_out.data_ptr<float>());
  } else {
    stats_rows(reinterpret_cast<const uint16_t*>(logits.data_ptr<c10::BFloat16>()),
               targets.data_ptr<int64_t>(), rows, vocab, vocab_start, stats_out.data_ptr<float>());
  }
}

// grad_out = grad[:, None] * (onehot(targets) - exp((logits - max[:, None]) - log_sum[:, None])),
// in the logits' dtype.
void backward(const torch::Tensor& logits, const torch::Tensor& targets, int64_t vocab_start,
              const torch::Tensor& maxima, const torch::Tensor& log_sums, const torch::Tensor& grad,
              torch::Tensor& grad_out) {
  check(logits, targets);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  dpo_logratio::check_backward(logits, maxima, log_sums, grad, grad_out);
  if (logits.scalar_type() == torch::kFloat) {
    backward_rows(logits.data_ptr<float>(), targets.data_ptr<int64_t>(), maxima.data_ptr<float>(),
                  log_sums.data_ptr<float>(), grad.data_ptr<float>(), rows, vocab, vocab_start,
                  grad_out.data_ptr<float>());
  } else {
    backward_rows(reinterpret_cast<const uint16_t*>(logits.data_ptr<c10::BFloat16>()),
                  targets.data_ptr<int64_t>(), maxima.data_ptr<float>(), log_sums.data_ptr<float>(),
                  grad.data_ptr<float>(), rows, vocab, vocab_start,
                  reinterpret_cast<uint16_t*>(grad_out.data_ptr<c10::BFloat16>()));
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Batched DPO log-ratio op: CPU kernels";
  m.def("stats", &stats, "per-row max, sum of exp and target logit over a vocabulary shard");
  m.def("backward", &backward, "gradient of the target log-probs with respect to the logits");
}
