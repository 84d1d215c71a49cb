// Host launcher of sft_labels (declared in cuda/launch.h). Torch-free; stream-ordered, no host
// synchronisation: num_trainable is zeroed by a memset on the same stream, then one grid-stride
// kernel writes the labels and adds per-block counts.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "cuda/launch.h"
#include "kernels/sft_labels.cuh"

namespace sftctl {
namespace cuda {

void sft_labels(const SftLabelsParams& p, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.batch < 0 || p.seq_len < 0)
    throw std::runtime_error("sftctl CUDA sft_labels: negative batch or seq_len");
  if (!p.num_trainable || (p.batch * p.seq_len > 0 && (!p.input_ids || !p.labels)))
    throw std::runtime_error("sftctl CUDA sft_labels: null input_ids, labels or num_trainable");
  cudaError_t e = cudaMemsetAsync(p.num_trainable, 0, sizeof(int64_t), stream);
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("sftctl CUDA sft_labels memset: ") + cudaGetErrorString(e));
  const int64_t total = p.batch * p.seq_len;
  if (total == 0) return;
  constexpr int kThreads = 256;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65536);
  sft_labels_kernel<kThreads><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  e = cudaGetLastError();
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("sftctl CUDA launch of sft_labels_kernel: ") +
                             cudaGetErrorString(e));
}

}  // namespace cuda
}  // namespace sftctl
