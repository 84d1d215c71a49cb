// CPU entry points: target validation, reduction bookkeeping, capability dispatch, sft_labels.
//
// Design
// - The capability is read once from ATen (at::get_cpu_capability(), which honours the
//   ATEN_CPU_CAPABILITY environment variable), so tests can force each compiled variant.
// - Targets are checked in a serial pre-pass that also counts the non-ignored rows (the mean's
//   default divisor). The pass reads N int64 values, negligible next to N x V logits, and it runs
//   before any output is written, so an error leaves memory-mode logits untouched.
// - Row losses come back as doubles and are summed serially in double: the reduced loss does not
//   depend on the thread count.
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>
#include <vector>

#include "cpu/kernels.h"

namespace sftctl {
namespace cpu {
namespace {

enum class Cap { Default, Avx2, Avx512 };

Cap detect() {
#if defined(SFTCTL_CPU_X86_VARIANTS)
  const std::string c = at::get_cpu_capability();
  if (c == "AVX512") return Cap::Avx512;
  if (c == "AVX2") return Cap::Avx2;
#endif
  return Cap::Default;
}

Cap capability() {
  static const Cap cap = detect();
  return cap;
}

}  // namespace

const char* kernel_capability() {
  switch (capability()) {
    case Cap::Avx512:
      return "AVX512";
    case Cap::Avx2:
      return "AVX2";
    default:
      return "DEFAULT";
  }
}

void cross_entropy_forward(const CrossEntropyParams& p) {
  TORCH_CHECK(p.vocab >= 1, "cross_entropy: vocab must be >= 1, got ", p.vocab);
  const DType gd = grad_dtype_of(p);
  TORCH_CHECK(!p.grad || gd == p.dtype || (p.dtype == DType::Float32 && gd != DType::Float32),
              "cross_entropy: a gradient dtype other than the logits' is only supported as "
              "bf16/fp16 from fp32 logits");
  int64_t n_valid = 0;
  for (int64_t i = 0; i < p.n_rows; ++i) {
    const int64_t y = p.targets[i];
    if (y == p.ignore_index) continue;
    TORCH_CHECK(y >= 0 && y < p.vocab, "cross_entropy: targets[", i, "] = ", y,
                " is out of range [0, ", p.vocab, ") and is not ignore_index (", p.ignore_index,
                ")");
    ++n_valid;
  }
  const float gs = p.grad_scale ? *p.grad_scale : 1.f;
  double divisor = 1.0;
  if (p.reduction == Reduction::Mean) {
    divisor = p.normalizer ? static_cast<double>(*p.normalizer) : static_cast<double>(n_valid);
  }
  // A zero divisor (all ignored, or normalizer 0) gives loss 0 and a zero gradient, never NaN.
  const float scale = divisor == 0.0 ? 0.f : static_cast<float>(gs / divisor);

  std::vector<double> row_loss(static_cast<size_t>(p.n_rows));
  if (p.n_rows > 0) {
    switch (capability()) {
#if defined(SFTCTL_CPU_X86_VARIANTS)
      case Cap::Avx512:
        AVX512::ce_rows(p, scale, row_loss.data());
        break;
      case Cap::Avx2:
        AVX2::ce_rows(p, scale, row_loss.data());
        break;
#endif
      default:
        DEFAULT::ce_rows(p, scale, row_loss.data());
        break;
    }
  }
  if (p.reduction == Reduction::None) {
    for (int64_t i = 0; i < p.n_rows; ++i) p.loss[i] = static_cast<float>(row_loss[i]);
    return;
  }
  double total = 0.0;
  for (double l : row_loss) total += l;
  if (p.reduction == Reduction::Mean) total = divisor == 0.0 ? 0.0 : total / divisor;
  *p.loss = static_cast<float>(total);
}

void scale_grad(void* grad, DType dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
                const float* grad_output, bool per_row, const float* grad_scale) {
  const float gs = grad_scale ? *grad_scale : 1.f;
  if (!per_row && *grad_output == gs) return;  // common case: the gradient is already final
  if (gs == 0.f) {  // the saved gradient is all zeros: only grad_output == 0 is representable
    for (int64_t i = 0; i < (per_row ? n_rows : 1); ++i) {
      TORCH_CHECK(grad_output[i] == 0.f,
                  "scale_grad_: grad_scale is 0, so the saved gradient is all zeros and cannot be "
                  "rescaled to grad_output ", grad_output[i], "; pass a nonzero grad_scale");
    }
    return;
  }
  switch (capability()) {
#if defined(SFTCTL_CPU_X86_VARIANTS)
    case Cap::Avx512:
      AVX512::scale_rows(grad, dtype, n_rows, vocab, row_stride, grad_output, per_row, gs);
      break;
    case Cap::Avx2:
      AVX2::scale_rows(grad, dtype, n_rows, vocab, row_stride, grad_output, per_row, gs);
      break;
#endif
    default:
      DEFAULT::scale_rows(grad, dtype, n_rows, vocab, row_stride, grad_output, per_row, gs);
      break;
  }
}

void sft_labels(const SftLabelsParams& p) {
  const int64_t B = p.batch, T = p.seq_len;
  std::vector<int64_t> per_row(static_cast<size_t>(B), 0);
  at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t off = b * T;
      const int64_t prompt = p.prompt_lengths ? p.prompt_lengths[b] : 0;
      int64_t count = 0;
      for (int64_t t = 0; t < T; ++t) {
        int64_t label = p.ignore_index;
        const int64_t s = t + 1;
        if (s < T) {
          bool ok = true;
          if (p.attention_mask) ok = p.attention_mask[off + t] != 0 && p.attention_mask[off + s] != 0;
          if (ok && p.loss_mask) ok = p.loss_mask[off + s] != 0;
          if (ok && p.prompt_lengths) ok = s >= prompt;
          if (ok && p.position_ids) ok = p.position_ids[off + s] != 0;
          if (ok && p.document_ids) ok = p.document_ids[off + t] == p.document_ids[off + s];
          if (ok) {
            label = p.input_ids[off + s];
            ++count;
          }
        }
        p.labels[off + t] = label;
      }
      per_row[b] = count;
    }
  });
  int64_t total = 0;
  for (int64_t c : per_row) total += c;
  *p.num_trainable = total;
}

}  // namespace cpu
}  // namespace sftctl
