// The CUDA backend behind the Backend contract (backend/backend.h). Plain C++: the addon includes
// this header without nvcc. Every method takes host pointers and stages them on the device itself;
// the device-pointer APIs it is built from are in cuda/*.cuh.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "backend/backend.h"

namespace osd {

// One request of a batched tree verification (host pointers, as Backend::verify_tree takes them).
struct TreeBatchItem {
  TreeInput in;
  Sampling sampling;
  TreeChildren mode = TreeChildren::WithReplacement;
  uint64_t stream = 0;
  int32_t* path = nullptr;  // capacity in.n
  int32_t* out = nullptr;   // capacity in.n + 1
  TreeResult result;        // filled in
};

class CudaBackend final : public Backend {
 public:
  ~CudaBackend() override;
  std::string name() const override { return "cuda"; }

  void verify_chain_batch(const ChainBatch& in, ChainBatchOut& out, Fault fault = Fault::None) override;
  TreeResult verify_tree(const TreeInput& in, const Sampling& s, TreeChildren mode, uint64_t seed, uint64_t stream,
                         int32_t* path, int32_t* out, Fault fault = Fault::None) override;
  double distill_loss(const DistillInput& in, float* grad) override;
  void adamw_step(float* params, const float* grads, float* m, float* v, size_t n, const AdamWConfig& c) override;
  double global_norm(const float* x, size_t n) override;

  // Beyond the contract.
  // Tree verification of many requests in one launch (seed shared, streams per request).
  void verify_tree_batch(TreeBatchItem* items, int32_t count, uint64_t seed, Fault fault = Fault::None);
  // WarpedRow::to_dense of each row: probs[r * V + j].
  void warp_rows(const float* logits, int32_t rows, int32_t vocab, const Sampling& s, float* probs);
  // Tree attention mask of one request (see cuda/tree_kv.cuh): positions[n], mask[n * words].
  void tree_mask(const int32_t* parents, int32_t n, int32_t base, int32_t* positions, uint32_t* mask, int32_t words);
  // Sequence::keep_path on one layer's K and V caches held on the host ([slots x kv_dim] each).
  void kv_keep_path(float* k, float* v, int32_t slots, int32_t kv_dim, int32_t base, const int32_t* path, int32_t len);

  // e.g. "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs)".
  std::string device_name() const;

 private:
  CudaBackend();
  friend Backend* cuda_backend_or_null(std::string* why);
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The CUDA backend when a CUDA device is usable here; otherwise null, with the reason in *why
// (for example "no CUDA driver: cudaErrorInsufficientDriver (CUDA driver version is insufficient
// for CUDA runtime version)"). The first call probes; later calls return the same answer.
Backend* cuda_backend_or_null(std::string* why);

// The GPU targets compiled into this build, e.g. "sm_80, sm_86, sm_89, sm_90 + PTX compute_90".
std::string cuda_backend_targets();

}  // namespace osd
