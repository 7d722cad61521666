// Tree attention masks and accepted-path KV compaction.
// Build (standalone check of this file): nvcc -std=c++17 -O3 -arch=sm_90 -I native -c cuda/tree_kv.cu
// Parity: test/native/test_cuda.cu (tree_mask_matches_cpu, kv_keep_path_matches_cpu): exact.
#include "common.cuh"
#include "tree_kv.cuh"

namespace osd {
namespace cuda {

namespace {

__global__ void tree_mask_kernel(TreeMaskBatch b) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  if (g >= b.total_nodes) return;
  int lo = 0, hi = b.count - 1;  // request holding node g: last r with node_offset[r] <= g
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (b.node_offset[mid] <= g) lo = mid; else hi = mid - 1;
  }
  const int off = b.node_offset[lo];
  uint32_t* row = b.mask + static_cast<size_t>(g) * b.words;
  for (int w = 0; w < b.words; ++w) row[w] = 0u;
  int depth = -1;
  for (int j = g - off; j >= 0; j = b.parents[off + j]) {
    row[j >> 5] |= 1u << (j & 31);
    ++depth;
  }
  b.positions[g] = b.base[lo] + depth;
}

__global__ void kv_keep_path_kernel(const KvPathJob* jobs, const int32_t* paths) {
  const KvPathJob job = jobs[blockIdx.y];
  const int d = blockIdx.x * blockDim.x + threadIdx.x;
  if (d >= job.kv_dim) return;
  const int32_t* path = paths + job.path_offset;
  for (int i = 0; i < job.len; ++i) {
    const int64_t src = job.base + path[i], dst = job.base + i;
    if (src == dst) continue;
    job.k[dst * job.row_stride + d] = job.k[src * job.row_stride + d];
    job.v[dst * job.row_stride + d] = job.v[src * job.row_stride + d];
  }
}

}  // namespace

void tree_mask_launch(const TreeMaskBatch& b, cudaStream_t stream) {
  if (b.total_nodes <= 0) return;
  tree_mask_kernel<<<(b.total_nodes + 127) / 128, 128, 0, stream>>>(b);
  OSD_CUDA_CHECK_LAUNCH();
}

void kv_keep_path_launch(const KvPathJob* jobs, int32_t n_jobs, const int32_t* paths, int32_t max_kv_dim,
                         cudaStream_t stream) {
  if (n_jobs <= 0 || max_kv_dim <= 0) return;
  dim3 grid((max_kv_dim + 127) / 128, n_jobs);
  kv_keep_path_kernel<<<grid, 128, 0, stream>>>(jobs, paths);
  OSD_CUDA_CHECK_LAUNCH();
}

}  // namespace cuda
}  // namespace osd
