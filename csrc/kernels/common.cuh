// Device helpers shared by sftctl's CUDA kernels: dtype traits for 16-byte vectors, a device
// assert that survives NDEBUG, and thin PTX wrappers for the Hopper features the cross-entropy
// kernel uses (mbarrier, 1-D bulk copy, thread-block-cluster barrier and distributed shared memory).
//
// Design choices
// - Torch-free: only the CUDA toolkit headers. The kernels see raw pointers and int64 sizes.
// - Every value is widened to fp32 right after it leaves memory and rounded once when stored.
// - The sm_90 wrappers compile to a trap on older targets; the host launcher never selects a
//   kernel that uses them on such a device (it checks the compute capability first).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>

// CUDA's own device-side assert entry point. Called directly (rather than through assert()) so
// that the check stays on in builds that define NDEBUG; the failure surfaces on the host as
// "device-side assert triggered", like ATen's CUDA_KERNEL_ASSERT.
extern "C" __host__ __device__ void __assertfail(const char* message, const char* file,
                                                 unsigned int line, const char* function,
                                                 size_t char_size);

#define SFTCTL_DEVICE_ASSERT(cond, msg)                                     \
  do {                                                                      \
    if (!(cond)) __assertfail(msg, __FILE__, __LINE__, __func__, sizeof(char)); \
  } while (0)

namespace sftctl {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;  // log2(e)

// exp2 on the special-function unit (ex2.approx, ~2 ulp). Callers pass (x - shift) * log2e with
// the shift subtracted *before* the scaling, so no large rounded product enters the exponent.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ---------------------------------------------------------------------------------------------
// 16-byte vectors of logits, widened to fp32.
template <typename T>
struct Vec;

template <>
struct Vec<float> {
  static constexpr int kElems = 4;
  __device__ __forceinline__ static void unpack(const uint4& u, float (&x)[4]) {
    x[0] = __uint_as_float(u.x);
    x[1] = __uint_as_float(u.y);
    x[2] = __uint_as_float(u.z);
    x[3] = __uint_as_float(u.w);
  }
  __device__ __forceinline__ static uint4 pack(const float (&g)[4]) {
    return make_uint4(__float_as_uint(g[0]), __float_as_uint(g[1]), __float_as_uint(g[2]),
                      __float_as_uint(g[3]));
  }
  __device__ __forceinline__ static float load1(const float* p) { return *p; }
  __device__ __forceinline__ static void store1(float* p, float v) { *p = v; }
};

template <>
struct Vec<__nv_bfloat16> {
  static constexpr int kElems = 8;
  // bf16 is the top half of an fp32: widening is a shift or a mask, one op per element.
  __device__ __forceinline__ static void unpack2(uint32_t w, float& lo, float& hi) {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  }
  __device__ __forceinline__ static void unpack(const uint4& u, float (&x)[8]) {
    unpack2(u.x, x[0], x[1]);
    unpack2(u.y, x[2], x[3]);
    unpack2(u.z, x[4], x[5]);
    unpack2(u.w, x[6], x[7]);
  }
  __device__ __forceinline__ static uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // round to nearest even, once
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static uint4 pack(const float (&g)[8]) {
    return make_uint4(pack2(g[0], g[1]), pack2(g[2], g[3]), pack2(g[4], g[5]), pack2(g[6], g[7]));
  }
  __device__ __forceinline__ static float load1(const __nv_bfloat16* p) {
    return __bfloat162float(*p);
  }
  __device__ __forceinline__ static void store1(__nv_bfloat16* p, float v) {
    *p = __float2bfloat16_rn(v);
  }
};

template <>
struct Vec<__half> {
  static constexpr int kElems = 8;
  __device__ __forceinline__ static void unpack2(uint32_t w, float& lo, float& hi) {
    float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
    lo = f.x;
    hi = f.y;
  }
  __device__ __forceinline__ static void unpack(const uint4& u, float (&x)[8]) {
    unpack2(u.x, x[0], x[1]);
    unpack2(u.y, x[2], x[3]);
    unpack2(u.z, x[4], x[5]);
    unpack2(u.w, x[6], x[7]);
  }
  __device__ __forceinline__ static uint32_t pack2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static uint4 pack(const float (&g)[8]) {
    return make_uint4(pack2(g[0], g[1]), pack2(g[2], g[3]), pack2(g[4], g[5]), pack2(g[6], g[7]));
  }
  __device__ __forceinline__ static float load1(const __half* p) { return __half2float(*p); }
  __device__ __forceinline__ static void store1(__half* p, float v) { *p = __float2half_rn(v); }
};

// ---------------------------------------------------------------------------------------------
// Hopper (sm_90) primitives. Each is a no-op trap below sm_90 so that the file still compiles for
// the sm_80 target of the build; the launcher gates their use on the device's capability.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define SFTCTL_SM90 1
#else
#define SFTCTL_SM90 0
#endif

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
#if SFTCTL_SM90
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count)
               : "memory");
#else
  __trap();
#endif
}

// Makes the barrier initialisation visible to the async (copy-engine) proxy and the cluster.
__device__ __forceinline__ void mbar_fence_init() {
#if SFTCTL_SM90
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if SFTCTL_SM90
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
#if SFTCTL_SM90
  uint32_t done = 0;
  const uint32_t a = smem_addr(bar);
  do {
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(a), "r"(parity)
        : "memory");
  } while (!done);
#else
  __trap();
#endif
}

// One-dimensional bulk copy global -> this CTA's shared memory on the copy engine; completion is
// signalled on `bar` as transferred bytes. src and dst 16-byte aligned, bytes a multiple of 16.
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, uint32_t bytes,
                                              uint64_t* bar) {
#if SFTCTL_SM90
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ uint32_t cluster_ctarank() {
#if SFTCTL_SM90
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
#else
  return 0;
#endif
}

// Split cluster barrier: arrive (release) now, wait (acquire) later, so the wait does not stall.
__device__ __forceinline__ void cluster_arrive() {
#if SFTCTL_SM90
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
#else
  __trap();
#endif
}

__device__ __forceinline__ void cluster_wait() {
#if SFTCTL_SM90
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
  __trap();
#endif
}

// Address of the same shared variable in CTA `rank` of this cluster (distributed shared memory).
template <typename T>
__device__ __forceinline__ const T* cluster_map(const T* p, uint32_t rank) {
#if SFTCTL_SM90
  uint64_t out;
  asm volatile("mapa.u64 %0, %1, %2;" : "=l"(out) : "l"(p), "r"(rank));
  return reinterpret_cast<const T*>(out);
#else
  __trap();
  return p;
#endif
}

}  // namespace cuda
}  // namespace sftctl
