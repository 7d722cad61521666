// Chain and tree verification on the GPU, making the CPU reference's decisions (spec/verify.cpp).
// Build (standalone check of this file): nvcc -std=c++17 -O3 -arch=sm_90 -I native -c cuda/verify.cu
// Parity: test/native/test_cuda.cu (chain_* and tree_* tests): identical accepted counts, paths and
// tokens for identical seeds (tolerance: zero mismatches), plus chi-square exactness on the GPU.
#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "core/error.h"
#include "chain_blocked.cuh"
#include "verify.cuh"
#include "warp_device.cuh"

namespace osd {
namespace cuda {

namespace {

// ---------------------------------------------------------------------------------------------
// Chains

struct ChainSeq {
  uint64_t stream;
  int32_t g, t0, d0, tok_off, out_off, greedy, ntasks, batch_index;
};

// The reference walk for chains that the CPU verifies with verify_chain (top-k / top-p rows, and
// every sequence under a planted fault): one CTA prepares each row whole (persistent grid over
// rows), and the CTA that finishes a sequence's last row walks it.
struct ChainParams {
  const RowTask* tasks;
  RowStat* stats;
  int32_t n_tasks;
  const ChainSeq* seqs;
  int32_t* done;
  const int32_t* tokens;
  int32_t* out_tokens;
  int32_t* accepted;
  uint64_t seed;
  int32_t fault;
  int32_t vocab;
  SlotPool pool;
};

// sample_row(P) for a sparse row with its support list: the id of the sampled entry.
__device__ __forceinline__ int support_sample(const RowRef& P, double u, PrepSmem& sm) {
  const int i = block_sample(weights_of(kWeightSupRow, P), P.nsup, u, sm);
  return static_cast<int>(ld_cg(P.sup + i) >> 32);  // i >= 0: the row max keeps weight
}

// Residual sample from norm(max(0, p - q)) (sample_residual in verify.cpp).
__device__ __noinline__ int chain_residual(const RowRef& P, const RowRef& Q, int V, double u, int fault, PrepSmem& sm) {
  if (fault == static_cast<int>(Fault::None) && P.mode == kRowSparse && P.nsup >= 0) {
    // As the CPU: max(0, p - q) is 0 outside p's support, so only the support is summed and scanned,
    // in id order (the same sums and token as the dense scan, which adds only zeros besides).
    const int i = block_sample(weights_of(kWeightSupResidual, P, Q), P.nsup, u, sm);
    return i >= 0 ? static_cast<int>(ld_cg(P.sup + i) >> 32) : support_sample(P, u, sm);
  }
  if (fault == static_cast<int>(Fault::ResidualFromTarget))
    return block_sample(weights_of(kWeightDense, P), V, u, sm);
  if (fault == static_cast<int>(Fault::ResidualNoClamp)) {
    if (threadIdx.x == 0) {
      double total = 0.0;
      for (int j = 0; j < V; ++j) total += __fsub_rn(row_dense(P, j), row_dense(Q, j));
      const double target = u * total;
      double cum = 0.0;
      int res = V - 1;
      for (int j = 0; j < V; ++j) {
        cum += __fsub_rn(row_dense(P, j), row_dense(Q, j));
        if (cum > target) {
          res = j;
          break;
        }
      }
      sm.bi[3] = res;
    }
    __syncthreads();
    const int res = sm.bi[3];
    __syncthreads();
    return res;
  }
  int y = block_sample(weights_of(kWeightResidual, P, Q), V, u, sm);
  if (y < 0) y = block_sample(weights_of(kWeightRow, P), V, u, sm);
  return y;
}

__device__ __noinline__ void chain_walk(const ChainParams& p, int b, PrepSmem& sm) {
  const int tid = threadIdx.x;
  const ChainSeq q = p.seqs[b];
  const int V = p.vocab;
  int32_t* out = p.out_tokens + q.out_off;
  const int32_t* tok = p.tokens + q.tok_off;
  int bad = 0;
  for (int i = tid; i < q.ntasks; i += kBlock) bad |= ld_cg(&p.stats[q.t0 + i].bad);
  bad = block_or(bad, sm.red);
  if (bad) {
    if (tid == 0) p.accepted[q.batch_index] = -1;
    return;
  }
  // Every decision before the first rejection (or mismatch) depends on its own row alone, so all g
  // are made at once and the first failing position is the CPU's stopping point.
  if (q.greedy) {
    int miss = q.g;
    for (int i = tid; i < q.g; i += kBlock)
      if (ld_cg(&p.stats[q.t0 + i].argmax) != tok[i]) miss = min(miss, i);
    miss = block_min_int(miss, sm.red);
    for (int i = tid; i < miss; i += kBlock) out[i] = tok[i];
    if (tid == 0) {
      out[miss] = ld_cg(&p.stats[q.t0 + miss].argmax);
      p.accepted[q.batch_index] = miss;
    }
    return;
  }
  int rej = q.g;
  for (int i = tid; i < q.g; i += kBlock) {
    const RowRef P = load_row(p.tasks[q.t0 + i], p.stats + q.t0 + i);
    const RowRef Q = load_row(p.tasks[q.d0 + i], p.stats + q.d0 + i);
    const int x = tok[i];
    const double px = row_prob(P, x), qx = row_prob(Q, x);
    const double u = philox_uniform(p.seed, q.stream, static_cast<uint32_t>(i + 1), kLaneAccept);
    if (!(qx > 0.0 && __dmul_rn(u, qx) < px)) rej = min(rej, i);
  }
  rej = block_min_int(rej, sm.red);
  for (int i = tid; i < rej; i += kBlock) out[i] = tok[i];
  if (rej < q.g) {
    const RowRef P = load_row(p.tasks[q.t0 + rej], p.stats + q.t0 + rej);
    const RowRef Q = load_row(p.tasks[q.d0 + rej], p.stats + q.d0 + rej);
    const double u = philox_uniform(p.seed, q.stream, static_cast<uint32_t>(rej), kLaneSample);
    const int y = chain_residual(P, Q, V, u, p.fault, sm);
    if (tid == 0) {
      out[rej] = y;
      p.accepted[q.batch_index] = rej;
    }
    return;
  }
  const RowRef P = load_row(p.tasks[q.t0 + q.g], p.stats + q.t0 + q.g);
  const double u = philox_uniform(p.seed, q.stream, static_cast<uint32_t>(q.g), kLaneSample);
  const int y = P.mode == kRowSparse && P.nsup >= 0 ? support_sample(P, u, sm)
                                                     : block_sample(weights_of(kWeightRow, P), V, u, sm);
  if (tid == 0) {
    out[q.g] = y;
    p.accepted[q.batch_index] = q.g;
  }
}

// Called by every block after it prepared a row: the block that completes an owner runs its walk.
__device__ __forceinline__ bool finished_owner(int32_t* done, int owner, int ntasks, PrepSmem& sm) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) sm.bi[7] = (atomicAdd(&done[owner], 1) + 1 == ntasks) ? 1 : 0;
  __syncthreads();
  const bool last = sm.bi[7] != 0;
  __syncthreads();
  if (last) __threadfence();
  return last;
}

__global__ void __launch_bounds__(kBlock, 1) chain_kernel(ChainParams p) {
  __shared__ PrepSmem sm;
  for (int t = blockIdx.x; t < p.n_tasks; t += gridDim.x) {
    const RowTask task = p.tasks[t];
    prepare_row(task, p.stats + t, p.pool, sm);
    if (finished_owner(p.done, task.owner, p.seqs[task.owner].ntasks, sm)) chain_walk(p, task.owner, sm);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Trees

struct TreeReq {
  uint64_t stream;
  float* pd;
  float* qd;
  int32_t n, V, t0, d0, node_off, first_off, out_off, path_off, greedy, mode, use_draft, ntasks;
};

struct TreeParams {
  const RowTask* tasks;
  RowStat* stats;
  int32_t n_tasks;
  const TreeReq* reqs;
  int32_t* done;
  const int32_t* tokens;  // node_off + i
  const int32_t* first;   // first_off + slot (slot = parent + 1)
  const int32_t* next;    // node_off + i
  int32_t* const* out_tokens;  // per request
  int32_t* const* out_path;
  int32_t* const* out_counts;
  uint64_t seed;
  int32_t fault;
  SlotPool pool;
};

// The walk's current p or q (verify.cpp's pd / qd): P.to_dense read from its prepared row until the
// first rejection; after it, the raw values in a buffer times the factor of the normalise() still to
// apply (each read rounds fmul(raw, factor), the CPU's v[j] *= inv). Deferring the factor to the next
// read lets one pass per rejection do the CPU's residual, zeroing and both normalise sums.
struct Cur {
  RowRef row;
  float* buf;
  float scale;
  int32_t src;  // kFromRow, kFromBuf or kFromBufScaled
};
constexpr int32_t kFromRow = 0, kFromBuf = 1, kFromBufScaled = 2;

__device__ __forceinline__ float cur_at(const Cur& c, int j) {
  if (c.src == kFromRow) return row_dense(c.row, j);
  const float v = c.buf[j];
  return c.src == kFromBufScaled ? __fmul_rn(v, c.scale) : v;
}
__device__ __forceinline__ float4 scale4(float4 v, float f) {
  return make_float4(__fmul_rn(v.x, f), __fmul_rn(v.y, f), __fmul_rn(v.z, f), __fmul_rn(v.w, f));
}
__device__ __forceinline__ float4 cur4(const Cur& c, int k) {
  if (c.src == kFromRow) {
    const RowRef& r = c.row;
    if (r.mode == kRowSparse) return __ldcg(reinterpret_cast<const float4*>(r.prob) + k);
    if (r.e) return scale4(__ldcg(reinterpret_cast<const float4*>(r.e) + k), r.inv_z);
    const float4 l = __ldg(reinterpret_cast<const float4*>(r.l) + k);
    return scale4(make_float4(exp_fast(scaled_logit(l.x, r.mx, r.inv_t)), exp_fast(scaled_logit(l.y, r.mx, r.inv_t)),
                              exp_fast(scaled_logit(l.z, r.mx, r.inv_t)), exp_fast(scaled_logit(l.w, r.mx, r.inv_t))),
                  r.inv_z);
  }
  const float4 v = reinterpret_cast<const float4*>(c.buf)[k];
  return c.src == kFromBufScaled ? scale4(v, c.scale) : v;
}
__device__ __forceinline__ bool cur_aligned(const Cur& c) {
  const void* a = c.src != kFromRow         ? static_cast<const void*>(c.buf)
                  : c.row.mode == kRowSparse ? static_cast<const void*>(c.row.prob)
                  : c.row.e                  ? static_cast<const void*>(c.row.e)
                                             : static_cast<const void*>(c.row.l);
  return (reinterpret_cast<uintptr_t>(a) & 15u) == 0;
}

// What a rejection does to p (verify.cpp's loop body).
enum RejectKind : int32_t {
  kRejectResidual = 0,  // p <- max(0, p - q)
  kRejectNoClamp = 1,   // p <- p - q (the planted fault)
  kRejectZero = 2,      // p[x] <- 0 (deterministic children: q is one-hot on x)
  kRejectKeep = 3,      // p as it is (the planted fault ResidualFromTarget)
};

// One rejection of child token x in one pass over the vocabulary: p's new raw values into P.buf,
// with q's (x zeroed) into Q.buf when `q_update` (without replacement), then both normalise() factors.
// A q whose exp terms are recomputed from the logits is copied to Q.buf on its first pass, so later
// passes do not recompute them.
__device__ __noinline__ void reject_pass(Cur& P, Cur& Q, int x, int kind, bool q_update, int V, PrepSmem& sm) {
  float* pd = P.buf;
  float* qd = Q.buf;
  const bool need_q = kind <= kRejectNoClamp;  // the residual reads q
  const bool read_q = need_q || q_update;
  const bool q_write =
      q_update || (need_q && Q.src == kFromRow && Q.row.mode != kRowSparse && Q.row.e == nullptr);
  // Sums and absolute sums for normalise_factor's bound. Only the planted fault's unclamped residual
  // can be negative: elsewhere every value is >= 0 and the absolute sum is the sum.
  const bool signed_p = kind == kRejectNoClamp;
  double sp = 0.0, ap = 0.0, sq = 0.0;
  auto one = [&](int j, float pc, float qc) {
    float r;
    if (kind == kRejectKeep) r = pc;
    else if (kind == kRejectZero) r = j == x ? 0.0f : pc;
    else {
      r = __fsub_rn(pc, qc);
      if (kind == kRejectResidual) r = r > 0.0f ? r : 0.0f;
    }
    sp += static_cast<double>(r);
    if (signed_p) ap += fabs(static_cast<double>(r));
    if (q_update) {
      const float qn = j == x ? 0.0f : qc;
      sq += static_cast<double>(qn);
      return make_float2(r, qn);
    }
    return make_float2(r, qc);
  };
  const bool vec = V % 4 == 0 && cur_aligned(P) && (!read_q || cur_aligned(Q)) &&
                   ((reinterpret_cast<uintptr_t>(pd) | reinterpret_cast<uintptr_t>(qd)) & 15u) == 0;
  if (vec) {
    const int V4 = V / 4;
    constexpr int U = 4;  // float4 loads in flight per stream and thread
    for (int base = threadIdx.x; base < V4; base += U * kBlock) {
      float4 a[U], b[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int k = base + u * kBlock;
        if (k < V4) {
          a[u] = cur4(P, k);
          b[u] = read_q ? cur4(Q, k) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int k = base + u * kBlock;
        if (k < V4) {
          const float2 r0 = one(4 * k, a[u].x, b[u].x), r1 = one(4 * k + 1, a[u].y, b[u].y);
          const float2 r2 = one(4 * k + 2, a[u].z, b[u].z), r3 = one(4 * k + 3, a[u].w, b[u].w);
          reinterpret_cast<float4*>(pd)[k] = make_float4(r0.x, r1.x, r2.x, r3.x);
          if (q_write) reinterpret_cast<float4*>(qd)[k] = make_float4(r0.y, r1.y, r2.y, r3.y);
        }
      }
    }
  } else {
    for (int j = threadIdx.x; j < V; j += kBlock) {
      const float pc = cur_at(P, j);
      const float qc = read_q ? cur_at(Q, j) : 0.0f;
      const float2 r = one(j, pc, qc);
      pd[j] = r.x;
      if (q_write) qd[j] = r.y;
    }
  }
  if (signed_p) block_sum2(sp, ap, sm.red); else block_sum2(sp, sq, sm.red);  // the barriers publish the buffers
  if (!signed_p) ap = sp;
  else if (q_update) sq = block_sum(sq, sm.red);
  float f = 0.0f;
  P.src = normalise_factor(sp, ap, pd, V, &f, sm) ? kFromBufScaled : kFromBuf;
  P.scale = f;
  if (q_update) {
    Q.src = normalise_factor(sq, sq, qd, V, &f, sm) ? kFromBufScaled : kFromBuf;
    Q.scale = f;
  } else if (q_write) {
    Q.src = kFromBuf;  // Q.buf holds q itself
  }
}

__device__ __noinline__ void tree_walk(const TreeParams& p, int r, PrepSmem& sm) {
  const int tid = threadIdx.x;
  const TreeReq q = p.reqs[r];
  const int V = q.V;
  const int32_t* tokens = p.tokens + q.node_off;
  const int32_t* first = p.first + q.first_off;
  const int32_t* next = p.next + q.node_off;
  int32_t* out = p.out_tokens[r];
  int32_t* path = p.out_path[r];
  int32_t* counts = p.out_counts[r];
  [[maybe_unused]] const bool timed = tid == 0 && r == 0;  // OSD_PHASE slots 3-19
  OSD_PHASE(timed, 3);
  int bad = 0;
  for (int i = tid; i < q.ntasks; i += kBlock) bad |= ld_cg(&p.stats[q.t0 + i].bad);
  bad = block_or(bad, sm.red);
  OSD_PHASE(timed, 4);
  if (bad) {
    if (tid == 0) counts[0] = -1, counts[1] = -1;
    return;
  }
  if (q.greedy) {
    if (tid == 0) {
      int row = 0, plen = 0;
      for (;;) {
        const int best = ld_cg(&p.stats[q.t0 + row].argmax);
        int hit = -1;
        for (int c = first[row]; c >= 0; c = next[c])
          if (tokens[c] == best) {
            hit = c;
            break;
          }
        if (hit < 0) {
          out[plen] = best;
          counts[0] = plen;
          counts[1] = plen + 1;
          break;
        }
        path[plen] = hit;
        out[plen++] = best;
        row = hit + 1;
      }
    }
    return;
  }
  const bool use_draft = q.use_draft != 0;
  const bool q_update = use_draft && q.mode == static_cast<int>(TreeChildren::WithoutReplacement) &&
                        p.fault != static_cast<int>(Fault::ResidualFromTarget);
  const int kind = p.fault == static_cast<int>(Fault::ResidualFromTarget) ? kRejectKeep
                   : !use_draft                                           ? kRejectZero
                   : p.fault == static_cast<int>(Fault::ResidualNoClamp)  ? kRejectNoClamp
                                                                          : kRejectResidual;
  // A first child's test reads its parent's rows as prepared (no rejection there has changed p or
  // q yet when the walk arrives), so every first child is tested at once, up front, and the walk
  // descends through accepted first children without a global-memory round trip per level. The
  // tree's first-child lists and the decisions go to PrepSmem arrays that only row preparation uses.
  const bool staged = q.n + 1 <= kBlock;
  int* sfirst = reinterpret_cast<int*>(sm.tmax);
  uint32_t* first_ok = sm.hist;  // bit c: node c is a first child and passes its test
  static_assert(sizeof(sm.tmax) >= kBlock * sizeof(int) && sizeof(sm.hist) * 8 >= kBlock, "staging space");
  if (staged) {
    for (int w = tid; w < (q.n + 32) / 32; w += kBlock) first_ok[w] = 0;
    __syncthreads();
    for (int rw = tid; rw <= q.n; rw += kBlock) {
      const int c = first[rw];
      sfirst[rw] = c;
      if (c < 0) continue;
      const int x = tokens[c];
      const double px = static_cast<double>(row_dense(load_row(p.tasks[q.t0 + rw], p.stats + q.t0 + rw), x));
      const double qx =
          use_draft ? static_cast<double>(row_dense(load_row(p.tasks[q.d0 + rw], p.stats + q.d0 + rw), x)) : 1.0;
      const double u = philox_uniform(p.seed, q.stream, static_cast<uint32_t>(c + 1), kLaneAccept);
      if (qx > 0.0 && __dmul_rn(u, qx) < px) atomicOr(&first_ok[c >> 5], 1u << (c & 31));
    }
    __syncthreads();
  }
  OSD_PHASE(timed, 5);
  int row = 0, plen = 0, rejections = 0;
  for (;;) {
    OSD_PHASE(timed && plen < 8, 12 + plen);
    const int c0 = staged ? sfirst[row] : first[row];
    if (c0 >= 0 && staged && ((first_ok[c0 >> 5] >> (c0 & 31)) & 1u)) {  // the first child is accepted
      if (tid == 0) path[plen] = c0, out[plen] = tokens[c0];
      ++plen;
      row = c0 + 1;
      continue;
    }
    const RowRef P = load_row(p.tasks[q.t0 + row], p.stats + q.t0 + row);
    if (c0 < 0) {  // a leaf: the bonus token comes from the target
      const double u = philox_uniform(p.seed, q.stream, static_cast<uint32_t>(row), kLaneSample);
      const int y = block_sample(weights_of(kWeightRow, P), V, u, sm);
      OSD_PHASE(timed, 11);
      if (tid == 0) out[plen] = y, counts[0] = plen, counts[1] = plen + 1;
      return;
    }
    Cur pc{P, q.pd, 0.0f, kFromRow}, qc{RowRef{}, q.qd, 0.0f, kFromRow};
    if (use_draft) qc.row = load_row(p.tasks[q.d0 + row], p.stats + q.d0 + row);
    int accepted = -1;
    for (int c = c0; c >= 0; c = next[c]) {
      const int x = tokens[c];
      int acc;
      if (staged && c == c0) {
        acc = (first_ok[c >> 5] >> (c & 31)) & 1u;
      } else {
        if (tid == 0) {
          const double px = static_cast<double>(cur_at(pc, x));
          const double qx = use_draft ? static_cast<double>(cur_at(qc, x)) : 1.0;
          const double u = philox_uniform(p.seed, q.stream, static_cast<uint32_t>(c + 1), kLaneAccept);
          sm.bi[1] = (qx > 0.0 && __dmul_rn(u, qx) < px) ? 1 : 0;
        }
        __syncthreads();
        acc = sm.bi[1];
        __syncthreads();
      }
      if (acc) {
        accepted = c;
        break;
      }
      reject_pass(pc, qc, x, kind, q_update, V, sm);
      OSD_PHASE(timed && rejections < 4, 6 + rejections);
      ++rejections;
    }
    if (accepted < 0) {  // pc holds the last residual (a rejection happened)
      const double u = philox_uniform(p.seed, q.stream, static_cast<uint32_t>(row), kLaneSample);
      int y = block_sample(pc.src == kFromBufScaled ? weights_of(kWeightPositiveScaled, P, RowRef{}, pc.buf, pc.scale)
                                                    : weights_of(kWeightPositive, P, RowRef{}, pc.buf),
                           V, u, sm);
      if (y < 0) y = block_sample(weights_of(kWeightRow, P), V, u, sm);
      OSD_PHASE(timed, 10);
      if (tid == 0) out[plen] = y, counts[0] = plen, counts[1] = plen + 1;
      return;
    }
    if (tid == 0) path[plen] = accepted, out[plen] = tokens[accepted];
    ++plen;
    row = accepted + 1;
    __syncthreads();
  }
}

// Launches of more rows than one wave of row blocks, when no row is top-k / top-p: one warp
// prepares each row (tree_prep_warp_kernel: RowStat as prepare_row, exp terms not stored), then one
// block per request walks (tree_walk_kernel). A row block spends most of its time on the 16 serial
// chains of z; a warp runs the same chains while the SM holds many more of them.
constexpr int kPrepWarps = 8;  // warps per block of tree_prep_warp_kernel

__device__ void prepare_row_warp(const RowTask& t, RowStat* st) {
  const int lane = lane_id();
  const int V = t.vocab;
  const float* l = t.logits;
  const RowScan rs = scan_row<32>(l, V, lane);
  float mx = warp_max(rs.mx), bv = rs.bv;
  int bidx = rs.bidx;
  const int bad = __any_sync(0xffffffffu, rs.bad) ? 1 : 0;
  for (int o = 16; o > 0; o >>= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, bv, o);
    const int j = __shfl_xor_sync(0xffffffffu, bidx, o);
    argmax_combine(bv, bidx, w, j);
  }
  if (bad || mx == -INFINITY) {
    if (lane == 0) set_bad_row(st, bad, mx);
    return;
  }
  double z = 0.0;
  float inv_z = 0.0f;
  if (t.mode == kRowDense) {
    // z_exact's order: lane k < 16 adds the terms 16 m + k in increasing m, in float; then the tail
    // j >= 16 M in double, then the 16 lane sums in lane order. Each step covers 32 consecutive
    // terms: group 2 i on lanes 0-15, group 2 i + 1 on lanes 16-31 (handed down by a shuffle).
    const int M = V / 16, pairs = M / 2;
    const float it = t.inv_t;
    float acc = 0.0f;
    auto step = [&](float x) {
      const float e = exp_fast(scaled_logit(x, mx, it));
      const float hi = __shfl_down_sync(0xffffffffu, e, 16);
      if (lane < 16) acc = __fadd_rn(__fadd_rn(acc, e), hi);
    };
    constexpr int U = 8;  // loads in flight per lane
    int i = 0;
    for (; i + U <= pairs; i += U) {
      float x[U];
#pragma unroll
      for (int u = 0; u < U; ++u) x[u] = __ldg(l + 32 * (i + u) + lane);
#pragma unroll
      for (int u = 0; u < U; ++u) step(x[u]);
    }
    for (; i < pairs; ++i) step(__ldg(l + 32 * i + lane));
    if ((M & 1) && lane < 16) acc = __fadd_rn(acc, exp_fast(scaled_logit(__ldg(l + 32 * pairs + lane), mx, it)));
    double total = 0.0;
    if (lane == 0)
      for (int j = 16 * M; j < V; ++j) total += static_cast<double>(exp_fast(scaled_logit(__ldg(l + j), mx, it)));
    for (int k = 0; k < 16; ++k) total += static_cast<double>(__shfl_sync(0xffffffffu, acc, k));
    z = total;
    inv_z = __double2float_rn(__ddiv_rn(1.0, z));
  }
  if (lane == 0) {
    st->bad = 0;
    st->max = mx;
    st->argmax = bidx;
    st->z = z;
    st->inv_z = inv_z;
    st->nsup = -1;
  }
}

__global__ void __launch_bounds__(kPrepWarps * 32) tree_prep_warp_kernel(const RowTask* tasks, RowStat* stats,
                                                                         int n_tasks) {
  const int t = blockIdx.x * kPrepWarps + warp_id();
  if (t < n_tasks) prepare_row_warp(tasks[t], stats + t);
}

__global__ void __launch_bounds__(kBlock, 1) tree_walk_kernel(TreeParams p) {
  __shared__ PrepSmem sm;
  tree_walk(p, blockIdx.x, sm);
}

__global__ void __launch_bounds__(kBlock, 1) tree_kernel(TreeParams p) {
  __shared__ PrepSmem sm;
  for (int t = blockIdx.x; t < p.n_tasks; t += gridDim.x) {
    const RowTask task = p.tasks[t];
    prepare_row(task, p.stats + t, p.pool, sm);
    if (finished_owner(p.done, task.owner, p.reqs[task.owner].ntasks, sm)) tree_walk(p, task.owner, sm);
    __syncthreads();
  }
}

template <class K>
int kernel_grid(Workspace& ws, K kernel, int n_tasks) {
  int per_sm = 0;
  OSD_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kBlock, 0));
  return std::max(1, std::min(n_tasks, std::max(1, per_sm) * device_sm_count(ws)));
}

// Floats of scratch a task needs: V (exp terms or probabilities), none for a dense row whose exp
// terms are not stored (the walk then recomputes them from the logits with the same bits).
size_t task_floats(const RowTask& t, bool store_exp) {
  return t.mode == kRowGreedy || (t.mode == kRowDense && !store_exp) ? 0 : static_cast<size_t>(t.vocab);
}

// Gives every non-greedy task its scratch; returns how many rows are sparse (they may need a
// candidate slot).
int assign_rows(std::vector<RowTask>& tasks, Workspace& ws, bool store_exp = true) {
  size_t floats = 0;
  for (auto& t : tasks) floats += task_floats(t, store_exp);
  float* rows = ws.rows.as<float>(std::max<size_t>(floats, 1));
  size_t offset = 0;
  int n_sparse = 0;
  for (auto& t : tasks) {
    if (t.mode == kRowGreedy || (t.mode == kRowDense && !store_exp)) continue;
    if (t.mode == kRowSparse) t.prob_out = rows + offset; else t.e_out = rows + offset;
    offset += task_floats(t, store_exp);
    n_sparse += t.mode == kRowSparse;
  }
  return n_sparse;
}

// The reference walk for the sequences `sel` of the batch (see ChainParams). Their rows' RowStat go
// to stats[0 ..), their origins are appended. Records the timing start event when `record` is set.
void chain_reference_launch(const ChainBatchDevice& in, const std::vector<int32_t>& sel,
                            const std::vector<size_t>& trow, const std::vector<size_t>& drow, Fault fault,
                            RowStat* stats, Workspace& ws, cudaStream_t stream, std::vector<RowOrigin>& origins,
                            bool record) {
  const int32_t V = in.vocab, n = static_cast<int32_t>(sel.size());
  if (n == 0) return;
  std::vector<RowTask> tasks;
  std::vector<ChainSeq> seqs(n);
  for (int32_t k = 0; k < n; ++k) {
    const int32_t b = sel[k], g = in.lengths[b];
    const Sampling& s = in.sampling[b];
    ChainSeq& q = seqs[k];
    q.stream = in.streams[b];
    q.g = g;
    q.greedy = s.greedy() ? 1 : 0;
    q.tok_off = static_cast<int32_t>(drow[b]);
    q.out_off = static_cast<int32_t>(trow[b]);
    q.batch_index = b;
    q.t0 = static_cast<int32_t>(tasks.size());
    for (int32_t i = 0; i <= g; ++i) {
      tasks.push_back(make_row_task(in.target + (trow[b] + i) * V, V, s, k));
      origins.push_back(RowOrigin{b, 0, static_cast<int32_t>(trow[b] + i)});
    }
    q.d0 = -1;
    if (!q.greedy) {
      q.d0 = static_cast<int32_t>(tasks.size());
      for (int32_t i = 0; i < g; ++i) {
        tasks.push_back(make_row_task(in.draft + (drow[b] + i) * V, V, s, k));
        origins.push_back(RowOrigin{b, 1, static_cast<int32_t>(drow[b] + i)});
      }
    }
    q.ntasks = static_cast<int32_t>(tasks.size()) - q.t0;
  }
  const int n_sparse = assign_rows(tasks, ws);
  if (n_sparse > 0 && fault == Fault::None) {  // support lists for the walk's samplers
    auto* sup = ws.sup.as<unsigned long long>(static_cast<size_t>(n_sparse) * kSupCap);
    for (auto& t : tasks)
      if (t.mode == kRowSparse) t.sup = sup, sup += kSupCap;
  }
  const int n_tasks = static_cast<int>(tasks.size());
  const int grid = kernel_grid(ws, chain_kernel, n_tasks);
  ChainParams p{};
  p.n_tasks = n_tasks;
  p.tasks = upload(ws.tasks, ws.host_tasks, tasks, stream);
  p.seqs = upload(ws.seqs, ws.host_seqs, seqs, stream);
  p.stats = stats;
  p.done = ws.done.as<int32_t>(n);
  OSD_CUDA_CHECK(cudaMemsetAsync(p.done, 0, sizeof(int32_t) * n, stream));
  p.tokens = in.tokens;
  p.out_tokens = in.out_tokens;
  p.accepted = in.accepted;
  p.seed = in.seed;
  p.fault = static_cast<int32_t>(fault);
  p.vocab = V;
  p.pool = make_slot_pool(ws, n_sparse, V, grid, stream);
  if (record) record_start(ws, stream);
  chain_kernel<<<grid, kBlock, 0, stream>>>(p);
  OSD_CUDA_CHECK_LAUNCH();
}

}  // namespace

void chain_verify_launch(const ChainBatchDevice& in, Fault fault, Workspace& ws, cudaStream_t stream,
                         std::vector<RowOrigin>* row_origins) {
  const int32_t B = in.batch;
  if (B == 0) {
    if (row_origins) row_origins->clear();
    return;
  }
  // Exactly where the CPU backend runs verify_chain_blocked or a plain argmax (no planted fault;
  // greedy, or temperature only) the blocked scheme; elsewhere the reference walk. (A top-k >= V is
  // a dense row for warp_row but not s.dense(): the CPU then walks the reference.)
  std::vector<int32_t> blocked, reference;
  std::vector<size_t> trow(B + 1, 0), drow(B + 1, 0);  // each sequence's first target and draft row
  size_t rows = 0;
  for (int32_t b = 0; b < B; ++b) {
    const Sampling& s = in.sampling[b];
    (fault == Fault::None && (s.greedy() || s.dense()) ? blocked : reference).push_back(b);
    trow[b + 1] = trow[b] + in.lengths[b] + 1;
    drow[b + 1] = drow[b] + in.lengths[b];
    rows += in.lengths[b] + 1 + (s.greedy() ? 0 : in.lengths[b]);
  }
  RowStat* stats = ws.stats.as<RowStat>(std::max<size_t>(rows, 1));
  std::vector<RowOrigin> origins;
  chain_blocked_launch(in, blocked, trow, drow, stats, ws, stream, origins);
  chain_reference_launch(in, reference, trow, drow, fault, stats + origins.size(), ws, stream, origins,
                         blocked.empty());
  record_stop(ws, stream);
  if (row_origins) *row_origins = std::move(origins);
}

namespace {
std::atomic<TreeLaunch> g_tree_launch{TreeLaunch::Auto};
std::atomic<long> g_split_launches{0};
}  // namespace

void set_tree_launch(TreeLaunch mode) { g_tree_launch.store(mode); }

[[maybe_unused]] const char* const kPhaseNames[kTreePhases] = {
    "row 0: prep start", "row 0: max pass done", "row 0: z done", "walk 0: start", "walk 0: bad rows checked",
    "walk 0: first children tested", "walk 0: rejection 1 done", "walk 0: rejection 2 done",
    "walk 0: rejection 3 done", "walk 0: rejection 4 done", "walk 0: residual sampled", "walk 0: leaf sampled",
    "walk 0: level 0", "walk 0: level 1", "walk 0: level 2", "walk 0: level 3", "walk 0: level 4",
    "walk 0: level 5", "walk 0: level 6", "walk 0: level 7"};

std::vector<TreePhase> tree_phases() {
  std::vector<TreePhase> out;
#ifdef OSD_CUDA_PHASES
  unsigned long long h[32] = {0}, zero[32] = {0};
  OSD_CUDA_CHECK(cudaMemcpyFromSymbol(h, g_osd_phase, sizeof(h)));
  OSD_CUDA_CHECK(cudaMemcpyToSymbol(g_osd_phase, zero, sizeof(zero)));
  for (int i = 0; i < kTreePhases; ++i)
    if (h[i] && h[0]) out.push_back(TreePhase{kPhaseNames[i], (static_cast<double>(h[i]) - static_cast<double>(h[0])) * 1e-3});
#endif
  return out;
}
long tree_split_launches() { return g_split_launches.load(); }

void tree_verify_launch(const TreeRequestDevice* reqs, int32_t count, uint64_t seed, Fault fault, Workspace& ws,
                        cudaStream_t stream, std::vector<RowOrigin>* row_origins) {
  std::vector<RowTask> tasks;
  std::vector<TreeReq> rq(count);
  std::vector<RowOrigin> origins;
  std::vector<int32_t> nodes;  // tokens | next, then first lists
  std::vector<int32_t*> outs(3 * static_cast<size_t>(count));
  int32_t vmax = 1;
  size_t node_total = 0, first_total = 0;
  for (int32_t r = 0; r < count; ++r) node_total += reqs[r].n, first_total += reqs[r].n + 1;
  nodes.assign(2 * node_total + first_total, -1);
  int32_t* tok_h = nodes.data();
  int32_t* next_h = tok_h + node_total;
  int32_t* first_h = next_h + node_total;
  size_t node_off = 0, first_off = 0, scratch = 0;
  for (int32_t r = 0; r < count; ++r) {
    const TreeRequestDevice& d = reqs[r];
    const Sampling& s = d.sampling;
    const int32_t n = d.n, V = d.vocab;
    vmax = std::max(vmax, V);
    TreeReq& q = rq[r];
    q.stream = d.stream;
    q.n = n;
    q.V = V;
    q.greedy = s.greedy() ? 1 : 0;
    q.mode = static_cast<int32_t>(d.mode);
    q.use_draft = (!s.greedy() && d.mode != TreeChildren::Deterministic) ? 1 : 0;
    q.node_off = static_cast<int32_t>(node_off);
    q.first_off = static_cast<int32_t>(first_off);
    // Children lists in node order (verify.cpp): first[parent + 1], next[child].
    std::vector<int32_t> last(n + 1, -1);
    for (int32_t i = 0; i < n; ++i) {
      tok_h[node_off + i] = d.tokens[i];
      const int32_t slot = d.parents[i] + 1;
      if (last[slot] < 0) first_h[first_off + slot] = i; else next_h[node_off + last[slot]] = i;
      last[slot] = i;
    }
    q.t0 = static_cast<int32_t>(tasks.size());
    for (int32_t row = 0; row <= n; ++row) {
      tasks.push_back(make_row_task(d.target + static_cast<size_t>(row) * V, V, s, r));
      origins.push_back(RowOrigin{r, 0, row});
    }
    q.d0 = -1;
    if (q.use_draft) {
      q.d0 = static_cast<int32_t>(tasks.size());
      for (int32_t row = 0; row <= n; ++row) {
        tasks.push_back(make_row_task(d.draft + static_cast<size_t>(row) * V, V, s, r));
        origins.push_back(RowOrigin{r, 1, row});
      }
    }
    q.ntasks = static_cast<int32_t>(tasks.size()) - q.t0;
    outs[r] = d.out_tokens;
    outs[count + r] = d.out_path;
    outs[2 * static_cast<size_t>(count) + r] = d.out_counts;
    if (!q.greedy) scratch += 2 * static_cast<size_t>(V);
    node_off += n;
    first_off += n + 1;
  }
  // Stable order for the RowStat array: the CPU reports the first bad row of a request, target
  // rows before draft rows; tasks interleave per request, so origins say which is which.
  if (row_origins) *row_origins = origins;
  if (count == 0) return;
  // More rows than one wave of row blocks, none top-k / top-p: warp-prepared rows, then the walks,
  // without stored exp terms (most rows of a tree are never visited; the walks recompute the ones
  // they read). Else one launch: row blocks that store the exp terms, the last one of a request walks.
  const int n_tasks = static_cast<int>(tasks.size());
  const int grid = kernel_grid(ws, tree_kernel, n_tasks);
  const TreeLaunch mode = g_tree_launch.load();
  const bool split = mode != TreeLaunch::OneKernel && (n_tasks > grid || mode == TreeLaunch::Split) &&
                     std::none_of(tasks.begin(), tasks.end(), [](const RowTask& t) { return t.mode == kRowSparse; });
  if (split) g_split_launches.fetch_add(1);
  const int n_sparse = assign_rows(tasks, ws, !split);
  float* pdqd = ws.misc.as<float>(std::max<size_t>(scratch, 1));
  size_t off = 0;
  for (auto& q : rq) {
    if (q.greedy) continue;
    q.pd = pdqd + off;
    q.qd = pdqd + off + q.V;
    off += 2 * static_cast<size_t>(q.V);
  }
  TreeParams p{};
  p.n_tasks = n_tasks;
  p.tasks = upload(ws.tasks, ws.host_tasks, tasks, stream);
  p.reqs = upload(ws.seqs, ws.host_seqs, rq, stream);
  const int32_t* nodes_d = upload(ws.nodes, ws.host_nodes, nodes, stream);
  p.tokens = nodes_d;
  p.next = nodes_d + node_total;
  p.first = nodes_d + 2 * node_total;
  // Output pointers live in misc2 (three arrays of `count` pointers).
  static thread_local std::vector<unsigned char> outs_host;
  int32_t** outs_d = upload(ws.misc2, outs_host, outs, stream);
  p.out_tokens = outs_d;
  p.out_path = outs_d + count;
  p.out_counts = outs_d + 2 * static_cast<size_t>(count);
  p.stats = ws.stats.as<RowStat>(n_tasks);
  if (!split) {  // the one-kernel launch counts each request's prepared rows to find its walker
    p.done = ws.done.as<int32_t>(count);
    OSD_CUDA_CHECK(cudaMemsetAsync(p.done, 0, sizeof(int32_t) * count, stream));
  }
  p.seed = seed;
  p.fault = static_cast<int32_t>(fault);
  p.pool = make_slot_pool(ws, n_sparse, vmax, grid, stream);
  record_start(ws, stream);
  if (split) {
    tree_prep_warp_kernel<<<(n_tasks + kPrepWarps - 1) / kPrepWarps, kPrepWarps * 32, 0, stream>>>(p.tasks, p.stats,
                                                                                                  n_tasks);
    OSD_CUDA_CHECK_LAUNCH();
    tree_walk_kernel<<<count, kBlock, 0, stream>>>(p);
  } else {
    tree_kernel<<<grid, kBlock, 0, stream>>>(p);
  }
  OSD_CUDA_CHECK_LAUNCH();
  record_stop(ws, stream);
}

}  // namespace cuda
}  // namespace osd
