// CUDA kernels of the batched DPO log-ratio op (megatron_sip/ops/dpo.py); the same two functions,
// signatures and semantics as csrc/dpo_logratio_cpu.cpp.
//
// For N rows of logits over this rank's vocabulary shard [vocab_start, vocab_start + V):
//   stats:    per row (max, sum of exp(x - max), the target's logit or 0 when another shard holds
//             it), in ONE read of the row: each thread keeps a running (max, sum) pair that it
//             rescales when the max grows (online softmax), the pairs are merged with warp shuffles
//             and then across warps through shared memory.
//   backward: grad[n, v] = g[n] * (onehot(y[n])[v] - exp((x[n, v] - max[n]) - logsum[n])), one read
//             of the logits and one write of the gradient in their dtype; rows with g == 0 only
//             write zeros. The max and the log-sum stay apart (their sum, the lse, would be rounded
//             at the magnitude of the logits), and the exponential is the accurate expf: the
//             gradient is as precise as torch's own log_softmax backward.
// One block per row (grid-stride over rows). Rows are walked as a scalar head up to the first
// 16-byte boundary, a body of 16-byte vectors (4 fp32 or 8 bf16; four vectors in flight per thread)
// and a scalar tail, so any vocabulary size and row offset works. Accumulation is fp32; bf16 is
// widened exactly (bit shift) and narrowed with round-to-nearest-even.
#include <torch/extension.h>

#include "dpo_logratio_checks.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kUnroll = 4;      // 16-byte vectors loaded before any is used, per thread
constexpr int kMaxThreads = 1024;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int64_t kMaxGrid = 65535LL * 32;  // rows beyond this are walked grid-stride

// Storage traits: `float` for fp32 rows, `uint16_t` (the bits) for bf16 rows.
template <typename storage_t>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kWidth = 4;  // elements per 16-byte vector
  __device__ __forceinline__ static float load(const float* p) { return __ldg(p); }
  __device__ __forceinline__ static void store(float* p, float y) { *p = y; }
  __device__ __forceinline__ static void unpack(const uint4& r, float (&x)[kWidth]) {
    x[0] = __uint_as_float(r.x);
    x[1] = __uint_as_float(r.y);
    x[2] = __uint_as_float(r.z);
    x[3] = __uint_as_float(r.w);
  }
  __device__ __forceinline__ static uint4 pack(const float (&y)[kWidth]) {
    return make_uint4(__float_as_uint(y[0]), __float_as_uint(y[1]), __float_as_uint(y[2]),
                      __float_as_uint(y[3]));
  }
};

__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits) {
  return __uint_as_float(bits << 16);
}

// Two floats to a bf16 pair (round to nearest even); `lo` lands at the lower address.
__device__ __forceinline__ uint32_t float2_to_bf16_bits(float lo, float hi) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(lo, hi);
  return static_cast<uint32_t>(__bfloat16_as_ushort(pair.x)) |
         (static_cast<uint32_t>(__bfloat16_as_ushort(pair.y)) << 16);
}

template <>
struct Elem<uint16_t> {
  static constexpr int kWidth = 8;
  __device__ __forceinline__ static float load(const uint16_t* p) {
    return bf16_bits_to_float(__ldg(reinterpret_cast<const unsigned short*>(p)));
  }
  __device__ __forceinline__ static void store(uint16_t* p, float y) {
    *p = __bfloat16_as_ushort(__float2bfloat16_rn(y));
  }
  __device__ __forceinline__ static void unpack(const uint4& r, float (&x)[kWidth]) {
    const uint32_t words[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      x[2 * k] = __uint_as_float(words[k] << 16);
      x[2 * k + 1] = __uint_as_float(words[k] & 0xFFFF0000u);
    }
  }
  __device__ __forceinline__ static uint4 pack(const float (&y)[kWidth]) {
    return make_uint4(float2_to_bf16_bits(y[0], y[1]), float2_to_bf16_bits(y[2], y[3]),
                      float2_to_bf16_bits(y[4], y[5]), float2_to_bf16_bits(y[6], y[7]));
  }
};

// Elements before the first 16-byte boundary of `p` (at most `length`).
template <typename storage_t>
__device__ __forceinline__ int64_t head_elements(const storage_t* p, int64_t length) {
  const uint32_t misaligned = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p) & 15u);
  const int64_t head = misaligned == 0 ? 0 : (16 - misaligned) / sizeof(storage_t);
  return head < length ? head : length;
}

// Running (max, sum of exp(x - max)) of one thread; (-inf, 0) before any finite value. NaN logits
// are skipped by the max (fmaxf, like the CPU's `x > max`) but reach the sum, as on CPU.
struct MaxSum {
  float max;
  float sum;
};

// The shift that exponents are taken against: the max, or 0 while the max is still -inf (so that
// -inf values add exp(-inf) = 0 instead of exp(-inf + inf) = NaN, and a NaN still propagates).
__device__ __forceinline__ float reference(float max) { return max == -INFINITY ? 0.f : max; }

// Folds a group of values into the running pair with a single rescale.
template <int kCount>
__device__ __forceinline__ void accumulate(MaxSum& acc, const float (&x)[kCount]) {
  float group_max = x[0];
#pragma unroll
  for (int k = 1; k < kCount; ++k) group_max = fmaxf(group_max, x[k]);
  const float new_max = fmaxf(acc.max, group_max);
  const float ref = reference(new_max);
  float group_sum = 0.f;
#pragma unroll
  for (int k = 0; k < kCount; ++k) group_sum += __expf(x[k] - ref);
  acc.sum = acc.sum * __expf(acc.max - ref) + group_sum;
  acc.max = new_max;
}

__device__ __forceinline__ void merge(MaxSum& acc, float other_max, float other_sum) {
  const float new_max = fmaxf(acc.max, other_max);
  const float ref = reference(new_max);
  acc.sum = acc.sum * __expf(acc.max - ref) + other_sum * __expf(other_max - ref);
  acc.max = new_max;
}

__device__ __forceinline__ void warp_merge(MaxSum& acc) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other_max = __shfl_xor_sync(0xFFFFFFFFu, acc.max, offset);
    const float other_sum = __shfl_xor_sync(0xFFFFFFFFu, acc.sum, offset);
    merge(acc, other_max, other_sum);
  }
}

template <typename storage_t>
__global__ void __launch_bounds__(kMaxThreads)
    stats_kernel(const storage_t* __restrict__ logits, const int64_t* __restrict__ targets,
                 int64_t rows, int64_t vocab, int64_t vocab_start, float* __restrict__ out) {
  using E = Elem<storage_t>;
  constexpr int W = E::kWidth;
  __shared__ float shared_max[kMaxWarps];
  __shared__ float shared_sum[kMaxWarps];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  const int64_t threads = blockDim.x;

  for (int64_t n = blockIdx.x; n < rows; n += gridDim.x) {
    const storage_t* row = logits + n * vocab;

    // The target's logit, loaded up front so that its latency hides behind the row.
    float target_logit = 0.f;
    if (threadIdx.x == 0) {
      const int64_t local = targets[n] - vocab_start;
      if (local >= 0 && local < vocab) target_logit = E::load(row + local);
    }

    MaxSum acc{-INFINITY, 0.f};
    const int64_t head = head_elements(row, vocab);
    if (threadIdx.x < head) {
      const float x[1] = {E::load(row + threadIdx.x)};
      accumulate(acc, x);
    }
    const int64_t vectors = (vocab - head) / W;
    const uint4* body = reinterpret_cast<const uint4*>(row + head);
    int64_t i = threadIdx.x;
    for (; i + (kUnroll - 1) * threads < vectors; i += kUnroll * threads) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) raw[u] = __ldg(body + i + u * threads);
      float x[kUnroll * W];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float part[W];
        E::unpack(raw[u], part);
#pragma unroll
        for (int k = 0; k < W; ++k) x[u * W + k] = part[k];
      }
      accumulate(acc, x);
    }
    for (; i < vectors; i += threads) {
      float x[W];
      E::unpack(__ldg(body + i), x);
      accumulate(acc, x);
    }
    const int64_t tail_start = head + vectors * W;
    for (int64_t v = tail_start + threadIdx.x; v < vocab; v += threads) {
      const float x[1] = {E::load(row + v)};
      accumulate(acc, x);
    }

    // Block reduction: within each warp, then warp 0 over the warps' results.
    warp_merge(acc);
    if (lane == 0) {
      shared_max[warp] = acc.max;
      shared_sum[warp] = acc.sum;
    }
    __syncthreads();
    if (warp == 0) {
      acc.max = lane < warps ? shared_max[lane] : -INFINITY;
      acc.sum = lane < warps ? shared_sum[lane] : 0.f;
      warp_merge(acc);
      if (lane == 0) {
        // A row of -inf (or NaN) only: the CPU kernel's sum of exp(-inf - (-inf)) is NaN.
        if (acc.max == -INFINITY && vocab > 0) acc.sum = NAN;
        out[3 * n] = acc.max;
        out[3 * n + 1] = acc.sum;
        out[3 * n + 2] = target_logit;
      }
    }
    __syncthreads();  // the shared slots are reused by the next row
  }
}

// kVector: the logits and the gradient rows share their alignment modulo 16 bytes, so one head
// length aligns both; otherwise every element goes through the scalar path.
template <typename storage_t, bool kVector>
__global__ void __launch_bounds__(kMaxThreads)
    backward_kernel(const storage_t* __restrict__ logits, const int64_t* __restrict__ targets,
                    const float* __restrict__ maxima, const float* __restrict__ log_sums,
                    const float* __restrict__ grad, int64_t rows, int64_t vocab,
                    int64_t vocab_start, storage_t* __restrict__ out) {
  using E = Elem<storage_t>;
  constexpr int W = E::kWidth;
  const int64_t threads = blockDim.x;

  for (int64_t n = blockIdx.x; n < rows; n += gridDim.x) {
    const storage_t* row = logits + n * vocab;
    storage_t* grad_row = out + n * vocab;
    const float g = grad[n];
    const int64_t head = kVector ? head_elements(row, vocab) : vocab;
    const int64_t vectors = (vocab - head) / W;
    const int64_t tail_start = head + vectors * W;
    uint4* body_out = reinterpret_cast<uint4*>(grad_row + head);

    if (g == 0.f) {  // uniform over the block: zeros, no read of the logits
      for (int64_t v = threadIdx.x; v < head; v += threads) E::store(grad_row + v, 0.f);
      const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
      for (int64_t i = threadIdx.x; i < vectors; i += threads) body_out[i] = zero;
      for (int64_t v = tail_start + threadIdx.x; v < vocab; v += threads) {
        E::store(grad_row + v, 0.f);
      }
      continue;
    }

    const float maximum = maxima[n];
    const float log_sum = log_sums[n];
    const int64_t local = targets[n] - vocab_start;  // may be outside [0, vocab): no one-hot
    // g * (onehot - p): -g * p off the target, g * (1 - p) on it, as on CPU.
    auto value = [&](float x, int64_t v) {
      return g * ((v == local ? 1.f : 0.f) - expf((x - maximum) - log_sum));
    };

    for (int64_t v = threadIdx.x; v < head; v += threads) {
      E::store(grad_row + v, value(E::load(row + v), v));
    }
    const uint4* body = reinterpret_cast<const uint4*>(row + head);
    int64_t i = threadIdx.x;
    for (; i + (kUnroll - 1) * threads < vectors; i += kUnroll * threads) {
      uint4 raw[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) raw[u] = __ldg(body + i + u * threads);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        float x[W];
        E::unpack(raw[u], x);
        const int64_t first = head + (i + u * threads) * W;
#pragma unroll
        for (int k = 0; k < W; ++k) x[k] = value(x[k], first + k);
        body_out[i + u * threads] = E::pack(x);
      }
    }
    for (; i < vectors; i += threads) {
      float x[W];
      E::unpack(__ldg(body + i), x);
      const int64_t first = head + i * W;
#pragma unroll
      for (int k = 0; k < W; ++k) x[k] = value(x[k], first + k);
      body_out[i] = E::pack(x);
    }
    for (int64_t v = tail_start + threadIdx.x; v < vocab; v += threads) {
      E::store(grad_row + v, value(E::load(row + v), v));
    }
  }
}

// Threads per row: enough that each thread has about two unrolled rounds of vectors, at most 512
// (1024 when there are too few rows to fill the GPU with blocks), a multiple of a warp.
int threads_per_row(int64_t rows, int64_t vocab, int width) {
  const int64_t vectors = (vocab + width - 1) / width;
  const int limit = rows < 256 ? kMaxThreads : 512;
  const int64_t per_thread = rows < 256 ? kUnroll : 2 * kUnroll;
  int threads = 32;
  while (threads < limit && threads * per_thread < vectors) threads *= 2;
  return threads;
}

int grid_for(int64_t rows) { return static_cast<int>(rows < kMaxGrid ? rows : kMaxGrid); }

void check(const torch::Tensor& logits, const torch::Tensor& targets) {
  TORCH_CHECK(logits.device().is_cuda() && targets.device() == logits.device(),
              "CUDA tensors on one device expected");
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "logits: contiguous [rows, vocab]");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == logits.size(0) &&
                  targets.scalar_type() == torch::kLong && targets.is_contiguous(),
              "targets: contiguous int64 [rows]");
  TORCH_CHECK(logits.scalar_type() == torch::kFloat || logits.scalar_type() == torch::kBFloat16,
              "logits must be float32 or bfloat16");
}

void check_device(const torch::Tensor& tensor, const torch::Tensor& logits, const char* name) {
  TORCH_CHECK(tensor.device() == logits.device(), name, ": expected on ", logits.device(),
              ", got ", tensor.device());
}

}  // namespace

// stats_out[n] = (max, sum exp(x - max), target logit or 0): the row's local statistics.
void stats(const torch::Tensor& logits, const torch::Tensor& targets, int64_t vocab_start,
           torch::Tensor& stats_out) {
  check(logits, targets);
  check_device(stats_out, logits, "stats_out");
  TORCH_CHECK(stats_out.scalar_type() == torch::kFloat && stats_out.is_contiguous() &&
                  stats_out.numel() == 3 * logits.size(0),
              "stats_out: contiguous float32 [rows, 3]");
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  if (rows == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  if (logits.scalar_type() == torch::kFloat) {
    const int threads = threads_per_row(rows, vocab, Elem<float>::kWidth);
    stats_kernel<float><<<grid_for(rows), threads, 0, stream>>>(
        logits.data_ptr<float>(), targets.data_ptr<int64_t>(), rows, vocab, vocab_start,
        stats_out.data_ptr<float>());
  } else {
    const int threads = threads_per_row(rows, vocab, Elem<uint16_t>::kWidth);
    stats_kernel<uint16_t><<<grid_for(rows), threads, 0, stream>>>(
        reinterpret_cast<const uint16_t*>(logits.data_ptr<c10::BFloat16>()),
        targets.data_ptr<int64_t>(), rows, vocab, vocab_start, stats_out.data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename storage_t>
void launch_backward(const storage_t* logits, const int64_t* targets, const float* maxima,
                     const float* log_sums, const float* grad, int64_t rows, int64_t vocab,
                     int64_t vocab_start, storage_t* out, cudaStream_t stream) {
  const int threads = threads_per_row(rows, vocab, Elem<storage_t>::kWidth);
  const bool same_alignment =
      ((reinterpret_cast<uintptr_t>(logits) ^ reinterpret_cast<uintptr_t>(out)) & 15u) == 0;
  if (same_alignment) {
    backward_kernel<storage_t, true><<<grid_for(rows), threads, 0, stream>>>(
        logits, targets, maxima, log_sums, grad, rows, vocab, vocab_start, out);
  } else {
    backward_kernel<storage_t, false><<<grid_for(rows), threads, 0, stream>>>(
        logits, targets, maxima, log_sums, grad, rows, vocab, vocab_start, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// grad_out = grad[:, None] * (onehot(targets) - exp((logits - max[:, None]) - log_sum[:, None])),
// in the logits' dtype.
void backward(const torch::Tensor& logits, const torch::Tensor& targets, int64_t vocab_start,
              const torch::Tensor& maxima, const torch::Tensor& log_sums, const torch::Tensor& grad,
              torch::Tensor& grad_out) {
  check(logits, targets);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  check_device(maxima, logits, "max");
  check_device(log_sums, logits, "log_sum");
  check_device(grad, logits, "grad");
  check_device(grad_out, logits, "grad_out");
  dpo_logratio::check_backward(logits, maxima, log_sums, grad, grad_out);
  if (rows == 0 || vocab == 0) return;
  const c10::cuda::OptionalCUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(logits.device().index()).stream();
  if (logits.scalar_type() == torch::kFloat) {
    launch_backward(logits.data_ptr<float>(), targets.data_ptr<int64_t>(),
                    maxima.data_ptr<float>(), log_sums.data_ptr<float>(), grad.data_ptr<float>(),
                    rows, vocab, vocab_start, grad_out.data_ptr<float>(), stream);
  } else {
    launch_backward(reinterpret_cast<const uint16_t*>(logits.data_ptr<c10::BFloat16>()),
                    targets.data_ptr<int64_t>(), maxima.data_ptr<float>(),
                    log_sums.data_ptr<float>(), grad.data_ptr<float>(), rows, vocab, vocab_start,
                    reinterpret_cast<uint16_t*>(grad_out.data_ptr<c10::BFloat16>()), stream);
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Batched DPO log-ratio op: CUDA kernels";
  m.def("stats", &stats, "per-row max, sum of exp and target logit over a vocabulary shard");
  m.def("backward", &backward, "gradient of the target log-probs with respect to the logits");
}
