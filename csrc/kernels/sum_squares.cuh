// Sum of squares over a list of tensors (sftctl::sum_squares): the squared global 2-norm that
// gradient clipping needs, in one pass over mixed bf16/fp16/fp32 tensors.
//
// Design choices
// - One read of every element, one launch per batch of up to kSumSqMaxTensors tensors of any mix
//   of dtypes (torch's _foreach_norm needs one call per dtype and, on an H200, read 1.95 GB of
//   bf16 gradients at ~2.4 TB/s in 47 launches).
// - Numerics: each element is widened to fp32 and squared in fp32 (exact up to one rounding);
//   a thread sums the squares of one chunk's elements it owns (at most 256 per chunk) in fp32,
//   then adds that chunk sum to its own fp64 accumulator; blocks reduce their threads' fp64 sums
//   in a fixed tree order and write one fp64 partial each; a one-block kernel adds the partials
//   in index order and rounds the total to fp32 once. Relative error ~ (256 + 1) u_fp32 in the
//   worst case, independent of the element count; no atomics, so the same inputs give the same
//   bits (the chunk-to-block assignment depends only on the grid, which depends only on the
//   device and the sizes).
// - An inf or NaN element makes the sum inf or NaN (the caller's finiteness check relies on it).
// - Chunks of 64K elements (down to 2K while a batch has fewer chunks than resident blocks);
//   16-byte loads when a tensor is 16-byte aligned, scalar loads for the rest and for tails.
#pragma once

#include <cstdint>

#include "kernels/params.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace sftctl {
namespace cuda {

constexpr int kSumSqMaxTensors = 96;
constexpr int64_t kSumSqMaxChunk = int64_t{1} << 16;
constexpr int64_t kSumSqMinChunk = int64_t{1} << 11;

struct SumSquaresBatch {
  SumSquaresTensor tensors[kSumSqMaxTensors];
  int64_t first_chunk[kSumSqMaxTensors + 1];  // chunk index where tensor t starts; [n] = total
  int64_t chunk;                              // elements per chunk
  int n_tensors;
  double* partials;                           // [gridDim.x]: one fp64 sum per block
};
static_assert(sizeof(SumSquaresBatch) <= 4000, "kernel parameters must fit 4 KiB");

__device__ __forceinline__ float sq_of(const float* p, int64_t i) { return p[i] * p[i]; }
__device__ __forceinline__ float sq_of(const __nv_bfloat16* p, int64_t i) {
  const float x = __bfloat162float(p[i]);
  return x * x;
}
__device__ __forceinline__ float sq_of(const __half* p, int64_t i) {
  const float x = __half2float(p[i]);
  return x * x;
}

// Squares of one 16-byte vector (4 fp32 or 8 16-bit values), summed into acc.
__device__ __forceinline__ void add_sq16(const float* p, int64_t v, float& acc) {
  const float4 q = __ldcs(reinterpret_cast<const float4*>(p) + v);
  acc += q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w;
}
__device__ __forceinline__ void add_sq16(const __nv_bfloat16* p, int64_t v, float& acc) {
  const uint4 q = __ldcs(reinterpret_cast<const uint4*>(p) + v);
  const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {  // bf16 -> fp32 is a shift
    const float lo = __uint_as_float(w[k] << 16), hi = __uint_as_float(w[k] & 0xFFFF0000u);
    acc += lo * lo + hi * hi;
  }
}
__device__ __forceinline__ void add_sq16(const __half* p, int64_t v, float& acc) {
  const uint4 q = __ldcs(reinterpret_cast<const uint4*>(p) + v);
  const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float lo = __half2float(__ushort_as_half(static_cast<unsigned short>(w[k])));
    const float hi = __half2float(__ushort_as_half(static_cast<unsigned short>(w[k] >> 16)));
    acc += lo * lo + hi * hi;
  }
}

// One chunk [begin, end) of tensor t: this thread's share of the squares, in fp32.
template <typename T, int THREADS>
__device__ __forceinline__ float chunk_sq(const T* p, int64_t begin, int64_t end) {
  constexpr int64_t kPer16 = 16 / sizeof(T);
  float acc = 0.f;
  int64_t scalar_from = begin;
  if ((reinterpret_cast<uintptr_t>(p) & 15) == 0) {  // begin is a multiple of kPer16
    const int64_t v0 = begin / kPer16, v1 = end / kPer16;
#pragma unroll 4
    for (int64_t v = v0 + threadIdx.x; v < v1; v += THREADS) add_sq16(p, v, acc);
    scalar_from = v1 * kPer16;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < end; i += THREADS) acc += sq_of(p, i);
  return acc;
}

// The block's sum of every thread's `mine`, in a fixed order (warp shuffles, then the warps in
// order); the result is valid in thread 0. Every thread of the block must call it.
template <int THREADS>
__device__ __forceinline__ double block_sum_fp64(double mine) {
  for (int off = 16; off > 0; off >>= 1) mine += __shfl_down_sync(0xffffffffu, mine, off);
  __shared__ double warp_sums[THREADS / 32];
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x / 32] = mine;
  __syncthreads();
  double s = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < THREADS / 32; ++w) s += warp_sums[w];
  return s;
}

template <int THREADS>
__global__ void __launch_bounds__(THREADS)
    sum_squares_kernel(const __grid_constant__ SumSquaresBatch b) {
  const int64_t total = b.first_chunk[b.n_tensors];
  double mine = 0.0;
  int t = 0;  // chunks only grow along the grid-stride loop, so the tensor index does too
  for (int64_t chunk = blockIdx.x; chunk < total; chunk += gridDim.x) {
    while (b.first_chunk[t + 1] <= chunk) ++t;
    const SumSquaresTensor& x = b.tensors[t];
    const int64_t begin = (chunk - b.first_chunk[t]) * b.chunk;
    const int64_t end = begin + b.chunk < x.numel ? begin + b.chunk : x.numel;
    float part;
    if (x.dtype == DType::Float32)
      part = chunk_sq<float, THREADS>(static_cast<const float*>(x.data), begin, end);
    else if (x.dtype == DType::BFloat16)
      part = chunk_sq<__nv_bfloat16, THREADS>(static_cast<const __nv_bfloat16*>(x.data), begin,
                                              end);
    else
      part = chunk_sq<__half, THREADS>(static_cast<const __half*>(x.data), begin, end);
    mine += static_cast<double>(part);
  }
  const double block = block_sum_fp64<THREADS>(mine);
  if (threadIdx.x == 0) b.partials[blockIdx.x] = block;
}

// Adds the n partials and rounds once: thread i sums partials i, i + THREADS, ... in order, then
// the same fixed-order reduction as above.
template <int THREADS>
__global__ void __launch_bounds__(THREADS)
    sum_squares_finish_kernel(const double* partials, int64_t n, float* out) {
  double mine = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += THREADS) mine += partials[i];
  const double total = block_sum_fp64<THREADS>(mine);
  if (threadIdx.x == 0) *out = static_cast<float>(total);
}

}  // namespace cuda
}  // namespace sftctl
#endif  // __CUDACC__
