// CPU kernels of sftctl._C (declarations). Implemented in csrc/cpu/*.cpp; called by csrc/binding.cpp
// and by the ctest executable csrc/tests/test_kernels.cpp.
//
// The entry points in namespace sftctl::cpu validate what only the kernel can see cheaply
// (target range), pick the vectorized variant for the running CPU once (the capability that ATen
// itself reports, so ATEN_CPU_CAPABILITY=default|avx2|avx512 forces a variant), and do the
// reductions over rows. The per-capability namespaces hold the vectorized row loops; each is
// compiled from the same kernel header (ce_kernel.h) in its own translation unit.
#pragma once
#include <cstdint>

#include "kernels/params.h"

// The AVX2/AVX-512 copies are built where GCC's `#pragma GCC target` is available (x86-64 g++);
// elsewhere only the baseline copy exists and the dispatch always picks it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SFTCTL_CPU_X86_VARIANTS 1
#endif

namespace sftctl {
namespace cpu {

// Fused cross-entropy forward (+ gradient when p.grad != nullptr); see CrossEntropyParams.
// Throws c10::Error for a target outside [0, vocab) that is not ignore_index, before writing
// anything (so memory mode leaves the logits intact on that error).
void cross_entropy_forward(const CrossEntropyParams& p);

// grad[i, :] *= grad_output[per_row ? i : 0] / grad_scale, skipped (no write) where the factor's
// numerator equals the denominator. grad_scale null means 1.
void scale_grad(void* grad, DType dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
                const float* grad_output, bool per_row, const float* grad_scale);

void sft_labels(const SftLabelsParams& p);

// One AdamW step on split fp32 master weights over n_tensors parameters
// (kernels/adamw_split.cuh); writes nothing when *s.found_inf is nonzero.
void adamw_split(const AdamWSplitTensor* tensors, int64_t n_tensors, const AdamWSplitScalars& s);

// Sum of squares of every element of n_tensors contiguous tensors (fp32, bf16 or fp16), rounded
// to fp32 once (cpu/sum_squares.cpp).
float sum_squares(const SumSquaresTensor* tensors, int64_t n_tensors);

// The variant cross_entropy_forward/scale_grad dispatch to: "AVX512", "AVX2" or "DEFAULT".
const char* kernel_capability();

// Row loops, one copy per CPU capability (ce_avx512.cpp, ce_avx2.cpp, ce_default.cpp).
// ce_rows writes lse/correct/grad rows and the per-row loss (double, 0 for ignored rows) into
// row_loss[n_rows]; `scale` is the gradient factor of the reduction (see params.h).
#define SFTCTL_DECLARE_CPU_VARIANT(NS)                                                       \
  namespace NS {                                                                             \
  void ce_rows(const CrossEntropyParams& p, float scale, double* row_loss);                  \
  void scale_rows(void* grad, DType dtype, int64_t n_rows, int64_t vocab, int64_t row_stride, \
                  const float* grad_output, bool per_row, float grad_scale);                 \
  }
SFTCTL_DECLARE_CPU_VARIANT(DEFAULT)
SFTCTL_DECLARE_CPU_VARIANT(AVX2)
SFTCTL_DECLARE_CPU_VARIANT(AVX512)
#undef SFTCTL_DECLARE_CPU_VARIANT

}  // namespace cpu
}  // namespace sftctl
