// Resident blocks of a kernel on the current device (SM count x blocks per SM at `threads`
// threads, no dynamic shared memory), queried once per (device, kernel) and cached: the grid of
// sftctl's grid-stride launchers (adamw_split.cu, sum_squares.cu). Host-only, plain nvcc.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

namespace sftctl {
namespace cuda {

template <typename Kernel>
int64_t resident_blocks(Kernel kernel, int threads, const char* who) {
  auto check = [who](cudaError_t e, const char* what) {
    if (e != cudaSuccess)
      throw std::runtime_error(std::string(who) + ": " + what + ": " + cudaGetErrorString(e));
  };
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, int64_t> cache;
  int dev = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  const auto key = std::make_pair(dev, reinterpret_cast<const void*>(kernel));
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int sms = 0, per_sm = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "SM count");
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0),
        "occupancy query");
  const int64_t blocks = static_cast<int64_t>(std::max(sms, 1)) * std::max(per_sm, 1);
  cache[key] = blocks;
  return blocks;
}

}  // namespace cuda
}  // namespace sftctl
