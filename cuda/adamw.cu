// AdamW step and global gradient norm.
// Build (standalone check of this file): nvcc -std=c++17 -O3 -arch=sm_90 -I native -c cuda/adamw.cu
// Parity: test/native/test_cuda.cu (adamw_matches_cpu: |dp| <= 1e-6 * |p| + 1e-9, bit-identical when
// the CPU reference is built with -ffp-contract=off; global_norm_matches_cpu: relative 1e-12).
#include <algorithm>
#include <cmath>

#include "adamw.cuh"
#include "common.cuh"

namespace osd {
namespace cuda {

namespace {

struct AdamWConsts {
  float b1, b2, omb1, omb2, eps, step_size, inv_sqrt_bc2, decay, gs;
};

__global__ void adamw_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ m,
                             float* __restrict__ v, size_t n, AdamWConsts c) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const float gi = __fmul_rn(g[i], c.gs);
    const float mi = __fadd_rn(__fmul_rn(c.b1, m[i]), __fmul_rn(c.omb1, gi));
    const float vi = __fadd_rn(__fmul_rn(c.b2, v[i]), __fmul_rn(__fmul_rn(c.omb2, gi), gi));
    const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vi), c.inv_sqrt_bc2), c.eps);
    m[i] = mi;
    v[i] = vi;
    p[i] = __fsub_rn(__fmul_rn(p[i], c.decay), __fdiv_rn(__fmul_rn(c.step_size, mi), denom));
  }
}

constexpr int kNormBlock = 256;
constexpr size_t kNormChunk = 1 << 16;  // elements per partial, fixed so results do not depend on the GPU

__global__ void sum_squares_kernel(const float* __restrict__ x, size_t n, double* __restrict__ part) {
  __shared__ double red[kNormBlock / 32];
  const size_t lo = blockIdx.x * kNormChunk, hi = (lo + kNormChunk < n) ? lo + kNormChunk : n;
  double s = 0.0;
  for (size_t i = lo + threadIdx.x; i < hi; i += kNormBlock) s += static_cast<double>(x[i]) * x[i];
  s = warp_sum(s);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < kNormBlock / 32; ++w) t += red[w];
    part[blockIdx.x] = t;
  }
}

}  // namespace

void adamw_launch(float* params, const float* grads, float* m, float* v, size_t n, const AdamWConfig& c,
                  cudaStream_t stream) {
  if (n == 0) return;
  // The constants exactly as adamw_update() computes them.
  const float b1 = c.beta1, b2 = c.beta2;
  const float bc1 = static_cast<float>(1.0 - std::pow(static_cast<double>(b1), static_cast<double>(c.step)));
  const float bc2 = static_cast<float>(1.0 - std::pow(static_cast<double>(b2), static_cast<double>(c.step)));
  AdamWConsts k;
  k.b1 = b1;
  k.b2 = b2;
  k.omb1 = 1.0f - b1;
  k.omb2 = 1.0f - b2;
  k.eps = c.eps;
  k.step_size = c.lr / bc1;
  k.inv_sqrt_bc2 = 1.0f / std::sqrt(bc2);
  k.decay = 1.0f - c.lr * c.weight_decay;
  k.gs = c.grad_scale;
  const int threads = 256;
  const size_t blocks = std::min<size_t>((n + threads - 1) / threads, 65536);
  adamw_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(params, grads, m, v, n, k);
  OSD_CUDA_CHECK_LAUNCH();
}

int sum_squares_launch(const float* x, size_t n, Workspace& ws, cudaStream_t stream) {
  const size_t nb = (n + kNormChunk - 1) / kNormChunk;
  if (nb == 0) return 0;
  double* part = ws.misc.as<double>(nb);
  sum_squares_kernel<<<static_cast<unsigned>(nb), kNormBlock, 0, stream>>>(x, n, part);
  OSD_CUDA_CHECK_LAUNCH();
  return static_cast<int>(nb);
}

}  // namespace cuda
}  // namespace osd
