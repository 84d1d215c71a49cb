// Host launcher of the AdamW step on split or whole fp32 masters (declared in cuda/launch.h;
// kernel and design notes in kernels/adamw_split.cuh).
//
// Design choices
// - Torch-free, compiled by plain nvcc; errors come back as std::runtime_error with the CUDA
//   message (the binding turns them into a Python RuntimeError).
// - Parameters are packed into batches of up to kAdamWMaxTensors (empty ones skipped), one launch
//   per batch on the caller's stream. No host synchronization and no allocation: grad_scale and
//   found_inf are read by the kernel itself, so the step can be captured in a CUDA graph.
// - Grid: the blocks the device holds at once (SM count x resident blocks per SM, queried once
//   per device), fewer when the batch has fewer chunks; the kernel walks the chunks grid-stride.
//   Chunks are 64K elements, halved down to 2K while a batch has fewer chunks than resident
//   blocks, so a lone 4M-element parameter still spreads over every SM.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda/launch.h"
#include "cuda/occupancy.h"
#include "kernels/adamw_split.cuh"

namespace sftctl {
namespace cuda {
namespace {

constexpr int kAdamWThreads = 256;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("sftctl CUDA adamw_split: ") + what + ": " +
                             cudaGetErrorString(e));
}

// This launcher's kernel: blocks resident on the current device at once.
int64_t device_blocks() {
  return resident_blocks(adamw_split_kernel<kAdamWThreads>, kAdamWThreads,
                         "sftctl CUDA adamw_split");
}

// Chunks of `chunk` elements over the batch's tensors.
int64_t count_chunks(const AdamWSplitBatch& batch, int64_t chunk) {
  int64_t n = 0;
  for (int t = 0; t < batch.n_tensors; ++t) n += (batch.tensors[t].numel + chunk - 1) / chunk;
  return n;
}

// Picks the chunk size (the largest that still gives every resident block a chunk, within
// [kAdamWMinChunk, kAdamWMaxChunk]), fills the chunk table and launches.
void launch(AdamWSplitBatch& batch, cudaStream_t stream) {
  const int64_t resident = device_blocks();
  int64_t chunk = kAdamWMaxChunk;
  while (chunk > kAdamWMinChunk && count_chunks(batch, chunk) < resident) chunk /= 2;
  batch.chunk = chunk;
  batch.first_chunk[0] = 0;
  for (int t = 0; t < batch.n_tensors; ++t)
    batch.first_chunk[t + 1] = batch.first_chunk[t] + (batch.tensors[t].numel + chunk - 1) / chunk;
  const int64_t blocks = std::min(batch.first_chunk[batch.n_tensors], resident);
  adamw_split_kernel<kAdamWThreads>
      <<<static_cast<unsigned>(blocks), kAdamWThreads, 0, stream>>>(batch);
  check(cudaGetLastError(), "launch of adamw_split_kernel");
}

}  // namespace

void adamw_split(const AdamWSplitTensor* tensors, int64_t n_tensors, const AdamWSplitScalars& s,
                 void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  AdamWSplitBatch batch;
  batch.s = s;
  batch.n_tensors = 0;
  for (int64_t i = 0; i < n_tensors; ++i) {
    const AdamWSplitTensor& t = tensors[i];
    if (t.numel <= 0) continue;
    const bool split = t.weight && t.low && t.grad && !t.weight_f32 && !t.grad_f32;
    const bool whole = t.weight_f32 && t.grad_f32 && !t.weight && !t.low && !t.grad;
    if (!(split || whole) || !t.exp_avg || !t.exp_avg_sq)
      throw std::runtime_error("sftctl CUDA adamw_split: a nonempty parameter must have either "
                               "split or whole data pointers, all non-null");
    batch.tensors[batch.n_tensors++] = t;
    if (batch.n_tensors == kAdamWMaxTensors) {
      launch(batch, stream);
      batch.n_tensors = 0;
    }
  }
  if (batch.n_tensors > 0) launch(batch, stream);
}

}  // namespace cuda
}  // namespace sftctl
