// Operator registration of sftctl._C: schemas, argument validation, dispatch to the CPU or CUDA
// kernels.
//
// Design
// - The ops are registered with TORCH_LIBRARY (no pybind11 functions on the op path), so they
//   work from torch.ops.sftctl.*, torch.compile, TorchScript and C++ alike.
// - One set of implementation functions serves both devices: each validates every argument with a
//   TORCH_CHECK that names it, fills the torch-free params struct (csrc/kernels/params.h) and calls
//   sftctl::cpu::* or sftctl::cuda::* by the logits' device. Only the registrations differ.
// - Optional scalars (normalizer, grad_scale) and masks are converted on their device (0-dim fp32,
//   int64): tiny tensors, no host synchronization, so a CUDA call never waits on the GPU.
// - Logits may have any row stride (the params carry it); only non-contiguous columns force a
//   copy, which warns once because it costs an N x V temporary. Memory mode cannot copy (it must
//   write into the caller's buffer) and rejects such logits instead.
// - The CPU gradient buffer (N x V, written once, often hundreds of MB) is advised to use
//   transparent huge pages: first-touch page faults of a fresh 4 KiB-page buffer cost more than
//   the whole kernel on a VM (measured: ~75 ms vs ~15 ms for 131 MB), and torch's CPU allocator
//   only does this itself under THP_MEM_ALLOC_ENABLE=1. Advice only: on failure the buffer simply
//   keeps small pages.
// - The Python module init below exists only in the setuptools build (which defines
//   TORCH_EXTENSION_NAME), so `import sftctl._C` loads this library and runs the registrations;
//   the CMake build produces a plain shared library.
#ifdef TORCH_EXTENSION_NAME
#include <Python.h>
#endif

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/kernels.h"
#include "kernels/params.h"

#ifdef SFTCTL_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/launch.h"
#endif

namespace sftctl {
namespace {

using OptTensor = std::optional<at::Tensor>;

DType kernel_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::Float32;
    case at::kBFloat16:
      return DType::BFloat16;
    case at::kHalf:
      return DType::Float16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, bfloat16 or float16, got ",
                  t.scalar_type());
  }
}

void check_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                  const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the same device as ",
              ref_name, " (", ref.device(), "), got ", t.device());
}

// The loss options both losses share (their meaning: csrc/kernels/params.h).
void check_loss_options(const char* op, int64_t reduction, double label_smoothing, double z_loss,
                        double softcap) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing <= 1.0, op,
              ": label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK(z_loss >= 0.0 && std::isfinite(z_loss), op,
              ": z_loss must be a finite number >= 0, got ", z_loss);
  TORCH_CHECK(softcap >= 0.0 && std::isfinite(softcap), op,
              ": softcap must be a finite number >= 0 (0 is off), got ", softcap);
}

void check_supported_device(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), op, ": ", name,
              " must be a CPU or CUDA tensor, got ", t.device());
#ifndef SFTCTL_WITH_CUDA
  TORCH_CHECK(!t.device().is_cuda(), op, ": ", name,
              " is on CUDA but sftctl._C was built without CUDA kernels (rebuild with a CUDA "
              "torch and nvcc available, without SFTCTL_FORCE_CPU)");
#endif
}

// Optional 0-dim scalar -> 0-dim fp32 on the reference device (no host sync).
at::Tensor scalar_f32(const at::Tensor& t, const at::Tensor& ref, const char* op,
                      const char* name) {
  TORCH_CHECK(t.dim() == 0, op, ": ", name, " must be a 0-dim tensor, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()) || at::isIntegralType(t.scalar_type(), false),
              op, ": ", name, " must be a real number tensor, got ", t.scalar_type());
  check_device(t, ref, op, name, "logits");
  return t.to(at::kFloat).contiguous();
}

// Integer index tensor -> contiguous int64.
at::Tensor index_i64(const at::Tensor& t, const char* op, const char* name, bool allow_bool) {
  const bool ok = at::isIntegralType(t.scalar_type(), /*includeBool=*/allow_bool);
  TORCH_CHECK(ok, op, ": ", name, " must be an integer", allow_bool ? " or bool" : "",
              " tensor, got ", t.scalar_type());
  return t.to(at::kLong).contiguous();
}

struct CEInputs {
  at::Tensor logits, targets, normalizer, grad_scale;
  CrossEntropyParams p;
};

CEInputs prepare_ce(const at::Tensor& logits_in, const at::Tensor& targets_in,
                    const OptTensor& normalizer, const OptTensor& grad_scale, int64_t ignore_index,
                    int64_t reduction, double label_smoothing, double z_loss, double softcap,
                    const char* op, bool inplace) {
  CEInputs in;
  check_supported_device(logits_in, op, "logits");
  TORCH_CHECK(logits_in.dim() == 2, op, ": logits must be 2-D [N, V], got shape ",
              logits_in.sizes(), " (sftctl.ops.cross_entropy flattens leading dims)");
  const DType dtype = kernel_dtype(logits_in, op, "logits");
  const int64_t N = logits_in.size(0), V = logits_in.size(1);
  TORCH_CHECK(V >= 1, op, ": logits must have at least one class (V >= 1), got shape ",
              logits_in.sizes());
  TORCH_CHECK(targets_in.dim() == 1, op, ": targets must be 1-D [N], got shape ",
              targets_in.sizes());
  TORCH_CHECK(targets_in.size(0) == N, op, ": targets has ", targets_in.size(0),
              " entries but logits has ", N, " rows");
  check_device(targets_in, logits_in, op, "targets", "logits");
  check_loss_options(op, reduction, label_smoothing, z_loss, softcap);

  if (logits_in.size(1) > 1 && logits_in.stride(1) != 1) {
    TORCH_CHECK(!inplace, op, ": logits must have contiguous columns (stride(1) == 1) in memory "
                "mode, got strides ", logits_in.strides(), "; the gradient is written in place");
    TORCH_WARN_ONCE(op, ": logits columns are not contiguous (strides ", logits_in.strides(),
                    "); making a contiguous copy (an extra N x V buffer)");
    in.logits = logits_in.contiguous();
  } else {
    in.logits = logits_in;
  }
  int64_t row_stride = N > 1 ? in.logits.stride(0) : V;
  if (inplace) {
    TORCH_CHECK(row_stride >= V, op, ": logits rows overlap (stride(0) = ", row_stride, " < V = ",
                V, "); memory mode needs distinct rows to write the gradient into");
  }
  in.targets = index_i64(targets_in, op, "targets", /*allow_bool=*/false);

  CrossEntropyParams& p = in.p;
  p.logits = in.logits.data_ptr();
  p.logits_row_stride = row_stride;
  p.targets = in.targets.data_ptr<int64_t>();
  p.n_rows = N;
  p.vocab = V;
  p.ignore_index = ignore_index;
  p.dtype = dtype;
  p.grad_dtype = static_cast<int>(dtype);
  p.reduction = static_cast<Reduction>(reduction);
  p.label_smoothing = static_cast<float>(label_smoothing);
  p.z_loss = static_cast<float>(z_loss);
  p.softcap = static_cast<float>(softcap);
  if (normalizer.has_value()) {
    TORCH_CHECK(reduction == 1, op, ": normalizer is only used with reduction='mean' (1), got "
                "reduction ", reduction);
    in.normalizer = scalar_f32(*normalizer, in.logits, op, "normalizer");
    p.normalizer = in.normalizer.data_ptr<float>();
  }
  if (grad_scale.has_value()) {
    in.grad_scale = scalar_f32(*grad_scale, in.logits, op, "grad_scale");
    p.grad_scale = in.grad_scale.data_ptr<float>();
  }
  return in;
}

void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;  // 2 MiB, the x86-64/arm64 THP size
  const size_t bytes = t.nbytes();
  if (!t.device().is_cpu() || bytes < 8 * kHuge) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1);  // whole huge pages inside the buffer
  const uintptr_t end = (p + bytes) & ~(kHuge - 1);
  if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

void launch_ce(CrossEntropyParams& p, const at::Tensor& logits) {
  if (logits.is_cuda()) {
#ifdef SFTCTL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(logits.device());
    const size_t ws = cuda::cross_entropy_workspace_bytes(p);
    at::Tensor workspace;
    if (ws > 0) {
      // Freed right after the launch: the caching allocator keeps it stream-ordered.
      workspace = at::empty({static_cast<int64_t>((ws + sizeof(float) - 1) / sizeof(float))},
                            logits.options().dtype(at::kFloat));
      p.workspace = workspace.data_ptr<float>();
    }
    cuda::cross_entropy_forward(p, at::cuda::getCurrentCUDAStream().stream());
#endif
  } else {
    cpu::cross_entropy_forward(p);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> make_ce_outputs(const at::Tensor& logits,
                                                                 int64_t reduction,
                                                                 bool return_lse,
                                                                 bool return_accuracy,
                                                                 CrossEntropyParams& p) {
  const int64_t N = logits.size(0);
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = reduction == 0 ? at::empty({N}, f32) : at::empty({}, f32);
  at::Tensor lse = at::empty({return_lse ? N : 0}, f32);
  at::Tensor correct = at::empty({return_accuracy ? N : 0}, logits.options().dtype(at::kBool));
  p.loss = loss.data_ptr<float>();
  p.lse = return_lse ? lse.data_ptr<float>() : nullptr;
  p.correct = return_accuracy ? correct.data_ptr<bool>() : nullptr;
  return {loss, lse, correct};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cross_entropy(
    const at::Tensor& logits, const at::Tensor& targets, const OptTensor& normalizer,
    const OptTensor& grad_scale, int64_t ignore_index, int64_t reduction, double label_smoothing,
    double z_loss, double softcap, bool return_lse, bool return_accuracy, bool compute_grad) {
  CEInputs in = prepare_ce(logits, targets, normalizer, grad_scale, ignore_index, reduction,
                           label_smoothing, z_loss, softcap, "sftctl::cross_entropy", false);
  auto [loss, lse, correct] = make_ce_outputs(in.logits, reduction, return_lse, return_accuracy,
                                              in.p);
  at::Tensor grad;
  if (compute_grad) {
    grad = at::empty({in.p.n_rows, in.p.vocab}, in.logits.options());  // [N, V], logits dtype
    advise_huge_pages(grad);
    in.p.grad = grad.data_ptr();
    in.p.grad_row_stride = in.p.vocab;
  } else {
    grad = at::empty({0}, in.logits.options());
  }
  launch_ce(in.p, in.logits);
  return {loss, lse, correct, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_(
    at::Tensor& logits, const at::Tensor& targets, const OptTensor& normalizer,
    const OptTensor& grad_scale, int64_t ignore_index, int64_t reduction, double label_smoothing,
    double z_loss, double softcap, bool return_lse, bool return_accuracy) {
  CEInputs in = prepare_ce(logits, targets, normalizer, grad_scale, ignore_index, reduction,
                           label_smoothing, z_loss, softcap, "sftctl::cross_entropy_", true);
  auto outs = make_ce_outputs(in.logits, reduction, return_lse, return_accuracy, in.p);
  in.p.grad = in.logits.data_ptr();  // the gradient overwrites the logits, row by row
  in.p.grad_row_stride = in.p.logits_row_stride;
  launch_ce(in.p, in.logits);
  return outs;
}

void scale_grad_(at::Tensor& grad, const at::Tensor& grad_output, const OptTensor& grad_scale) {
  const char* op = "sftctl::scale_grad_";
  check_supported_device(grad, op, "grad");
  TORCH_CHECK(grad.dim() == 2, op, ": grad must be 2-D [N, V], got shape ", grad.sizes(),
              grad.numel() == 0 ? " (cross_entropy was called with compute_grad=False)" : "");
  const DType dtype = kernel_dtype(grad, op, "grad");
  const int64_t N = grad.size(0), V = grad.size(1);
  TORCH_CHECK(V <= 1 || grad.stride(1) == 1, op,
              ": grad must have contiguous columns (stride(1) == 1), got strides ", grad.strides());
  const int64_t row_stride = N > 1 ? grad.stride(0) : V;
  TORCH_CHECK(row_stride >= V || N <= 1, op, ": grad rows overlap (strides ", grad.strides(), ")");
  check_device(grad_output, grad, op, "grad_output", "grad");
  TORCH_CHECK(grad_output.dim() == 0 || (grad_output.dim() == 1 && grad_output.size(0) == N), op,
              ": grad_output must be 0-dim (mean/sum) or [N] = [", N,
              "] (reduction none), got shape ", grad_output.sizes());
  TORCH_CHECK(at::isFloatingType(grad_output.scalar_type()), op,
              ": grad_output must be a floating tensor, got ", grad_output.scalar_type());
  const bool per_row = grad_output.dim() == 1;
  const at::Tensor go = grad_output.to(at::kFloat).contiguous();
  at::Tensor gs;
  if (grad_scale.has_value()) {
    TORCH_CHECK(grad_scale->dim() == 0, op, ": grad_scale must be a 0-dim tensor, got shape ",
                grad_scale->sizes());
    check_device(*grad_scale, grad, op, "grad_scale", "grad");
    gs = grad_scale->to(at::kFloat).contiguous();
  }
  if (N == 0 || V == 0) return;
  const float* gs_ptr = gs.defined() ? gs.data_ptr<float>() : nullptr;
  if (grad.is_cuda()) {
#ifdef SFTCTL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(grad.device());
    cuda::scale_grad(grad.data_ptr(), dtype, N, V, row_stride, go.data_ptr<float>(), per_row,
                     gs_ptr, at::cuda::getCurrentCUDAStream().stream());
#endif
  } else {
    cpu::scale_grad(grad.data_ptr(), dtype, N, V, row_stride, go.data_ptr<float>(), per_row,
                    gs_ptr);
  }
}

// ---------------------------------------------------------------------------------------------
// Fused linear + cross-entropy (sftctl::linear_cross_entropy): a row-chunked driver around ATen
// GEMMs and the cross-entropy kernels above. See core/ops/functional.py for the design notes.

// Rows per chunk, the unit of the gradient GEMMs: a chunk's logits gradient (rows * V, in the
// GEMM dtype) is kept until dhidden and dweight are computed from it, one GEMM each. Default:
// all n rows in one chunk when their gradient fits kLceChunkBytes plus the [V, d] fp32 dweight
// accumulator that a single chunk spares a 16-bit weight with a gradient (spared_bytes; its
// dweight is then one GEMM written straight into the weight's dtype); otherwise chunks whose
// gradient fits kLceChunkBytes, with that accumulator. Either way the kept gradient plus any
// accumulator stays within kLceChunkBytes + spared_bytes, and one chunk is also the fastest
// plan (no accumulator passes). A multiple of 128 when >= 128. Mirrored by
// core/ops/linear_ce_ref.py (op_chunk_rows).
constexpr int64_t kLceChunkBytes = int64_t{3} << 29;  // 1.5 GiB
// Rows per fp32 logits piece inside a chunk (rows * V * 4 bytes <= kLcePieceBytes): the logits
// only live from their GEMM to the cross-entropy kernel, which turns them into the gradient.
// 512 MiB: on an H200 (d = 4096, V = 128256) the fp32-output logits GEMM in 1024-row pieces
// costs 16% over one bf16-output GEMM, in 512-row pieces 22% (bench/profile_lce.py).
constexpr int64_t kLcePieceBytes = int64_t{512} << 20;

int64_t lce_rows_within(int64_t bytes, int64_t row_bytes) {
  int64_t rows = std::max<int64_t>(1, bytes / std::max<int64_t>(row_bytes, 1));
  if (rows >= 128) rows = rows / 128 * 128;
  return rows;
}

// elem_bytes: bytes per kept gradient value; spared_bytes: the fp32 dweight accumulator a single
// chunk avoids (0 when there is none to avoid).
int64_t lce_chunk_rows(int64_t vocab, int64_t n_rows, int64_t requested, int64_t elem_bytes,
                       int64_t spared_bytes) {
  const int64_t n = std::max<int64_t>(n_rows, 1);
  if (requested > 0) return std::min(requested, n);
  const int64_t row_bytes = elem_bytes * vocab;
  if (n <= (kLceChunkBytes + spared_bytes) / std::max<int64_t>(row_bytes, 1)) return n;
  return std::min(lce_rows_within(kLceChunkBytes, row_bytes), n);
}

// Rows of a [V, d] fp32 temporary per dweight GEMM piece (the CPU's 16-bit dweight written in
// pieces, or the fallback accumulation): bounds that temporary at ~256 MiB.
constexpr int64_t kLceDwPieceBytes = int64_t{256} << 20;

#ifdef SFTCTL_WITH_CUDA
// While one is alive, cuBLAS may still split K but must reduce the partial sums in fp32, so a
// 16-bit GEMM output is its fp32 result rounded once (torch's default lets split-K reduce in
// 16 bits). The op's dhidden and dweight GEMMs write the 16-bit gradients directly under it,
// instead of an fp32 GEMM plus a rounding copy (on an H200 that copy cost the dweight 2.2 ms of
// a 9 ms GEMM). The setting is process-wide: the first guard in sets it, the last one out puts
// back what was there; meanwhile other threads' 16-bit GEMMs can only get more exact.
class ExactCublasReduction {
 public:
  ExactCublasReduction() {
    std::lock_guard<std::mutex> lock(mu_);
    if (depth_++ > 0) return;
    auto& ctx = at::globalContext();
    bf16_ = ctx.allowBF16ReductionCuBLAS();
    fp16_ = ctx.allowFP16ReductionCuBLAS();
    if (bf16_ == at::CuBLASReductionOption::AllowReducedPrecisionWithSplitK)
      ctx.setAllowBF16ReductionCuBLAS(false, true);
    if (fp16_ == at::CuBLASReductionOption::AllowReducedPrecisionWithSplitK)
      ctx.setAllowFP16ReductionCuBLAS(false, true);
  }
  ~ExactCublasReduction() {
    std::lock_guard<std::mutex> lock(mu_);
    if (--depth_ > 0) return;
    auto& ctx = at::globalContext();
    using O = at::CuBLASReductionOption;
    ctx.setAllowBF16ReductionCuBLAS(bf16_ == O::AllowReducedPrecisionWithSplitK,
                                    bf16_ != O::DisallowReducedPrecisionDisallowSplitK);
    ctx.setAllowFP16ReductionCuBLAS(fp16_ == O::AllowReducedPrecisionWithSplitK,
                                    fp16_ != O::DisallowReducedPrecisionDisallowSplitK);
  }
  ExactCublasReduction(const ExactCublasReduction&) = delete;
  ExactCublasReduction& operator=(const ExactCublasReduction&) = delete;

 private:
  static inline std::mutex mu_;
  static inline int depth_ = 0;
  static inline at::CuBLASReductionOption bf16_{}, fp16_{};
};
#endif

bool stream_capturing(const at::Tensor& t) {
#ifdef SFTCTL_WITH_CUDA
  if (t.is_cuda()) {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    const cudaError_t e = cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream().stream(), &st);
    TORCH_CHECK(e == cudaSuccess, "sftctl::linear_cross_entropy: cudaStreamIsCapturing: ",
                cudaGetErrorString(e));
    return st != cudaStreamCaptureStatusNone;
  }
#endif
  (void)t;
  return false;
}

// out[M, N] (fp32) = a[M, K] @ b[K, N] (+ bias[N]), fp32 output and accumulation. On CUDA the
// 16-bit operands go straight to cuBLAS through aten::mm.dtype (fp32 output); on the CPU (where
// that overload does not exist) the caller passes fp32 operands.
void gemm_f32(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  if (a.scalar_type() == at::kFloat) {
    if (bias.defined())
      at::addmm_out(out, bias, a, b);
    else
      at::mm_out(out, a, b);
  } else {
    TORCH_INTERNAL_ASSERT(a.is_cuda(), "16-bit GEMM operands on the CPU");
    at::mm_out(out, a, b, at::kFloat);
    // a 16-bit bias is added in fp32 afterwards (addmm.dtype's bias handling differs between
    // torch versions; LM heads rarely have a bias, so the extra pass is rare)
    if (bias.defined()) out.add_(bias);
  }
}

// acc[M, N] (fp32) += a[M, K] @ b[K, N] for 16-bit a, b on CUDA, accumulated by cuBLAS itself
// (C = acc, beta = 1): aten::addmm.dtype insists on a 16-bit `self`, but aten::baddbmm.dtype_out
// accumulates into its fp32 `out` (passed as self too) with only the batches' dtypes checked.
// Returns false, once and for all, if this torch refuses it; the caller then adds fp32 pieces.
std::atomic<bool> g_lce_baddbmm_ok{true};

bool lce_accumulate_16bit(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (!g_lce_baddbmm_ok.load(std::memory_order_relaxed)) return false;
  at::Tensor acc3 = acc.unsqueeze(0);  // [1, M, N] view of the accumulator
  try {
    at::baddbmm_out(acc3, acc3, a.unsqueeze(0), b.unsqueeze(0), at::kFloat, /*beta=*/1,
                    /*alpha=*/1);
  } catch (const c10::Error& e) {
    g_lce_baddbmm_ok.store(false);
    TORCH_WARN_ONCE("sftctl::linear_cross_entropy: aten::baddbmm.dtype_out cannot accumulate "
                    "the fp32 dweight here (", e.what_without_backtrace(), "); adding fp32 "
                    "GEMM pieces instead (a <= 256 MiB temporary and one more pass per chunk)");
    return false;
  }
  return true;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy(
    const at::Tensor& hidden_in, const at::Tensor& weight, const at::Tensor& targets_in,
    const OptTensor& bias, const OptTensor& normalizer, const OptTensor& grad_scale,
    const OptTensor& row_scale, int64_t ignore_index, int64_t reduction, double label_smoothing,
    double z_loss, double softcap, double logit_scale, bool return_lse, bool grad_hidden,
    bool grad_weight, bool grad_bias, int64_t compact, int64_t chunk_rows) {
  const char* op = "sftctl::linear_cross_entropy";
  // ---- validation
  check_supported_device(hidden_in, op, "hidden");
  TORCH_CHECK(hidden_in.dim() == 2, op, ": hidden must be 2-D [N, d], got shape ",
              hidden_in.sizes(), " (sftctl.ops.linear_cross_entropy flattens leading dims)");
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [V, d], got shape ", weight.sizes());
  const int64_t N = hidden_in.size(0), d = hidden_in.size(1), V = weight.size(0);
  TORCH_CHECK(weight.size(1) == d, op, ": weight has ", weight.size(1),
              " input features but hidden has ", d, " (weight is [V, d])");
  TORCH_CHECK(V >= 1, op, ": weight must have at least one row (V >= 1), got shape ",
              weight.sizes());
  const DType gdt = kernel_dtype(hidden_in, op, "hidden");  // the GEMM dtype
  (void)kernel_dtype(weight, op, "weight");
  check_device(weight, hidden_in, op, "weight", "hidden");
  TORCH_CHECK(targets_in.dim() == 1 && targets_in.size(0) == N, op,
              ": targets must be 1-D [N] = [", N, "], got shape ", targets_in.sizes());
  check_device(targets_in, hidden_in, op, "targets", "hidden");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V, op, ": bias must be 1-D [V] = [", V,
                "], got shape ", bias->sizes());
    (void)kernel_dtype(*bias, op, "bias");
    check_device(*bias, hidden_in, op, "bias", "hidden");
  }
  check_loss_options(op, reduction, label_smoothing, z_loss, softcap);
  TORCH_CHECK(std::isfinite(logit_scale) && logit_scale != 0.0, op,
              ": logit_scale must be a finite nonzero number, got ", logit_scale);
  TORCH_CHECK(chunk_rows >= 0, op, ": chunk_rows must be >= 0 (0: automatic), got ", chunk_rows);
  TORCH_CHECK(!grad_bias || bias.has_value(), op, ": grad_bias without a bias");
  if (normalizer.has_value())
    TORCH_CHECK(reduction == 1, op, ": normalizer is only used with reduction='mean' (1), got "
                "reduction ", reduction);

  // GEMMs and elementwise work below are implementation details: no autograd recording, no
  // autocast (the op decides its own precisions).
  const c10::DeviceGuard device_guard(hidden_in.device());
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);

  const at::ScalarType gst = hidden_in.scalar_type();
  const auto f32 = hidden_in.options().dtype(at::kFloat);
  const bool cuda = hidden_in.is_cuda();
  at::Tensor hidden = hidden_in.contiguous();                      // [N, d]
  at::Tensor targets = index_i64(targets_in, op, "targets", false);  // [N]
  at::Tensor w = weight.scalar_type() == gst ? weight : weight.to(gst);  // [V, d], GEMM dtype
  at::Tensor b;                                                    // [V] GEMM dtype (or fp32)
  if (bias.has_value()) b = bias->scalar_type() == gst ? *bias : bias->to(gst);
  at::Tensor rscale;
  if (row_scale.has_value()) {
    TORCH_CHECK(row_scale->dim() == 1 && row_scale->size(0) == N, op,
                ": row_scale must be 1-D [N] = [", N, "], got shape ", row_scale->sizes());
    check_device(*row_scale, hidden_in, op, "row_scale", "hidden");
    rscale = row_scale->to(at::kFloat).contiguous();
  }
  // CPU GEMMs run on fp32 copies of the 16-bit operands (exact: products of 16-bit values are
  // exact in fp32, accumulation is fp32 either way).
  const bool f32_operands = !cuda && gst != at::kFloat;
  const at::Tensor wg = f32_operands ? w.to(at::kFloat) : w;       // [V, d] GEMM operand
  const at::Tensor bg = !b.defined() ? b : (f32_operands || !cuda ? b.to(at::kFloat) : b);

  // ---- gradient factor and mean divisor, on the device (no host sync)
  const at::Tensor valid = targets.ne(ignore_index);  // [N] bool
  at::Tensor gs = grad_scale.has_value() ? scalar_f32(*grad_scale, hidden, op, "grad_scale")
                                         : at::ones({}, f32);
  at::Tensor divisor;  // mean only
  at::Tensor factor = gs;
  if (reduction == 1) {
    divisor = normalizer.has_value() ? scalar_f32(*normalizer, hidden, op, "normalizer")
                                     : valid.sum().to(at::kFloat);
    const at::Tensor nz = divisor.ne(0);
    factor = at::where(nz, gs / at::where(nz, divisor, at::ones({}, f32)), at::zeros({}, f32));
  }
  factor = factor.contiguous();

  // ---- compaction: drop ignored rows before the GEMMs (a host sync: the count)
  bool do_compact = compact != 0 && N > 0 && !stream_capturing(hidden);
  at::Tensor idx;  // [n] rows kept, when compacting
  at::Tensor h = hidden, t = targets, rs = rscale;
  if (do_compact) {
    at::Tensor keep = at::nonzero(valid).squeeze(1);  // syncs
    if (keep.size(0) < N) {
      idx = keep;
      h = hidden.index_select(0, idx);
      t = targets.index_select(0, idx);
      if (rs.defined()) rs = rs.index_select(0, idx);
    }
  }
  if (!cuda) {  // the CPU kernel checks too, but per chunk; name the row of the whole input
    const at::Tensor bad = valid & (targets.lt(0) | targets.ge(V));
    if (bad.any().item<bool>()) {
      const int64_t i = at::nonzero(bad)[0][0].item<int64_t>();
      TORCH_CHECK(false, op, ": targets[", i, "] = ", targets[i].item<int64_t>(),
                  " is out of range [0, ", V, ") and is not ignore_index (", ignore_index, ")");
    }
  }
  const int64_t n = h.size(0);

  // ---- outputs and accumulators (every row of them is written by the chunks below when n > 0:
  // the first chunk's dweight GEMM overwrites the accumulator, so no zero-fill pass is needed)
  auto alloc = [n](at::IntArrayRef shape, const at::TensorOptions& o) {
    return n > 0 ? at::empty(shape, o) : at::zeros(shape, o);
  };
  at::Tensor row_loss = alloc({n}, f32);  // [n]
  at::Tensor lse_c = alloc({n}, f32);     // [n]
  const bool any_grad = grad_hidden || grad_weight || grad_bias;
  at::Tensor dh_c = grad_hidden ? alloc({n, d}, hidden.options()) : at::Tensor();  // [n, d]
  const bool dw_direct = grad_weight && weight.scalar_type() == at::kFloat;
  // (on the CPU a 16-bit chunk's gradient also gets an fp32 copy for the GEMMs: 6 bytes a value)
  const int64_t R = lce_chunk_rows(V, n, chunk_rows, f32_operands ? 6 : hidden.element_size(),
                                   grad_weight && !dw_direct ? V * d * 4 : 0);
  const int64_t P = std::min(R, lce_rows_within(kLcePieceBytes, 4 * V));  // fp32 logits piece
  // a 16-bit weight whose rows all fit one chunk: dweight from one GEMM written in the weight's
  // dtype (CUDA: by cuBLAS from its fp32 accumulator; CPU: fp32 pieces, each rounded once);
  // otherwise an fp32 [V, d] accumulator (for an fp32 weight: the returned gradient itself)
  const bool dw_once = grad_weight && !dw_direct && n > 0 && n <= R;
  // dw_acc / dw_out [V, d] are allocated at the first dweight GEMM: with one chunk the fp32
  // logits piece is released by then, so the two never count together in the peak
  at::Tensor dw_acc, dw_out;
#ifdef SFTCTL_WITH_CUDA
  // 16-bit GEMM outputs below are rounded once from fp32 (see ExactCublasReduction)
  std::optional<ExactCublasReduction> exact_reduction;
  if (cuda && gst != at::kFloat) exact_reduction.emplace();
#endif
  at::Tensor db_acc = grad_bias ? at::zeros({V}, f32) : at::Tensor();  // [V]

  at::Tensor zbuf, gbuf, dh_tmp, dw_tmp;
  if (n > 0) {
    zbuf = at::empty({std::min(P, n), V}, f32);  // fp32 logits of one piece
    if (any_grad) gbuf = at::empty({std::min(R, n), V}, hidden.options());  // dlogits of a chunk
  }
  const int64_t dw_piece =
      std::max<int64_t>(1, std::min<int64_t>(V, kLceDwPieceBytes / (4 * std::max<int64_t>(d, 1))));
  for (int64_t r0 = 0, chunk = 0; r0 < n; r0 += R, ++chunk) {
    const int64_t rows = std::min(R, n - r0);
    // logits piece by piece -> the cross-entropy kernel -> this chunk's gradient rows in gbuf
    for (int64_t p0 = 0; p0 < rows; p0 += P) {
      const int64_t prow = std::min(P, rows - p0);
      const at::Tensor hp = h.narrow(0, r0 + p0, prow);                  // [prow, d]
      at::Tensor z = zbuf.narrow(0, 0, prow);                             // [prow, V] fp32
      gemm_f32(z, f32_operands ? hp.to(at::kFloat) : hp, wg.t(), bg);

      CrossEntropyParams p;
      const at::Tensor tp = t.narrow(0, r0 + p0, prow);
      p.logits = z.data_ptr();
      p.logits_row_stride = V;
      p.targets = tp.data_ptr<int64_t>();
      p.n_rows = prow;
      p.vocab = V;
      p.ignore_index = ignore_index;
      p.dtype = DType::Float32;
      p.reduction = Reduction::None;  // per-row losses; the driver reduces (the divisor is global)
      p.label_smoothing = static_cast<float>(label_smoothing);
      p.z_loss = static_cast<float>(z_loss);
      p.softcap = static_cast<float>(softcap);
      p.logit_scale = static_cast<float>(logit_scale);
      p.grad_scale = factor.data_ptr<float>();
      p.loss = row_loss.data_ptr<float>() + r0 + p0;
      p.lse = lse_c.data_ptr<float>() + r0 + p0;
      if (any_grad) {
        at::Tensor g = gbuf.narrow(0, p0, prow);                          // [prow, V]
        p.grad = g.data_ptr();
        p.grad_row_stride = V;
        p.grad_dtype = static_cast<int>(gdt);
        if (rs.defined()) p.row_scale = rs.data_ptr<float>() + r0 + p0;
      }
      launch_ce(p, z);
    }
    if (r0 + rows >= n) zbuf.reset();  // the last logits piece is done (stream-ordered reuse)
    if (!any_grad) continue;

    const at::Tensor hc = h.narrow(0, r0, rows);                          // [rows, d]
    const at::Tensor hg = f32_operands ? hc.to(at::kFloat) : hc;          // GEMM operand
    const at::Tensor g = gbuf.narrow(0, 0, rows);                         // [rows, V]
    const at::Tensor gg = f32_operands ? g.to(at::kFloat) : g;            // GEMM operand
    if (grad_hidden) {
      at::Tensor dst = dh_c.narrow(0, r0, rows);  // [rows, d]
      if (gst == at::kFloat || cuda) {
        at::mm_out(dst, gg, wg);  // 16-bit on CUDA: fp32 accumulation, rounded once
      } else {
        if (!dh_tmp.defined()) dh_tmp = at::empty({std::min(R, n), d}, f32);
        at::Tensor tmp = dh_tmp.narrow(0, 0, rows);
        gemm_f32(tmp, gg, wg, at::Tensor());
        dst.copy_(tmp);  // rounded once to hidden's dtype
      }
    }
    if (grad_weight) {
      const at::Tensor gt = gg.t();  // [V, rows]
      // dst (+)= gt @ hg through fp32 pieces of <= kLceDwPieceBytes, each rounded/added once
      auto dw_by_pieces = [&](at::Tensor& dst, bool add) {
        for (int64_t v0 = 0; v0 < V; v0 += dw_piece) {
          const int64_t vp = std::min(dw_piece, V - v0);
          if (!dw_tmp.defined()) dw_tmp = at::empty({std::min(dw_piece, V), d}, f32);
          at::Tensor tmp = dw_tmp.narrow(0, 0, vp);
          gemm_f32(tmp, gt.narrow(0, v0, vp), hg, at::Tensor());
          at::Tensor part = dst.narrow(0, v0, vp);
          if (add)
            part.add_(tmp);
          else
            part.copy_(tmp);
        }
      };
      if (dw_once) dw_out = at::empty({V, d}, weight.options());
      if (!dw_once && chunk == 0) dw_acc = at::empty({V, d}, f32);
      if (dw_once && cuda && weight.scalar_type() == gst) {
        at::mm_out(dw_out, gt, hg);  // the whole dweight in one GEMM, rounded once
      } else if (dw_once) {
        dw_by_pieces(dw_out, false);  // the whole dweight from this one chunk, rounded once
      } else if (chunk == 0) {
        gemm_f32(dw_acc, gt, hg, at::Tensor());  // the first chunk writes the accumulator
      } else if (gst == at::kFloat || f32_operands) {
        at::addmm_out(dw_acc, dw_acc, gt, hg);  // fp32 operands: accumulate in the GEMM (beta 1)
      } else if (!lce_accumulate_16bit(dw_acc, gt, hg)) {
        dw_by_pieces(dw_acc, true);  // fallback: fp32 pieces added to the accumulator
      }
    }
    if (grad_bias) db_acc.add_(at::sum(g, {0}, false, at::kFloat));
  }

  // ---- reduce, scatter back the compacted rows, round the gradients
  at::Tensor loss;
  if (reduction == 0) {
    loss = idx.defined() ? at::zeros({N}, f32).index_copy_(0, idx, row_loss) : row_loss;
  } else {
    at::Tensor total = row_loss.sum(at::kDouble);  // fixed-order reduction: deterministic
    if (reduction == 1) {
      const at::Tensor div = divisor.to(at::kDouble);
      const at::Tensor nz = div.ne(0);
      total = at::where(nz, total / at::where(nz, div, at::ones_like(div)), at::zeros_like(div));
    }
    loss = total.to(at::kFloat);
  }
  at::Tensor lse = at::empty({0}, f32);
  if (return_lse)
    lse = idx.defined() ? at::zeros({N}, f32).index_copy_(0, idx, lse_c) : lse_c;
  at::Tensor dh = at::empty({0}, hidden.options());
  if (grad_hidden)
    dh = idx.defined() ? at::zeros({N, d}, hidden.options()).index_copy_(0, idx, dh_c) : dh_c;
  at::Tensor dw = at::empty({0}, weight.options());
  if (grad_weight && !dw_once && !dw_acc.defined()) dw_acc = at::zeros({V, d}, f32);  // n == 0
  if (grad_weight) dw = dw_once ? dw_out : (dw_direct ? dw_acc : dw_acc.to(weight.scalar_type()));
  at::Tensor db = at::empty({0}, bias.has_value() ? bias->options() : f32);
  if (grad_bias) db = db_acc.to(bias->scalar_type());
  return {loss, lse, dh, dw, db};
}

std::tuple<at::Tensor, at::Tensor> sft_labels(const at::Tensor& input_ids,
                                              const OptTensor& loss_mask,
                                              const OptTensor& prompt_lengths,
                                              const OptTensor& attention_mask,
                                              const OptTensor& position_ids,
                                              const OptTensor& document_ids,
                                              int64_t ignore_index) {
  const char* op = "sftctl::sft_labels";
  check_supported_device(input_ids, op, "input_ids");
  TORCH_CHECK(input_ids.dim() == 2, op, ": input_ids must be 2-D [B, T], got shape ",
              input_ids.sizes());
  const int64_t B = input_ids.size(0), T = input_ids.size(1);
  SftLabelsParams p;
  const at::Tensor ids = index_i64(input_ids, op, "input_ids", false);
  p.input_ids = ids.data_ptr<int64_t>();
  p.batch = B;
  p.seq_len = T;
  p.ignore_index = ignore_index;

  auto bt_mask = [&](const OptTensor& t, const char* name, bool allow_bool) -> at::Tensor {
    if (!t.has_value()) return at::Tensor();
    TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == T, op, ": ", name,
                " must have the shape of input_ids [", B, ", ", T, "], got ", t->sizes());
    check_device(*t, input_ids, op, name, "input_ids");
    return index_i64(*t, op, name, allow_bool);
  };
  const at::Tensor lm = bt_mask(loss_mask, "loss_mask", true);
  const at::Tensor am = bt_mask(attention_mask, "attention_mask", true);
  const at::Tensor pos = bt_mask(position_ids, "position_ids", false);
  const at::Tensor doc = bt_mask(document_ids, "document_ids", false);
  at::Tensor pl;
  if (prompt_lengths.has_value()) {
    TORCH_CHECK(prompt_lengths->dim() == 1 && prompt_lengths->size(0) == B, op,
                ": prompt_lengths must be 1-D [B] = [", B, "], got shape ",
                prompt_lengths->sizes());
    check_device(*prompt_lengths, input_ids, op, "prompt_lengths", "input_ids");
    pl = index_i64(*prompt_lengths, op, "prompt_lengths", false);
  }
  p.loss_mask = lm.defined() ? lm.data_ptr<int64_t>() : nullptr;
  p.attention_mask = am.defined() ? am.data_ptr<int64_t>() : nullptr;
  p.position_ids = pos.defined() ? pos.data_ptr<int64_t>() : nullptr;
  p.document_ids = doc.defined() ? doc.data_ptr<int64_t>() : nullptr;
  p.prompt_lengths = pl.defined() ? pl.data_ptr<int64_t>() : nullptr;

  const auto i64 = input_ids.options().dtype(at::kLong);
  at::Tensor labels = at::empty({B, T}, i64);
  at::Tensor num = at::empty({}, i64);
  p.labels = labels.data_ptr<int64_t>();
  p.num_trainable = num.data_ptr<int64_t>();
  if (input_ids.is_cuda()) {
#ifdef SFTCTL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(input_ids.device());
    cuda::sft_labels(p, at::cuda::getCurrentCUDAStream().stream());
#endif
  } else {
    cpu::sft_labels(p);
  }
  return {labels, num};
}

// ---------------------------------------------------------------------------------------------
// AdamW on fp32 master weights (sftctl::adamw_split_): validation, then the CPU loop or the CUDA
// launches (kernels/adamw_split.cuh). Each parameter is split (a bf16 weight, its int16 low half
// of the same shape, a bf16 gradient) or whole (an fp32 weight and gradient, its lows entry an
// empty int16 tensor). Every per-parameter check names the list and the index. grad_scale and
// found_inf are passed as pointers and read by the kernels on their device, so a CUDA step never
// waits on the GPU.

struct AdamWSplitList {
  at::TensorList tensors;
  const char* name;
  at::ScalarType dtype;
  const char* dtype_name;
};

void check_adamw_flag(const OptTensor& t, const at::Tensor* ref, const char* op,
                      const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1, op, ": ", name, " must have exactly one element, got shape ",
              t->sizes());
  TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t->scalar_type());
  check_supported_device(*t, op, name);
  if (ref != nullptr) check_device(*t, *ref, op, name, "weights[0]");
}

void adamw_split_(at::TensorList weights, at::TensorList lows, at::TensorList grads,
                  at::TensorList exp_avgs, at::TensorList exp_avg_sqs, double lr, double beta1,
                  double beta2, double eps, double weight_decay, int64_t step,
                  const OptTensor& grad_scale, const OptTensor& found_inf,
                  const OptTensor& nonfinite) {
  const char* op = "sftctl::adamw_split_";
  const AdamWSplitList lists[] = {{weights, "weights", at::kBFloat16, "bfloat16"},
                                  {lows, "lows", at::kShort, "int16"},
                                  {grads, "grads", at::kBFloat16, "bfloat16"},
                                  {exp_avgs, "exp_avgs", at::kFloat, "float32"},
                                  {exp_avg_sqs, "exp_avg_sqs", at::kFloat, "float32"}};
  // a whole fp32 parameter: fp32 weight and gradient, no low half
  const AdamWSplitList whole_lists[] = {{weights, "weights", at::kFloat, "float32"},
                                        {lows, "lows", at::kShort, "int16"},
                                        {grads, "grads", at::kFloat, "float32"},
                                        {exp_avgs, "exp_avgs", at::kFloat, "float32"},
                                        {exp_avg_sqs, "exp_avg_sqs", at::kFloat, "float32"}};
  const size_t n = weights.size();
  for (const AdamWSplitList& l : lists)
    TORCH_CHECK(l.tensors.size() == n, op, ": ", l.name, " has ", l.tensors.size(),
                " tensors but weights has ", n, " (one entry per parameter in every list)");
  TORCH_CHECK(step >= 1, op, ": step must be >= 1 (the count of steps including this one), got ",
              step);
  TORCH_CHECK(std::isfinite(lr) && lr >= 0.0, op, ": lr must be a finite number >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0, op, ": beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0.0 && beta2 < 1.0, op, ": beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, op, ": eps must be a finite number >= 0, got ",
              eps);
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0.0, op,
              ": weight_decay must be a finite number >= 0, got ", weight_decay);

  const at::Tensor* ref = n > 0 ? &weights[0] : nullptr;
  if (ref != nullptr) {
    TORCH_CHECK(ref->defined(), op, ": weights[0] is an undefined tensor");
    check_supported_device(*ref, op, "weights[0]");
  }
  std::vector<char> is_whole(n, 0);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(weights[i].defined(), op, ": weights[", i, "] is an undefined tensor");
    const at::ScalarType wt = weights[i].scalar_type();
    TORCH_CHECK(wt == at::kBFloat16 || wt == at::kFloat, op, ": weights[", i,
                "] must be bfloat16 (split, with its low half in lows) or float32 (whole, with an "
                "empty lows entry), got ", wt);
    is_whole[i] = wt == at::kFloat;
    const AdamWSplitList* row = is_whole[i] ? whole_lists : lists;
    for (int k = 0; k < 5; ++k) {
      const AdamWSplitList& l = row[k];
      const at::Tensor& t = l.tensors[i];
      TORCH_CHECK(t.defined(), op, ": ", l.name, "[", i, "] is an undefined tensor");
      TORCH_CHECK(t.scalar_type() == l.dtype, op, ": ", l.name, "[", i, "] must be ",
                  l.dtype_name, " (weights[", i, "] is ", wt, "), got ", t.scalar_type());
      TORCH_CHECK(t.device() == ref->device(), op, ": ", l.name, "[", i,
                  "] must be on the same device as weights[0] (", ref->device(), "), got ",
                  t.device());
      if (is_whole[i] && k == 1) {  // lows
        TORCH_CHECK(t.numel() == 0, op, ": lows[", i, "] must be empty: weights[", i,
                    "] is float32, a whole master with no low half (got shape ", t.sizes(), ")");
        continue;
      }
      TORCH_CHECK(t.sizes() == weights[i].sizes(), op, ": ", l.name, "[", i, "] has shape ",
                  t.sizes(), " but weights[", i, "] has shape ", weights[i].sizes());
      TORCH_CHECK(t.is_contiguous(), op, ": ", l.name, "[", i,
                  "] must be contiguous, got strides ", t.strides(), " for shape ", t.sizes());
    }
  }
  check_adamw_flag(grad_scale, ref, op, "grad_scale");
  check_adamw_flag(found_inf, ref, op, "found_inf");
  check_adamw_flag(nonfinite, ref, op, "nonfinite");
  if (nonfinite.has_value()) {
    TORCH_CHECK(nonfinite->is_contiguous(), op, ": nonfinite must be contiguous");
    for (const OptTensor* other : {&grad_scale, &found_inf})
      TORCH_CHECK(!other->has_value() || !(*other)->is_same(*nonfinite), op,
                  ": nonfinite must not be the same tensor as grad_scale or found_inf");
  }

  std::vector<AdamWSplitTensor> params;
  params.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    if (weights[i].numel() == 0) continue;
    AdamWSplitTensor p;
    if (is_whole[i]) {
      p.weight_f32 = weights[i].data_ptr<float>();
      p.grad_f32 = grads[i].data_ptr<float>();
    } else {
      p.weight = static_cast<uint16_t*>(weights[i].data_ptr());
      p.low = static_cast<int16_t*>(lows[i].data_ptr());
      p.grad = static_cast<const uint16_t*>(grads[i].data_ptr());
    }
    p.exp_avg = exp_avgs[i].data_ptr<float>();
    p.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
    p.numel = weights[i].numel();
    params.push_back(p);
  }
  if (params.empty()) return;

  // Hyperparameter-only terms in double, rounded once (as torch's fused AdamW derives them).
  AdamWSplitScalars s;
  s.beta1 = static_cast<float>(beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.weight_decay_on = weight_decay != 0.0;
  s.lr_weight_decay = static_cast<float>(lr * weight_decay);
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  s.step_size = static_cast<float>(lr / bias_correction1);
  s.bias_correction2_sqrt = static_cast<float>(std::sqrt(bias_correction2));
  s.eps = static_cast<float>(eps);
  s.grad_scale = grad_scale.has_value() ? grad_scale->data_ptr<float>() : nullptr;
  s.found_inf = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
  s.nonfinite = nonfinite.has_value() ? nonfinite->data_ptr<float>() : nullptr;

  const int64_t count = static_cast<int64_t>(params.size());
  if (ref->is_cuda()) {
#ifdef SFTCTL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(ref->device());
    cuda::adamw_split(params.data(), count, s, at::cuda::getCurrentCUDAStream().stream());
#endif
  } else {
    cpu::adamw_split(params.data(), count, s);
  }
}

// ADInplaceOrView kernel of adamw_split_: runs the op below this key, then bumps the version
// counter of every tensor the op writes, as ATen's in-place ops do, so autograd notices a weight
// that was saved for backward and then stepped. (Inference mode skips this key; its tensors have
// no counter.)
void adamw_split_bump_versions(at::TensorList weights, at::TensorList lows, at::TensorList grads,
                               at::TensorList exp_avgs, at::TensorList exp_avg_sqs, double lr,
                               double beta1, double beta2, double eps, double weight_decay,
                               int64_t step, const OptTensor& grad_scale,
                               const OptTensor& found_inf, const OptTensor& nonfinite) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sftctl::adamw_split_", "")
                             .typed<decltype(adamw_split_)>();
  {
    const at::AutoDispatchBelowADInplaceOrView below;
    op.call(weights, lows, grads, exp_avgs, exp_avg_sqs, lr, beta1, beta2, eps, weight_decay,
            step, grad_scale, found_inf, nonfinite);
  }
  for (const at::TensorList written : {weights, lows, exp_avgs, exp_avg_sqs})
    for (const at::Tensor& t : written) t.unsafeGetTensorImpl()->bump_version();
  if (nonfinite.has_value()) nonfinite->unsafeGetTensorImpl()->bump_version();
}

// ---------------------------------------------------------------------------------------------
// Sum of squares over a list of tensors (sftctl::sum_squares): the squared global 2-norm of
// gradients for clipping, one pass over any mix of fp32/bf16/fp16 tensors, fp32 result on their
// device (kernels/sum_squares.cuh). No host sync on CUDA.

at::Tensor sum_squares(at::TensorList tensors) {
  const char* op = "sftctl::sum_squares";
  TORCH_CHECK(!tensors.empty(), op, ": tensors is empty (no device to put the sum on)");
  const at::Tensor& ref = tensors[0];
  TORCH_CHECK(ref.defined(), op, ": tensors[0] is an undefined tensor");
  check_supported_device(ref, op, "tensors[0]");
  std::vector<SumSquaresTensor> list;
  list.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), op, ": tensors[", i, "] is an undefined tensor");
    TORCH_CHECK(t.device() == ref.device(), op, ": tensors[", i,
                "] must be on the same device as tensors[0] (", ref.device(), "), got ",
                t.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ||
                    t.scalar_type() == at::kHalf,
                op, ": tensors[", i, "] must be float32, bfloat16 or float16, got ",
                t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), op, ": tensors[", i, "] must be contiguous, got strides ",
                t.strides(), " for shape ", t.sizes());
    TORCH_CHECK(!t.is_sparse(), op, ": tensors[", i, "] is sparse");
    SumSquaresTensor x;
    x.data = t.numel() > 0 ? t.data_ptr() : nullptr;
    x.dtype = kernel_dtype(t, op, "tensors[i]");
    x.numel = t.numel();
    list.push_back(x);
  }
  if (ref.is_cuda()) {
#ifdef SFTCTL_WITH_CUDA
    const c10::cuda::CUDAGuard guard(ref.device());
    at::Tensor out = at::empty({}, ref.options().dtype(at::kFloat));
    at::Tensor partials = at::empty(
        {cuda::sum_squares_partials(list.data(), static_cast<int64_t>(list.size()))},
        ref.options().dtype(at::kDouble));
    cuda::sum_squares(list.data(), static_cast<int64_t>(list.size()),
                      partials.data_ptr<double>(), out.data_ptr<float>(),
                      at::cuda::getCurrentCUDAStream().stream());
    return out;
#endif
  }
  at::Tensor out = at::empty({}, ref.options().dtype(at::kFloat));
  *out.data_ptr<float>() = cpu::sum_squares(list.data(), static_cast<int64_t>(list.size()));
  return out;
}

}  // namespace
}  // namespace sftctl

TORCH_LIBRARY(sftctl, m) {
  m.def(
      "cross_entropy(Tensor logits, Tensor targets, Tensor? normalizer, Tensor? grad_scale, "
      "int ignore_index, int reduction, float label_smoothing, float z_loss, float softcap, "
      "bool return_lse, bool return_accuracy, bool compute_grad) "
      "-> (Tensor loss, Tensor lse, Tensor correct, Tensor grad_logits)");
  m.def(
      "cross_entropy_(Tensor(a!) logits, Tensor targets, Tensor? normalizer, Tensor? grad_scale, "
      "int ignore_index, int reduction, float label_smoothing, float z_loss, float softcap, "
      "bool return_lse, bool return_accuracy) -> (Tensor loss, Tensor lse, Tensor correct)");
  m.def("scale_grad_(Tensor(a!) grad, Tensor grad_output, Tensor? grad_scale) -> ()");
  m.def(
      "linear_cross_entropy(Tensor hidden, Tensor weight, Tensor targets, Tensor? bias, "
      "Tensor? normalizer, Tensor? grad_scale, Tensor? row_scale, int ignore_index, "
      "int reduction, float label_smoothing, float z_loss, float softcap, float logit_scale, "
      "bool return_lse, bool grad_hidden, bool grad_weight, bool grad_bias, int compact, "
      "int chunk_rows) -> (Tensor loss, Tensor lse, Tensor grad_hidden, Tensor grad_weight, "
      "Tensor grad_bias)");
  m.def(
      "sft_labels(Tensor input_ids, Tensor? loss_mask, Tensor? prompt_lengths, "
      "Tensor? attention_mask, Tensor? position_ids, Tensor? document_ids, int ignore_index) "
      "-> (Tensor labels, Tensor num_trainable)");
  m.def(
      "adamw_split_(Tensor(a!)[] weights, Tensor(b!)[] lows, Tensor[] grads, "
      "Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, int step, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor(e!)? nonfinite=None) -> ()");
  m.def("sum_squares(Tensor[] tensors) -> Tensor");
}

TORCH_LIBRARY_IMPL(sftctl, CPU, m) {
  m.impl("cross_entropy", &sftctl::cross_entropy);
  m.impl("linear_cross_entropy", &sftctl::linear_cross_entropy);
  m.impl("cross_entropy_", &sftctl::cross_entropy_);
  m.impl("scale_grad_", &sftctl::scale_grad_);
  m.impl("sft_labels", &sftctl::sft_labels);
  m.impl("adamw_split_", &sftctl::adamw_split_);
  m.impl("sum_squares", &sftctl::sum_squares);
}

#ifdef SFTCTL_WITH_CUDA
TORCH_LIBRARY_IMPL(sftctl, CUDA, m) {
  m.impl("cross_entropy", &sftctl::cross_entropy);
  m.impl("linear_cross_entropy", &sftctl::linear_cross_entropy);
  m.impl("cross_entropy_", &sftctl::cross_entropy_);
  m.impl("scale_grad_", &sftctl::scale_grad_);
  m.impl("sft_labels", &sftctl::sft_labels);
  m.impl("adamw_split_", &sftctl::adamw_split_);
  m.impl("sum_squares", &sftctl::sum_squares);
}
#endif

// adamw_split_ with no tensor argument at all (empty lists, no grad_scale/found_inf) gives the
// dispatcher no device to pick; such a call reaches this kernel, which validates and does nothing
// (sum_squares on an empty list: an error that says so).
// The same function also answers any backend without its own kernel, by rejecting the device.
TORCH_LIBRARY_IMPL(sftctl, CompositeExplicitAutograd, m) {
  m.impl("adamw_split_", &sftctl::adamw_split_);
  m.impl("sum_squares", &sftctl::sum_squares);  // an empty list: its own clear error
}

TORCH_LIBRARY_IMPL(sftctl, ADInplaceOrView, m) {
  m.impl("adamw_split_", &sftctl::adamw_split_bump_versions);
}

#ifdef TORCH_EXTENSION_NAME
// `import sftctl._C` only needs to load this library (the ops register themselves above); the
// module itself is empty.
static PyModuleDef sftctl_c_module = {PyModuleDef_HEAD_INIT, "sftctl._C",
                                      "Loads the sftctl ops into torch.ops.sftctl.", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) {
  PyObject* m = PyModule_Create(&sftctl_c_module);
#ifdef SFTCTL_CE_TUNING
  const long tuning = 1;
#else
  const long tuning = 0;
#endif
  // Tells bench/ and the CUDA tests whether the SFTCTL_CE_* plan knobs are compiled in.
  if (m && PyModule_AddIntConstant(m, "ce_tuning", tuning) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
#endif
