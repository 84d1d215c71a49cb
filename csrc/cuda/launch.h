// Host-side entry points of the CUDA kernels, called by csrc/binding.cpp.
//
// Torch-free (no ATen/c10, not even cuda_runtime.h): the binding passes the current stream as an
// opaque pointer (cudaStream_t is a pointer type), so this header is includable from any C++ TU and
// the .cu files that implement it compile with plain nvcc.
#pragma once
#include <cstddef>
#include <cstdint>

#include "kernels/params.h"

namespace sftctl {
namespace cuda {

// Bytes of device scratch that cross_entropy_forward needs for these params (the binding
// allocates it with the caching allocator and sets params.workspace).
size_t cross_entropy_workspace_bytes(const CrossEntropyParams& p);

// Launches the fused forward(+gradient) on `stream`. No host synchronization.
void cross_entropy_forward(const CrossEntropyParams& p, void* stream);

// In-place rescale of a gradient produced by cross_entropy_forward. `grad_output` is fp32, 0-dim
// (per_row == false) or [n_rows] (per_row == true). Reads grad_output and grad_scale on the device
// and writes nothing when they are equal (grad_scale null means 1).
void scale_grad(void* grad, DType dtype, int64_t n_rows, int64_t vocab, int64_t row_stride,
                const float* grad_output, bool per_row, const float* grad_scale, void* stream);

void sft_labels(const SftLabelsParams& p, void* stream);

// One AdamW step on split fp32 master weights over n_tensors parameters (kernels/adamw_split.cuh),
// on `stream`. grad_scale and found_inf are device pointers read by the kernel: no host sync.
void adamw_split(const AdamWSplitTensor* tensors, int64_t n_tensors, const AdamWSplitScalars& s,
                 void* stream);

// Sum of squares of every element of n_tensors tensors (kernels/sum_squares.cuh), written to the
// fp32 device scalar `out` on `stream`. `partials` is device scratch of
// sum_squares_partials(tensors, n_tensors) doubles (the binding allocates it). No host sync.
int64_t sum_squares_partials(const SumSquaresTensor* tensors, int64_t n_tensors);
void sum_squares(const SumSquaresTensor* tensors, int64_t n_tensors, double* partials, float* out,
                 void* stream);

}  // namespace cuda
}  // namespace sftctl
