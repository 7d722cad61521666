// Shared device helpers for the CUDA backend: error checks, the bit-exact exp_approx, order keys,
// and deterministic block reductions.
//
// Exactness rule: every float operation that decides a token (exp terms, probabilities, residuals)
// is written with __fadd_rn/__fmul_rn/... so nvcc cannot contract it into an FMA; the exp's fused
// multiply-adds are explicit (__fmaf_rn), as in the CPU's exp_approx (fmaf). The CPU reference must
// be compiled without contraction too (-ffp-contract=off); then both sides round the same operations
// in the same order and produce the same bits.
#pragma once
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>

#include "core/fast_math.h"
#include "core/philox.h"

namespace osd {
namespace cuda {

[[noreturn]] void throw_cuda(cudaError_t e, const char* what, const char* file, int line);
inline void check_cuda(cudaError_t e, const char* what, const char* file, int line) {
  if (e != cudaSuccess) throw_cuda(e, what, file, line);
}
#define OSD_CUDA_CHECK(x) ::osd::cuda::check_cuda((x), #x, __FILE__, __LINE__)
#define OSD_CUDA_CHECK_LAUNCH() ::osd::cuda::check_cuda(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

// Phase timestamps for profiling tree launches (cmake -DOSD_CUDA_PHASES=ON, then bench_cuda
// --phases): OSD_PHASE(cond, slot) stores %globaltimer in the slot when cond holds. Compiled out
// unless OSD_CUDA_PHASES is defined. Slots: see kPhaseNames in verify.cu.
#ifdef OSD_CUDA_PHASES
static __device__ unsigned long long g_osd_phase[32];
#define OSD_PHASE(cond, slot)                                                        \
  do {                                                                               \
    if (cond) {                                                                      \
      unsigned long long t_;                                                         \
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t_));                        \
      ::osd::cuda::g_osd_phase[slot] = t_;                                           \
    }                                                                                \
  } while (0)
#else
#define OSD_PHASE(cond, slot) \
  do {                        \
  } while (0)
#endif

constexpr int kBlock = 512;  // threads per block of the row and walk kernels
constexpr int kWarps = kBlock / 32;

// x where keep holds, else +0, as a bit mask. A conditional expression would let nvcc branch around
// the computation of x, and unrolled loops of exps then run one after the other instead of
// interleaved (measured on an H200: 3-5x slower row statistics).
__device__ __forceinline__ float keep_or_zero(bool keep, float x) {
  return __int_as_float(__float_as_int(x) & (keep ? -1 : 0));
}

// osd::exp_approx (core/fast_math.h) itself: every rounding step is an explicit fmaf, so nvcc
// cannot round it differently from the CPU. The reference exp_fast is tested against (test_cuda);
// it branches around the polynomial below the range, so the kernels use exp_fast.
__device__ __forceinline__ float exp_ref(float x) { return osd::exp_approx(x); }

// exp_ref for x <= 0 (or NaN), bit for bit: the argument of every warped exp term is (l - max) * it
// <= 0. It skips exp_ref's clamps, and takes 2^n from m's bits (m = 1.5 * 2^23 + n, exactly, for
// |x| < 2^21): x < -87.3 computes garbage that the final select replaces by 0, as in exp_ref.
// test_cuda's exp_fast_matches_exp_ref checks every float x <= 0.
__device__ __forceinline__ float exp_fast(float x) {
  const float m = __fmaf_rn(x, 1.44269504088896341f, osd::kExpShift);
  const float n = __fsub_rn(m, osd::kExpShift);
  const float p = osd::exp_poly(x, n);
  // (bits(m) << 23) = n << 23 (mod 2^32): the bits of 1.5 * 2^23 all shift out.
  const float scale = __uint_as_float((__float_as_uint(m) << 23) + (127u << 23));
  return keep_or_zero(!(x <= -87.3f), __fmul_rn(p, scale));
}

// (l - max) * inv_t, the argument of every warped exp term.
__device__ __forceinline__ float scaled_logit(float l, float mx, float inv_t) { return __fmul_rn(__fsub_rn(l, mx), inv_t); }

// Float -> uint32 keys whose unsigned order is the float order (-0 is folded into +0 because the
// CPU compares logits with == and >, where they are equal). desc_key sorts the largest logit first.
__device__ __forceinline__ uint32_t desc_key(float x) {
  x = (x == 0.0f) ? 0.0f : x;
  const uint32_t u = __float_as_uint(x);
  const uint32_t ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~ordered;
}
__device__ __forceinline__ float desc_key_to_float(uint32_t k) {
  const uint32_t ordered = ~k;
  const uint32_t u = (ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered;
  return __uint_as_float(u);
}

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x & 31u); }
__device__ __forceinline__ int warp_id() { return static_cast<int>(threadIdx.x >> 5); }

// Butterfly sums give every lane the same bits (each step adds the same two operands).
__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// Float sum over a warp by the xor butterfly (16, 8, 4, 2, 1): lane 0 ends with the CPU's lane_sum
// fold a_k += a_(k+16), then a_k += a_(k+8), ... (float addition is commutative).
__device__ __forceinline__ float warp_fold_sum(float a) {
  for (int o = 16; o > 0; o >>= 1) a = __fadd_rn(a, __shfl_xor_sync(0xffffffffu, a, o));
  return a;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

// Scratch for block reductions (kBlock threads). Reductions end with a barrier so it can be reused.
struct BlockRed {
  double d[kWarps];
  double d2[kWarps];
  float f[kWarps];
  int32_t i[kWarps];
  int32_t i2[kWarps];
};

// Deterministic block sum: per-warp butterflies, then warps summed in order by every thread.
__device__ __forceinline__ double block_sum(double v, BlockRed& r) {
  v = warp_sum(v);
  if (lane_id() == 0) r.d[warp_id()] = v;
  __syncthreads();
  double t = 0.0;
  for (int w = 0; w < kWarps; ++w) t += r.d[w];
  __syncthreads();
  return t;
}

__device__ __forceinline__ void block_sum2(double& a, double& b, BlockRed& r) {
  a = warp_sum(a);
  b = warp_sum(b);
  if (lane_id() == 0) r.d[warp_id()] = a, r.d2[warp_id()] = b;
  __syncthreads();
  double ta = 0.0, tb = 0.0;
  for (int w = 0; w < kWarps; ++w) ta += r.d[w], tb += r.d2[w];
  __syncthreads();
  a = ta;
  b = tb;
}

__device__ __forceinline__ float block_max(float v, BlockRed& r) {
  v = warp_max(v);
  if (lane_id() == 0) r.f[warp_id()] = v;
  __syncthreads();
  float t = r.f[0];
  for (int w = 1; w < kWarps; ++w) t = r.f[w] > t ? r.f[w] : t;
  __syncthreads();
  return t;
}

__device__ __forceinline__ int block_or(int v, BlockRed& r) {
  v = __any_sync(0xffffffffu, v != 0) ? 1 : 0;
  if (lane_id() == 0) r.i[warp_id()] = v;
  __syncthreads();
  int t = 0;
  for (int w = 0; w < kWarps; ++w) t |= r.i[w];
  __syncthreads();
  return t;
}

__device__ __forceinline__ int block_min_int(int v, BlockRed& r) {
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (lane_id() == 0) r.i[warp_id()] = v;
  __syncthreads();
  int t = r.i[0];
  for (int w = 1; w < kWarps; ++w) t = min(t, r.i[w]);
  __syncthreads();
  return t;
}

// Argmax with ties to the lowest index (index -1 means "none").
__device__ __forceinline__ void argmax_combine(float& v, int& i, float w, int j) {
  if (j < 0) return;
  if (i < 0 || w > v || (w == v && j < i)) v = w, i = j;
}
__device__ __forceinline__ int block_argmax(float v, int i, BlockRed& r) {
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, v, o);
    const int j = __shfl_xor_sync(0xffffffffu, i, o);
    argmax_combine(v, i, w, j);
  }
  if (lane_id() == 0) r.f[warp_id()] = v, r.i[warp_id()] = i;
  __syncthreads();
  float bv = r.f[0];
  int bi = r.i[0];
  for (int w = 1; w < kWarps; ++w) argmax_combine(bv, bi, r.f[w], r.i[w]);
  __syncthreads();
  return bi;
}

// Reads of data written earlier in the same launch by other blocks go around L1.
__device__ __forceinline__ float ld_cg(const float* p) { return __ldcg(p); }
__device__ __forceinline__ double ld_cg(const double* p) { return __ldcg(p); }
__device__ __forceinline__ int ld_cg(const int* p) { return __ldcg(p); }
__device__ __forceinline__ unsigned long long ld_cg(const unsigned long long* p) { return __ldcg(p); }

}  // namespace cuda
}  // namespace osd
