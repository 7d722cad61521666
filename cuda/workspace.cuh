// Grow-only device (and page-locked host) buffers reused across calls, and the per-device facts the launchers need.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <vector>

#include "common.cuh"

namespace osd {
namespace cuda {

// A buffer that grows and is reused across calls: device memory, or page-locked host memory (for
// copies that run async). Old contents are not kept when it grows.
template <bool kPinnedHost>
class GrowBuffer {
 public:
  GrowBuffer() = default;
  GrowBuffer(const GrowBuffer&) = delete;
  GrowBuffer& operator=(const GrowBuffer&) = delete;
  ~GrowBuffer() {
    if (ptr_) kPinnedHost ? cudaFreeHost(ptr_) : cudaFree(ptr_);
  }
  // At least `bytes` bytes.
  void* reserve(size_t bytes) {
    if (bytes <= bytes_ && ptr_) return ptr_;
    if (ptr_) OSD_CUDA_CHECK(kPinnedHost ? cudaFreeHost(ptr_) : cudaFree(ptr_));
    ptr_ = nullptr;
    bytes_ = 0;
    size_t grow = bytes + bytes / 4 + 256;
    OSD_CUDA_CHECK(kPinnedHost ? cudaMallocHost(&ptr_, grow) : cudaMalloc(&ptr_, grow));
    bytes_ = grow;
    return ptr_;
  }
  template <class T>
  T* as(size_t count) {
    return static_cast<T*>(reserve(count * sizeof(T) > 0 ? count * sizeof(T) : 1));
  }
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};
using DeviceBuffer = GrowBuffer<false>;
using PinnedBuffer = GrowBuffer<true>;

// Scratch for the row/walk kernels (verification, warping) and the other ops.
struct Workspace {
  DeviceBuffer tasks, stats, seqs, done, rows, pool, locks, nodes, misc, misc2, sup;
  DeviceBuffer brows, bseqs, ustats, bblk, brmass, bdec;  // chains on the blocked scheme
  std::vector<unsigned char> host_tasks, host_seqs, host_nodes, host_brows, host_bseqs;  // staging kept alive across async copies
  int sm_count = 0;
  int pdl = -1;  // chain kernels chained by programmatic dependent launch (-1: not decided yet)
  // When set, launchers record these around their main kernel (benchmarks time kernels with them).
  cudaEvent_t kernel_start = nullptr, kernel_stop = nullptr;
};

inline void record_start(Workspace& ws, cudaStream_t s) {
  if (ws.kernel_start) OSD_CUDA_CHECK(cudaEventRecord(ws.kernel_start, s));
}
inline void record_stop(Workspace& ws, cudaStream_t s) {
  if (ws.kernel_stop) OSD_CUDA_CHECK(cudaEventRecord(ws.kernel_stop, s));
}

// Copies v to a device buffer on `stream`, through host staging that outlives the async copy.
template <class T>
T* upload(DeviceBuffer& buf, std::vector<unsigned char>& host, const std::vector<T>& v, cudaStream_t stream) {
  T* d = buf.as<T>(v.size());
  host.assign(reinterpret_cast<const unsigned char*>(v.data()), reinterpret_cast<const unsigned char*>(v.data() + v.size()));
  if (!v.empty()) OSD_CUDA_CHECK(cudaMemcpyAsync(d, host.data(), host.size(), cudaMemcpyHostToDevice, stream));
  return d;
}

// Multiprocessor count of the current device (cached per workspace).
int device_sm_count(Workspace& ws);

}  // namespace cuda
}  // namespace osd
