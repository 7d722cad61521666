// Chain verification on the blocked scheme (spec/sampling.h), in up to four kernels on one stream:
//  1. blk_stats_*_kernel: per (row, block of kStatBlock logits), reads the block from memory once
//     and leaves bm_b, the block's first argmax, NaN / +Infinity and (sampled rows) S_b;
//  2. chain_decide_kernel: one CTA per sequence combines its rows' blocks in block order (max, z,
//     c_b, W_b), runs the greedy comparison or every accept test, and writes the accepted tokens;
//  3. residual_mass_*_kernel: per (sequence, block), forms the residual's block mass R_b, for
//     the sequences that rejected a token;
//  4. chain_sample_kernel: one CTA per sampled sequence draws the correction or the bonus token.
// No exp term is stored: every later use recomputes e_j = exp_fast((l_j - bm_b) * it) from the logit,
// which gives the same bits and moves each logit through memory once (the stored terms cost a
// write and a read of every row). Kernels 2-4 start early through programmatic dependent launch on
// sm_90 and wait for their predecessor before reading its results; what they read of the inputs
// (the sequences, the draft tokens and their logits) they load before the wait.
// Build (standalone check): nvcc -std=c++17 -O3 -arch=sm_90 -I native -c cuda/chain_blocked.cu
#include <algorithm>
#include <atomic>
#include <climits>
#include <string>
#include <vector>

#include "chain_blocked.cuh"
#include "core/error.h"
#include "warp_device.cuh"

namespace osd {
namespace cuda {

namespace {

constexpr int kPerLane = kStatBlock / 32;  // entries of a block per lane: lane k holds 32 i + k
constexpr int kChunk = 16;                 // entries per lane loaded at a time
// The per-block kernels (block statistics, residual masses) come in two shapes, chosen per launch
// by the number of (row or sequence, block) units; both give the same bits:
//  - split, for few units (latency): one CTA of kSplitWarps warps per unit, warp w holding i in
//    [16 w, 16 w + 16) of every lane, so the block is read in one round trip and its exps spread
//    over four warps; warp 0 then adds the terms in the lanes' order from shared memory;
//  - warp, for many units (throughput): one warp per unit, kWarpUnitWarps per CTA, four chunks of
//    16 per lane, the max pass and then the exp pass (that second read served by L1).
// On an H200 the split shape ran 1.1-1.35x faster at batch 1 and 0.7-0.9x as fast at batch 64.
constexpr int kSplitWarps = kPerLane / kChunk;
constexpr int kWarpUnitWarps = 2;
constexpr int kSplitUnitsPerSm = 12;  // the split shape up to this many units per multiprocessor
std::atomic<int> g_split_units_per_sm{kSplitUnitsPerSm};
static_assert(kStatLanes == 32 && kStatBlock % 32 == 0, "one warp per block, 32 lanes");
static_assert(kBlock * 4 == kStatBlock, "the sampler scans four entries of the chosen block per thread");

// Programmatic dependent launch (sm_90): let the next kernel's CTAs start, and wait for the previous
// kernel to finish and flush its writes. Both are no-ops when the launch did not ask for it.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

struct BRow {
  const float* logits;
  float inv_t;
  int32_t exp_terms;  // sampled rows also sum their exp terms
};

struct BSeq {
  const float* target;  // row 0 of the sequence's g + 1 target rows
  const float* draft;   // row 0 of its g draft rows (sampled sequences)
  uint64_t stream;
  int32_t g, r0, tok_off, out_off, greedy, batch_index;  // r0: first of its rows (targets, then drafts)
  float inv_t;
};

// What chain_decide_kernel leaves for the sampling kernels.
struct Decision {
  int32_t pos;       // -1: nothing to sample; else the position whose token is drawn (rejection or g)
  int32_t residual;  // 1: from norm(max(0, p - q)) at that position; 0: from p (bonus)
};

struct Params {
  const BSeq* seqs;
  const UnitStat* us;  // rows x nb
  float* blk;          // rows x 2 nb: c_b, then W_b
  float* rmass;        // sequences x nb: residual block masses R_b
  RowStat* stats;      // rows
  Decision* dec;       // sequences
  const int32_t* tokens;
  int32_t* out_tokens;
  int32_t* accepted;
  uint64_t seed;
  int32_t vocab, nb, n_seqs;
};

// Everything a kernel reads that an earlier kernel of the chain wrote is loaded around L1 (ld_cg).
__device__ __forceinline__ Decision load_decision(const Params& p, int s) {
  return Decision{ld_cg(&p.dec[s].pos), ld_cg(&p.dec[s].residual)};
}

// e_j of the blocked scheme from the logit: the bits the block statistics summed (0 in a block of
// -Infinity only, where l - bm would be NaN).
__device__ __forceinline__ float blk_e(const float* l, int j, float bm, float inv_t) {
  return keep_or_zero(bm != -INFINITY, exp_fast(scaled_logit(__ldg(l + j), bm, inv_t)));
}

// ---------------------------------------------------------------------------------------------
// 1. Block statistics.

// prepare_row's visit(): the max, NaN / +Infinity, the first index of the max. Ties go to the
// lowest index at every combine, so the order of the combines does not matter.
struct Visit {
  float mx = -INFINITY, bv = -INFINITY;
  int32_t bad = 0, bidx = -1;
};

// Lane's entries 32 (i0 + i) + lane of the block, -Infinity past its n entries.
__device__ __forceinline__ void load_chunk(const float* l, int i0, int n, float (&v)[kChunk]) {
  const int lane = lane_id();
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    const int j = 32 * (i0 + i) + lane;
    v[i] = j < n ? __ldg(l + j) : -INFINITY;
  }
}

// load_chunk for a full block (all but a row's last): no bound to test per entry.
__device__ __forceinline__ void load_full(const float* l, int i0, float (&v)[kChunk]) {
  const int lane = lane_id();
#pragma unroll
  for (int i = 0; i < kChunk; ++i) v[i] = __ldg(l + 32 * (i0 + i) + lane);
}

__device__ __forceinline__ void visit_chunk(Visit& s, const float (&v)[kChunk], int i0, int n, int j0) {
  const int lane = lane_id();
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    const int j = 32 * (i0 + i) + lane;
    if (j < n) {
      const float x = v[i];
      s.mx = x > s.mx ? x : s.mx;
      s.bad |= (!(x <= FLT_MAX)) & (x != -INFINITY);
      if (s.bidx < 0 || x > s.bv) s.bv = x, s.bidx = j0 + j;
    }
  }
}

// The visit of a lane over a full block in fewer integer operations (the block statistics are bound
// by them): one compare per entry gives both the max and its first index, since the lane's running
// max is the value at its first argmax; NaN and +Infinity show in a running sum, which is NaN or
// +Infinity whenever an entry is one (then, or when a sum of finite logits overflows, the exact test
// runs again over the lane's entries).
struct FullVisit {
  float mx, chk;
  int32_t bi;  // i of the lane's first max (entry 32 bi + lane)
};

__device__ __forceinline__ void visit_full(FullVisit& f, const float (&v)[kChunk], int i0) {
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    const float x = v[i];
    if (x > f.mx) f.mx = x, f.bi = i0 + i;
    f.chk = __fadd_rn(f.chk, x);
  }
}

// The lane's Visit after visit_full over its entries i in [i_lo, i_hi) of the block at l (first
// index j0); f started as {-Infinity, 0, i_lo}.
__device__ __forceinline__ Visit finish_full(const FullVisit& f, const float* l, int i_lo, int i_hi, int j0) {
  const int lane = lane_id();
  Visit s;
  s.mx = s.bv = f.mx;
  s.bidx = j0 + 32 * f.bi + lane;
  if (!(f.chk < INFINITY))
    for (int i = i_lo; i < i_hi; ++i) {
      const float x = __ldg(l + 32 * i + lane);
      s.bad |= (!(x <= FLT_MAX)) & (x != -INFINITY);
    }
  return s;
}

__device__ __forceinline__ void combine_visits(Visit& s, const Visit& o) {
  s.mx = o.mx > s.mx ? o.mx : s.mx;
  s.bad |= o.bad;
  argmax_combine(s.bv, s.bidx, o.bv, o.bidx);
}

// Every lane gets the warp's visit.
__device__ __forceinline__ void visit_warp(Visit& s) {
  s.mx = warp_max(s.mx);
  s.bad = __any_sync(0xffffffffu, s.bad != 0) ? 1 : 0;
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, s.bv, o);
    const int oi = __shfl_xor_sync(0xffffffffu, s.bidx, o);
    argmax_combine(s.bv, s.bidx, ov, oi);
  }
}

__device__ __forceinline__ void store_unit(UnitStat* us, long long unit, const Visit& s, float sb) {
  UnitStat u;
  u.bm = s.mx;
  u.s = sb;
  u.arg = s.bidx;
  u.bad = s.bad;
  us[unit] = u;
}

// S_b = lane_sum(e) and R_b = lane_sum(r): lane k adds its terms in increasing i, then the fold.
// Entries past a short block hold -Infinity, whose e and r are +0: adding them changes no sum (the
// sums are never -0), so every lane adds all 64 terms. (A block of -Infinity only has S_b = +0.)

// Shared memory of a split unit: the warps' visits, and the terms in the lanes' order.
struct SplitSmem {
  float t[kPerLane][32];
  Visit vis[kSplitWarps];
};

// The split shape's lane_sum: every thread passes its warp's chunk of terms; thread 0 gets the sum.
__device__ __forceinline__ float split_lane_sum(const float (&t)[kChunk], SplitSmem& sm) {
  const int w = warp_id(), lane = lane_id();
#pragma unroll
  for (int i = 0; i < kChunk; ++i) sm.t[w * kChunk + i][lane] = t[i];
  __syncthreads();
  float acc = 0.0f;
  if (w == 0) {
#pragma unroll 16
    for (int i = 0; i < kPerLane; ++i) acc = __fadd_rn(acc, sm.t[i][lane]);
    acc = warp_fold_sum(acc);
  }
  return acc;
}

// One warp per (row, block): bm_b, the first argmax, bad entries and (sampled rows) S_b.
__global__ void __launch_bounds__(kWarpUnitWarps * 32) blk_stats_warp_kernel(const BRow* rows, long long n_units,
                                                                            int nb, int V, UnitStat* us) {
  pdl_launch_dependents();
  const long long unit = static_cast<long long>(blockIdx.x) * kWarpUnitWarps + warp_id();
  if (unit >= n_units) return;  // whole warps leave together
  const int r = static_cast<int>(unit / nb), b = static_cast<int>(unit - static_cast<long long>(r) * nb);
  const BRow row = rows[r];
  const int j0 = b * kStatBlock, n = min(kStatBlock, V - j0);
  const float* l = row.logits + j0;
  Visit s;
  if (n == kStatBlock) {
    FullVisit f{-INFINITY, 0.0f, 0};
    for (int i0 = 0; i0 < kPerLane; i0 += kChunk) {
      float v[kChunk];
      load_full(l, i0, v);
      visit_full(f, v, i0);
    }
    s = finish_full(f, l, 0, kPerLane, j0);
  } else {
    for (int i0 = 0; i0 < kPerLane; i0 += kChunk) {
      float v[kChunk];
      load_chunk(l, i0, n, v);
      visit_chunk(s, v, i0, n, j0);
    }
  }
  visit_warp(s);
  float sb = 0.0f;
  if (row.exp_terms && s.mx != -INFINITY) {
    float acc = 0.0f;
    for (int i0 = 0; i0 < kPerLane; i0 += kChunk) {
      float v[kChunk];
      if (n == kStatBlock)
        load_full(l, i0, v);
      else
        load_chunk(l, i0, n, v);
#pragma unroll
      for (int i = 0; i < kChunk; ++i) acc = __fadd_rn(acc, exp_fast(scaled_logit(v[i], s.mx, row.inv_t)));
    }
    sb = warp_fold_sum(acc);
  }
  if (lane_id() == 0) store_unit(us, unit, s, sb);
}

// One CTA per (row, block): the same statistics, the block read once.
__global__ void __launch_bounds__(kSplitWarps * 32) blk_stats_split_kernel(const BRow* rows, int nb, int V,
                                                                          UnitStat* us) {
  __shared__ SplitSmem sm;
  pdl_launch_dependents();
  const int unit = blockIdx.x, r = unit / nb, b = unit - r * nb;
  const BRow row = rows[r];
  const int w = warp_id(), i0 = w * kChunk, j0 = b * kStatBlock, n = min(kStatBlock, V - j0);
  float v[kChunk];
  Visit s;
  if (n == kStatBlock) {
    load_full(row.logits + j0, i0, v);
    FullVisit f{-INFINITY, 0.0f, i0};
    visit_full(f, v, i0);
    s = finish_full(f, row.logits + j0, i0, i0 + kChunk, j0);
  } else {
    load_chunk(row.logits + j0, i0, n, v);
    visit_chunk(s, v, i0, n, j0);
  }
  visit_warp(s);
  if (lane_id() == 0) sm.vis[w] = s;
  __syncthreads();
  s = sm.vis[0];
#pragma unroll
  for (int k = 1; k < kSplitWarps; ++k) combine_visits(s, sm.vis[k]);
  float sb = 0.0f;
  if (row.exp_terms && s.mx != -INFINITY) {  // the same for the whole CTA
    float t[kChunk];
#pragma unroll
    for (int i = 0; i < kChunk; ++i) t[i] = exp_fast(scaled_logit(v[i], s.mx, row.inv_t));
    sb = split_lane_sum(t, sm);
  }
  if (threadIdx.x == 0) store_unit(us, unit, s, sb);
}

// ---------------------------------------------------------------------------------------------
// 2. Rows and decisions.

// Combines a row's blocks into its RowStat and, for a sampled row, c_b and W_b (blk) and z exactly
// as dense_rows does: max over the blocks, the first block holding it gives the argmax, c_b =
// exp_approx((bm_b - max) it), W_b = S_b c_b, z = sum_b double(W_b) in block order. One warp.
__device__ void finalize_row(const UnitStat* us, int nb, bool exp_terms, float inv_t, float* blk, RowStat* st) {
  const int lane = lane_id();
  // One 16-byte load per block; blocks lane and lane + 32 stay in registers (nb <= 64: V <= 131072),
  // later ones are loaded again.
  const int4* u4 = reinterpret_cast<const int4*>(us);
  int4 c0 = make_int4(0, 0, 0, 0), c1 = c0;
  if (lane < nb) c0 = __ldcg(u4 + lane);
  if (lane + 32 < nb) c1 = __ldcg(u4 + lane + 32);
  auto get = [&](int b) { return b == lane ? c0 : b == lane + 32 ? c1 : __ldcg(u4 + b); };
  float mx = -INFINITY;
  int bad = 0;
  for (int b = lane; b < nb; b += 32) {
    const int4 u = get(b);
    const float m = __int_as_float(u.x);
    mx = m > mx ? m : mx;
    bad |= u.w;
  }
  mx = warp_max(mx);
  bad = __any_sync(0xffffffffu, bad != 0) ? 1 : 0;
  if (bad || mx == -INFINITY) {
    if (lane == 0) set_bad_row(st, bad, mx);
    return;
  }
  int first = nb, arg = 0;
  for (int b = lane; b < nb; b += 32) {
    const int4 u = get(b);
    if (__int_as_float(u.x) == mx && b < first) first = b, arg = u.z;
  }
  for (int o = 16; o > 0; o >>= 1) {
    const int of = __shfl_xor_sync(0xffffffffu, first, o), oa = __shfl_xor_sync(0xffffffffu, arg, o);
    if (of < first) first = of, arg = oa;
  }
  double z = 0.0;
  if (exp_terms) {
    for (int base = 0; base < nb; base += 32) {
      const int b = base + lane;
      float w = 0.0f;
      if (b < nb) {
        const int4 u = get(b);
        const float bm = __int_as_float(u.x), sb = __int_as_float(u.y);
        const float c = keep_or_zero(bm != -INFINITY, exp_fast(scaled_logit(bm, mx, inv_t)));
        w = __fmul_rn(sb, c);
        blk[b] = c;
        blk[nb + b] = w;
      }
      const int cnt = min(32, nb - base);
      for (int k = 0; k < cnt; ++k) z += static_cast<double>(__shfl_sync(0xffffffffu, w, k));  // block order
    }
  }
  if (lane == 0) {
    st->bad = 0;
    st->max = mx;
    st->argmax = arg;
    st->z = z;
    st->inv_z = 0.0f;  // unused here
    st->nsup = -1;
  }
}

// A finalized sampled row as the later kernels read it.
struct RowView {
  const float* l;
  const UnitStat* us;
  const float* blk;
  double z;
};

__device__ __forceinline__ RowView row_view(const Params& p, int r, const float* l) {
  RowView v;
  v.l = l;
  v.us = p.us + static_cast<size_t>(r) * p.nb;
  v.blk = p.blk + static_cast<size_t>(r) * 2 * p.nb;
  v.z = ld_cg(&p.stats[r].z);
  return v;
}

// DenseRow::prob(x) = double(e_x c_b) / z, from the logit lx = l[x] (as blk_e).
__device__ __forceinline__ double blk_prob(const RowView& r, int x, float lx, float inv_t) {
  const int b = x / kStatBlock;
  const float bm = ld_cg(&r.us[b].bm);
  const float e = keep_or_zero(bm != -INFINITY, exp_fast(scaled_logit(lx, bm, inv_t)));
  return __ddiv_rn(static_cast<double>(__fmul_rn(e, ld_cg(r.blk + b))), r.z);
}

__global__ void __launch_bounds__(kBlock) chain_decide_kernel(Params p) {
  __shared__ BlockRed red;
  const int tid = threadIdx.x, s = blockIdx.x, nb = p.nb;
  const BSeq q = p.seqs[s];
  const size_t V = static_cast<size_t>(p.vocab);
  const int32_t* tok = p.tokens + q.tok_off;
  // Inputs of position tid's test, loaded while the block statistics still run: its draft token, and
  // (sampled) that token's target and draft logits.
  int x0 = 0;
  float lp0 = 0.0f, lq0 = 0.0f;
  if (tid < q.g) {
    x0 = tok[tid];
    if (!q.greedy) lp0 = __ldg(q.target + tid * V + x0), lq0 = __ldg(q.draft + tid * V + x0);
  }
  pdl_wait();
  pdl_launch_dependents();
  const int nrows = q.greedy ? q.g + 1 : 2 * q.g + 1;
  for (int i = warp_id(); i < nrows; i += kWarps) {
    const size_t r = static_cast<size_t>(q.r0) + i;
    finalize_row(p.us + r * nb, nb, !q.greedy, q.inv_t, p.blk + r * 2 * nb, p.stats + r);
  }
  __syncthreads();
  int bad = 0;
  for (int i = tid; i < nrows; i += kBlock) bad |= ld_cg(&p.stats[q.r0 + i].bad);
  bad = block_or(bad, red);
  int32_t* out = p.out_tokens + q.out_off;
  Decision d{-1, 0};
  if (bad) {
    if (tid == 0) p.accepted[q.batch_index] = -1, p.dec[s] = d;
    return;
  }
  if (q.greedy) {
    int miss = q.g;
    for (int i = tid; i < q.g; i += kBlock)
      if (ld_cg(&p.stats[q.r0 + i].argmax) != (i == tid ? x0 : tok[i])) miss = min(miss, i);
    miss = block_min_int(miss, red);
    for (int i = tid; i < miss; i += kBlock) out[i] = tok[i];
    if (tid == 0) {
      out[miss] = ld_cg(&p.stats[q.r0 + miss].argmax);
      p.accepted[q.batch_index] = miss;
      p.dec[s] = d;
    }
    return;
  }
  // Every accept test before the first rejection depends on its own rows alone, so all g run at
  // once and the first failing position is the CPU's stopping point.
  int rej = q.g;
  for (int i = tid; i < q.g; i += kBlock) {
    const RowView P = row_view(p, q.r0 + i, q.target + i * V);
    const RowView Q = row_view(p, q.r0 + q.g + 1 + i, q.draft + i * V);
    const bool pre = i == tid;
    const int x = pre ? x0 : tok[i];
    const double px = blk_prob(P, x, pre ? lp0 : __ldg(P.l + x), q.inv_t);
    const double qx = blk_prob(Q, x, pre ? lq0 : __ldg(Q.l + x), q.inv_t);
    const double u = philox_uniform(p.seed, q.stream, static_cast<uint32_t>(i + 1), kLaneAccept);
    if (!(qx > 0.0 && __dmul_rn(u, qx) < px)) rej = min(rej, i);
  }
  rej = block_min_int(rej, red);
  for (int i = tid; i < rej; i += kBlock) out[i] = tok[i];
  if (tid == 0) {
    d.pos = rej;
    d.residual = rej < q.g ? 1 : 0;
    p.dec[s] = d;
    p.accepted[q.batch_index] = rej;
  }
}

// ---------------------------------------------------------------------------------------------
// 3-4. Sampling: sample_dense and sample_residual_dense of spec/sampling.cpp.

// The weights the sampler scans. Dense: w_j = e_j c_b, block masses W_b. Residual: r_j = max(0,
// e^p_j a^p_b - e^q_j a^q_b), a_b = float(c_b / z), block masses R_b (rmass).
struct BlkWeights {
  RowView p, q;
  float* rmass;
  float inv_t;
  int32_t nb;
  int32_t residual;
};

__device__ __forceinline__ BlkWeights chain_weights(const Params& p, int s, const BSeq& q, int pos, bool residual) {
  const size_t V = static_cast<size_t>(p.vocab);
  BlkWeights w;
  w.p = row_view(p, q.r0 + pos, q.target + pos * V);
  w.q = residual ? row_view(p, q.r0 + q.g + 1 + pos, q.draft + pos * V) : w.p;
  w.rmass = p.rmass + static_cast<size_t>(s) * p.nb;
  w.inv_t = q.inv_t;
  w.nb = p.nb;
  w.residual = residual ? 1 : 0;
  return w;
}

// One block's view of the weights.
struct BlkScan {
  const float* lp;
  const float* lq;
  float bp, bq;  // the block's maxima bm_b in p and q
  float sp, sq;  // dense: c_b; residual: a^p_b, a^q_b
  float inv_t;
  int32_t residual;
};
__device__ __forceinline__ BlkScan blk_scan(const BlkWeights& w, int b) {
  BlkScan s;
  s.lp = w.p.l;
  s.lq = w.q.l;
  s.bp = ld_cg(&w.p.us[b].bm);
  s.bq = ld_cg(&w.q.us[b].bm);
  s.inv_t = w.inv_t;
  s.residual = w.residual;
  if (w.residual) {
    s.sp = __double2float_rn(__ddiv_rn(static_cast<double>(ld_cg(w.p.blk + b)), w.p.z));
    s.sq = __double2float_rn(__ddiv_rn(static_cast<double>(ld_cg(w.q.blk + b)), w.q.z));
  } else {
    s.sp = ld_cg(w.p.blk + b);
    s.sq = 0.0f;
  }
  return s;
}
// r_j from the two logits (block_residual, then sample_blocks' r_j * 1.0f).
__device__ __forceinline__ float residual_term(const BlkScan& s, float xp, float xq) {
  const float ep = keep_or_zero(s.bp != -INFINITY, exp_fast(scaled_logit(xp, s.bp, s.inv_t)));
  const float eq = keep_or_zero(s.bq != -INFINITY, exp_fast(scaled_logit(xq, s.bq, s.inv_t)));
  const float d = __fsub_rn(__fmul_rn(ep, s.sp), __fmul_rn(eq, s.sq));
  return d > 0.0f ? d : 0.0f;
}
// The weight of entry j (in the block the BlkScan was made for), rounded as the CPU rounds it
// (residual_term; or w_j * c_b).
__device__ __forceinline__ float blk_at(const BlkScan& s, int j) {
  if (s.residual) return residual_term(s, __ldg(s.lp + j), __ldg(s.lq + j));
  return __fmul_rn(blk_e(s.lp, j, s.bp, s.inv_t), s.sp);
}
__device__ __forceinline__ const float* blk_masses(const BlkWeights& w) {
  return w.residual ? w.rmass : w.p.blk + w.nb;
}

// R_b = lane_sum(r over block b) for the sequences that rejected: the scan of block b of sequence
// s's residual, or false when s draws no residual.
__device__ __forceinline__ bool residual_block(const Params& p, const BSeq& q, int s, int b, BlkScan& sc) {
  const Decision d = load_decision(p, s);
  if (d.pos < 0 || !d.residual) return false;
  sc = blk_scan(chain_weights(p, s, q, d.pos, true), b);
  return true;
}

// R_b by one warp: every lane gets it.
__device__ __forceinline__ float residual_warp_sum(const BlkScan& sc, int j0, int n) {
  float acc = 0.0f;
  for (int i0 = 0; i0 < kPerLane; i0 += kChunk) {
    float lp[kChunk], lq[kChunk];
    load_chunk(sc.lp + j0, i0, n, lp);
    load_chunk(sc.lq + j0, i0, n, lq);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) acc = __fadd_rn(acc, residual_term(sc, lp[i], lq[i]));
  }
  return warp_fold_sum(acc);
}

// One warp per (sequence, block).
__global__ void __launch_bounds__(kWarpUnitWarps * 32) residual_mass_warp_kernel(Params p) {
  pdl_wait();
  pdl_launch_dependents();
  const long long unit = static_cast<long long>(blockIdx.x) * kWarpUnitWarps + warp_id();
  if (unit >= static_cast<long long>(p.n_seqs) * p.nb) return;
  const int s = static_cast<int>(unit / p.nb), b = static_cast<int>(unit - static_cast<long long>(s) * p.nb);
  BlkScan sc;
  if (!residual_block(p, p.seqs[s], s, b, sc)) return;
  const int j0 = b * kStatBlock;
  const float acc = residual_warp_sum(sc, j0, min(kStatBlock, p.vocab - j0));
  if (lane_id() == 0) p.rmass[static_cast<size_t>(s) * p.nb + b] = acc;
}

// One CTA per (sequence, block).
__global__ void __launch_bounds__(kSplitWarps * 32) residual_mass_split_kernel(Params p) {
  __shared__ SplitSmem sm;
  const int unit = blockIdx.x, s = unit / p.nb, b = unit - s * p.nb;
  const BSeq q = p.seqs[s];  // an input: readable before the wait
  pdl_wait();
  pdl_launch_dependents();
  BlkScan sc;
  if (!residual_block(p, q, s, b, sc)) return;  // the same for the whole CTA
  const int i0 = warp_id() * kChunk, j0 = b * kStatBlock, n = min(kStatBlock, p.vocab - j0);
  float lp[kChunk], lq[kChunk], t[kChunk];
  load_chunk(sc.lp + j0, i0, n, lp);
  load_chunk(sc.lq + j0, i0, n, lq);
#pragma unroll
  for (int i = 0; i < kChunk; ++i) t[i] = residual_term(sc, lp[i], lq[i]);
  const float acc = split_lane_sum(t, sm);
  if (threadIdx.x == 0) p.rmass[static_cast<size_t>(s) * p.nb + b] = acc;
}

constexpr int kStagedMasses = 8192;  // block masses staged in shared memory (V up to 16.7M)

struct SampleSmem {
  float mass[kStagedMasses];  // block masses, staged for thread 0's sequential loops
  BlockRed red;
  double bd[2];
  int32_t bi[4];
};

// sample_blocks(w, wscale, bmass, V, u): the same token as the CPU, or -1 when the masses sum to
// <= 0. One thread sums the block masses and walks them in block order exactly as the CPU does
// (cum, target and the chosen block are the CPU's bits). Inside the chosen block a parallel prefix
// sum finds the first entry whose running sum passes the target; it is accepted only when an error
// bound proves that the CPU's sequential double sum crosses at the same entry. Otherwise (about
// 1e-12 of draws, or when rounding makes the CPU run past the block) one thread runs the CPU's loop
// literally. test_cuda's blocked_sampler_replay_matches_cpu replays this on the host. Every thread
// of the block must call it; all get the result.
__device__ __noinline__ int blocked_sample(const BlkWeights& w, int V, double u, SampleSmem& sm) {
  const int tid = threadIdx.x, lane = lane_id(), warp = warp_id();
  const int nb = w.nb;
  const float* mass = blk_masses(w);
  const bool staged = nb <= kStagedMasses;
  if (staged) {
    for (int b = tid; b < nb; b += kBlock) sm.mass[b] = ld_cg(mass + b);
    __syncthreads();
  }
  if (tid == 0) {
    double total = 0.0;
    for (int b = 0; b < nb; ++b) total += static_cast<double>(staged ? sm.mass[b] : ld_cg(mass + b));
    int sel = -1;
    double cum = 0.0, target = 0.0;
    if (total > 0.0) {
      target = u * total;
      for (int b = 0; b < nb; ++b) {
        const float m = staged ? sm.mass[b] : ld_cg(mass + b);
        if (!(m > 0.0f)) continue;
        if (cum + m <= target) {
          cum += m;
          continue;
        }
        sel = b;
        break;
      }
    }
    sm.bi[0] = total > 0.0 ? sel : -2;
    sm.bd[0] = cum;
    sm.bd[1] = target;
  }
  __syncthreads();
  const int sel = sm.bi[0];
  const double cum0 = sm.bd[0], target = sm.bd[1];
  __syncthreads();
  if (sel == -2) return -1;
  int status = 1;  // 1: run the CPU's loop; 2: decided (token in bi[3])
  if (sel >= 0) {
    const int j0 = sel * kStatBlock, n = min(kStatBlock, V - j0);
    const BlkScan sc = blk_scan(w, sel);
    float x[4];
    double part = 0.0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int j = 4 * tid + i;
      x[i] = j < n ? blk_at(sc, j0 + j) : 0.0f;
      part += static_cast<double>(x[i]);
    }
    double incl = part;
    for (int o = 1; o < 32; o <<= 1) {
      const double y = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl = y + incl;
    }
    double excl = __shfl_up_sync(0xffffffffu, incl, 1);
    if (lane == 0) excl = 0.0;
    if (lane == 31) sm.red.d[warp] = incl;
    __syncthreads();
    double wbase = 0.0, wtotal = 0.0;
    for (int k = 0; k < kWarps; ++k) {
      if (k == warp) wbase = wtotal;
      wtotal += sm.red.d[k];
    }
    // Every partial sum either side computes is at most about cum0 + wtotal; any two summation
    // orders of these n + 1 non-negative terms differ by at most 2 (n + 1) 2^-53 of that.
    const double margin = 4.01 * (static_cast<double>(n) + 2.0) * 1.1102230246251565e-16 * (cum0 + wtotal);
    double c = cum0 + (wbase + excl);
    int hit = n;
    double hce = 0.0, hci = 0.0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const double ce = c;
      c += static_cast<double>(x[i]);
      if (hit == n && x[i] > 0.0f && c > target) hit = 4 * tid + i, hce = ce, hci = c;
    }
    const int first = block_min_int(hit, sm.red);
    if (first < n && hit == first) {
      const bool sure = hci > target + margin && hce < target - margin;
      sm.bi[1] = sure ? 2 : 1;
      sm.bi[3] = j0 + first;
    }
    if (first >= n && tid == 0) sm.bi[1] = 1;
    __syncthreads();
    status = sm.bi[1];
    __syncthreads();
  }
  if (status == 1) {  // the CPU's loop, literally (from the chosen block on)
    if (tid == 0) {
      double cum = cum0;
      int res = -1;
      for (int b = sel < 0 ? nb : sel; b < nb && res < 0; ++b) {
        const float m = ld_cg(mass + b);
        if (!(m > 0.0f)) continue;
        if (cum + m <= target) {
          cum += m;
          continue;
        }
        const BlkScan sc = blk_scan(w, b);
        const int hi = min(V, (b + 1) * kStatBlock);
        for (int j = b * kStatBlock; j < hi; ++j) {
          const float x = blk_at(sc, j);
          if (!(x > 0.0f)) continue;
          cum += x;
          if (cum > target) {
            res = j;
            break;
          }
        }
      }
      // Rounding left u * total at the very top: the last entry with weight.
      for (int j = V - 1; res < 0 && j >= 0; --j)
        if (blk_at(blk_scan(w, j / kStatBlock), j) > 0.0f) res = j;
      sm.bi[3] = res;
    }
    __syncthreads();
  }
  const int result = sm.bi[3];
  __syncthreads();
  return result;
}

__global__ void __launch_bounds__(kBlock) chain_sample_kernel(Params p) {
  __shared__ SampleSmem sm;
  const int s = blockIdx.x;
  const BSeq q = p.seqs[s];
  pdl_wait();
  const Decision d = load_decision(p, s);
  if (d.pos < 0) return;
  const double u = philox_uniform(p.seed, q.stream, static_cast<uint32_t>(d.pos), kLaneSample);
  int y = blocked_sample(chain_weights(p, s, q, d.pos, d.residual != 0), p.vocab, u, sm);
  if (y < 0 && d.residual) y = blocked_sample(chain_weights(p, s, q, d.pos, false), p.vocab, u, sm);  // p == q
  if (threadIdx.x == 0) p.out_tokens[q.out_off + d.pos] = y;
}

// Launches kernel k of the chain with `grid` CTAs, as a programmatic dependent of the previous
// kernel on the stream where the device supports it (sm_90).
template <class... A, class... P>
void launch(void (*k)(A...), int grid, int threads, bool pdl, cudaStream_t stream, P&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(std::max(grid, 1)));
  cfg.blockDim = dim3(static_cast<unsigned>(threads));
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  OSD_CUDA_CHECK(cudaLaunchKernelEx(&cfg, k, std::forward<P>(args)...));
}

// Programmatic dependent launch only where the loaded kernels are sm_90 code: compiled from older
// PTX, griddepcontrol.wait is absent and a dependent kernel could read its predecessor's results
// early, so the launches stay fully ordered. Decided once per workspace.
bool kernels_use_pdl(Workspace& ws) {
  if (ws.pdl < 0) {
    cudaFuncAttributes fa{};
    OSD_CUDA_CHECK(cudaFuncGetAttributes(&fa, chain_decide_kernel));
    ws.pdl = fa.ptxVersion >= 90 ? 1 : 0;
  }
  return ws.pdl == 1;
}

}  // namespace

void set_split_units_per_sm(int units) { g_split_units_per_sm.store(units < 0 ? kSplitUnitsPerSm : units); }

void chain_blocked_launch(const ChainBatchDevice& in, const std::vector<int32_t>& sel,
                          const std::vector<size_t>& trow, const std::vector<size_t>& drow, RowStat* stats,
                          Workspace& ws, cudaStream_t stream, std::vector<RowOrigin>& origins) {
  const int n = static_cast<int>(sel.size());
  if (n == 0) return;
  const int32_t V = in.vocab, nb = stat_blocks(V);
  std::vector<BRow> rows;
  std::vector<BSeq> seqs(n);
  bool sampled = false;
  for (int k = 0; k < n; ++k) {
    const int32_t b = sel[k], g = in.lengths[b];
    const Sampling& s = in.sampling[b];
    BSeq& q = seqs[k];
    q.greedy = s.greedy() ? 1 : 0;
    q.inv_t = q.greedy ? 1.0f : 1.0f / s.temperature;  // the CPU's float division
    q.target = in.target + trow[b] * V;
    q.draft = (!q.greedy && in.draft) ? in.draft + drow[b] * V : nullptr;
    q.stream = in.streams[b];
    q.g = g;
    q.r0 = static_cast<int32_t>(rows.size());
    q.tok_off = static_cast<int32_t>(drow[b]);
    q.out_off = static_cast<int32_t>(trow[b]);
    q.batch_index = b;
    for (int32_t i = 0; i <= g; ++i) {
      rows.push_back(BRow{q.target + static_cast<size_t>(i) * V, q.inv_t, !q.greedy});
      origins.push_back(RowOrigin{b, 0, static_cast<int32_t>(trow[b] + i)});
    }
    if (!q.greedy) {
      sampled = true;
      for (int32_t i = 0; i < g; ++i) {
        rows.push_back(BRow{q.draft + static_cast<size_t>(i) * V, q.inv_t, 1});
        origins.push_back(RowOrigin{b, 1, static_cast<int32_t>(drow[b] + i)});
      }
    }
  }
  const long long n_rows = static_cast<long long>(rows.size());
  Params p{};
  const BRow* d_rows = upload(ws.brows, ws.host_brows, rows, stream);
  p.seqs = upload(ws.bseqs, ws.host_bseqs, seqs, stream);
  UnitStat* us = ws.ustats.as<UnitStat>(static_cast<size_t>(n_rows) * nb);
  p.us = us;
  p.blk = ws.bblk.as<float>(static_cast<size_t>(n_rows) * 2 * nb);
  p.rmass = ws.brmass.as<float>(static_cast<size_t>(n) * nb);
  p.stats = stats;
  p.dec = ws.bdec.as<Decision>(n);
  p.tokens = in.tokens;
  p.out_tokens = in.out_tokens;
  p.accepted = in.accepted;
  p.seed = in.seed;
  p.vocab = V;
  p.nb = nb;
  p.n_seqs = n;
  const bool pdl = kernels_use_pdl(ws);
  const long long units = n_rows * nb;
  if (units >= INT32_MAX || static_cast<long long>(n) * nb >= INT32_MAX)
    throw_range("chain batch of " + std::to_string(n_rows) + " rows of vocabSize " + std::to_string(V) +
                " is too large for one CUDA launch");
  record_start(ws, stream);
  const long long split_max = static_cast<long long>(g_split_units_per_sm.load()) * device_sm_count(ws);
  if (units <= split_max)
    launch(blk_stats_split_kernel, static_cast<int>(units), kSplitWarps * 32, false, stream, d_rows, nb, V, us);
  else
    launch(blk_stats_warp_kernel, static_cast<int>((units + kWarpUnitWarps - 1) / kWarpUnitWarps), kWarpUnitWarps * 32,
           false, stream, d_rows, units, nb, V, us);
  launch(chain_decide_kernel, n, kBlock, pdl, stream, p);
  if (sampled) {
    if (n * nb <= split_max)
      launch(residual_mass_split_kernel, n * nb, kSplitWarps * 32, pdl, stream, p);
    else
      launch(residual_mass_warp_kernel, (n * nb + kWarpUnitWarps - 1) / kWarpUnitWarps, kWarpUnitWarps * 32, pdl,
             stream, p);
    launch(chain_sample_kernel, n, kBlock, pdl, stream, p);
  }
}

}  // namespace cuda
}  // namespace osd
