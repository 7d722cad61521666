// Distillation losses on the GPU (forward KL, reverse KL, JSD, TVD), each fused with its gradient
// with respect to the student logits; dense or sparse (top-k + residual) teacher; masked rows.
// Same formulas as native/distill/losses.cpp; sums run in a different order, so results match the
// CPU within the tolerances stated in test/native/test_cuda.cu, not bit for bit.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "distill/losses.h"
#include "workspace.cuh"

namespace osd {
namespace cuda {

struct DistillDevice {
  DistillKind kind = DistillKind::ForwardKL;
  const float* student = nullptr;  // device: rows x V
  int32_t rows = 0;
  int32_t vocab = 0;
  float temperature = 1.0f;
  float beta = 0.5f;
  const uint8_t* mask = nullptr;      // device: rows, or null
  const float* teacher = nullptr;     // device: rows x V (dense teacher), or null
  const int32_t* topk_ids = nullptr;  // device: rows x k (sparse teacher)
  const float* topk_probs = nullptr;  // device: rows x k
  const float* residual = nullptr;    // device: rows, or null
  int32_t k = 0;
  float scale = 1.0f;          // gradient scale: 1 / (number of counted rows)
  float* grad = nullptr;       // device out: rows x V, or null (masked rows get zeros)
  double* row_loss = nullptr;  // device out: rows (0 for masked rows)
  int32_t* row_bad = nullptr;  // device out: rows; 1 student not finite, 2 teacher not finite
};

// Enqueues the loss (and gradient) of every row. Inputs must pass validate_distill().
void distill_launch(const DistillDevice& in, Workspace& ws, cudaStream_t stream);

// Reverse KL, JSD and TVD against a dense teacher: the blocked scheme of the CPU's fast path (three
// kernels over (row, block) pairs, float per entry) when on, else one CTA per row in double per
// entry. On unless OSD_CUDA_BLOCKED_DIVERGENCE=0: the blocked kernels match the CPU's default
// (blocked) path and ran 2.4-4.1x faster than the row kernel on an H200 (test_cuda checks both
// ways against the CPU; bench_cuda times both).
bool blocked_divergence();
void set_blocked_divergence(bool on);

// With the blocked scheme on: reverse KL, JSD and TVD in one pass over the data on sm_90 (one
// thread-block cluster per row, the row kept in shared memory; 12 bytes move per entry against the
// three kernels' 28), where the row fits a cluster. On unless OSD_CUDA_CLUSTER_DIVERGENCE=0 (then
// the three blocked kernels run); test_cuda checks both against the CPU, bench_cuda times both.
bool cluster_divergence();
void set_cluster_divergence(bool on);

// How many one-cluster-per-row distillation kernels have been launched (forward KL and the
// divergences): tests tell from it which path ran.
long long cluster_launches();
// Warps (2048-logit blocks) per CTA of those kernels; 0 (the default) lets the launcher choose
// (four, or more where a row needs more than 16 CTAs of four). For measuring.
void set_cluster_warps(int warps);
// Whether this build runs the cluster kernels on the current device (sm_90 code for it, CUDA 12+).
bool cluster_kernels_built();

}  // namespace cuda
}  // namespace osd
