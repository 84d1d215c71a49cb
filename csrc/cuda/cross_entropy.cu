// Host launchers of the fused cross-entropy and of scale_grad (declared in cuda/launch.h).
//
// Design choices
// - Torch-free: compiled by plain nvcc; errors are thrown as std::runtime_error with the CUDA
//   message, which the binding turns into a Python RuntimeError.
// - Launch plan for a forward: prep kernel (count, checks, scale) -> row kernel -> finalize
//   kernel (Mean/Sum only). Everything is stream-ordered with no host synchronisation and no
//   allocation, so the sequence can be captured in a CUDA graph.
// - Row kernel selection (decided from shape and device only, so a given call always takes the
//   same path and gives the same bits): on sm_90 the cluster/shared-memory kernel, with the
//   smallest cluster whose per-CTA slice fits the slice budget (the largest slice with which
//   three CTAs of 256 threads share an SM, 74.6 KB on an H200, so one CTA's loads overlap the
//   math and gradient stores of the others; see bench/NOTES_cuda.md for the measured
//   alternatives); elsewhere, or when no cluster shape fits, the one-CTA-per-row kernel that
//   re-reads the row from L2.
// - SFTCTL_CE_SLICE_KB, SFTCTL_CE_THREADS (256|512), SFTCTL_CE_CHUNKS and SFTCTL_CE_KERNEL
//   (cluster|global) override the plan at every launch, but only in a tuning build (compiled
//   with -DSFTCTL_CE_TUNING: bench/run_cuda_device.sh, the standalone test, or the extension
//   built with SFTCTL_CE_TUNING=1). A production build never reads the environment on the launch
//   path: its plan is the constants below, so it depends on shape and device alone.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include "cuda/launch.h"
#include "kernels/cross_entropy.cuh"

namespace sftctl {
namespace cuda {
namespace {

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("sftctl CUDA ") + what + ": " + cudaGetErrorString(e));
}

struct DeviceInfo {
  int major = 0;
  int sms = 0;
  int smem_optin = 0;     // max dynamic+static shared memory per block after opt-in
  int smem_per_sm = 0;    // shared memory of one multiprocessor
  int smem_reserved = 0;  // shared memory the driver reserves per block
};

DeviceInfo device_info() {
  static std::mutex mu;
  static std::map<int, DeviceInfo> cache;
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  DeviceInfo d;
  check(cudaDeviceGetAttribute(&d.major, cudaDevAttrComputeCapabilityMajor, dev), "attribute");
  check(cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev), "attribute");
  check(cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
        "attribute");
  check(cudaDeviceGetAttribute(&d.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev),
        "attribute");
  check(cudaDeviceGetAttribute(&d.smem_reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev),
        "attribute");
  cache[dev] = d;
  return d;
}

#ifdef SFTCTL_CE_TUNING
int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long x = std::strtol(v, &end, 10);
  if (*end != '\0' || x <= 0) throw std::runtime_error(std::string(name) + " must be a positive integer");
  return static_cast<int>(x);
}
#endif

// The plan's defaults (bench/NOTES_cuda.md); a tuning build may override each per launch.
// Slice 0 = auto: the largest slice with which 3 CTAs (of 256 threads) still share one multiprocessor
// (fewer CTAs per row, same occupancy: V = 151936 takes 4 CTAs of 74 KB instead of 5 of 59 KB).
// One bulk copy per slice: measured 1-3% faster than four at every V and ignored fraction.
constexpr int kDefaultThreads = 256;
constexpr int kDefaultSliceKb = 0;
constexpr int kDefaultChunks = 1;
constexpr int ctas_per_sm(int threads) { return threads <= 256 ? 3 : 2; }  // = ce_min_blocks

struct Knobs {
  bool force_global = false;
  int threads = kDefaultThreads;
  int slice_kb = kDefaultSliceKb;
  int chunks = kDefaultChunks;
};

Knobs plan_knobs() {
  Knobs k;
#ifdef SFTCTL_CE_TUNING
  const char* force = std::getenv("SFTCTL_CE_KERNEL");
  const std::string want = force ? force : "";
  if (!want.empty() && want != "global" && want != "cluster")
    throw std::runtime_error("SFTCTL_CE_KERNEL must be global or cluster");
  k.force_global = want == "global";
  k.threads = env_int("SFTCTL_CE_THREADS", kDefaultThreads);
  if (k.threads != 256 && k.threads != 512)
    throw std::runtime_error("SFTCTL_CE_THREADS must be 256 or 512");
  k.slice_kb = std::getenv("SFTCTL_CE_SLICE_KB") ? env_int("SFTCTL_CE_SLICE_KB", 1) : 0;
  k.chunks = env_int("SFTCTL_CE_CHUNKS", kDefaultChunks);
#endif
  return k;
}

size_t dtype_size(DType t) { return t == DType::Float32 ? 4 : 2; }

// Raises a kernel's dynamic shared-memory limit (and the cluster-size limit) once per device.
void prepare_kernel(const void* fn, int smem, bool nonportable) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int>, int> done;  // (kernel, device) -> smem set
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  auto key = std::make_tuple(fn, dev);
  auto it = done.find(key);
  if (it != done.end() && it->second >= smem) return;
  check(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem),
        "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  if (nonportable)
    check(cudaFuncSetAttribute(fn, cudaFuncAttributeNonPortableClusterSizeAllowed, 1),
          "cudaFuncSetAttribute(NonPortableClusterSizeAllowed)");
  done[key] = smem;
}

// How many clusters of this shape can be resident at once (0: none; cached per kernel and shape).
int max_active_clusters(const void* fn, int csize, int threads, int smem) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, int, int>, int> cache;
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  auto key = std::make_tuple(fn, dev, csize, threads, smem);
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(csize, 1, 1);
  cfg.blockDim = dim3(threads, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = csize;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, fn, &cfg) != cudaSuccess) n = 0;
  (void)cudaGetLastError();  // an unsupported shape is an answer here, not an error
  std::lock_guard<std::mutex> lock(mu);
  cache[key] = n;
  return n;
}

enum class Kind { Global, Cluster };

struct Plan {
  Kind kind = Kind::Global;
  int csize = 1;
  int vpc = 0;
  int nchunk = 1;  // bulk copies per slice
  int threads = 256;
};

template <typename T, typename G, int THREADS, bool FULL>
const void* kernel_ptr(Kind kind) {
  switch (kind) {
    case Kind::Cluster:
      return reinterpret_cast<const void*>(&ce_forward_kernel<T, G, THREADS, FULL, true>);
    default:
      return reinterpret_cast<const void*>(&ce_forward_kernel<T, G, THREADS, FULL, false>);
  }
}

template <typename T, typename G>
const void* pick_kernel(const Plan& plan, bool full) {
  if (plan.threads == 512)
    return full ? kernel_ptr<T, G, 512, true>(plan.kind) : kernel_ptr<T, G, 512, false>(plan.kind);
  return full ? kernel_ptr<T, G, 256, true>(plan.kind) : kernel_ptr<T, G, 256, false>(plan.kind);
}

// (logits dtype, gradient dtype): the same, or fp32 logits with a bf16/fp16 gradient.
const void* pick_kernel(const Plan& plan, DType dt, DType gdt, bool full) {
  if (dt == DType::Float32 && gdt == DType::BFloat16)
    return pick_kernel<float, __nv_bfloat16>(plan, full);
  if (dt == DType::Float32 && gdt == DType::Float16) return pick_kernel<float, __half>(plan, full);
  if (gdt != dt)
    throw std::runtime_error("sftctl CUDA cross_entropy: a gradient dtype other than the "
                             "logits' is only supported as bf16/fp16 from fp32 logits");
  switch (dt) {
    case DType::Float32: return pick_kernel<float, float>(plan, full);
    case DType::BFloat16: return pick_kernel<__nv_bfloat16, __nv_bfloat16>(plan, full);
    case DType::Float16: return pick_kernel<__half, __half>(plan, full);
  }
  throw std::runtime_error("sftctl CUDA cross_entropy: unknown dtype");
}

// Static shared memory of a kernel (barriers, reduction scratch), cached per kernel.
int64_t static_smem_bytes(const void* fn) {
  static std::mutex mu;
  static std::map<const void*, int64_t> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(fn);
  if (it != cache.end()) return it->second;
  cudaFuncAttributes attr = {};
  check(cudaFuncGetAttributes(&attr, fn), "cudaFuncGetAttributes");
  return cache[fn] = static_cast<int64_t>(attr.sharedSizeBytes);
}

Plan make_plan(const CrossEntropyParams& p, bool full) {
  const DeviceInfo dev = device_info();
  const Knobs knobs = plan_knobs();
  Plan plan;
  plan.threads = knobs.threads;
  if (dev.major < 9 || knobs.force_global) return plan;

  const int64_t elt = static_cast<int64_t>(dtype_size(p.dtype));
  const int64_t nvec_max = std::max<int64_t>(1, p.vocab * elt / 16);  // body vectors, worst case
  Plan probe;
  probe.kind = Kind::Cluster;
  probe.threads = plan.threads;
  const int64_t static_smem = static_smem_bytes(pick_kernel(probe, p.dtype, grad_dtype_of(p), full));
  const int64_t cap_vec = (dev.smem_optin - static_smem) / 16;
  const int64_t slice_target =
      knobs.slice_kb > 0 ? static_cast<int64_t>(knobs.slice_kb) * 1024 / 16
                         : std::max<int64_t>(256, (dev.smem_per_sm / ctas_per_sm(plan.threads) -
                                                   dev.smem_reserved - static_smem) / 16);
  int64_t csize = (nvec_max + slice_target - 1) / slice_target;
  if (csize > 16) csize = 16;  // hardware limit (non-portable above 8)
  const int64_t vpc = (nvec_max + csize - 1) / csize;
  if (vpc > cap_vec) return plan;  // row too long for 16 CTAs of shared memory: global variant
  plan.csize = static_cast<int>(csize);
  plan.vpc = static_cast<int>(vpc);
  plan.kind = Kind::Cluster;
  plan.nchunk = static_cast<int>(std::min<int64_t>(
      std::min(knobs.chunks, kMaxChunks), std::max<int64_t>(1, vpc / 256)));
  const void* fn = pick_kernel(plan, p.dtype, grad_dtype_of(p), full);
  const int smem = plan.vpc * 16;
  prepare_kernel(fn, smem, plan.csize > 8);
  if (max_active_clusters(fn, plan.csize, plan.threads, smem) <= 0) {
    Plan fallback;  // no cluster of this shape fits next to the rest of the GPU's state
    fallback.threads = plan.threads;
    return fallback;
  }
  return plan;
}

}  // namespace

size_t cross_entropy_workspace_bytes(const CrossEntropyParams& p) {
  return static_cast<size_t>(kWsHeader + std::max<int64_t>(p.n_rows, 0)) * sizeof(float);
}

void cross_entropy_forward(const CrossEntropyParams& p, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.n_rows < 0 || p.vocab <= 0)
    throw std::runtime_error("sftctl CUDA cross_entropy: need n_rows >= 0 and vocab > 0, got " +
                             std::to_string(p.n_rows) + " x " + std::to_string(p.vocab));
  if (p.vocab > (int64_t{1} << 30))
    throw std::runtime_error("sftctl CUDA cross_entropy: vocab " + std::to_string(p.vocab) +
                             " is larger than 2^30");
  if (!p.workspace || !p.targets || !p.loss || (p.n_rows > 0 && !p.logits))
    throw std::runtime_error("sftctl CUDA cross_entropy: null workspace, targets, loss or logits");
  if (p.grad && p.grad_row_stride < p.vocab)
    throw std::runtime_error("sftctl CUDA cross_entropy: grad_row_stride < vocab");
  if (p.logits_row_stride < p.vocab)
    throw std::runtime_error("sftctl CUDA cross_entropy: logits_row_stride < vocab");

  ce_prep_kernel<1024><<<1, 1024, 0, stream>>>(p);
  check(cudaGetLastError(), "launch of ce_prep_kernel");

  if (p.n_rows > 0) {
    const bool full = p.softcap != 0.f || p.label_smoothing != 0.f || p.correct != nullptr ||
                      p.logit_scale != 1.f;
    const Plan plan = make_plan(p, full);
    const void* fn = pick_kernel(plan, p.dtype, grad_dtype_of(p), full);
    const bool tma = plan.kind == Kind::Cluster;
    const int smem = tma ? plan.vpc * 16 : 0;
    CeKernelArgs args;
    args.p = p;
    args.csize = plan.csize;
    args.vpc = tma ? plan.vpc : static_cast<int>(p.vocab);
    args.nchunk = plan.nchunk;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = plan.csize;
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    auto launch = [&](int64_t blocks) {
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(static_cast<unsigned>(blocks), 1, 1);
      cfg.blockDim = dim3(plan.threads, 1, 1);
      cfg.dynamicSmemBytes = smem;
      cfg.stream = stream;
      cfg.attrs = attr;
      cfg.numAttrs = tma && plan.csize > 1 ? 1 : 0;
      void* kargs[] = {&args};
      check(cudaLaunchKernelExC(&cfg, fn, kargs), "launch of the cross-entropy row kernel");
    };
    const int64_t max_rows = (int64_t{1} << 31) / plan.csize - 1;  // grid.x limit
    for (int64_t r0 = 0; r0 < p.n_rows; r0 += max_rows) {
      args.row_begin = r0;
      launch(std::min(max_rows, p.n_rows - r0) * plan.csize);
    }
  }
  if (p.reduction != Reduction::None) {
    ce_finalize_kernel<512><<<1, 512, 0, stream>>>(p);
    check(cudaGetLastError(), "launch of ce_finalize_kernel");
  }
}

namespace {
template <typename T>
void launch_scale_grad(void* grad, int64_t n_rows, int64_t vocab, int64_t row_stride,
                       const float* grad_output, bool per_row, const float* grad_scale,
                       cudaStream_t stream) {
  constexpr int kThreads = 256, kUnroll = 4;
  constexpr int64_t chunk = int64_t{kThreads} * Vec<T>::kElems * kUnroll;
  const bool vec = (reinterpret_cast<uintptr_t>(grad) % 16 == 0) &&
                   ((row_stride * static_cast<int64_t>(sizeof(T))) % 16 == 0);
  const int64_t chunks = (vocab + chunk - 1) / chunk;
  if (chunks > 0x7fffffff) throw std::runtime_error("sftctl CUDA scale_grad: vocab too large");
  // About 8 blocks per SM in all (rows are grid-strided): enough to stream a rescale at full
  // bandwidth, and few enough that the usual no-op (grad_output == grad_scale) costs microseconds.
  const int64_t row_blocks = std::max<int64_t>(
      1, std::min<int64_t>({n_rows, 65535, (8 * device_info().sms + chunks - 1) / chunks}));
  dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(row_blocks));
  scale_grad_kernel<T, kThreads, kUnroll><<<grid, kThreads, 0, stream>>>(
      static_cast<T*>(grad), n_rows, vocab, row_stride, grad_output, per_row, grad_scale, vec);
  check(cudaGetLastError(), "launch of scale_grad_kernel");
}
}  // namespace

void scale_grad(void* grad, DType dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
                const float* grad_output, bool per_row, const float* grad_scale, void* stream) {
  if (n_rows <= 0 || vocab <= 0) return;
  if (!grad || !grad_output) throw std::runtime_error("sftctl CUDA scale_grad: null pointer");
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::Float32:
      return launch_scale_grad<float>(grad, n_rows, vocab, row_stride, grad_output, per_row,
                                      grad_scale, s);
    case DType::BFloat16:
      return launch_scale_grad<__nv_bfloat16>(grad, n_rows, vocab, row_stride, grad_output,
                                              per_row, grad_scale, s);
    case DType::Float16:
      return launch_scale_grad<__half>(grad, n_rows, vocab, row_stride, grad_output, per_row,
                                       grad_scale, s);
  }
  throw std::runtime_error("sftctl CUDA scale_grad: unknown dtype");
}

}  // namespace cuda
}  // namespace sftctl
