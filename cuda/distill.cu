// Distillation losses fused with their gradients (forward KL against a dense teacher: see below;
// the others one block per row, two passes over the row, or for reverse KL, JSD and TVD against a
// dense teacher the blocked kernels when blocked_divergence() is on: see div_sums_kernel).
// Build (standalone check of this file): nvcc -std=c++17 -O3 -arch=sm_90 -I native -c cuda/distill.cu
// Parity: test/native/test_cuda.cu (distill_matches_cpu): loss within 2e-5 * max(1, |loss|),
// gradients within 1e-6 * max|grad| + 1e-5 * |grad_j| of the CPU backend. The softmax sums are the
// CPU's, bit for bit (z_exact); what remains are sums over rows in another order.
// Forward KL against a dense teacher follows the CPU's fast path (forward_kl_row_blocked) operation
// for operation, so its gradient is bit-identical and its loss differs only by the last bits of
// log(); test_cuda checks it at that tighter tolerance. On sm_90 it runs in one pass over the data
// (fkl_cluster_kernel: one thread-block cluster per row keeps the row in shared memory between the
// block sums and the gradient); elsewhere, and where that kernel does not apply, as two kernels over
// (row, block) pairs (fkl_stats_kernel, fkl_grad_kernel), which read the row twice. Reverse KL, JSD
// and TVD run the same way on sm_90 (div_cluster_kernel) unless cluster_divergence() is turned off.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>

#include "common.cuh"
#include "core/error.h"
#include "distill.cuh"
#include "warp_device.cuh"  // z_exact: the CPU's softmax sums, bit for bit

// The one-pass forward KL uses bulk copies counted by mbarrier transactions: PTX ISA 8.0, CUDA 12.
// Older toolkits (the CUDA 11.8 prebuild) build the two-kernel path only.
#if defined(__CUDACC_VER_MAJOR__) && __CUDACC_VER_MAJOR__ >= 12
#define OSD_FKL_CLUSTER 1
#else
#define OSD_FKL_CLUSTER 0
#endif

namespace osd {
namespace cuda {

namespace {

struct BinTerm {
  double loss;
  double g;
};

__device__ double log_add_exp(double a, double b) {
  if (a == -INFINITY) return b;
  if (b == -INFINITY) return a;
  const double m = a > b ? a : b;
  return m + log(exp(a - m) + exp(b - m));
}

// losses.cpp bin_term().
__device__ BinTerm bin_term(int kind, double lp, double lq, double beta) {
  const double p = exp(lp), q = exp(lq);
  switch (kind) {
    case static_cast<int>(DistillKind::ForwardKL):
      return {p > 0.0 ? p * (lp - lq) : 0.0, 0.0};
    case static_cast<int>(DistillKind::ReverseKL): {
      const double floor_lp = -27.631021115928547;  // log(1e-12)
      const double lpf = lp > floor_lp ? lp : floor_lp;
      return {q > 0.0 ? q * (lq - lpf) : 0.0, lq - lpf};
    }
    case static_cast<int>(DistillKind::JSD): {
      const double lm = log_add_exp(log(beta) + lp, log1p(-beta) + lq);
      const double l = (p > 0.0 ? beta * p * (lp - lm) : 0.0) + (q > 0.0 ? (1.0 - beta) * q * (lq - lm) : 0.0);
      return {l, (1.0 - beta) * (lq - lm)};
    }
    default:  // TVD
      return {0.5 * fabs(p - q), q > p ? 0.5 : (q < p ? -0.5 : 0.0)};
  }
}

// Max of a row (finite_max in losses.cpp) and sum_exp_scaled() in the CPU's exact order, plus a flag
// for non-finite entries. Using the CPU's summation order keeps the gradients within double rounding
// of the CPU's (the CPU's float-lane sum is itself only accurate to ~1e-6 relative, and reverse KL,
// JSD and TVD amplify that through q * (g - E_q[g])).
__device__ void row_softmax_stats(const float* x, int V, float inv_t, float* out_max, double* out_z, int* out_bad,
                                  PrepSmem& sm) {
  float m = -FLT_MAX;
  int bad = 0;
  for (int j = threadIdx.x; j < V; j += kBlock) {
    const float v = x[j];
    bad |= !(fabsf(v) <= FLT_MAX);
    m = v > m ? v : m;
  }
  bad = block_or(bad, sm.red);
  m = block_max(m, sm.red);
  *out_max = m;
  *out_bad = bad;
  *out_z = bad ? 0.0 : z_exact(x, V, m, inv_t, nullptr, sm);
}

struct DistillParams {
  DistillDevice in;
  float inv_t;
  double* gb;    // sparse: rows x k bin gradients
};

constexpr int kChunk = 16;  // entries per lane loaded together in fkl_stats_kernel's passes

// Forward KL against a dense teacher over many CTAs: forward_kl_blocked's two passes as two
// kernels on one stream. fkl_stats_kernel: one warp per (row, block of kStatBlock entries), pass 1
// exactly as forward_kl_blocked (the same lane sums), 8 floats per block to global memory.
// fkl_grad_kernel: one CTA per (row, block); each combines its row's blocks in block order exactly
// as forward_kl_blocked's thread 0 does (so every CTA of a row gets the same bits), the CTA of
// block 0 writes the loss, and each writes the gradient of its own block.
constexpr int kFklWarps = 4;   // warps per CTA of fkl_stats_kernel
constexpr int kFklThreads = 256;  // threads per CTA of fkl_grad_kernel (8 entries each)

__global__ void __launch_bounds__(kFklWarps * 32) fkl_stats_kernel(DistillDevice in, float it, int nb, float* fkl) {
  const int lane = lane_id();
  const long long unit = static_cast<long long>(blockIdx.x) * kFklWarps + warp_id();
  if (unit >= static_cast<long long>(in.rows) * nb) return;
  const int r = static_cast<int>(unit / nb), b = static_cast<int>(unit - static_cast<long long>(r) * nb);
  if (in.mask && !in.mask[r]) return;
  const int V = in.vocab;
  const float* s = in.student + static_cast<size_t>(r) * V;
  const float* t = in.teacher + static_cast<size_t>(r) * V;
  const int j0 = b * kStatBlock, n = min(kStatBlock, V - j0);
  float bs = -FLT_MAX, bt = -FLT_MAX;
  int bad_s = 0, bad_t = 0;
  for (int i0 = 0; i0 < kStatBlock / 32; i0 += kChunk) {
    float xs[kChunk], ys[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) {
      const int j = 32 * (i0 + i) + lane;
      xs[i] = j < n ? __ldg(s + j0 + j) : 0.0f;
      ys[i] = j < n ? __ldg(t + j0 + j) : 0.0f;
    }
#pragma unroll
    for (int i = 0; i < kChunk; ++i)
      if (32 * (i0 + i) + lane < n) {
        const float x = xs[i], y = ys[i];
        bs = x > bs ? x : bs;
        bt = y > bt ? y : bt;
        bad_s |= !(fabsf(x) <= FLT_MAX);
        bad_t |= !(fabsf(y) <= FLT_MAX);
      }
  }
  bs = warp_max(bs);
  bt = warp_max(bt);
  bad_s = __any_sync(0xffffffffu, bad_s);
  bad_t = __any_sync(0xffffffffu, bad_t);
  float as = 0.0f, at = 0.0f, ad = 0.0f;
  if (!bad_s && !bad_t) {
    for (int i0 = 0; i0 < kStatBlock / 32; i0 += kChunk) {
      float xs[kChunk], ys[kChunk];
#pragma unroll
      for (int i = 0; i < kChunk; ++i) {
        const int j = 32 * (i0 + i) + lane;
        xs[i] = j < n ? __ldg(s + j0 + j) : 0.0f;
        ys[i] = j < n ? __ldg(t + j0 + j) : 0.0f;
      }
#pragma unroll
      for (int i = 0; i < kChunk; ++i)
        if (32 * (i0 + i) + lane < n) {
          const float ds = __fsub_rn(xs[i], bs), tt = __fsub_rn(ys[i], bt);
          as = __fadd_rn(as, exp_fast(__fmul_rn(ds, it)));
          const float e = exp_fast(__fmul_rn(tt, it));
          at = __fadd_rn(at, e);
          ad = __fadd_rn(ad, __fmul_rn(e, __fmul_rn(__fsub_rn(tt, ds), it)));
        }
    }
    as = warp_fold_sum(as);
    at = warp_fold_sum(at);
    ad = warp_fold_sum(ad);
  }
  if (lane == 0) {
    float4* o = reinterpret_cast<float4*>(fkl + 8 * unit);
    o[0] = make_float4(bs, bt, as, at);
    o[1] = make_float4(ad, __int_as_float(bad_s | (bad_t << 1)), 0.0f, 0.0f);
  }
}

// A row's block statistics combined as PairBlocks::combine (losses.cpp): both maxima and the bad
// flags (order-free), c_b for every block (kept in cs_ / ct_ when nb fits), and zs, zt summed in
// block order by thread 0 into zz. Every CTA of a row gets the same bits. All kFklThreads threads
// call it; it ends with a barrier.
struct RowBlocks {
  float ms, mt;
  int bad;    // 0, 1 (student not finite) or 2 (teacher)
  bool smem;  // c_b in cs_ / ct_
};
constexpr int kRowBlocksSmem = kStatBlock / 32 * 4;  // up to 256 blocks in shared memory

struct RowBlocksSmem {
  float cs[kRowBlocksSmem], ct[kRowBlocksSmem];
  float red_f[2 * (kFklThreads / 32)];
  int red_i[kFklThreads / 32];
  double zz[2];
};

__device__ float block_c(const RowBlocks& rb, const RowBlocksSmem& sm, const float* st, int k, int side, float it) {
  if (rb.smem) return side ? sm.ct[k] : sm.cs[k];
  return exp_fast(__fmul_rn(__fsub_rn(st[8 * k + side], side ? rb.mt : rb.ms), it));
}

__device__ RowBlocks combine_row_blocks(const float* st, int nb, float it, RowBlocksSmem& sm) {
  const int tid = threadIdx.x, lane = lane_id(), warp = warp_id();
  float ms = -FLT_MAX, mt = -FLT_MAX;
  int bad = 0;
  for (int k = tid; k < nb; k += kFklThreads) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(st + 8 * k));
    const float4 c = __ldg(reinterpret_cast<const float4*>(st + 8 * k) + 1);
    ms = a.x > ms ? a.x : ms;
    mt = a.y > mt ? a.y : mt;
    bad |= __float_as_int(c.y);
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float x = __shfl_xor_sync(0xffffffffu, ms, o), y = __shfl_xor_sync(0xffffffffu, mt, o);
    ms = x > ms ? x : ms;
    mt = y > mt ? y : mt;
    bad |= __shfl_xor_sync(0xffffffffu, bad, o);
  }
  if (lane == 0) sm.red_f[warp] = ms, sm.red_f[kFklThreads / 32 + warp] = mt, sm.red_i[warp] = bad;
  __syncthreads();
  RowBlocks rb;
  rb.ms = sm.red_f[0], rb.mt = sm.red_f[kFklThreads / 32], bad = sm.red_i[0];
  for (int w = 1; w < kFklThreads / 32; ++w) {
    rb.ms = sm.red_f[w] > rb.ms ? sm.red_f[w] : rb.ms;
    rb.mt = sm.red_f[kFklThreads / 32 + w] > rb.mt ? sm.red_f[kFklThreads / 32 + w] : rb.mt;
    bad |= sm.red_i[w];
  }
  rb.bad = (bad & 1) ? 1 : (bad & 2) ? 2 : 0;
  rb.smem = nb <= kRowBlocksSmem;
  if (rb.bad) return rb;  // uniform across the CTA: no barrier is skipped by some threads only
  for (int k = tid; k < nb && rb.smem; k += kFklThreads) {
    sm.cs[k] = exp_fast(__fmul_rn(__fsub_rn(st[8 * k], rb.ms), it));
    sm.ct[k] = exp_fast(__fmul_rn(__fsub_rn(st[8 * k + 1], rb.mt), it));
  }
  __syncthreads();
  if (tid == 0) {
    double zs = 0.0, zt = 0.0;
    for (int k = 0; k < nb; ++k) {
      zs += static_cast<double>(__fmul_rn(st[8 * k + 2], block_c(rb, sm, st, k, 0, it)));
      zt += static_cast<double>(__fmul_rn(st[8 * k + 3], block_c(rb, sm, st, k, 1, it)));
    }
    sm.zz[0] = zs;
    sm.zz[1] = zt;
  }
  __syncthreads();
  return rb;
}

// A masked row's block in a (row, block) kernel of kFklThreads threads: zeroes its gradient (CTA b
// = 0 also the row's loss and flag) and returns true; false for a counted row.
__device__ bool masked_row_block(const DistillDevice& in, int r, int b, int n, float* grad) {
  if (!in.mask || in.mask[r]) return false;
  if (grad)
    for (int j = threadIdx.x; j < n; j += kFklThreads) grad[j] = 0.0f;
  if (b == 0 && threadIdx.x == 0) in.row_loss[r] = 0.0, in.row_bad[r] = 0;
  return true;
}

__global__ void __launch_bounds__(kFklThreads) fkl_grad_kernel(DistillDevice in, float it, int nb, const float* fkl) {
  __shared__ RowBlocksSmem sm;
  const int tid = threadIdx.x;
  const int r = blockIdx.x, b = blockIdx.y;
  const int V = in.vocab;
  const float gscale = __fmul_rn(in.scale, it);
  const int j0 = b * kStatBlock, n = min(kStatBlock, V - j0);
  float* grad = in.grad ? in.grad + static_cast<size_t>(r) * V + j0 : nullptr;
  if (masked_row_block(in, r, b, n, grad)) return;
  const float* st = fkl + static_cast<size_t>(r) * nb * 8;
  const RowBlocks rb = combine_row_blocks(st, nb, it, sm);
  const float ms = rb.ms, mt = rb.mt;
  if (rb.bad) {  // as forward_kl_blocked: no gradient for a bad row
    if (b == 0 && tid == 0) in.row_bad[r] = rb.bad, in.row_loss[r] = 0.0;
    return;
  }
  if (tid == 0 && b == 0) {
    double cross = 0.0;
    for (int k = 0; k < nb; ++k) {
      const float bsk = st[8 * k], btk = st[8 * k + 1], stk = st[8 * k + 3], dsk = st[8 * k + 4];
      const double kk = __dmul_rn(__dsub_rn(__dsub_rn(static_cast<double>(btk), static_cast<double>(mt)),
                                            __dsub_rn(static_cast<double>(bsk), static_cast<double>(ms))),
                                  static_cast<double>(it));
      const double term = __dadd_rn(static_cast<double>(dsk), __dmul_rn(static_cast<double>(stk), kk));
      cross = __dadd_rn(cross, __dmul_rn(static_cast<double>(block_c(rb, sm, st, k, 1, it)), term));
    }
    in.row_loss[r] = cross / sm.zz[1] + log(sm.zz[0]) - log(sm.zz[1]);
    in.row_bad[r] = 0;
  }
  if (!grad) return;
  const float bsb = st[8 * b], btb = st[8 * b + 1];
  const float qs = __double2float_rn(__ddiv_rn(static_cast<double>(block_c(rb, sm, st, b, 0, it)), sm.zz[0]));
  const float qt = __double2float_rn(__ddiv_rn(static_cast<double>(block_c(rb, sm, st, b, 1, it)), sm.zz[1]));
  const float* s = in.student + static_cast<size_t>(r) * V + j0;
  const float* t = in.teacher + static_cast<size_t>(r) * V + j0;
  auto one = [&](float x, float y) {
    const float es = exp_fast(__fmul_rn(__fsub_rn(x, bsb), it));
    const float et = exp_fast(__fmul_rn(__fsub_rn(y, btb), it));
    return __fmul_rn(gscale, __fsub_rn(__fmul_rn(es, qs), __fmul_rn(et, qt)));
  };
  const bool vec = n == kStatBlock && ((reinterpret_cast<uintptr_t>(s) | reinterpret_cast<uintptr_t>(t) |
                                        reinterpret_cast<uintptr_t>(grad)) & 15u) == 0;
  if (vec) {
    const float4* s4 = reinterpret_cast<const float4*>(s);
    const float4* t4 = reinterpret_cast<const float4*>(t);
    float4* g4 = reinterpret_cast<float4*>(grad);
    float4 x[2], y[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) x[k] = __ldg(s4 + tid + k * kFklThreads), y[k] = __ldg(t4 + tid + k * kFklThreads);
#pragma unroll
    for (int k = 0; k < 2; ++k)
      g4[tid + k * kFklThreads] = make_float4(one(x[k].x, y[k].x), one(x[k].y, y[k].y), one(x[k].z, y[k].z), one(x[k].w, y[k].w));
  } else {
    for (int j = tid; j < n; j += kFklThreads) grad[j] = one(__ldg(s + j), __ldg(t + j));
  }
}

// ---- Reverse KL, JSD and TVD against a dense teacher: the blocked scheme ----------------------
// divergence_row_blocked (losses.cpp) over (row, block) pairs, in float per entry like the CPU:
// fkl_stats_kernel (pass 1: block maxima and exp sums; its cross term goes unused), div_sums_kernel
// (each CTA combines its row's blocks, then sums its block's loss terms and q_j g_j), and
// div_grad_kernel (E_q[g] from those sums in block order, then the gradient). g_j is not stored:
// div_grad_kernel recomputes it with the same operations, so with the same bits. 28 bytes move per
// entry (s and t read twice, s a third time, the gradient written), against the row kernel's
// double-precision math per entry. Each entry's operations are the CPU's, in the same order and
// rounded alone; the sums over a block run in another order, and -log uses logf (the CPU a
// polynomial): test_cuda compares with the CPU's blocked path.
struct DivRow {
  float ms, mt, it, ls, lt, c, floor, beta;  // as losses.cpp's DivRow
};

// One entry of div_lanes (losses.cpp): g_j = dL/dq_j, the loss term l_j, the exp term es_j and
// q_j = es_j fq.
template <int kKind>
__device__ __forceinline__ void div_entry(float s, float t, float bs, float bt, const DivRow& r, float fq, float fp,
                                          float& g, float& l, float& es, float& q) {
  es = exp_fast(__fmul_rn(__fsub_rn(s, bs), r.it));
  const float et = exp_fast(__fmul_rn(__fsub_rn(t, bt), r.it));
  const float a = __fmul_rn(__fsub_rn(s, r.ms), r.it), b = __fmul_rn(__fsub_rn(t, r.mt), r.it);
  q = __fmul_rn(es, fq);
  const float p = __fmul_rn(et, fp);
  const float d = __fsub_rn(__fsub_rn(a, b), r.c);  // log q - log p
  if (kKind == static_cast<int>(DistillKind::ReverseKL)) {
    g = __fsub_rn(b, r.lt) >= r.floor ? d : __fsub_rn(__fsub_rn(a, r.ls), r.floor);
    l = __fmul_rn(q, g);
  } else if (kKind == static_cast<int>(DistillKind::TVD)) {
    g = d > 0.0f ? 0.5f : d < 0.0f ? -0.5f : 0.0f;
    l = __fmul_rn(0.5f, fabsf(__fsub_rn(p, q)));
  } else {  // JSD: log m relative to the larger side, as div_lanes
    const float beta = r.beta, beta1 = __fsub_rn(1.0f, r.beta);
    const bool pos = d >= 0.0f;
    const float e = exp_fast(pos ? -d : d);
    const float lg = -logf(pos ? __fadd_rn(__fmul_rn(beta, e), beta1) : __fadd_rn(beta, __fmul_rn(beta1, e)));
    const float A = pos ? lg : __fadd_rn(lg, d), B = pos ? __fsub_rn(lg, d) : lg;
    g = __fmul_rn(beta1, A);
    l = __fadd_rn(__fmul_rn(__fmul_rn(beta, p), B), __fmul_rn(__fmul_rn(beta1, q), A));
  }
}

// The row constants and this block's scales, from a combined row (sm.zz holds zs, zt).
__device__ DivRow div_row(const RowBlocks& rb, const RowBlocksSmem& sm, float it, float beta) {
  const double log_zs = log(sm.zz[0]), log_zt = log(sm.zz[1]);
  return DivRow{rb.ms,
                rb.mt,
                it,
                static_cast<float>(log_zs),
                static_cast<float>(log_zt),
                static_cast<float>(log_zs - log_zt),
                static_cast<float>(log(1e-12)),
                beta};
}

// Calls f(j, s_j, t_j) for the block's entries j < n, kFklThreads threads, float4 loads when aligned.
template <class F>
__device__ __forceinline__ void for_block_entries(const float* s, const float* t, int n, F&& f) {
  const int tid = threadIdx.x;
  if (n == kStatBlock && ((reinterpret_cast<uintptr_t>(s) | reinterpret_cast<uintptr_t>(t)) & 15u) == 0) {
    const float4* s4 = reinterpret_cast<const float4*>(s);
    const float4* t4 = reinterpret_cast<const float4*>(t);
#pragma unroll
    for (int k = 0; k < kStatBlock / (4 * kFklThreads); ++k) {
      const int i = tid + k * kFklThreads;
      const float4 x = __ldg(s4 + i), y = __ldg(t4 + i);
      f(4 * i, x.x, y.x);
      f(4 * i + 1, x.y, y.y);
      f(4 * i + 2, x.z, y.z);
      f(4 * i + 3, x.w, y.w);
    }
  } else {
    for (int j = tid; j < n; j += kFklThreads) f(j, __ldg(s + j), __ldg(t + j));
  }
}

// Grid (rows, nb). Writes sums[3 u] = the block's loss terms, sums[3 u + 1] = its sum of q_j g_j and
// sums[3 u + 2] = its scale fq (u = r nb + b); CTA b = 0 also the row's DivRow and row_bad.
template <int kKind>
__global__ void __launch_bounds__(kFklThreads) div_sums_kernel(DistillDevice in, float it, int nb, float* stats,
                                                               double* sums, DivRow* rowc) {
  __shared__ RowBlocksSmem sm;
  __shared__ double red[2][kFklThreads / 32];
  const int tid = threadIdx.x, r = blockIdx.x, b = blockIdx.y, V = in.vocab;
  if (in.mask && !in.mask[r]) return;  // div_grad_kernel zeroes the gradient and the loss
  const float* st = stats + static_cast<size_t>(r) * nb * 8;
  const RowBlocks rb = combine_row_blocks(st, nb, it, sm);
  if (b == 0 && tid == 0) in.row_bad[r] = rb.bad;
  if (rb.bad) return;
  const DivRow row = div_row(rb, sm, it, in.beta);
  const float fq = __double2float_rn(__ddiv_rn(static_cast<double>(block_c(rb, sm, st, b, 0, it)), sm.zz[0]));
  const float fp = __double2float_rn(__ddiv_rn(static_cast<double>(block_c(rb, sm, st, b, 1, it)), sm.zz[1]));
  const int j0 = b * kStatBlock, n = min(kStatBlock, V - j0);
  const float bs = st[8 * b], bt = st[8 * b + 1];
  float la = 0.0f, ea = 0.0f;
  for_block_entries(in.student + static_cast<size_t>(r) * V + j0, in.teacher + static_cast<size_t>(r) * V + j0, n,
                    [&](int, float x, float y) {
                      float g, l, es, q;
                      div_entry<kKind>(x, y, bs, bt, row, fq, fp, g, l, es, q);
                      la = __fadd_rn(la, l);
                      ea = __fadd_rn(ea, __fmul_rn(q, g));
                    });
  double dl = warp_sum(static_cast<double>(la)), de = warp_sum(static_cast<double>(ea));
  if (lane_id() == 0) red[0][warp_id()] = dl, red[1][warp_id()] = de;
  __syncthreads();
  if (tid == 0) {
    dl = 0.0, de = 0.0;
    for (int w = 0; w < kFklThreads / 32; ++w) dl += red[0][w], de += red[1][w];
    const size_t u = static_cast<size_t>(r) * nb + b;
    sums[3 * u] = dl;
    sums[3 * u + 1] = de;
    sums[3 * u + 2] = fq;
    if (b == 0) rowc[r] = row;
  }
}

// Grid (rows, nb) with a gradient, (rows, 1) without. The row's loss (CTA b = 0) and E_q[g] are the
// block sums added in block order; grad_j = c es_j (g_j - E_q[g]) with c = gscale fq_b, as
// div_grad_block (losses.cpp).
template <int kKind>
__global__ void __launch_bounds__(kFklThreads) div_grad_kernel(DistillDevice in, float it, int nb, const float* stats,
                                                               const double* sums, const DivRow* rowc) {
  __shared__ float eg_s;
  const int tid = threadIdx.x, r = blockIdx.x, b = blockIdx.y, V = in.vocab;
  const int j0 = b * kStatBlock, n = min(kStatBlock, V - j0);
  float* grad = in.grad ? in.grad + static_cast<size_t>(r) * V + j0 : nullptr;
  if (masked_row_block(in, r, b, n, grad)) return;
  if (in.row_bad[r]) {
    if (b == 0 && tid == 0) in.row_loss[r] = 0.0;
    return;
  }
  const double* rs = sums + 3 * static_cast<size_t>(r) * nb;
  if (tid == 0) {
    double loss = 0.0, eg = 0.0;
    for (int k = 0; k < nb; ++k) loss += rs[3 * k], eg += rs[3 * k + 1];
    if (b == 0) in.row_loss[r] = loss;
    eg_s = static_cast<float>(eg);
  }
  __syncthreads();
  if (!grad) return;
  const float* st = stats + static_cast<size_t>(r) * nb * 8;
  const DivRow row = rowc[r];
  const float bs = st[8 * b], bt = st[8 * b + 1], eg = eg_s;
  const float fq = static_cast<float>(rs[3 * b + 2]), c = __fmul_rn(__fmul_rn(in.scale, it), fq);
  for_block_entries(in.student + static_cast<size_t>(r) * V + j0, in.teacher + static_cast<size_t>(r) * V + j0, n,
                    [&](int j, float x, float y) {
                      float g, l, es, q;  // g does not depend on the teacher's scale
                      div_entry<kKind>(x, y, bs, bt, row, fq, 1.0f, g, l, es, q);
                      grad[j] = __fmul_rn(__fmul_rn(c, es), __fsub_rn(g, eg));
                    });
}

template <int kKind>
void div_launch_kind(const DistillDevice& in, float it, Workspace& ws, cudaStream_t stream) {
  const int nb = stat_blocks(in.vocab);
  const size_t units = static_cast<size_t>(in.rows) * nb;
  // One scratch buffer: block stats (8 floats a block), block sums (3 doubles), row constants.
  const size_t stats_bytes = (units * 8 * sizeof(float) + 15) / 16 * 16;
  const size_t sums_bytes = units * 3 * sizeof(double);
  char* buf = ws.misc2.as<char>(stats_bytes + sums_bytes + static_cast<size_t>(in.rows) * sizeof(DivRow));
  float* stats = reinterpret_cast<float*>(buf);
  double* sums = reinterpret_cast<double*>(buf + stats_bytes);
  DivRow* rowc = reinterpret_cast<DivRow*>(buf + stats_bytes + sums_bytes);
  record_start(ws, stream);
  fkl_stats_kernel<<<static_cast<unsigned>((units + kFklWarps - 1) / kFklWarps), kFklWarps * 32, 0, stream>>>(
      in, it, nb, stats);
  OSD_CUDA_CHECK_LAUNCH();
  div_sums_kernel<kKind><<<dim3(in.rows, nb), kFklThreads, 0, stream>>>(in, it, nb, stats, sums, rowc);
  OSD_CUDA_CHECK_LAUNCH();
  div_grad_kernel<kKind><<<dim3(in.rows, in.grad ? nb : 1), kFklThreads, 0, stream>>>(in, it, nb, stats, sums, rowc);
  OSD_CUDA_CHECK_LAUNCH();
  record_stop(ws, stream);
}

void div_launch(const DistillDevice& in, float it, Workspace& ws, cudaStream_t stream) {
  switch (in.kind) {
    case DistillKind::ReverseKL: div_launch_kind<static_cast<int>(DistillKind::ReverseKL)>(in, it, ws, stream); break;
    case DistillKind::TVD: div_launch_kind<static_cast<int>(DistillKind::TVD)>(in, it, ws, stream); break;
    default: div_launch_kind<static_cast<int>(DistillKind::JSD)>(in, it, ws, stream); break;
  }
}

// ---- Forward KL in one pass (sm_90): one thread-block cluster per row -------------------------
// The two kernels above move about 20 bytes per entry (s and t read twice, the gradient written);
// this one moves 12. Warp w of CTA `rank` owns block b = rank * W + w of its row: the bulk-copy
// engine (TMA) brings the block's s and t into shared memory, the warp computes the block's sums
// exactly as fkl_stats_kernel (lane k adds entries 32 i + k in increasing i) and keeps the exp terms
// es_j, et_j in place of s_j, t_j. After a cluster barrier every CTA reads the row's block sums from
// the other CTAs' shared memory (DSMEM), combines them in block order exactly as fkl_grad_kernel, and
// each warp writes its block's gradient from the exp terms it kept: no entry is read twice and no
// exp is computed twice. The row (8 bytes per entry) must fit in the cluster: W warps of 16 KiB each,
// up to kFklMaxCluster CTAs.
constexpr int kFklMaxCluster = 16;     // non-portable cluster size (H100/H200 run 16)
constexpr int kFklClusterThreads = 512;  // launch bound; W <= 13 warps fit the 227 KiB of shared memory

struct alignas(16) FklStat {  // one block's pass-1 results, read by every CTA of the cluster
  float bs, bt, ss, st, ds;
  int bad;  // 1: student entry not finite, 2: teacher entry
  float pad[2];
};

// Dynamic shared memory of a CTA of W warps (blocks) in a row of nb blocks: the blocks' s and t,
// their FklStat and mbarrier, then the row's combine terms (3 double, 2 float per block).
size_t fkl_cluster_smem(int W, int nb) {
  return static_cast<size_t>(W) * (2 * kStatBlock * sizeof(float) + sizeof(FklStat) + sizeof(uint64_t)) +
         static_cast<size_t>(nb) * (3 * sizeof(double) + 2 * sizeof(float));
}

#if OSD_FKL_CLUSTER && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// One-shot mbarrier (phase 0) that completes when `bytes` bytes of bulk copies have landed.
__device__ __forceinline__ void mbar_arm(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(1u) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");  // the init before the copies' complete_tx
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :
               : "r"(smem_addr(dst)), "l"(__cvta_generic_to_global(src)), "r"(bytes), "r"(smem_addr(bar))
               : "memory");
}
__device__ __forceinline__ void mbar_wait0(uint64_t* bar) {
  uint32_t done = 0;
  while (!done)
    asm volatile(
        "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\n selp.u32 %0, 1, 0, p;\n}"
        : "=r"(done)
        : "r"(smem_addr(bar))
        : "memory");
}

// The cluster kernels' pieces, shared by fkl_cluster_kernel and div_cluster_kernel.

// A masked row: its warps zero their blocks' gradient (n entries from grad, or none), rank 0 its
// loss; the whole cluster then returns, before any barrier. False for a counted row.
__device__ __forceinline__ bool cluster_masked_row(const DistillDevice& in, int r, int rank, int n, float* grad) {
  if (!in.mask || in.mask[r]) return false;
  for (int i = lane_id(); grad && i < n / 4; i += 32)
    reinterpret_cast<float4*>(grad)[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (rank == 0 && threadIdx.x == 0) in.row_loss[r] = 0.0, in.row_bad[r] = 0;
  return true;
}

// The warp's block (n > 0 entries from j0 of row r) brought into sb and tb by the bulk-copy engine,
// then its maxima (order-free, float4) and finiteness: x * 0 is NaN exactly for NaN and
// +-Infinity. Returns the bad flags: 1 student, 2 teacher.
__device__ __forceinline__ int cluster_block_maxima(const DistillDevice& in, int r, int j0, int n, float* sb, float* tb,
                                                    uint64_t* bar, float& bs, float& bt) {
  const int lane = lane_id();
  const size_t row = static_cast<size_t>(r) * in.vocab + j0;
  if (lane == 0) {
    mbar_arm(bar, 8u * n);
    bulk_load(sb, in.student + row, 4u * n, bar);
    bulk_load(tb, in.teacher + row, 4u * n, bar);
  }
  __syncwarp();  // the mbarrier is initialised before any lane polls it
  mbar_wait0(bar);
  float fs = 0.0f, ft = 0.0f;
  bs = -FLT_MAX, bt = -FLT_MAX;
  const float4* s4 = reinterpret_cast<const float4*>(sb);
  const float4* t4 = reinterpret_cast<const float4*>(tb);
  for (int i = lane; i < n / 4; i += 32) {
    const float4 x = s4[i], y = t4[i];
    bs = fmaxf(fmaxf(bs, x.x), fmaxf(x.y, fmaxf(x.z, x.w)));
    bt = fmaxf(fmaxf(bt, y.x), fmaxf(y.y, fmaxf(y.z, y.w)));
    fs = __fmaf_rn(x.x, 0.0f, __fmaf_rn(x.y, 0.0f, __fmaf_rn(x.z, 0.0f, __fmaf_rn(x.w, 0.0f, fs))));
    ft = __fmaf_rn(y.x, 0.0f, __fmaf_rn(y.y, 0.0f, __fmaf_rn(y.z, 0.0f, __fmaf_rn(y.w, 0.0f, ft))));
  }
  bs = warp_max(bs);
  bt = warp_max(bt);
  return (__any_sync(0xffffffffu, fs != fs) ? 1 : 0) | (__any_sync(0xffffffffu, ft != ft) ? 2 : 0);
}

// The row's maxima and bad flag from every thread's block statistics g (one block per thread k <
// nb, -FLT_MAX elsewhere), through red_f[64] / red_i[32]: the same in every CTA of the cluster.
// Returns 0, 1 (student not finite) or 2 (teacher). Ends with the CTA's threads synchronised.
__device__ __forceinline__ int cluster_row_maxima(const FklStat& g, float* red_f, unsigned* red_i, float& ms,
                                                  float& mt) {
  const int w = warp_id(), W = blockDim.x / 32;
  ms = warp_max(g.bs), mt = warp_max(g.bt);
  unsigned bad = __reduce_or_sync(0xffffffffu, static_cast<unsigned>(g.bad));
  if (lane_id() == 0) red_f[w] = ms, red_f[32 + w] = mt, red_i[w] = bad;
  __syncthreads();
  for (int k = 0; k < W; ++k) {
    ms = red_f[k] > ms ? red_f[k] : ms;
    mt = red_f[32 + k] > mt ? red_f[32 + k] : mt;
    bad |= red_i[k];
  }
  return (bad & 1) ? 1 : (bad & 2) ? 2 : 0;
}
#endif

// Grid: rows x C CTAs of W = blockDim.x / 32 warps, clusters of C CTAs (one per row), C * W >= nb;
// dynamic shared memory fkl_cluster_smem(W, nb). Rows start 16-byte aligned (V % 4 == 0).
// kUnitT (it == 1): the exp loop skips its multiplies by it, which are exact there (as the CPU's).
template <bool kUnitT>
__global__ void __launch_bounds__(kFklClusterThreads) fkl_cluster_kernel(DistillDevice in, float it, int nb) {
#if OSD_FKL_CLUSTER && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char fkl_smem[];
  __shared__ float red_f[2 * 32];
  __shared__ unsigned red_i[32];
  __shared__ double zz[2];
  const int tid = threadIdx.x, lane = lane_id(), w = warp_id(), W = blockDim.x / 32;
  const int C = static_cast<int>(__clusterSizeInBlocks()), rank = static_cast<int>(__clusterRelativeBlockRank());
  const int r = blockIdx.x / C, V = in.vocab, b = rank * W + w;
  const int j0 = b * kStatBlock, n = b < nb ? min(kStatBlock, V - j0) : 0;  // n = 0: a warp without a block
  float* grad = in.grad && n ? in.grad + static_cast<size_t>(r) * V + j0 : nullptr;
  if (cluster_masked_row(in, r, rank, n, grad)) return;  // the whole cluster, before any barrier
  float* sb = reinterpret_cast<float*>(fkl_smem) + w * 2 * kStatBlock;  // s_j, then es_j
  float* tb = sb + kStatBlock;                                           // t_j, then et_j
  FklStat* stat = reinterpret_cast<FklStat*>(fkl_smem + static_cast<size_t>(W) * 2 * kStatBlock * sizeof(float));
  uint64_t* bar = reinterpret_cast<uint64_t*>(stat + W);
  double* term = reinterpret_cast<double*>(bar + W);  // per block of the row: zs, zt and cross terms
  float* cs = reinterpret_cast<float*>(term + 3 * nb);  // c_b of the student, then of the teacher
  float* ct = cs + nb;

  // Pass 1 over this warp's block, from shared memory.
  if (n) {
    float bs, bt;
    const int bad = cluster_block_maxima(in, r, j0, n, sb, tb, bar + w, bs, bt);
    // The exp terms and their lane sums, as fkl_stats_kernel; es_j, et_j overwrite s_j, t_j.
    float as = 0.0f, at = 0.0f, ad = 0.0f;
#pragma unroll 4
    for (int j = lane; j < n; j += 32) {
      const float ds = __fsub_rn(sb[j], bs), tt = __fsub_rn(tb[j], bt), dd = __fsub_rn(tt, ds);
      const float es = exp_fast(kUnitT ? ds : __fmul_rn(ds, it)), et = exp_fast(kUnitT ? tt : __fmul_rn(tt, it));
      as = __fadd_rn(as, es);
      at = __fadd_rn(at, et);
      ad = __fadd_rn(ad, __fmul_rn(et, kUnitT ? dd : __fmul_rn(dd, it)));
      sb[j] = es;
      tb[j] = et;
    }
    as = warp_fold_sum(as);
    at = warp_fold_sum(at);
    ad = warp_fold_sum(ad);
    if (lane == 0) stat[w] = FklStat{bs, bt, as, at, ad, bad, {0.0f, 0.0f}};
  }
  __cluster_barrier_arrive();  // release: stat[] is written
  __cluster_barrier_wait();
  // Thread k < nb (nb <= C * W <= 16 W < blockDim.x) fetches block k's results from its CTA.
  FklStat g{-FLT_MAX, -FLT_MAX, 0.0f, 0.0f, 0.0f, 0, {0.0f, 0.0f}};
  if (tid < nb) g = *static_cast<const FklStat*>(__cluster_map_shared_rank(stat + tid % W, tid / W));
  __cluster_barrier_arrive();  // our reads of the other CTAs are done; they wait for it before they exit

  // Both maxima and the bad flags (order-free), then the combine in block order (fkl_grad_kernel).
  float ms, mt;
  const int row_bad = cluster_row_maxima(g, red_f, red_i, ms, mt);
  if (row_bad) {  // as forward_kl_blocked: no gradient for a bad row
    if (rank == 0 && tid == 0) in.row_bad[r] = row_bad, in.row_loss[r] = 0.0;
  } else {
    if (tid < nb) {
      const float c_s = exp_fast(__fmul_rn(__fsub_rn(g.bs, ms), it));
      const float c_t = exp_fast(__fmul_rn(__fsub_rn(g.bt, mt), it));
      cs[tid] = c_s;
      ct[tid] = c_t;
      term[tid] = static_cast<double>(__fmul_rn(g.ss, c_s));
      term[nb + tid] = static_cast<double>(__fmul_rn(g.st, c_t));
      const double kk = __dmul_rn(__dsub_rn(__dsub_rn(static_cast<double>(g.bt), static_cast<double>(mt)),
                                            __dsub_rn(static_cast<double>(g.bs), static_cast<double>(ms))),
                                  static_cast<double>(it));
      const double tk = __dadd_rn(static_cast<double>(g.ds), __dmul_rn(static_cast<double>(g.st), kk));
      term[2 * nb + tid] = __dmul_rn(static_cast<double>(c_t), tk);
    }
    __syncthreads();
    if (tid == 0) {  // the sums over blocks, in block order
      double zs = 0.0, zt = 0.0;
      for (int k = 0; k < nb; ++k) zs = __dadd_rn(zs, term[k]), zt = __dadd_rn(zt, term[nb + k]);
      if (rank == 0) {
        double cross = 0.0;
        for (int k = 0; k < nb; ++k) cross = __dadd_rn(cross, term[2 * nb + k]);
        in.row_loss[r] = cross / zt + log(zs) - log(zt);
        in.row_bad[r] = 0;
      }
      zz[0] = zs;
      zz[1] = zt;
    }
    __syncthreads();
    if (grad) {  // grad_j = gscale (es_j qs_b - et_j qt_b), order-free: float4
      const float gscale = __fmul_rn(in.scale, it);
      const float qs = __double2float_rn(__ddiv_rn(static_cast<double>(cs[b]), zz[0]));
      const float qt = __double2float_rn(__ddiv_rn(static_cast<double>(ct[b]), zz[1]));
      const float4* s4 = reinterpret_cast<const float4*>(sb);
      const float4* t4 = reinterpret_cast<const float4*>(tb);
      float4* g4 = reinterpret_cast<float4*>(grad);
      auto one = [&](float es, float et) { return __fmul_rn(gscale, __fsub_rn(__fmul_rn(es, qs), __fmul_rn(et, qt))); };
      for (int i = lane; i < n / 4; i += 32) {
        const float4 x = s4[i], y = t4[i];
        g4[i] = make_float4(one(x.x, y.x), one(x.y, y.y), one(x.z, y.z), one(x.w, y.w));
      }
    }
  }
  __cluster_barrier_wait();  // no CTA leaves while another may still read its stat[]
#endif
}

// ---- Reverse KL, JSD and TVD in one pass (sm_90): one thread-block cluster per row --------------
// div_sums_kernel and div_grad_kernel's math, laid out as fkl_cluster_kernel: warp w of CTA `rank`
// owns block b = rank * W + w, whose s and t the bulk-copy engine brings into shared memory once.
// Pass 1: block maxima and exp sums (fkl_cluster_kernel's lane order); cluster barrier; every CTA
// combines the row's blocks as combine_row_blocks. Pass 2: each warp forms its block's g_j, loss
// terms and q_j g_j (div_entry), keeping es_j and g_j in place of s_j and t_j, and sums the terms in
// 32 lanes folded as the CPU's div_groups (lane k takes entries 32 i + k); cluster barrier; every
// CTA adds the blocks' sums in block order (the loss, E_q[g]). Pass 3 writes the gradient from the
// kept es_j and g_j, as div_grad_kernel (whose recomputed es_j and g_j have these bits). 12 bytes
// move per entry against the three kernels' 28. On by default (cluster_divergence()); test_cuda runs
// distill_blocked_divergence_matches_cpu both ways, and on an H200 it ran 1.4-2.1x faster than the
// three kernels.
struct DivSmemLayout {
  float* sb;     // this warp's block: s_j, then es_j
  float* tb;     //                    t_j, then g_j
  FklStat* stat;  // W: pass 1 of each warp's block (ds unused)
  float2* bsum;   // W: pass 2's lane-folded loss and q g sums
  uint64_t* bar;  // W
  double* term;   // 2 nb: zs, zt terms of every block of the row
  float* cs;      // nb, then ct (nb), then the blocks' loss sums (nb) and q g sums (nb)
};

size_t div_cluster_smem(int W, int nb) {
  return static_cast<size_t>(W) * (2 * kStatBlock * sizeof(float) + sizeof(FklStat) + sizeof(float2) + sizeof(uint64_t)) +
         static_cast<size_t>(nb) * (2 * sizeof(double) + 4 * sizeof(float));
}

// Grid: rows x C CTAs of W = blockDim.x / 32 warps, clusters of C CTAs (one per row), C * W >= nb;
// dynamic shared memory div_cluster_smem(W, nb). Rows start 16-byte aligned (V % 4 == 0).
template <int kKind>
__global__ void __launch_bounds__(kFklClusterThreads) div_cluster_kernel(DistillDevice in, float it, int nb) {
#if OSD_FKL_CLUSTER && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  extern __shared__ __align__(128) unsigned char div_smem[];
  __shared__ float red_f[2 * 32];
  __shared__ unsigned red_i[32];
  __shared__ double zz[2];
  __shared__ float eg_s;
  const int tid = threadIdx.x, lane = lane_id(), w = warp_id(), W = blockDim.x / 32;
  const int C = static_cast<int>(__clusterSizeInBlocks()), rank = static_cast<int>(__clusterRelativeBlockRank());
  const int r = blockIdx.x / C, V = in.vocab, b = rank * W + w;
  const int j0 = b * kStatBlock, n = b < nb ? min(kStatBlock, V - j0) : 0;  // n = 0: a warp without a block
  float* grad = in.grad && n ? in.grad + static_cast<size_t>(r) * V + j0 : nullptr;
  if (cluster_masked_row(in, r, rank, n, grad)) return;  // the whole cluster, before any barrier
  DivSmemLayout L;
  L.sb = reinterpret_cast<float*>(div_smem) + w * 2 * kStatBlock;
  L.tb = L.sb + kStatBlock;
  L.stat = reinterpret_cast<FklStat*>(div_smem + static_cast<size_t>(W) * 2 * kStatBlock * sizeof(float));
  L.bsum = reinterpret_cast<float2*>(L.stat + W);
  L.bar = reinterpret_cast<uint64_t*>(L.bsum + W);
  L.term = reinterpret_cast<double*>(L.bar + W);
  L.cs = reinterpret_cast<float*>(L.term + 2 * nb);
  float *cs = L.cs, *ct = cs + nb, *bl = ct + nb, *be = bl + nb;
  float* sb = L.sb;
  float* tb = L.tb;

  // Pass 1 over this warp's block, from shared memory: maxima, finiteness, exp sums.
  if (n) {
    float bs, bt;
    const int bad = cluster_block_maxima(in, r, j0, n, sb, tb, L.bar + w, bs, bt);
    float as = 0.0f, at = 0.0f;
#pragma unroll 4
    for (int j = lane; j < n; j += 32) {
      as = __fadd_rn(as, exp_fast(__fmul_rn(__fsub_rn(sb[j], bs), it)));
      at = __fadd_rn(at, exp_fast(__fmul_rn(__fsub_rn(tb[j], bt), it)));
    }
    as = warp_fold_sum(as);
    at = warp_fold_sum(at);
    if (lane == 0) L.stat[w] = FklStat{bs, bt, as, at, 0.0f, bad, {0.0f, 0.0f}};
  }
  __cluster_barrier_arrive();  // B1, release: stat[] is written
  __cluster_barrier_wait();
  FklStat g{-FLT_MAX, -FLT_MAX, 0.0f, 0.0f, 0.0f, 0, {0.0f, 0.0f}};
  if (tid < nb) g = *static_cast<const FklStat*>(__cluster_map_shared_rank(L.stat + tid % W, tid / W));

  // Both maxima and the bad flags (order-free), then c_b and the normalisers in block order.
  float ms, mt;
  const int row_bad = cluster_row_maxima(g, red_f, red_i, ms, mt);  // the same in every CTA of the cluster
  DivRow row{};
  float fq = 0.0f;
  if (!row_bad) {
    if (tid < nb) {
      const float c_s = exp_fast(__fmul_rn(__fsub_rn(g.bs, ms), it));
      const float c_t = exp_fast(__fmul_rn(__fsub_rn(g.bt, mt), it));
      cs[tid] = c_s;
      ct[tid] = c_t;
      L.term[tid] = static_cast<double>(__fmul_rn(g.ss, c_s));
      L.term[nb + tid] = static_cast<double>(__fmul_rn(g.st, c_t));
    }
    __syncthreads();
    if (tid == 0) {
      double zs = 0.0, zt = 0.0;
      for (int k = 0; k < nb; ++k) zs = __dadd_rn(zs, L.term[k]), zt = __dadd_rn(zt, L.term[nb + k]);
      zz[0] = zs;
      zz[1] = zt;
    }
    __syncthreads();
    const double log_zs = log(zz[0]), log_zt = log(zz[1]);
    row = DivRow{ms,
                 mt,
                 it,
                 static_cast<float>(log_zs),
                 static_cast<float>(log_zt),
                 static_cast<float>(log_zs - log_zt),
                 static_cast<float>(log(1e-12)),
                 in.beta};
    // Pass 2 over this warp's block: es_j and g_j replace s_j and t_j.
    if (n) {
      fq = __double2float_rn(__ddiv_rn(static_cast<double>(cs[b]), zz[0]));
      const float fp = __double2float_rn(__ddiv_rn(static_cast<double>(ct[b]), zz[1]));
      const float bs = L.stat[w].bs, bt = L.stat[w].bt;
      float la = 0.0f, ea = 0.0f;
      for (int j = lane; j < n; j += 32) {
        float gj, l, es, q;
        div_entry<kKind>(sb[j], tb[j], bs, bt, row, fq, fp, gj, l, es, q);
        la = __fadd_rn(la, l);
        ea = __fadd_rn(ea, __fmul_rn(q, gj));
        sb[j] = es;
        tb[j] = gj;
      }
      la = warp_fold_sum(la);
      ea = warp_fold_sum(ea);
      if (lane == 0) L.bsum[w] = make_float2(la, ea);
    }
  }
  __cluster_barrier_arrive();  // B2: bsum[] is written, and every CTA's reads of stat[] are done
  __cluster_barrier_wait();
  if (!row_bad && tid < nb) {
    const float2 v = *static_cast<const float2*>(__cluster_map_shared_rank(L.bsum + tid % W, tid / W));
    bl[tid] = v.x;
    be[tid] = v.y;
  }
  __cluster_barrier_arrive();  // B3: our reads of the other CTAs are done; they wait for it before they exit
  if (row_bad) {
    if (rank == 0 && tid == 0) in.row_bad[r] = row_bad, in.row_loss[r] = 0.0;
  } else {
    __syncthreads();
    if (tid == 0) {  // the blocks' sums in block order, as divergence_row_blocked
      double loss = 0.0, eg = 0.0;
      for (int k = 0; k < nb; ++k) loss += static_cast<double>(bl[k]), eg += static_cast<double>(be[k]);
      if (rank == 0) in.row_loss[r] = loss, in.row_bad[r] = 0;
      eg_s = static_cast<float>(eg);
    }
    __syncthreads();
    if (grad) {  // grad_j = (c es_j) (g_j - E_q[g]), c = gscale fq_b, order-free: float4
      const float c = __fmul_rn(__fmul_rn(in.scale, it), fq), eg = eg_s;
      const float4* s4 = reinterpret_cast<const float4*>(sb);
      const float4* t4 = reinterpret_cast<const float4*>(tb);
      float4* g4 = reinterpret_cast<float4*>(grad);
      auto one = [&](float es, float gj) { return __fmul_rn(__fmul_rn(c, es), __fsub_rn(gj, eg)); };
      for (int i = lane; i < n / 4; i += 32) {
        const float4 x = s4[i], y = t4[i];
        g4[i] = make_float4(one(x.x, y.x), one(x.y, y.y), one(x.z, y.z), one(x.w, y.w));
      }
    }
  }
  __cluster_barrier_wait();  // no CTA leaves while another may still read its shared memory
#endif
}

__global__ void __launch_bounds__(kBlock) distill_kernel(DistillParams P) {
  extern __shared__ uint32_t bitmap[];  // sparse teacher: top-k membership of the row
  __shared__ PrepSmem sm;
  BlockRed& red = sm.red;
  const DistillDevice& in = P.in;
  const int tid = threadIdx.x;
  const int V = in.vocab;
  const float inv_t = P.inv_t;
  const float gscale = __fmul_rn(in.scale, inv_t);
  for (int r = blockIdx.x; r < in.rows; r += gridDim.x) {
    float* grad = in.grad ? in.grad + static_cast<size_t>(r) * V : nullptr;
    if (in.mask && !in.mask[r]) {
      if (grad)
        for (int j = tid; j < V; j += kBlock) grad[j] = 0.0f;
      if (tid == 0) in.row_loss[r] = 0.0, in.row_bad[r] = 0;
      continue;
    }
    const float* s = in.student + static_cast<size_t>(r) * V;
    float ms;
    double zs;
    int bad_s;
    row_softmax_stats(s, V, inv_t, &ms, &zs, &bad_s, sm);
    if (bad_s) {
      if (tid == 0) in.row_bad[r] = 1, in.row_loss[r] = 0.0;
      continue;
    }
    const double log_zs = log(zs);
    double loss = 0.0;
    if (in.teacher) {
      const float* t = in.teacher + static_cast<size_t>(r) * V;
      float mt;
      double zt;
      int bad_t;
      row_softmax_stats(t, V, inv_t, &mt, &zt, &bad_t, sm);
      if (bad_t) {
        if (tid == 0) in.row_bad[r] = 2, in.row_loss[r] = 0.0;
        continue;
      }
      const double log_zt = log(zt);
      {  // forward KL (dense teacher) runs in fkl_cluster_kernel or fkl_stats_kernel / fkl_grad_kernel
        double eg = 0.0;
        for (int j = tid; j < V; j += kBlock) {
          const double lq = static_cast<double>(scaled_logit(s[j], ms, inv_t)) - log_zs;
          const double lp = static_cast<double>(scaled_logit(t[j], mt, inv_t)) - log_zt;
          const BinTerm b = bin_term(static_cast<int>(in.kind), lp, lq, in.beta);
          loss += b.loss;
          eg += exp(lq) * b.g;
          if (grad) grad[j] = static_cast<float>(b.g);
        }
        block_sum2(loss, eg, red);
        if (grad) {
          const float egf = static_cast<float>(eg), lzs = static_cast<float>(log_zs);
          for (int j = tid; j < V; j += kBlock) {
            const float q = exp_fast(__fsub_rn(scaled_logit(s[j], ms, inv_t), lzs));
            grad[j] = __fmul_rn(__fmul_rn(gscale, q), __fsub_rn(grad[j], egf));
          }
        }
      }
    } else {
      const int k = in.k;
      const int32_t* ids = in.topk_ids + static_cast<size_t>(r) * k;
      const float* probs = in.topk_probs + static_cast<size_t>(r) * k;
      double* gb = P.gb + static_cast<size_t>(r) * k;
      const int words = (V + 31) / 32;
      for (int w = tid; w < words; w += kBlock) bitmap[w] = 0u;
      double psum = 0.0;
      for (int i = tid; i < k; i += kBlock) psum += static_cast<double>(probs[i]);
      psum = block_sum(psum, red);  // also orders the bitmap clear before the marks
      for (int i = tid; i < k; i += kBlock) atomicOr(&bitmap[ids[i] >> 5], 1u << (ids[i] & 31));
      __syncthreads();
      // As losses.cpp: with k = V no token lies outside the top-k, so a residual is rounding; keeping
      // it would give the empty "rest" bin teacher mass and forward KL an infinite loss.
      const double pres = k == V ? 0.0 : in.residual ? static_cast<double>(in.residual[r]) : fmax(0.0, 1.0 - psum);
      const double pnorm = psum + pres;
      // As losses.cpp: the student mass outside the top-k relative to the largest logit there, so it
      // cannot underflow to 0 when the top-k hold almost everything.
      float rest_max = -INFINITY;
      for (int j = tid; j < V; j += kBlock)
        if (!((bitmap[j >> 5] >> (j & 31)) & 1u)) rest_max = s[j] > rest_max ? s[j] : rest_max;
      rest_max = block_max(rest_max, red);
      double rest = 0.0;
      for (int j = tid; j < V; j += kBlock)
        if (!((bitmap[j >> 5] >> (j & 31)) & 1u))  // std::exp(float): correctly rounded through double
          rest += static_cast<double>(__double2float_rn(exp(static_cast<double>(scaled_logit(s[j], rest_max, inv_t)))));
      rest = block_sum(rest, red);
      const double lq_rest =
          rest > 0.0 ? static_cast<double>(scaled_logit(rest_max, ms, inv_t)) + log(rest) - log_zs : -INFINITY;
      const double lp_rest = pres > 0.0 ? log(pres / pnorm) : -INFINITY;
      double eg = 0.0;
      for (int i = tid; i < k; i += kBlock) {
        const double lq = static_cast<double>(scaled_logit(s[ids[i]], ms, inv_t)) - log_zs;
        const double lp = probs[i] > 0.0f ? log(static_cast<double>(probs[i]) / pnorm) : -INFINITY;
        const BinTerm b = bin_term(static_cast<int>(in.kind), lp, lq, in.beta);
        loss += b.loss;
        gb[i] = b.g;
        eg += exp(lq) * b.g;
      }
      block_sum2(loss, eg, red);
      const BinTerm br = bin_term(static_cast<int>(in.kind), lp_rest, lq_rest, in.beta);
      loss += br.loss;
      if (lq_rest > -INFINITY) eg += exp(lq_rest) * br.g;
      if (grad) {
        if (in.kind == DistillKind::ForwardKL) {
          for (int j = tid; j < V; j += kBlock) {
            const double lq = static_cast<double>(scaled_logit(s[j], ms, inv_t)) - log_zs;
            const double qp = lp_rest > -INFINITY ? exp(lq - lq_rest + lp_rest) : 0.0;
            grad[j] = gscale * static_cast<float>(exp(lq) - qp);
          }
          __syncthreads();
          for (int i = tid; i < k; i += kBlock) {
            const double lq = static_cast<double>(scaled_logit(s[ids[i]], ms, inv_t)) - log_zs;
            grad[ids[i]] = gscale * static_cast<float>(exp(lq) - static_cast<double>(probs[i]) / pnorm);
          }
        } else {
          for (int j = tid; j < V; j += kBlock) {
            const double q = exp(static_cast<double>(scaled_logit(s[j], ms, inv_t)) - log_zs);
            grad[j] = gscale * static_cast<float>(q * (br.g - eg));
          }
          __syncthreads();
          for (int i = tid; i < k; i += kBlock) {
            const double q = exp(static_cast<double>(scaled_logit(s[ids[i]], ms, inv_t)) - log_zs);
            grad[ids[i]] = gscale * static_cast<float>(q * (gb[i] - eg));
          }
        }
      }
    }
    if (tid == 0) in.row_loss[r] = loss, in.row_bad[r] = 0;
    __syncthreads();
  }
}

std::atomic<long long> g_cluster_launches{0};
std::atomic<int> g_cluster_warps{0};  // 0: the launcher's choice

// Launches a one-cluster-per-row kernel (fkl_cluster_kernel, div_cluster_kernel; dynamic shared
// memory smem_of(W, nb)) where it applies: a build with sm_90 code on the device, 16-byte aligned
// rows, and a row that fits one schedulable cluster. Returns false (nothing launched) otherwise.
bool row_cluster_launch(void (*kernel)(DistillDevice, float, int), size_t (*smem_of)(int, int),
                        const DistillDevice& in, float it, Workspace& ws, cudaStream_t stream) {
  const int V = in.vocab, nb = stat_blocks(V);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(in.student) | reinterpret_cast<uintptr_t>(in.teacher) |
                         reinterpret_cast<uintptr_t>(in.grad);
  if (!OSD_FKL_CLUSTER) return false;
  if (V % 4 != 0 || (addr & 15u) != 0) return false;  // bulk copies move 16-byte aligned multiples of 16 bytes
  cudaFuncAttributes fa{};
  OSD_CUDA_CHECK(cudaFuncGetAttributes(&fa, kernel));
  if (fa.ptxVersion < 90) return false;  // compiled for an older target: the kernel is empty
  // Four warps (blocks) per CTA lets three CTAs share an SM; more where 16 CTAs of four are too few.
  // set_cluster_warps() asks for another count (bench_cuda --cluster-warps), within the same bounds.
  const int w_min = (nb + kFklMaxCluster - 1) / kFklMaxCluster, asked = g_cluster_warps.load();
  const int W = std::min(nb, std::max(asked > 0 ? asked : std::min(4, nb), w_min));
  const int C = (nb + W - 1) / W;
  const size_t smem = smem_of(W, nb);
  int dev = 0, max_optin = 0;
  OSD_CUDA_CHECK(cudaGetDevice(&dev));
  OSD_CUDA_CHECK(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  if (32 * W > kFklClusterThreads || smem + 1024 > static_cast<size_t>(max_optin)) return false;
  OSD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  // All of L1 as shared memory (the kernel reads global memory only through bulk copies): three
  // CTAs of four warps per SM rather than what a default carveout would leave room for.
  OSD_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                      static_cast<int>(cudaSharedmemCarveoutMaxShared)));
  if (C > 8 && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(C);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(in.rows) * static_cast<unsigned>(C));
  cfg.blockDim = dim3(32 * W);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  if (cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) != cudaSuccess || clusters < 1) {
    (void)cudaGetLastError();
    return false;
  }
  record_start(ws, stream);
  OSD_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, in, it, nb));
  OSD_CUDA_CHECK_LAUNCH();
  record_stop(ws, stream);
  g_cluster_launches.fetch_add(1, std::memory_order_relaxed);
  return true;
}

bool fkl_cluster_launch(const DistillDevice& in, float it, Workspace& ws, cudaStream_t stream) {
  return row_cluster_launch(it == 1.0f ? fkl_cluster_kernel<true> : fkl_cluster_kernel<false>, fkl_cluster_smem, in,
                            it, ws, stream);
}

bool div_cluster_launch(const DistillDevice& in, float it, Workspace& ws, cudaStream_t stream) {
  switch (in.kind) {
    case DistillKind::ReverseKL:
      return row_cluster_launch(div_cluster_kernel<static_cast<int>(DistillKind::ReverseKL)>, div_cluster_smem, in, it,
                                ws, stream);
    case DistillKind::TVD:
      return row_cluster_launch(div_cluster_kernel<static_cast<int>(DistillKind::TVD)>, div_cluster_smem, in, it, ws,
                                stream);
    default:
      return row_cluster_launch(div_cluster_kernel<static_cast<int>(DistillKind::JSD)>, div_cluster_smem, in, it, ws,
                                stream);
  }
}

}  // namespace

namespace {
// A switch read from the environment once (unset: `dflt`; the other value's digit flips it), which
// the setter overrides.
bool env_switch(std::atomic<int>& v, const char* name, bool dflt) {
  int x = v.load();
  if (x < 0) {
    const char* env = std::getenv(name);
    x = env && std::string(env) == (dflt ? "0" : "1") ? !dflt : dflt;
    int expected = -1;
    if (!v.compare_exchange_strong(expected, x)) x = expected;
  }
  return x == 1;
}
std::atomic<int> g_blocked_divergence{-1}, g_cluster_divergence{-1};  // -1: not read from the environment yet
}  // namespace

bool blocked_divergence() { return env_switch(g_blocked_divergence, "OSD_CUDA_BLOCKED_DIVERGENCE", true); }
void set_blocked_divergence(bool on) { g_blocked_divergence.store(on ? 1 : 0); }

bool cluster_divergence() { return env_switch(g_cluster_divergence, "OSD_CUDA_CLUSTER_DIVERGENCE", true); }
void set_cluster_divergence(bool on) { g_cluster_divergence.store(on ? 1 : 0); }

long long cluster_launches() { return g_cluster_launches.load(std::memory_order_relaxed); }
void set_cluster_warps(int warps) { g_cluster_warps.store(warps > 0 ? warps : 0); }

bool cluster_kernels_built() {
  if (!OSD_FKL_CLUSTER) return false;
  cudaFuncAttributes fa{};
  if (cudaFuncGetAttributes(&fa, fkl_cluster_kernel<true>) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return fa.ptxVersion >= 90;
}

void distill_launch(const DistillDevice& in, Workspace& ws, cudaStream_t stream) {
  if (in.rows <= 0) return;
  DistillParams p{};
  p.in = in;
  p.inv_t = 1.0f / in.temperature;
  size_t smem = 0;
  if (!in.teacher) {
    p.gb = ws.misc2.as<double>(std::max<size_t>(1, static_cast<size_t>(in.rows) * in.k));
    smem = sizeof(uint32_t) * ((static_cast<size_t>(in.vocab) + 31) / 32);
    int dev = 0, max_optin = 0;
    OSD_CUDA_CHECK(cudaGetDevice(&dev));
    OSD_CUDA_CHECK(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (smem + sizeof(PrepSmem) + 1024 > static_cast<size_t>(max_optin))
      throw_range("vocabSize " + std::to_string(in.vocab) + " is too large for the CUDA sparse-teacher loss");
    // Static (PrepSmem) plus dynamic shared memory above 48 KiB needs the opt-in.
    OSD_CUDA_CHECK(cudaFuncSetAttribute(distill_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  if (in.teacher && in.kind == DistillKind::ForwardKL) {
    if (fkl_cluster_launch(in, p.inv_t, ws, stream)) return;
    const int nb = stat_blocks(in.vocab);
    const long long units = static_cast<long long>(in.rows) * nb;
    float* fkl = ws.misc2.as<float>(static_cast<size_t>(units) * 8);
    record_start(ws, stream);
    fkl_stats_kernel<<<static_cast<unsigned>((units + kFklWarps - 1) / kFklWarps), kFklWarps * 32, 0, stream>>>(
        in, p.inv_t, nb, fkl);
    OSD_CUDA_CHECK_LAUNCH();
    fkl_grad_kernel<<<dim3(in.rows, nb), kFklThreads, 0, stream>>>(in, p.inv_t, nb, fkl);
    OSD_CUDA_CHECK_LAUNCH();
    record_stop(ws, stream);
    return;
  }
  if (in.teacher && blocked_divergence()) {
    if (cluster_divergence() && div_cluster_launch(in, p.inv_t, ws, stream)) return;
    div_launch(in, p.inv_t, ws, stream);
    return;
  }
  int per_sm = 0;
  OSD_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, distill_kernel, kBlock, smem));
  const int grid = std::max(1, std::min(in.rows, std::max(1, per_sm) * device_sm_count(ws)));
  record_start(ws, stream);
  distill_kernel<<<grid, kBlock, smem, stream>>>(p);
  OSD_CUDA_CHECK_LAUNCH();
  record_stop(ws, stream);
}

}  // namespace cuda
}  // namespace osd
