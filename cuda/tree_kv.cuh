// Tree attention masks and accepted-path KV compaction, batched, for the tree model pass.
//
// Mask: for request r with n_r tree nodes evaluated after a cached prefix of base_r tokens, node i
// sees the whole prefix and the tree nodes on its root path (itself included). Row i of the mask
// holds `words` uint32 words; bit j (word j >> 5, bit j & 31) is set when tree node j is visible.
// positions[i] = base_r + depth(i), depth 0 for children of the prefix (model/sequence.cpp).
//
// KV compaction (Sequence::keep_path): after a tree evaluated at slots [base, base + n), keep the
// accepted nodes path[0..len) as the contiguous slots base, base + 1, ...; each cache plane (a
// request's layer, or one key-value head of it) is one job. Copies run in path order per column, so
// they match the CPU's in-place loop. Entries are moved as 16-bit units: a float is two, a half one.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace osd {
namespace cuda {

struct TreeMaskBatch {
  const int32_t* parents = nullptr;      // device: sum n_r, request r at node_offset[r]; -1 = prefix
  const int32_t* node_offset = nullptr;  // device: count + 1
  const int32_t* base = nullptr;         // device: count
  int32_t count = 0;
  int32_t total_nodes = 0;  // node_offset[count]
  int32_t words = 0;        // mask words per row, >= ceil(max n_r / 32)
  int32_t* positions = nullptr;  // device out: total_nodes
  uint32_t* mask = nullptr;      // device out: total_nodes x words
};
void tree_mask_launch(const TreeMaskBatch& b, cudaStream_t stream);

struct KvPathJob {
  uint16_t* k = nullptr;  // device: slot s at k + s * row_stride (16-bit units)
  uint16_t* v = nullptr;
  int64_t row_stride = 0;
  int32_t kv_dim = 0;  // 16-bit units copied per slot
  int32_t base = 0;
  int32_t path_offset = 0;  // into the paths array
  int32_t len = 0;
};
// jobs and paths are device arrays; max_kv_dim bounds every job's kv_dim (16-bit units).
void kv_keep_path_launch(const KvPathJob* jobs, int32_t n_jobs, const int32_t* paths, int32_t max_kv_dim,
                         cudaStream_t stream);

}  // namespace cuda
}  // namespace osd
