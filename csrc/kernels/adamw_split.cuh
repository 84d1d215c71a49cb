// AdamW step on fp32 master weights (sftctl::adamw_split_): the per-element update, shared by the
// CPU loop (csrc/cpu/adamw_split.cpp) and the CUDA multi-tensor kernel below.
//
// Design choices
// - Two layouts of a master, one step for both: split (a bf16 weight the forward computes with
//   plus an int16 low half, bf16 gradient) for Linear weights, and whole (an fp32 weight and
//   gradient) for the rest (embeddings, norms, a tied head). One launch steps a mixed list, so
//   the whole ones do not take a second optimizer (torch's fused AdamW ran at ~2.9 TB/s on an
//   H200 where this kernel's loop runs at ~3.6) and the nonfinite check covers them too.
// - Encoding (core/ops/split_master.py, which this must match bit for bit): with u the fp32 bit
//   pattern of the master, weight = (u + 0x8000) >> 16 (the top half rounded to nearest, ties
//   away from zero) and low = u - (weight << 16) in [-32768, 32767]. weight << 16 has zero low
//   bits, so low's 16-bit pattern is just the low half of u: splitting is one add and two
//   truncations, joining is a shift plus a sign-extended add (mod 2^32). Every bit pattern
//   round-trips, infinities and NaN included, but the step stores a NaN result as the quiet NaN
//   0x7FC00000: CUDA's arithmetic NaN is 0x7FFFFFFF, whose top half rounds into the sign bit
//   (weight -0.0, low -1), so the pair would still decode to NaN while the bf16 weight the
//   forward computes with would be a zero that hides the divergence.
// - Math: fp32 per element in the order of torch's fused AdamW (ADAMW mode): unscale the
//   gradient (a division, as torch does), decoupled weight decay x -= lr * wd * x, the two
//   moment updates, denom = sqrt(v) / sqrt(1 - beta2^step) + eps, x -= step_size * m / denom.
//   Everything derived from the hyperparameters alone (step_size, the bias corrections, 1 - beta,
//   lr * wd) is computed once on the host in double and rounded to fp32 (AdamWSplitScalars).
// - Contraction: nvcc fuses a * b + c into fma by default (-fmad=true; in the PTX the moment
//   updates become fma.rn, and ptxas may fuse the plain mul/sub of the decay and update steps
//   too); the x86-64 CPU build does not (baseline ISA without FMA, and -std=c++17 turns
//   contraction off; a gnu++17 build on aarch64 could contract). So the CPU and CUDA results
//   may differ by an ulp or so. We keep the compilers' defaults: both stay within a few fp32 ulps
//   of a float64 evaluation, and torch's own fused AdamW differs from this formula by as much
//   (its CUDA kernel does part of the arithmetic in double, its CPU kernel updates m as a lerp).
// - found_inf (GradScaler's overflow flag) is read on the device of the step: when nonzero the
//   step writes nothing at all, so weights, lows and moments keep their bits.
// - nonfinite (the trainer's check that an update left every weight finite): the step already
//   holds each new weight in a register, so it tests the bf16 half it writes (the value the
//   forward computes with; a non-finite master always has a non-finite top half, and a finite
//   master near FLT_MAX may round to a bf16 inf) and sets the flag to 1 if any is inf or NaN.
//   A whole fp32 weight is tested the same way: inf, NaN, or a magnitude that rounds to a bf16
//   inf when autocast casts it (|x| >= 0x7F7F8000 as bits, ties to even included).
//   That spares the trainer a separate read of every weight. The flag is only ever set, never
//   cleared, and every writer writes the same 1, so the result does not depend on the order.
// - CUDA: one launch per batch of up to kAdamWMaxTensors parameters; the pointer table and each
//   parameter's first chunk index travel in the kernel parameters (__grid_constant__, read from
//   the constant bank, never copied to local memory). A block owns 64K-element chunks (smaller
//   when a launch has too few to fill the device) in a grid-stride loop (grid = the resident
//   blocks of the device, fewer when there are fewer chunks); inside a chunk each thread
//   updates 8 elements per step with 16-byte loads/stores of weight, low, grad and 2 x 16 bytes
//   of each moment when all five arrays are 16-byte aligned (a whole weight: float4s i and
//   i + 256 of each of its four arrays), element by element otherwise and for the last
//   numel % 8. Every byte is
//   touched once, so loads and stores use the streaming (evict-first) cache hints.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#define SFTCTL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#include <cmath>
#define SFTCTL_HOST_DEVICE inline
#endif

#include "kernels/params.h"

namespace sftctl {

SFTCTL_HOST_DEVICE float adamw_bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

SFTCTL_HOST_DEVICE uint32_t adamw_float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// The fp32 master held by a (weight, low) pair, as its bit pattern.
SFTCTL_HOST_DEVICE uint32_t join_master_bits(uint16_t weight, uint16_t low) {
  return (static_cast<uint32_t>(weight) << 16) +
         static_cast<uint32_t>(static_cast<int32_t>(static_cast<int16_t>(low)));
}

// Inverse of join_master_bits (see the encoding notes above).
SFTCTL_HOST_DEVICE void split_master_bits(uint32_t u, uint16_t& weight, uint16_t& low) {
  weight = static_cast<uint16_t>((u + 0x8000u) >> 16);
  low = static_cast<uint16_t>(u);
}

// Whether bf16 bits encode inf or NaN (exponent all ones).
SFTCTL_HOST_DEVICE bool bf16_bits_nonfinite(uint16_t bits) { return (bits & 0x7F80u) == 0x7F80u; }

// Whether an fp32 value is inf or NaN, or finite but rounds to a bf16 inf (round to nearest,
// ties to even or away: either way every magnitude from 0x7F7F8000 up does).
SFTCTL_HOST_DEVICE bool f32_nonfinite_as_bf16(float x) {
  return (adamw_float_to_bits(x) & 0x7FFFFFFFu) >= 0x7F7F8000u;
}

// One element's AdamW step on the fp32 master x with gradient g; m and v are the moments.
// grad_scale is applied only when has_grad_scale (dividing by an absent scale of 1 would be
// exact too, but costs a division per element).
SFTCTL_HOST_DEVICE float adamw_element(float x, float g, float& m, float& v,
                                       const AdamWSplitScalars& s, bool has_grad_scale,
                                       float grad_scale) {
  if (has_grad_scale) g = g / grad_scale;
  if (s.weight_decay_on) x = x - s.lr_weight_decay * x;
  m = s.beta1 * m + s.one_minus_beta1 * g;
  v = s.beta2 * v + s.one_minus_beta2 * g * g;
  const float denom = sqrtf(v) / s.bias_correction2_sqrt + s.eps;
  return x - s.step_size * m / denom;
}

// The same step on a split master: `weight`/`low` hold it and `grad` the bf16 gradient bits.
SFTCTL_HOST_DEVICE void adamw_split_element(uint16_t& weight, uint16_t& low, uint16_t grad,
                                            float& m, float& v, const AdamWSplitScalars& s,
                                            bool has_grad_scale, float grad_scale) {
  const float x = adamw_element(adamw_bits_to_float(join_master_bits(weight, low)),
                                adamw_bits_to_float(static_cast<uint32_t>(grad) << 16), m, v, s,
                                has_grad_scale, grad_scale);
  split_master_bits(x != x ? 0x7FC00000u : adamw_float_to_bits(x), weight, low);  // NaN: see notes
}

#if defined(__CUDACC__)
namespace cuda {

// Parameters per launch: the table below stays under the 4 KiB of kernel parameters that every
// CUDA version accepts.
constexpr int kAdamWMaxTensors = 48;
// Elements per chunk, the unit of work of one block iteration: 64K, halved (down to 2K) while a
// launch would have fewer chunks than the device has resident blocks. Always a multiple of the
// 8-element vector, so every chunk of an aligned parameter starts aligned.
constexpr int64_t kAdamWMaxChunk = int64_t{1} << 16;
constexpr int64_t kAdamWMinChunk = int64_t{1} << 11;

struct AdamWSplitBatch {
  AdamWSplitTensor tensors[kAdamWMaxTensors];
  int64_t first_chunk[kAdamWMaxTensors + 1];  // chunk index where tensor t starts; [n] = total
  int64_t chunk;                              // elements per chunk
  int n_tensors;
  AdamWSplitScalars s;
};
static_assert(sizeof(AdamWSplitBatch) <= 4000, "kernel parameters must fit 4 KiB");

// 8 consecutive 16-bit values <-> one 16-byte vector (little-endian halves).
__device__ __forceinline__ void unpack_u16x8(const uint4& q, uint16_t (&out)[8]) {
  const uint32_t w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = static_cast<uint16_t>(w[i]);
    out[2 * i + 1] = static_cast<uint16_t>(w[i] >> 16);
  }
}

__device__ __forceinline__ uint4 pack_u16x8(const uint16_t (&in)[8]) {
  uint32_t w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
    w[i] = static_cast<uint32_t>(in[2 * i]) | (static_cast<uint32_t>(in[2 * i + 1]) << 16);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Elements [begin, begin + 8 * count) of parameter t as count 8-element vectors, thread-strided.
template <int THREADS>
__device__ __forceinline__ void adamw_split_vectors(const AdamWSplitTensor& t, int64_t begin,
                                                    int64_t count, const AdamWSplitScalars& s,
                                                    bool has_scale, float scale, bool& bad) {
  const int64_t v0 = begin / 8;  // first vector of the range
  uint4* weight = reinterpret_cast<uint4*>(t.weight) + v0;
  uint4* low = reinterpret_cast<uint4*>(t.low) + v0;
  const uint4* grad = reinterpret_cast<const uint4*>(t.grad) + v0;
  float4* m = reinterpret_cast<float4*>(t.exp_avg) + 2 * v0;
  float4* v = reinterpret_cast<float4*>(t.exp_avg_sq) + 2 * v0;
  for (int64_t i = threadIdx.x; i < count; i += THREADS) {
    uint16_t w8[8], l8[8], g8[8];
    unpack_u16x8(__ldcs(weight + i), w8);
    unpack_u16x8(__ldcs(low + i), l8);
    unpack_u16x8(__ldcs(grad + i), g8);
    const float4 ma = __ldcs(m + 2 * i), mb = __ldcs(m + 2 * i + 1);
    const float4 va = __ldcs(v + 2 * i), vb = __ldcs(v + 2 * i + 1);
    float m8[8] = {ma.x, ma.y, ma.z, ma.w, mb.x, mb.y, mb.z, mb.w};
    float v8[8] = {va.x, va.y, va.z, va.w, vb.x, vb.y, vb.z, vb.w};
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      adamw_split_element(w8[k], l8[k], g8[k], m8[k], v8[k], s, has_scale, scale);
      bad |= bf16_bits_nonfinite(w8[k]);
    }
    __stcs(weight + i, pack_u16x8(w8));
    __stcs(low + i, pack_u16x8(l8));
    __stcs(m + 2 * i, make_float4(m8[0], m8[1], m8[2], m8[3]));
    __stcs(m + 2 * i + 1, make_float4(m8[4], m8[5], m8[6], m8[7]));
    __stcs(v + 2 * i, make_float4(v8[0], v8[1], v8[2], v8[3]));
    __stcs(v + 2 * i + 1, make_float4(v8[4], v8[5], v8[6], v8[7]));
  }
}

// Elements [begin, end) of parameter t one at a time, thread-strided.
template <int THREADS>
__device__ __forceinline__ void adamw_split_scalars(const AdamWSplitTensor& t, int64_t begin,
                                                    int64_t end, const AdamWSplitScalars& s,
                                                    bool has_scale, float scale, bool& bad) {
  uint16_t* low = reinterpret_cast<uint16_t*>(t.low);
  for (int64_t i = begin + threadIdx.x; i < end; i += THREADS) {
    uint16_t w = t.weight[i], l = low[i];
    float m = t.exp_avg[i], v = t.exp_avg_sq[i];
    adamw_split_element(w, l, t.grad[i], m, v, s, has_scale, scale);
    bad |= bf16_bits_nonfinite(w);
    t.weight[i] = w;
    low[i] = l;
    t.exp_avg[i] = m;
    t.exp_avg_sq[i] = v;
  }
}

// Four elements of a whole fp32 parameter (one float4 of each array).
__device__ __forceinline__ void adamw_whole_quad(float4& w, const float4& g, float4& m, float4& v,
                                                 const AdamWSplitScalars& s, bool has_scale,
                                                 float scale, bool& bad) {
  w.x = adamw_element(w.x, g.x, m.x, v.x, s, has_scale, scale);
  w.y = adamw_element(w.y, g.y, m.y, v.y, s, has_scale, scale);
  w.z = adamw_element(w.z, g.z, m.z, v.z, s, has_scale, scale);
  w.w = adamw_element(w.w, g.w, m.w, v.w, s, has_scale, scale);
  bad |= f32_nonfinite_as_bf16(w.x) | f32_nonfinite_as_bf16(w.y) | f32_nonfinite_as_bf16(w.z) |
         f32_nonfinite_as_bf16(w.w);
}

// Elements [begin, begin + 8 * count) of a whole fp32 parameter as 2 * count float4s. A thread
// takes float4 i and i + THREADS in one iteration: every load instruction of a warp reads 512
// contiguous bytes (a thread owning two adjacent float4s would leave half of each sector to a
// second instruction), and eight 16-byte loads are in flight per thread.
template <int THREADS>
__device__ __forceinline__ void adamw_whole_vectors(const AdamWSplitTensor& t, int64_t begin,
                                                    int64_t count, const AdamWSplitScalars& s,
                                                    bool has_scale, float scale, bool& bad) {
  const int64_t q0 = begin / 4;  // first float4 of the range
  const int64_t quads = 2 * count;
  float4* w = reinterpret_cast<float4*>(t.weight_f32) + q0;
  const float4* g = reinterpret_cast<const float4*>(t.grad_f32) + q0;
  float4* m = reinterpret_cast<float4*>(t.exp_avg) + q0;
  float4* v = reinterpret_cast<float4*>(t.exp_avg_sq) + q0;
  for (int64_t i = threadIdx.x; i < quads; i += 2 * THREADS) {
    const int64_t j = i + THREADS;
    if (j < quads) {
      float4 wa = __ldcs(w + i), wb = __ldcs(w + j);
      const float4 ga = __ldcs(g + i), gb = __ldcs(g + j);
      float4 ma = __ldcs(m + i), mb = __ldcs(m + j);
      float4 va = __ldcs(v + i), vb = __ldcs(v + j);
      adamw_whole_quad(wa, ga, ma, va, s, has_scale, scale, bad);
      adamw_whole_quad(wb, gb, mb, vb, s, has_scale, scale, bad);
      __stcs(w + i, wa);
      __stcs(w + j, wb);
      __stcs(m + i, ma);
      __stcs(m + j, mb);
      __stcs(v + i, va);
      __stcs(v + j, vb);
    } else {
      float4 wa = __ldcs(w + i), ma = __ldcs(m + i), va = __ldcs(v + i);
      const float4 ga = __ldcs(g + i);
      adamw_whole_quad(wa, ga, ma, va, s, has_scale, scale, bad);
      __stcs(w + i, wa);
      __stcs(m + i, ma);
      __stcs(v + i, va);
    }
  }
}

// Elements [begin, end) of a whole fp32 parameter one at a time, thread-strided.
template <int THREADS>
__device__ __forceinline__ void adamw_whole_scalars(const AdamWSplitTensor& t, int64_t begin,
                                                    int64_t end, const AdamWSplitScalars& s,
                                                    bool has_scale, float scale, bool& bad) {
  for (int64_t i = begin + threadIdx.x; i < end; i += THREADS) {
    float m = t.exp_avg[i], v = t.exp_avg_sq[i];
    const float x = adamw_element(t.weight_f32[i], t.grad_f32[i], m, v, s, has_scale, scale);
    bad |= f32_nonfinite_as_bf16(x);
    t.weight_f32[i] = x;
    t.exp_avg[i] = m;
    t.exp_avg_sq[i] = v;
  }
}

template <int THREADS>
__global__ void __launch_bounds__(THREADS)
    adamw_split_kernel(const __grid_constant__ AdamWSplitBatch batch) {
  const AdamWSplitScalars& s = batch.s;
  // One flag for the whole grid: every thread reads the same word (one broadcast per warp), and
  // the decision is uniform, so a skipped step costs a launch and nothing else.
  if (s.found_inf != nullptr && *s.found_inf != 0.f) return;
  const bool has_scale = s.grad_scale != nullptr;
  const float scale = has_scale ? *s.grad_scale : 1.f;
  const int64_t total = batch.first_chunk[batch.n_tensors];
  bool bad = false;  // this thread wrote a non-finite weight
  int t = 0;  // chunks only grow along the grid-stride loop, so the tensor index does too
  for (int64_t chunk = blockIdx.x; chunk < total; chunk += gridDim.x) {
    while (batch.first_chunk[t + 1] <= chunk) ++t;
    const AdamWSplitTensor& p = batch.tensors[t];
    const int64_t begin = (chunk - batch.first_chunk[t]) * batch.chunk;
    const int64_t end = begin + batch.chunk < p.numel ? begin + batch.chunk : p.numel;
    const uintptr_t addr_bits =
        reinterpret_cast<uintptr_t>(p.weight) | reinterpret_cast<uintptr_t>(p.low) |
        reinterpret_cast<uintptr_t>(p.grad) | reinterpret_cast<uintptr_t>(p.weight_f32) |
        reinterpret_cast<uintptr_t>(p.grad_f32) | reinterpret_cast<uintptr_t>(p.exp_avg) |
        reinterpret_cast<uintptr_t>(p.exp_avg_sq);
    const bool whole = p.weight_f32 != nullptr;  // uniform over the block
    int64_t scalar_from = begin;
    if ((addr_bits & 15) == 0) {
      const int64_t vectors = (end - begin) / 8;
      if (whole)
        adamw_whole_vectors<THREADS>(p, begin, vectors, s, has_scale, scale, bad);
      else
        adamw_split_vectors<THREADS>(p, begin, vectors, s, has_scale, scale, bad);
      scalar_from = begin + 8 * vectors;
    }
    if (whole)
      adamw_whole_scalars<THREADS>(p, scalar_from, end, s, has_scale, scale, bad);
    else
      adamw_split_scalars<THREADS>(p, scalar_from, end, s, has_scale, scale, bad);
  }
  // every thread of the block gets here (the found_inf return above is uniform over the grid)
  if (s.nonfinite != nullptr && __syncthreads_or(bad) && threadIdx.x == 0) *s.nonfinite = 1.f;
}

}  // namespace cuda
#endif  // __CUDACC__

}  // namespace sftctl
