// CPU sum of squares over a list of tensors (declared in cpu/kernels.h; the CUDA kernel and the
// design notes are in kernels/sum_squares.cuh).
//
// Design choices
// - Each tensor is cut into fixed 64K-element chunks; a chunk's squares are summed in fp64 (an
//   fp32 value squared is exact in fp64), chunks run in parallel with at::parallel_for, and the
//   chunk sums are added in index order: the same bits for any thread count.
// - bf16/fp16 values are widened with c10's conversions; the total is rounded to fp32 once.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <vector>

#include "cpu/kernels.h"

namespace sftctl {
namespace cpu {

namespace {
constexpr int64_t kSumSqChunk = int64_t{1} << 16;

template <typename T>
double chunk_sum(const T* p, int64_t begin, int64_t end) {
  double s = 0.0;
  for (int64_t i = begin; i < end; ++i) {
    const double x = static_cast<double>(static_cast<float>(p[i]));
    s += x * x;
  }
  return s;
}
}  // namespace

float sum_squares(const SumSquaresTensor* tensors, int64_t n_tensors) {
  double total = 0.0;
  for (int64_t t = 0; t < n_tensors; ++t) {
    const SumSquaresTensor& x = tensors[t];
    if (x.numel <= 0) continue;
    const int64_t chunks = (x.numel + kSumSqChunk - 1) / kSumSqChunk;
    std::vector<double> sums(static_cast<size_t>(chunks), 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t begin = c * kSumSqChunk;
        const int64_t end = begin + kSumSqChunk < x.numel ? begin + kSumSqChunk : x.numel;
        double s;
        if (x.dtype == DType::Float32)
          s = chunk_sum(static_cast<const float*>(x.data), begin, end);
        else if (x.dtype == DType::BFloat16)
          s = chunk_sum(static_cast<const c10::BFloat16*>(x.data), begin, end);
        else
          s = chunk_sum(static_cast<const c10::Half*>(x.data), begin, end);
        sums[static_cast<size_t>(c)] = s;
      }
    });
    for (double s : sums) total += s;
  }
  return static_cast<float>(total);
}

}  // namespace cpu
}  // namespace sftctl
