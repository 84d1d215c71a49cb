// Host launcher of the sum of squares over a list of tensors (declared in cuda/launch.h; kernel
// and design notes in kernels/sum_squares.cuh).
//
// Design choices
// - Torch-free, plain nvcc; errors come back as std::runtime_error with the CUDA message.
// - A plan (batches of up to kSumSqMaxTensors nonempty tensors, a chunk size and a grid per
//   batch) that depends only on the sizes and the device, so sum_squares_partials() can tell the
//   binding how many fp64 partials to allocate before sum_squares() fills them. No host sync.
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/launch.h"
#include "cuda/occupancy.h"
#include "kernels/sum_squares.cuh"

namespace sftctl {
namespace cuda {
namespace {

constexpr int kSumSqThreads = 256;

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    throw std::runtime_error(std::string("sftctl CUDA sum_squares: ") + what + ": " +
                             cudaGetErrorString(e));
}

// This launcher's kernel: blocks resident on the current device at once.
int64_t device_blocks() {
  return resident_blocks(sum_squares_kernel<kSumSqThreads>, kSumSqThreads,
                         "sftctl CUDA sum_squares");
}

// The batches of a call: tensor tables with their chunk size and grid filled in.
std::vector<SumSquaresBatch> plan(const SumSquaresTensor* tensors, int64_t n) {
  const int64_t resident = device_blocks();
  std::vector<SumSquaresBatch> batches;
  SumSquaresBatch b;
  b.n_tensors = 0;
  auto close = [&]() {
    if (b.n_tensors == 0) return;
    auto chunks = [&](int64_t c) {
      int64_t k = 0;
      for (int t = 0; t < b.n_tensors; ++t) k += (b.tensors[t].numel + c - 1) / c;
      return k;
    };
    int64_t chunk = kSumSqMaxChunk;
    while (chunk > kSumSqMinChunk && chunks(chunk) < resident) chunk /= 2;
    b.chunk = chunk;
    b.first_chunk[0] = 0;
    for (int t = 0; t < b.n_tensors; ++t)
      b.first_chunk[t + 1] = b.first_chunk[t] + (b.tensors[t].numel + chunk - 1) / chunk;
    batches.push_back(b);
    b.n_tensors = 0;
  };
  for (int64_t i = 0; i < n; ++i) {
    if (tensors[i].numel <= 0) continue;
    if (tensors[i].data == nullptr)
      throw std::runtime_error("sftctl CUDA sum_squares: null data pointer of a nonempty tensor");
    b.tensors[b.n_tensors++] = tensors[i];
    if (b.n_tensors == kSumSqMaxTensors) close();
  }
  close();
  return batches;
}

int64_t grid_of(const SumSquaresBatch& b) {
  return std::min(b.first_chunk[b.n_tensors], device_blocks());
}

}  // namespace

int64_t sum_squares_partials(const SumSquaresTensor* tensors, int64_t n_tensors) {
  int64_t total = 0;
  for (const SumSquaresBatch& b : plan(tensors, n_tensors)) total += grid_of(b);
  return std::max<int64_t>(total, 1);
}

void sum_squares(const SumSquaresTensor* tensors, int64_t n_tensors, double* partials,
                 float* out, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  int64_t used = 0;
  for (SumSquaresBatch& b : plan(tensors, n_tensors)) {
    const int64_t grid = grid_of(b);
    b.partials = partials + used;
    sum_squares_kernel<kSumSqThreads>
        <<<static_cast<unsigned>(grid), kSumSqThreads, 0, stream>>>(b);
    check(cudaGetLastError(), "launch of sum_squares_kernel");
    used += grid;
  }
  if (used == 0) {  // nothing nonempty: the sum is 0
    check(cudaMemsetAsync(partials, 0, sizeof(double), stream), "memset");
    used = 1;
  }
  sum_squares_finish_kernel<kSumSqThreads><<<1, kSumSqThreads, 0, stream>>>(partials, used, out);
  check(cudaGetLastError(), "launch of sum_squares_finish_kernel");
}

}  // namespace cuda
}  // namespace sftctl
