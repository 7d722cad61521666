// Distillation losses fused with their gradients (one block per row, two passes over the row).
// Build (standalone check of this file): nvcc -std=c++17 -O3 -arch=sm_90 -I native -c cuda/distill.cu
// Parity: test/native/test_cuda.cu (distill_matches_cpu): loss within 2e-5 * max(1, |loss|),
// gradients within 1e-6 * max|grad| + 1e-5 * |grad_j| of the CPU backend. The softmax sums are the
// CPU's, bit for bit (z_exact); what remains are sums over rows in another order.
// Forward KL against a dense teacher follows the CPU's fast path (forward_kl_row_blocked) operation
// for operation, so its gradient is bit-identical and its loss differs only by the last bits of
// log(); test_cuda checks it at that tighter tolerance.
#include <algorithm>

#include "common.cuh"
#include "core/error.h"
#include "distill.cuh"
#include "warp_device.cuh"  // z_exact: the CPU's softmax sums, bit for bit

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
  float* fkl;    // dense forward KL: per CUDA block, 8 x nb floats of per-block statistics
  int32_t nb;    // stat_blocks(V)
};

// forward_kl_row_blocked() of losses.cpp for one row. Pass 1: one warp per block of kStatBlock
// entries takes both maxima (finite_max: from -FLT_MAX, flagging non-finite entries), then the
// lane sums (lane k: entries 32 i + k in increasing i, xor-butterfly fold, as in blocked_stats) of
// es_j = exp((s_j - bs) it), et_j = exp((t_j - bt) it) and et_j d_j, d_j = ((t_j - bt) - (s_j - bs)) it.
// Blocks are combined in block order by one thread, like the CPU. Pass 2 recomputes es_j and et_j
// (the same operations, so the same bits the CPU kept) for grad_j = gscale (es_j qs_b - et_j qt_b).
// Returns 0, or 1 / 2 for a non-finite student / teacher entry. Every thread must call it.
constexpr int kChunk = 16;  // entries per lane loaded together in forward_kl_blocked's first pass

__device__ int forward_kl_blocked(const float* s, const float* t, int V, float it, float gscale, float* grad,
                                  float* w, int nb, double* loss_out, PrepSmem& sm) {
  const int tid = threadIdx.x, lane = lane_id();
  float* bs_ = w;          // student block maxima
  float* bt_ = w + nb;     // teacher block maxima
  float* ss_ = w + 2 * nb;  // lane_sum(es), then qs_b = float(cs_b / zs)
  float* st_ = w + 3 * nb;  // lane_sum(et)
  float* ds_ = w + 4 * nb;  // lane_sum(et d)
  float* cs_ = w + 5 * nb;  // cs_b, then qt_b = float(ct_b / zt)
  float* ct_ = w + 6 * nb;
  int32_t* bad_ = reinterpret_cast<int32_t*>(w + 7 * nb);
  for (int b = warp_id(); b < nb; b += kWarps) {
    const int j0 = b * kStatBlock, n = min(kStatBlock, V - j0);
    float bs = -FLT_MAX, bt = -FLT_MAX;
    int bad_s = 0, bad_t = 0;
    // Both loops take the lane's entries in increasing i, kChunk of them loaded before any is used
    // (one load in flight at a time left the warp waiting on memory).
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
            as = __fadd_rn(as, exp_ref(__fmul_rn(ds, it)));
            const float e = exp_ref(__fmul_rn(tt, it));
            at = __fadd_rn(at, e);
            ad = __fadd_rn(ad, __fmul_rn(e, __fmul_rn(__fsub_rn(tt, ds), it)));
          }
      }
      as = warp_fold_sum(as);
      at = warp_fold_sum(at);
      ad = warp_fold_sum(ad);
    }
    if (lane == 0) bs_[b] = bs, bt_[b] = bt, ss_[b] = as, st_[b] = at, ds_[b] = ad, bad_[b] = bad_s | (bad_t << 1);
  }
  __syncthreads();
  if (tid == 0) {
    float ms = -FLT_MAX, mt = -FLT_MAX;
    int bad = 0;
    for (int b = 0; b < nb; ++b) {
      ms = bs_[b] > ms ? bs_[b] : ms;
      mt = bt_[b] > mt ? bt_[b] : mt;
      bad |= bad_[b];
    }
    sm.bi[0] = (bad & 1) ? 1 : (bad & 2) ? 2 : 0;
    sm.red.f[0] = ms;
    sm.red.f[1] = mt;
  }
  __syncthreads();
  const int bad = sm.bi[0];
  const float ms = sm.red.f[0], mt = sm.red.f[1];
  __syncthreads();
  if (bad) return bad;
  for (int b = tid; b < nb; b += kBlock) {
    cs_[b] = exp_ref(__fmul_rn(__fsub_rn(bs_[b], ms), it));
    ct_[b] = exp_ref(__fmul_rn(__fsub_rn(bt_[b], mt), it));
  }
  __syncthreads();
  if (tid == 0) {
    double zs = 0.0, zt = 0.0;
    for (int b = 0; b < nb; ++b) {
      zs += static_cast<double>(__fmul_rn(ss_[b], cs_[b]));
      zt += static_cast<double>(__fmul_rn(st_[b], ct_[b]));
    }
    double cross = 0.0;
    for (int b = 0; b < nb; ++b) {
      const double k = __dmul_rn(__dsub_rn(__dsub_rn(static_cast<double>(bt_[b]), static_cast<double>(mt)),
                                           __dsub_rn(static_cast<double>(bs_[b]), static_cast<double>(ms))),
                                 static_cast<double>(it));
      const double term = __dadd_rn(static_cast<double>(ds_[b]), __dmul_rn(static_cast<double>(st_[b]), k));
      cross = __dadd_rn(cross, __dmul_rn(static_cast<double>(ct_[b]), term));
    }
    *loss_out = cross / zt + log(zs) - log(zt);
    sm.bd[0] = zs;
    sm.bd[1] = zt;
  }
  __syncthreads();
  const double zs = sm.bd[0], zt = sm.bd[1];
  __syncthreads();
  if (!grad) return 0;
  for (int b = tid; b < nb; b += kBlock) {
    ss_[b] = __double2float_rn(__ddiv_rn(static_cast<double>(cs_[b]), zs));
    cs_[b] = __double2float_rn(__ddiv_rn(static_cast<double>(ct_[b]), zt));
  }
  __syncthreads();
  constexpr int U = 4;  // loads of U entries in flight before the first store
  for (int j0 = tid; j0 < V; j0 += U * kBlock) {
    float xs[U], ys[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const int j = j0 + k * kBlock;
      xs[k] = j < V ? __ldg(s + j) : 0.0f;
      ys[k] = j < V ? __ldg(t + j) : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const int j = j0 + k * kBlock;
      if (j < V) {
        const int b = j / kStatBlock;
        const float es = exp_ref(__fmul_rn(__fsub_rn(xs[k], bs_[b]), it));
        const float et = exp_ref(__fmul_rn(__fsub_rn(ys[k], bt_[b]), it));
        grad[j] = __fmul_rn(gscale, __fsub_rn(__fmul_rn(es, ss_[b]), __fmul_rn(et, cs_[b])));
      }
    }
  }
  return 0;
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
    if (in.teacher && in.kind == DistillKind::ForwardKL) {
      double loss = 0.0;
      const int bad = forward_kl_blocked(s, in.teacher + static_cast<size_t>(r) * V, V, inv_t, gscale, grad,
                                         P.fkl + static_cast<size_t>(blockIdx.x) * 8 * P.nb, P.nb, &loss, sm);
      if (tid == 0) in.row_bad[r] = bad, in.row_loss[r] = bad ? 0.0 : loss;
      __syncthreads();
      continue;
    }
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
      {  // forward KL took forward_kl_blocked above
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
            const float q = exp_ref(__fsub_rn(scaled_logit(s[j], ms, inv_t), lzs));
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
      double rest = 0.0;
      for (int j = tid; j < V; j += kBlock)
        if (!((bitmap[j >> 5] >> (j & 31)) & 1u))  // std::exp(float): correctly rounded through double
          rest += static_cast<double>(__double2float_rn(exp(static_cast<double>(scaled_logit(s[j], ms, inv_t)))));
      rest = block_sum(rest, red);
      const double lq_rest = rest > 0.0 ? log(rest) - log_zs : -INFINITY;
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

}  // namespace

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
  int per_sm = 0;
  OSD_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, distill_kernel, kBlock, smem));
  const int grid = std::max(1, std::min(in.rows, std::max(1, per_sm) * device_sm_count(ws)));
  p.nb = stat_blocks(in.vocab);
  if (in.teacher && in.kind == DistillKind::ForwardKL)
    p.fkl = ws.misc2.as<float>(static_cast<size_t>(grid) * 8 * static_cast<size_t>(p.nb));
  record_start(ws, stream);
  distill_kernel<<<grid, kBlock, smem, stream>>>(p);
  OSD_CUDA_CHECK_LAUNCH();
  record_stop(ws, stream);
}

}  // namespace cuda
}  // namespace osd
