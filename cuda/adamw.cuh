// AdamW over flat parameter buffers and the global gradient norm, on the GPU.
// Same float operations as native/distill/adamw.cpp, each rounded on its own (no FMA), so the
// update is bit-identical to a CPU reference built with -ffp-contract=off.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "distill/adamw.h"
#include "workspace.cuh"

namespace osd {
namespace cuda {

// Enqueues one AdamW step over n device floats (c must pass validate_adamw).
void adamw_launch(float* params, const float* grads, float* m, float* v, size_t n, const AdamWConfig& c,
                  cudaStream_t stream);

// Enqueues per-block sums of squares (double) into ws.misc; returns how many partials were written.
// global_norm = sqrt(sum of the partials in order).
int sum_squares_launch(const float* x, size_t n, Workspace& ws, cudaStream_t stream);

}  // namespace cuda
}  // namespace osd
