// CUDA kernels of the fused cross-entropy (forward that also writes the gradient) and of the
// in-place gradient rescale. Semantics: CrossEntropyParams in kernels/params.h.
//
// Design choices
// - Traffic: a non-ignored row is read from HBM once and its gradient written once. On sm_90 a
//   row is split across a thread-block cluster of `csize` CTAs; each CTA pulls its contiguous
//   slice of the row into shared memory with the bulk-copy engine (cp.async.bulk, a few chunks,
//   each on its own mbarrier so the math starts on the first chunk while the rest arrive), reduces
//   it, exchanges one small partial per CTA through distributed shared memory, and computes the
//   gradient from its shared-memory copy. The second touch never leaves the SM, and since each
//   CTA only ever writes the elements it read itself, the gradient may overwrite the logits
//   (memory mode) with no hazard.
// - Ignored rows are never read: their CTAs only write zeros.
// - Below sm_90, or when a row's slice cannot fit shared memory even with 16 CTAs, the same code
//   runs with one CTA per row reading the row straight from global memory twice (the second read
//   is mostly served by L2). Both variants share every line of arithmetic.
// - Row alignment: a row is cut into a head (elements before the first 16-byte boundary), a body
//   of 16-byte vectors and a tail (< one vector). Any row stride and base offset works; the head
//   and tail (at most 7 elements each) go through scalar loads by one thread.
// - Numerics: online max/sum in fp32 per thread, exponent (x - shift) * log2(e) on ex2.approx
//   (the shift is subtracted before scaling, so no rounded large product biases the lse), partials
//   merged in a fixed order (warp shuffles, warps in order, cluster ranks in order). No float
//   atomics anywhere: the per-row losses go to a workspace and a one-block kernel sums them in
//   fp64 in a fixed order, so the same inputs give the same bits.
// - No host synchronisation: the divisor of the mean (normalizer or count of non-ignored rows)
//   and the gradient scale are computed on the device by a small prep kernel that also checks the
//   targets (device-side assert on a target outside [0, V) that is not ignore_index).
// - Template flags: FULL adds softcap, logit scale, label smoothing and argmax bookkeeping; the
//   common path (none of them) skips that work entirely.
// - Gradient storage type G: the logits' type T, or bf16/fp16 from fp32 logits (the fused linear
//   cross-entropy feeds that gradient straight to its bf16/fp16 backward GEMMs; rounded once).
#pragma once

#include <cstdint>

#include "kernels/common.cuh"
#include "kernels/params.h"

namespace sftctl {
namespace cuda {

constexpr int kMaxChunks = 8;     // bulk copies (each with its own mbarrier) per CTA slice
constexpr int kWsHeader = 4;      // workspace floats before the per-row losses
// workspace layout (floats): [0] gradient scale, [1] divisor of the mean, [2..3] unused,
//                            [kWsHeader + row] loss of each row (Mean/Sum only)

struct CeKernelArgs {
  CrossEntropyParams p;
  int64_t row_begin = 0;  // first row handled by this launch (grids are launched in pieces)
  int csize = 1;          // CTAs per row (the cluster size); 1 for the global-memory variant
  int vpc = 0;            // body vectors (16 B) per CTA slice: the shared buffer's capacity
  int nchunk = 1;         // bulk copies per slice
};

// One CTA's (or thread's) reduction state over a set of columns of one row.
template <bool FULL>
struct RowPart {
  float m;      // running max of z
  float s;      // sum of exp(z - m)
  float zy;     // z at the target column (valid when has_zy)
  int has_zy;
  float sumz;   // FULL: sum of z (label smoothing)
  float best;   // FULL: max z, and its first column
  int bidx;

  __device__ __forceinline__ void init() {
    m = -INFINITY;
    s = 0.f;
    zy = 0.f;
    has_zy = 0;
    sumz = 0.f;
    best = -INFINITY;
    bidx = 0x7fffffff;
  }
};

// Merges b into a. Commutative in every field, so shuffle-xor trees give identical results in
// every lane, and a fixed tree gives identical bits run to run.
template <bool FULL>
__device__ __forceinline__ void merge(RowPart<FULL>& a, const RowPart<FULL>& b) {
  const float M = fmaxf(a.m, b.m);
  const float sa = (a.m == -INFINITY) ? 0.f : a.s * fast_exp2((a.m - M) * kLog2e);
  const float sb = (b.m == -INFINITY) ? 0.f : b.s * fast_exp2((b.m - M) * kLog2e);
  a.m = M;
  a.s = sa + sb;
  if (b.has_zy) {
    a.zy = b.zy;
    a.has_zy = 1;
  }
  if (FULL) {
    a.sumz += b.sumz;
    if (b.best > a.best || (b.best == a.best && b.bidx < a.bidx)) {
      a.best = b.best;
      a.bidx = b.bidx;
    }
  }
}

template <bool FULL>
__device__ __forceinline__ void merge_shfl(RowPart<FULL>& a, int off) {
  RowPart<FULL> b;
  b.m = __shfl_xor_sync(0xffffffffu, a.m, off);
  b.s = __shfl_xor_sync(0xffffffffu, a.s, off);
  b.zy = __shfl_xor_sync(0xffffffffu, a.zy, off);
  b.has_zy = __shfl_xor_sync(0xffffffffu, a.has_zy, off);
  if (FULL) {
    b.sumz = __shfl_xor_sync(0xffffffffu, a.sumz, off);
    b.best = __shfl_xor_sync(0xffffffffu, a.best, off);
    b.bidx = __shfl_xor_sync(0xffffffffu, a.bidx, off);
  }
  // Order the pair by lane so both lanes add the same two numbers in the same order.
  if (threadIdx.x & off) {
    merge(b, a);
    a = b;
  } else {
    merge(a, b);
  }
}

// Row-level constants, computed once per row (identically in every CTA of the cluster).
// The log-sum-exp is kept split as m + log(s): the gradient's exponent is (x - m) * log2(e) -
// log2(s), exact to a few ulp of a small number, where x - lse would carry the rounding of
// lse itself (ulp(lse) is 8e-6 at |lse| = 100).
struct RowConst {
  float m;
  float log2s;
  float lse;
};

// ---------------------------------------------------------------------------------------------
// Per-row geometry and the passes, shared by both variants of the row kernel below.

// Stores one body vector's E = Vec<T>::kElems gradient values at an aligned G pointer: a 16-byte
// store when G == T, E * sizeof(G) bytes (8 for fp32 -> bf16/fp16) otherwise.
template <typename T, typename G>
struct GradStore {
  static constexpr int kBytes = Vec<T>::kElems * static_cast<int>(sizeof(G));
  __device__ __forceinline__ static void store(G* d, const float (&g)[Vec<T>::kElems]) {
    static_assert(Vec<T>::kElems == 4 && sizeof(G) == 2, "narrowing store: fp32 -> 16-bit only");
    *reinterpret_cast<uint2*>(d) = make_uint2(Vec<G>::pack2(g[0], g[1]), Vec<G>::pack2(g[2], g[3]));
  }
};
template <typename T>
struct GradStore<T, T> {
  static constexpr int kBytes = 16;
  __device__ __forceinline__ static void store(T* d, const float (&g)[Vec<T>::kElems]) {
    *reinterpret_cast<uint4*>(d) = Vec<T>::pack(g);
  }
};

// One row as seen by CTA `rank` of its cluster: head | body of 16-byte vectors | tail.
template <typename T, typename G>
struct RowView {
  const T* lrow;
  G* grow;      // null when no gradient is wanted
  int64_t row;
  int64_t y;
  int V;
  int head;     // elements before the first 16-byte boundary of the logits row
  int tail0;    // first element after the body
  int v0, nv;   // this CTA's body vectors [v0, v0 + nv)
  int yvec;     // body vector holding the target column, or -1
  bool first, last, gvec;

  __device__ __forceinline__ RowView(const CrossEntropyParams& p, int64_t r, int rank, int csize,
                                     int vpc) {
    constexpr int E = Vec<T>::kElems;
    row = r;
    V = static_cast<int>(p.vocab);
    lrow = static_cast<const T*>(p.logits) + r * p.logits_row_stride;
    grow = p.grad ? static_cast<G*>(p.grad) + r * p.grad_row_stride : nullptr;
    y = p.targets[r];
    const uint32_t mis = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(lrow)) & 15u;
    head = min(V, static_cast<int>(((16u - mis) & 15u) / sizeof(T)));
    const int nvec = (V - head) / E;
    tail0 = head + nvec * E;
    v0 = min(rank * vpc, nvec);
    nv = min(v0 + vpc, nvec) - v0;
    yvec = (y >= head && y < tail0) ? static_cast<int>(y - head) / E : -1;
    first = rank == 0;
    last = rank == csize - 1;
    gvec = grow != nullptr &&
           (reinterpret_cast<uintptr_t>(grow + head) % GradStore<T, G>::kBytes) == 0;
  }
  __device__ __forceinline__ const uint4* body() const {
    return reinterpret_cast<const uint4*>(lrow + head) + v0;
  }
};

template <typename T, typename G, int THREADS>
__device__ __forceinline__ void zero_row(const CrossEntropyParams& p, const RowView<T, G>& rv) {
  using VG = Vec<G>;
  constexpr int E = Vec<T>::kElems;
  const int tid = threadIdx.x;
  if (rv.grow) {
    if (rv.gvec) {
      const float z[E] = {};
      G* dst = rv.grow + rv.head + rv.v0 * E;
      for (int i = tid; i < rv.nv; i += THREADS) GradStore<T, G>::store(dst + i * E, z);
    } else {
      for (int i = tid; i < rv.nv * E; i += THREADS)
        VG::store1(rv.grow + rv.head + rv.v0 * E + i, 0.f);
    }
    if (rv.first && tid < rv.head) VG::store1(rv.grow + tid, 0.f);
    if (rv.last && tid < rv.V - rv.tail0) VG::store1(rv.grow + rv.tail0 + tid, 0.f);
  }
  if (rv.first && tid == 0) {
    if (p.reduction == Reduction::None)
      p.loss[rv.row] = 0.f;
    else
      p.workspace[kWsHeader + rv.row] = 0.f;
    if (p.lse) p.lse[rv.row] = 0.f;
    if (p.correct) p.correct[rv.row] = false;
  }
}

// The transform of a stored value x into z (FULL kernels only): x * ls, then the softcap.
struct Softcap {
  bool on;
  float cap, inv;
  float ls;  // logit scale
};

// Pass 1 over one scalar column (head/tail elements).
template <bool FULL>
__device__ __forceinline__ void take_scalar(RowPart<FULL>& st, float x, int col, int64_t y,
                                            const Softcap& sc) {
  if (FULL) x *= sc.ls;
  if (FULL && sc.on) x = sc.cap * tanhf(x * sc.inv);
  if (x > st.m) {
    st.s = st.s * fast_exp2((st.m - x) * kLog2e);  // m = -inf: s is 0, 0 * 0 = 0
    st.m = x;
  }
  st.s += fast_exp2((x - ((st.m == -INFINITY) ? 0.f : st.m)) * kLog2e);
  if (col == y) {
    st.zy = x;
    st.has_zy = 1;
  }
  if (FULL) {
    st.sumz += x;
    if (x > st.best) {
      st.best = x;
      st.bidx = col;
    }
  }
}

// Pass 1 over one 16-byte vector (body vector index v of the row).
template <typename T, typename G, bool FULL>
__device__ __forceinline__ void take_vec(RowPart<FULL>& st, const uint4& u, int v,
                                         const RowView<T, G>& rv, const Softcap& sc) {
  constexpr int E = Vec<T>::kElems;
  float x[E];
  Vec<T>::unpack(u, x);
  if (FULL) {
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] *= sc.ls;
  }
  if (FULL && sc.on) {
#pragma unroll
    for (int e = 0; e < E; ++e) x[e] = sc.cap * tanhf(x[e] * sc.inv);
  }
  float vm = x[0];
#pragma unroll
  for (int e = 1; e < E; ++e) vm = fmaxf(vm, x[e]);
  if (vm > st.m) {
    st.s = st.s * fast_exp2((st.m - vm) * kLog2e);
    st.m = vm;
  }
  // m = -inf here means every value so far is -inf: shift by 0 so exp2(-inf) = 0, not NaN.
  const float sh = (st.m == -INFINITY) ? 0.f : st.m;
  float acc = 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e) acc += fast_exp2((x[e] - sh) * kLog2e);
  st.s += acc;
  const int col0 = rv.head + v * E;
  if (v == rv.yvec) {
#pragma unroll
    for (int e = 0; e < E; ++e)
      if (col0 + e == rv.y) st.zy = x[e];
    st.has_zy = 1;
  }
  if (FULL) {
    float zs = 0.f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      zs += x[e];
      if (x[e] > st.best) {
        st.best = x[e];
        st.bidx = col0 + e;
      }
    }
    st.sumz += zs;
  }
}

// Head and tail columns, pass 1 (thread 0 of the first / last CTA).
template <typename T, typename G, bool FULL>
__device__ __forceinline__ void take_edges(RowPart<FULL>& st, const RowView<T, G>& rv,
                                           const Softcap& sc) {
  if (threadIdx.x != 0) return;
  if (rv.first)
    for (int j = 0; j < rv.head; ++j) take_scalar(st, Vec<T>::load1(rv.lrow + j), j, rv.y, sc);
  if (rv.last)
    for (int j = rv.tail0; j < rv.V; ++j)
      take_scalar(st, Vec<T>::load1(rv.lrow + j), j, rv.y, sc);
}

// Warp shuffles, then the warps in order; the CTA's partial ends up in thread 0.
template <int THREADS, bool FULL>
__device__ __forceinline__ RowPart<FULL> block_reduce(RowPart<FULL> st,
                                                      RowPart<FULL>* warp_parts) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) merge_shfl(st, off);
  if ((threadIdx.x & 31) == 0) warp_parts[threadIdx.x >> 5] = st;
  __syncthreads();
  RowPart<FULL> c = warp_parts[0];
  if (threadIdx.x == 0) {
#pragma unroll
    for (int w = 1; w < THREADS / 32; ++w) merge(c, warp_parts[w]);
  }
  return c;
}

// Row constants and the row's outputs from the merged partial (thread 0 of each CTA).
template <typename T, typename G, bool FULL>
__device__ __forceinline__ RowConst finish_row(const CrossEntropyParams& p,
                                               const RowView<T, G>& rv, const RowPart<FULL>& r) {
  RowConst rc;
  const float ln_s = logf(r.s);  // s >= 1: the max term contributes exp(0)
  rc.m = r.m;
  rc.log2s = log2f(r.s);
  rc.lse = r.m + ln_s;
  const float eps = FULL ? p.label_smoothing : 0.f;
  // (m - z_y) + log s: the difference of two logits is exact, no large lse is rounded first
  float loss = (r.m - r.zy) + ln_s;
  if (FULL && eps != 0.f)
    loss = (1.f - eps) * loss + eps * ((r.m - r.sumz / static_cast<float>(rv.V)) + ln_s);
  if (p.z_loss != 0.f) loss += p.z_loss * rc.lse * rc.lse;
  if (rv.first) {
    if (p.reduction == Reduction::None)
      p.loss[rv.row] = loss;
    else
      p.workspace[kWsHeader + rv.row] = loss;
    if (p.lse) p.lse[rv.row] = rc.lse;
    // A NaN logit makes lse NaN (like torch) and the row never counts as correct.
    if (p.correct) p.correct[rv.row] = FULL && r.bidx == rv.y && !isnan(rc.lse);
  }
  return rc;
}

struct GradCoef {
  float m, log2s;  // p_j = exp2((z_j - m) log2(e) - log2(s))
  float c1, c0;    // g_j = p_j c1 + c0 (- cy at the target), times the softcap derivative
  float cy;
};

__device__ __forceinline__ GradCoef grad_coef(const CrossEntropyParams& p, const RowConst& rc,
                                              float scale, bool full, int V) {
  GradCoef k;
  const float eps = full ? p.label_smoothing : 0.f;
  k.m = rc.m;
  k.log2s = rc.log2s;
  k.c1 = scale * (1.f + 2.f * p.z_loss * rc.lse);
  k.c0 = -scale * eps / static_cast<float>(V);
  k.cy = scale * (1.f - eps);
  return k;
}

template <bool FULL>
__device__ __forceinline__ float grad_scalar(float raw, int col, int64_t y, const GradCoef& k,
                                             const Softcap& sc) {
  float x = FULL ? raw * sc.ls : raw, d = 1.f;
  if (FULL && sc.on) {
    const float t = tanhf(x * sc.inv);
    x = sc.cap * t;
    d = 1.f - t * t;
  }
  float g = fmaf(fast_exp2(fmaf(x - k.m, kLog2e, -k.log2s)), k.c1, k.c0);
  if (col == y) g -= k.cy;
  return g * d;
}

// Pass 2 over this CTA's body vectors [lo, hi) read from `src` (shared memory or the global row).
template <typename T, typename G, int THREADS, bool FULL>
__device__ __forceinline__ void grad_body(const RowView<T, G>& rv, const uint4* src, int lo,
                                          int hi, const GradCoef& k, const Softcap& sc) {
  using VT = Vec<T>;
  constexpr int E = VT::kElems;
  G* gdst = rv.grow + rv.head + rv.v0 * E;
#pragma unroll 2
  for (int i = lo + threadIdx.x; i < hi; i += THREADS) {
    const uint4 u = src[i];
    float x[E], g[E];
    VT::unpack(u, x);
    if (FULL) {
#pragma unroll
      for (int e = 0; e < E; ++e) x[e] *= sc.ls;
    }
    if (FULL && sc.on) {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const float t = tanhf(x[e] * sc.inv);
        g[e] = fmaf(fast_exp2(fmaf(sc.cap * t - k.m, kLog2e, -k.log2s)), k.c1, k.c0);
        x[e] = 1.f - t * t;  // reuse x as the softcap derivative
      }
    } else {
#pragma unroll
      for (int e = 0; e < E; ++e)
        g[e] = fmaf(fast_exp2(fmaf(x[e] - k.m, kLog2e, -k.log2s)), k.c1, k.c0);
    }
    if (rv.v0 + i == rv.yvec) {
      const int col0 = rv.head + (rv.v0 + i) * E;
#pragma unroll
      for (int e = 0; e < E; ++e)
        if (col0 + e == rv.y) g[e] -= k.cy;
    }
    if (FULL && sc.on) {
#pragma unroll
      for (int e = 0; e < E; ++e) g[e] *= x[e];
    }
    if (rv.gvec) {
      GradStore<T, G>::store(gdst + i * E, g);
    } else {
      G* d = gdst + i * E;
#pragma unroll
      for (int e = 0; e < E; ++e) Vec<G>::store1(d + e, g[e]);
    }
  }
}

template <typename T, typename G, bool FULL>
__device__ __forceinline__ void grad_edges(const RowView<T, G>& rv, const GradCoef& k,
                                           const Softcap& sc) {
  using VT = Vec<T>;
  using VG = Vec<G>;
  if (threadIdx.x != 0) return;
  if (rv.first)
    for (int j = 0; j < rv.head; ++j)
      VG::store1(rv.grow + j, grad_scalar<FULL>(VT::load1(rv.lrow + j), j, rv.y, k, sc));
  if (rv.last)
    for (int j = rv.tail0; j < rv.V; ++j)
      VG::store1(rv.grow + j, grad_scalar<FULL>(VT::load1(rv.lrow + j), j, rv.y, k, sc));
}

__device__ __forceinline__ Softcap make_softcap(const CrossEntropyParams& p, bool full) {
  Softcap sc;
  sc.on = full && p.softcap > 0.f;
  sc.cap = p.softcap;
  sc.inv = sc.on ? 1.f / p.softcap : 0.f;
  sc.ls = full ? p.logit_scale : 1.f;
  return sc;
}

// ---------------------------------------------------------------------------------------------
// Kernel 1 (one cluster per row): each CTA bulk-copies its slice into shared memory in a few
// chunks, reduces, exchanges partials over DSMEM, writes its slice's gradient. With TMA = false
// it is the portable one-CTA-per-row kernel that reads the row from global memory twice.

// Register budget: 256 threads x 3 CTAs or 512 x 2 per SM (the shared-memory plan's occupancy).
template <int THREADS>
constexpr int ce_min_blocks() {
  return THREADS <= 256 ? 3 : 2;
}

template <typename T, typename G, int THREADS, bool FULL, bool TMA>
__global__ void __launch_bounds__(THREADS, ce_min_blocks<THREADS>())
    ce_forward_kernel(const CeKernelArgs a) {
  extern __shared__ __align__(128) uint4 slice[];  // TMA: this CTA's slice of the row
  __shared__ uint64_t bars[kMaxChunks];
  __shared__ RowPart<FULL> warp_parts[THREADS / 32];
  __shared__ RowPart<FULL> cta_part;  // read by the other CTAs of the cluster
  __shared__ RowConst row_const;

  const CrossEntropyParams& p = a.p;
  const int tid = threadIdx.x;
  const int rank = TMA ? static_cast<int>(cluster_ctarank()) : 0;
  const RowView<T, G> rv(p, a.row_begin + blockIdx.x / a.csize, rank, a.csize, a.vpc);
  if (rv.y == p.ignore_index) {  // zero gradient row; the logits are never read
    zero_row<T, G, THREADS>(p, rv);
    return;
  }
  const uint4* gbody = rv.body();

  // ---- start the loads of this CTA's slice (sm_90: copy engine into shared memory)
  const int nv = rv.nv;
  const int per_chunk = TMA ? (nv + a.nchunk - 1) / a.nchunk : nv;
  const int nchunk = TMA ? a.nchunk : 1;
  if (TMA) {
    if (tid == 0) {
      for (int k = 0; k < nchunk; ++k) mbar_init(&bars[k], 1);
      mbar_fence_init();
      for (int k = 0; k < nchunk; ++k) {
        const int lo = k * per_chunk, hi = min(lo + per_chunk, nv);
        if (hi <= lo) break;
        const uint32_t bytes = static_cast<uint32_t>(hi - lo) * 16u;
        mbar_arrive_expect_tx(&bars[k], bytes);
        bulk_copy_g2s(slice + lo, gbody + lo, bytes, &bars[k]);
      }
    }
    __syncthreads();  // barriers initialised before anyone waits on them
  }
  // gradient factor: the prep kernel's reduction scale x dz/dx x the optional per-row factor
  const float scale = (rv.grow != nullptr) ? p.workspace[0] * p.logit_scale *
                                                 (p.row_scale ? p.row_scale[rv.row] : 1.f)
                                           : 0.f;
  const Softcap sc = make_softcap(p, FULL);
  const uint4* src = TMA ? slice : gbody;

  // ---- pass 1: online max / sum over this CTA's columns
  RowPart<FULL> st;
  st.init();
  take_edges(st, rv, sc);
  for (int k = 0; k < nchunk; ++k) {
    const int lo = k * per_chunk, hi = min(lo + per_chunk, nv);
    if (hi <= lo) break;
    if (TMA) mbar_wait(&bars[k], 0);
#pragma unroll 2
    for (int i = lo + tid; i < hi; i += THREADS) take_vec(st, src[i], rv.v0 + i, rv, sc);
  }

  // ---- reduce: warp, warps in order, cluster ranks in order
  st = block_reduce<THREADS>(st, warp_parts);
  if (tid == 0) cta_part = st;
  if (TMA && a.csize > 1) {
    cluster_arrive();  // release: thread 0's cta_part becomes visible to the cluster
    cluster_wait();
  }
  if (tid == 0) {
    RowPart<FULL> r = cta_part;
    if (TMA && a.csize > 1) {
      r = *cluster_map(&cta_part, 0);
      for (int k = 1; k < a.csize; ++k) merge(r, *cluster_map(&cta_part, k));
    }
    row_const = finish_row(p, rv, r);
  }
  __syncthreads();
  // Peers may still read cta_part: arrive now, wait before exiting (keeps our smem alive).
  if (TMA && a.csize > 1) cluster_arrive();

  // ---- pass 2: gradient from the shared-memory copy (global re-read in the fallback variant)
  if (rv.grow) {
    const GradCoef k = grad_coef(p, row_const, scale, FULL, rv.V);
    grad_edges<T, G, FULL>(rv, k, sc);
    grad_body<T, G, THREADS, FULL>(rv, src, 0, nv, k, sc);
  }
  if (TMA && a.csize > 1) cluster_wait();
}

// Counts the non-ignored targets, checks them, and fixes the gradient scale and the divisor of
// the mean on the device (no host sync). One block.
template <int THREADS>
__global__ void __launch_bounds__(THREADS) ce_prep_kernel(const CrossEntropyParams p) {
  __shared__ long long counts[THREADS / 32];
  long long n = 0;
  for (int64_t i = threadIdx.x; i < p.n_rows; i += THREADS) {
    const int64_t y = p.targets[i];
    if (y == p.ignore_index) continue;
    if (y < 0 || y >= p.vocab) {
      printf("sftctl.cross_entropy: targets[%lld] = %lld is outside [0, %lld) and is not "
             "ignore_index (%lld)\n",
             static_cast<long long>(i), static_cast<long long>(y),
             static_cast<long long>(p.vocab), static_cast<long long>(p.ignore_index));
      SFTCTL_DEVICE_ASSERT(false, "sftctl.cross_entropy: target out of range");
    }
    ++n;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) n += __shfl_xor_sync(0xffffffffu, n, off);
  if ((threadIdx.x & 31) == 0) counts[threadIdx.x >> 5] = n;
  __syncthreads();
  if (threadIdx.x == 0) {
    long long total = 0;
    for (int w = 0; w < THREADS / 32; ++w) total += counts[w];
    const float gs = p.grad_scale ? *p.grad_scale : 1.f;
    float divisor = 1.f, scale = gs;
    if (p.reduction == Reduction::Mean) {
      divisor = p.normalizer ? *p.normalizer : static_cast<float>(total);
      scale = (divisor != 0.f) ? gs / divisor : 0.f;
    }
    p.workspace[0] = scale;
    p.workspace[1] = divisor;
  }
}

// Sum (or mean) of the per-row losses: fixed partition, fp64 accumulation, fixed tree.
template <int THREADS>
__global__ void __launch_bounds__(THREADS) ce_finalize_kernel(const CrossEntropyParams p) {
  __shared__ double part[THREADS];
  double acc = 0.0;
  const float* rows = p.workspace + kWsHeader;
  for (int64_t i = threadIdx.x; i < p.n_rows; i += THREADS) acc += static_cast<double>(rows[i]);
  part[threadIdx.x] = acc;
  __syncthreads();
#pragma unroll
  for (int w = THREADS / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    double total = part[0];
    if (p.reduction == Reduction::Mean) {
      const double divisor = p.workspace[1];
      total = (divisor != 0.0) ? total / divisor : 0.0;
    }
    *p.loss = static_cast<float>(total);
  }
}

// grad *= grad_output / grad_scale, per row or for the whole tensor; rows whose factor is
// exactly 1 (grad_output == grad_scale) are left untouched, so the common case moves no bytes.
template <typename T, int THREADS, int UNROLL>
__global__ void __launch_bounds__(THREADS)
    scale_grad_kernel(T* grad, int64_t n_rows, int64_t vocab, int64_t row_stride,
                      const float* grad_output, bool per_row, const float* grad_scale,
                      bool vec) {
  using VT = Vec<T>;
  constexpr int E = VT::kElems;
  constexpr int64_t kChunk = static_cast<int64_t>(THREADS) * E * UNROLL;
  const float gs = grad_scale ? *grad_scale : 1.f;
  if (!per_row && grad_output[0] == gs) return;  // the usual case: one load, no row loop
  for (int64_t row = blockIdx.y; row < n_rows; row += gridDim.y) {
    const float go = per_row ? grad_output[row] : grad_output[0];
    if (go == gs) continue;
    if (gs == 0.f) {
      // The forward wrote an all-zero gradient: only grad_output == 0 is representable.
      if (go != 0.f && blockIdx.x == 0 && threadIdx.x == 0)
        printf("sftctl.scale_grad_: grad_scale is 0, so the saved gradient is all zeros and "
               "cannot be rescaled to grad_output %g (row %lld); pass a nonzero grad_scale\n",
               go, static_cast<long long>(row));
      SFTCTL_DEVICE_ASSERT(go == 0.f, "sftctl.scale_grad_: grad_scale is 0");
      continue;
    }
    const float f = go / gs;
    T* r = grad + row * row_stride;
    const int64_t lo = blockIdx.x * kChunk;
    const int64_t hi = min(lo + kChunk, vocab);
    if (vec) {
      // row start 16-byte aligned (checked by the launcher); the last partial vector is scalar
      const int64_t vhi = lo + (hi - lo) / E * E;
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int64_t c = lo + (static_cast<int64_t>(u) * THREADS + threadIdx.x) * E;
        if (c < vhi) {
          uint4* ptr = reinterpret_cast<uint4*>(r + c);
          float x[E];
          VT::unpack(*ptr, x);
#pragma unroll
          for (int e = 0; e < E; ++e) x[e] *= f;
          *ptr = VT::pack(x);
        }
      }
      for (int64_t c = vhi + threadIdx.x; c < hi; c += THREADS)
        VT::store1(r + c, VT::load1(r + c) * f);
    } else {
      for (int64_t c = lo + threadIdx.x; c < hi; c += THREADS)
        VT::store1(r + c, VT::load1(r + c) * f);
    }
  }
}

}  // namespace cuda
}  // namespace sftctl
