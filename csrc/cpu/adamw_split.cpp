// CPU loop of the AdamW step on split or whole fp32 masters (declared in cpu/kernels.h;
// per-element math, encoding and design notes in kernels/adamw_split.cuh).
//
// Design choices
// - The element update is the very function the CUDA kernel calls, compiled here by the host
//   compiler, so both devices run one formula in one order (they can differ only by nvcc's fma
//   contraction, see the header).
// - Plain scalar loop over each parameter, split across threads with at::parallel_for. The step is
//   memory-bound and the CPU path serves tests and small models; no per-ISA copies as for the
//   cross-entropy kernels.
// - found_inf is read once, before anything is written.
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>

#include "cpu/kernels.h"
#include "kernels/adamw_split.cuh"

namespace sftctl {
namespace cpu {

namespace {
// Elements per parallel task: large enough that thread start-up does not dominate a task.
constexpr int64_t kAdamWGrain = int64_t{1} << 15;
}  // namespace

void adamw_split(const AdamWSplitTensor* tensors, int64_t n_tensors, const AdamWSplitScalars& s) {
  if (s.found_inf != nullptr && *s.found_inf != 0.f) return;
  const bool has_scale = s.grad_scale != nullptr;
  const float scale = has_scale ? *s.grad_scale : 1.f;
  std::atomic<bool> bad{false};  // a task wrote a non-finite weight
  for (int64_t i = 0; i < n_tensors; ++i) {
    const AdamWSplitTensor& t = tensors[i];
    float* m = t.exp_avg;
    float* v = t.exp_avg_sq;
    if (t.weight_f32 != nullptr) {  // a whole fp32 master
      float* x = t.weight_f32;
      const float* g = t.grad_f32;
      at::parallel_for(0, t.numel, kAdamWGrain, [&](int64_t begin, int64_t end) {
        bool task_bad = false;
        for (int64_t j = begin; j < end; ++j) {
          x[j] = adamw_element(x[j], g[j], m[j], v[j], s, has_scale, scale);
          task_bad |= f32_nonfinite_as_bf16(x[j]);
        }
        if (task_bad) bad.store(true, std::memory_order_relaxed);
      });
      continue;
    }
    uint16_t* weight = t.weight;
    uint16_t* low = reinterpret_cast<uint16_t*>(t.low);  // the low half's bits
    const uint16_t* grad = t.grad;
    at::parallel_for(0, t.numel, kAdamWGrain, [&](int64_t begin, int64_t end) {
      bool task_bad = false;
      for (int64_t j = begin; j < end; ++j) {
        adamw_split_element(weight[j], low[j], grad[j], m[j], v[j], s, has_scale, scale);
        task_bad |= bf16_bits_nonfinite(weight[j]);
      }
      if (task_bad) bad.store(true, std::memory_order_relaxed);
    });
  }
  if (s.nonfinite != nullptr && bad.load()) *s.nonfinite = 1.f;
}

}  // namespace cpu
}  // namespace sftctl
