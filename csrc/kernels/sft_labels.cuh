// CUDA kernel of sft_labels: next-token targets for causal-LM SFT. Semantics: SftLabelsParams in
// kernels/params.h.
//
// Design choices
// - One thread per (b, t): the label depends only on positions t and t + 1 of the same row, so
//   the op is a single coalesced elementwise pass over the optional int64 masks.
// - num_trainable is an integer count: per-block sums then one 64-bit integer atomic per block.
//   Integer addition is associative, so the count is exact and the same every run; the launcher
//   zeroes it with a stream-ordered memset (graph-capturable, no host sync).
#pragma once

#include <cstdint>

#include "kernels/common.cuh"
#include "kernels/params.h"

namespace sftctl {
namespace cuda {

template <int THREADS>
__global__ void __launch_bounds__(THREADS) sft_labels_kernel(const SftLabelsParams p) {
  __shared__ unsigned long long warp_counts[THREADS / 32];
  const int64_t total = p.batch * p.seq_len;
  unsigned long long count = 0;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * THREADS + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * THREADS) {
    const int64_t b = idx / p.seq_len;
    const int64_t t = idx - b * p.seq_len;
    bool keep = t + 1 < p.seq_len;
    if (keep) {
      const int64_t s = idx + 1;  // position t + 1 of the same row
      if (p.attention_mask) keep = p.attention_mask[idx] != 0 && p.attention_mask[s] != 0;
      if (keep && p.loss_mask) keep = p.loss_mask[s] != 0;
      if (keep && p.prompt_lengths) keep = t + 1 >= p.prompt_lengths[b];
      if (keep && p.position_ids) keep = p.position_ids[s] != 0;
      if (keep && p.document_ids) keep = p.document_ids[idx] == p.document_ids[s];
    }
    p.labels[idx] = keep ? p.input_ids[idx + 1] : p.ignore_index;
    count += keep ? 1ull : 0ull;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) count += __shfl_xor_sync(0xffffffffu, count, off);
  if ((threadIdx.x & 31) == 0) warp_counts[threadIdx.x >> 5] = count;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long c = 0;
    for (int w = 0; w < THREADS / 32; ++w) c += warp_counts[w];
    if (c) atomicAdd(reinterpret_cast<unsigned long long*>(p.num_trainable), c);
  }
}

}  // namespace cuda
}  // namespace sftctl
