// Argument structs shared by the CPU and CUDA kernels of sftctl._C.
//
// Torch-free on purpose: the CUDA kernels include this header and must compile with plain nvcc
// (no ATen, no c10), and the C++ test executable fills these structs directly. The binding
// (csrc/binding.cpp) is the only place that turns at::Tensor arguments into these structs after
// validating them; kernels never see a tensor.
#pragma once
#include <cstdint>

namespace sftctl {

enum class DType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

// Same numbering as torch's at::Reduction.
enum class Reduction : int { None = 0, Mean = 1, Sum = 2 };

// Fused cross-entropy over logits [n_rows, vocab]. One call computes, per non-ignored row i with
// target y and logits z = softcap(logit_scale * x) of the stored values x:
//   lse_i  = log sum_j exp(z_j)
//   loss_i = (1 - eps) * (lse_i - z_y) + eps * (lse_i - mean_j z_j) + z_loss * lse_i^2
// and, when grad != nullptr, the gradient of the reduced loss with respect to the stored x:
//   g_ij = scale * r_i * logit_scale * [ p_j (1 + 2 z_loss lse_i) - (1 - eps) [j == y] - eps / V ]
//          * dcap_ij
// where p = softmax(z), dcap = 1 - tanh^2(logit_scale x / softcap) (1 when softcap is off),
//   r_i = row_scale[i] (1 when row_scale is null) and
//   scale = grad_scale * (mean: 1 / normalizer, or 1 / n_valid when normalizer is null; 0 when
//           the divisor is 0) for Mean, grad_scale for Sum and None (None's per-row grad_output is
//           applied later by scale_grad_, or up front through row_scale).
// The gradient is stored in grad_dtype, which is the logits' dtype for sftctl::cross_entropy; the
// fused linear cross-entropy reads fp32 logits and writes bf16/fp16 gradients (the GEMM input
// dtype) directly, rounded once.
// Ignored rows (target == ignore_index) have loss 0, lse 0, correct false and a zero gradient row.
// All sums and the gradient are computed in fp32; the gradient is rounded once to the logits dtype.
struct CrossEntropyParams {
  const void* logits = nullptr;      // [n_rows, vocab] of `dtype`, row stride in elements below
  int64_t logits_row_stride = 0;     // elements between rows (>= vocab); columns are contiguous
  const int64_t* targets = nullptr;  // [n_rows]
  int64_t n_rows = 0;
  int64_t vocab = 0;
  int64_t ignore_index = -100;
  DType dtype = DType::Float32;
  Reduction reduction = Reduction::Mean;
  float label_smoothing = 0.f;       // eps in [0, 1]
  float z_loss = 0.f;                // coefficient of lse^2, >= 0
  float softcap = 0.f;               // > 0 applies softcap * tanh(x / softcap); 0 is off
  float logit_scale = 1.f;           // z = logit_scale * stored value, before the softcap
  const float* normalizer = nullptr; // 0-dim fp32, Mean only; null -> count of non-ignored rows
  const float* grad_scale = nullptr; // 0-dim fp32 multiplying the gradient (a loss scale); null -> 1

  float* loss = nullptr;             // None: [n_rows]; Mean/Sum: 0-dim
  float* lse = nullptr;              // optional [n_rows]
  bool* correct = nullptr;           // optional [n_rows]: argmax_j z_j == target (first max wins)
  void* grad = nullptr;              // optional [n_rows, vocab] of grad_dtype; may equal `logits`
  int64_t grad_row_stride = 0;       //   (memory mode: the gradient overwrites the logits)
  int grad_dtype = -1;               // a DType, or -1: `dtype` (see grad_dtype_of); a different
                                     //   one only as bf16/fp16 from fp32 logits
  const float* row_scale = nullptr;  // optional [n_rows] fp32 factor of each row's gradient

  float* workspace = nullptr;        // kernel scratch, size given by the launcher's *_workspace()
};

// The dtype the gradient is stored in.
inline DType grad_dtype_of(const CrossEntropyParams& p) {
  return p.grad_dtype < 0 ? p.dtype : static_cast<DType>(p.grad_dtype);
}

// Masking op: next-token targets for causal-LM SFT.
// labels[b, t] = input_ids[b, t + 1] when position t + 1 is a trainable token of the same document
// as position t, else ignore_index; labels[b, T - 1] = ignore_index. Position s is trainable when
// it is not padding (attention_mask[b, s] != 0, and position t is not padding either) and it is a
// response token (loss_mask[b, s] != 0 when a loss mask is given; s >= prompt_lengths[b] when
// prompt lengths are given; both may be given). t and t + 1 lie in different documents when
// position_ids[b, t + 1] == 0 or document_ids[b, t] != document_ids[b, t + 1].
struct SftLabelsParams {
  const int64_t* input_ids = nullptr;      // [B, T]
  int64_t batch = 0;
  int64_t seq_len = 0;
  const int64_t* loss_mask = nullptr;      // optional [B, T] (nonzero = response token)
  const int64_t* prompt_lengths = nullptr; // optional [B]
  const int64_t* attention_mask = nullptr; // optional [B, T]
  const int64_t* position_ids = nullptr;   // optional [B, T]
  const int64_t* document_ids = nullptr;   // optional [B, T]
  int64_t ignore_index = -100;
  int64_t* labels = nullptr;               // [B, T]
  int64_t* num_trainable = nullptr;        // 0-dim
};

// AdamW step on fp32 master weights (sftctl::adamw_split_; encoding and math:
// kernels/adamw_split.cuh), each held either split into a bf16 weight and its int16 low half
// (weight, low, grad set) or whole in fp32 (weight_f32, grad_f32 set, the others null). One
// entry per parameter; its arrays are contiguous, have `numel` elements each and belong to one
// device.
struct AdamWSplitTensor {
  uint16_t* weight = nullptr;      // split: bf16 bits, the fp32 master rounded to its top half
  int16_t* low = nullptr;          // split: the master's low 16 bits (see the encoding notes)
  const uint16_t* grad = nullptr;  // split: bf16 bits of the gradient
  float* weight_f32 = nullptr;     // whole: the fp32 master itself
  const float* grad_f32 = nullptr; // whole: its fp32 gradient
  float* exp_avg = nullptr;        // first moment m
  float* exp_avg_sq = nullptr;     // second moment v
  int64_t numel = 0;
};

// The step's scalars, derived once on the host in double from lr, betas, eps, weight_decay and
// step, then rounded to fp32 (the kernels do all per-element math in fp32).
struct AdamWSplitScalars {
  float beta1 = 0.f, beta2 = 0.f;
  float one_minus_beta1 = 0.f;        // 1 - beta1
  float one_minus_beta2 = 0.f;        // 1 - beta2
  float lr_weight_decay = 0.f;        // lr * weight_decay
  bool weight_decay_on = false;       // weight_decay != 0 (decoupled decay step applied)
  float step_size = 0.f;              // lr / (1 - beta1^step)
  float bias_correction2_sqrt = 1.f;  // sqrt(1 - beta2^step)
  float eps = 0.f;
  const float* grad_scale = nullptr;  // optional 1-element fp32: gradients are divided by it
  const float* found_inf = nullptr;   // optional 1-element fp32: nonzero skips the whole step
  float* nonfinite = nullptr;         // optional 1-element fp32: set to 1 when the step writes a
                                      // weight whose bf16 value is inf or NaN (else untouched)
};

// Sum of squares of every element of a list of tensors (sftctl::sum_squares; kernel and
// design notes: kernels/sum_squares.cuh). One entry per tensor, contiguous, on one device.
struct SumSquaresTensor {
  const void* data = nullptr;
  DType dtype = DType::Float32;
  int64_t numel = 0;
};

}  // namespace sftctl
