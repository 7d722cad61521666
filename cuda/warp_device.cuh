// Device code of the warping family: row preparation (validation, max/argmax, exact softmax sums,
// top-k / top-p supports) and the certified samplers. Included by the sources that prepare rows or
// reuse its block helpers: warp.cu, verify.cu, chain_blocked.cu and distill.cu.
// See warp.cuh for what is reproduced exactly and how.
#pragma once
#include "warp.cuh"

namespace osd {
namespace cuda {

constexpr int kZTile = 256;     // 16-lane groups per tile of the z chains (2 x 16 KiB double buffer)
constexpr int kSmemCand = 4096;  // candidates sorted in shared memory; larger sets use a pool slot
constexpr int kSeqTileCand = 2 * 16 * kZTile;  // floats staged at a time through PrepSmem::u.zbuf

struct PrepSmem {
  union alignas(16) {
    float zbuf[2 * 16 * kZTile];
    unsigned long long cand[kSmemCand];
  } u;
  uint32_t hist[256];
  float tmax[kBlock];  // each thread's max over its share of the row (prepare_row), for select_top_m
  float accs[16];
  BlockRed red;
  int32_t scan[kWarps];
  double bd[4];
  int32_t bi[8];
  float thr;
  unsigned long long* bptr;
};

// The RowStat of a row that fails validation: NaN or +Infinity (bad), else all -Infinity.
__device__ __forceinline__ void set_bad_row(RowStat* st, int bad, float mx) {
  st->bad = bad ? 1 : 2;
  st->max = mx;
  st->argmax = 0;
  st->z = 0.0;
  st->inv_z = 0.0f;
  st->nsup = -1;
}

// ---------------------------------------------------------------------------------------------
// z = sum_exp(l, V, max, inv_t) in the CPU's exact order; optionally stores every exp term.

// Warp 0's lanes 0-15 run the 16 float chains; the other warps load the row, compute the exp terms
// and stage them tile by tile in shared memory, lane k's terms contiguous (a row of kZStride floats
// per lane) so a chain reads four terms per load. The producers hold the next tile's logits in
// registers while the chains sum the current one, so their load latency overlaps the chains.
constexpr int kZGroups = 248;  // 16-term groups per tile (a multiple of 4)
constexpr int kZStride = 252;  // floats per lane row: a multiple of 4, 28 mod 32 (2-way bank conflicts at most)
static_assert(2 * 16 * kZStride <= 2 * 16 * kZTile, "z tiles must fit PrepSmem::u.zbuf");

static __device__ __noinline__ double z_exact(const float* l, int V, float mx, float inv_t, float* e_out, PrepSmem& sm) {
  const int tid = threadIdx.x, warp = warp_id(), lane = lane_id();
  const int M = V / 16;  // full 16-lane groups
  const int ntiles = (M + kZGroups - 1) / kZGroups;
  constexpr int NP = kBlock - 32;  // producer threads (warps 1..)
  constexpr int PF = (kZGroups * 4 + NP - 1) / NP;  // float4s a producer loads per tile
  // Rows and exp-term rows start 16-byte aligned when V % 4 == 0: producers then move float4s
  // (tiles hold whole 16-term groups, so an aligned row is all the float4 path needs).
  const bool vec = ((reinterpret_cast<uintptr_t>(l) | reinterpret_cast<uintptr_t>(e_out)) & 15u) == 0;
  float4 x[PF];
  auto load = [&](int t) {  // tile t's logits into registers (vec only)
    const int g0 = t * kZGroups, cnt4 = min(kZGroups, M - g0) * 4;
    const float4* s4 = reinterpret_cast<const float4*>(l + static_cast<size_t>(g0) * 16);
#pragma unroll
    for (int k = 0; k < PF; ++k) {
      const int i = tid - 32 + k * NP;
      if (i < cnt4) x[k] = s4[i];
    }
  };
  auto put = [&](float* b, int m, int lane16, float e) { b[lane16 * kZStride + m] = e; };
  auto produce = [&](int t) {  // tile t's exp terms into buffer t & 1 (and e_out)
    const int g0 = t * kZGroups, cnt = min(kZGroups, M - g0);
    float* b = sm.u.zbuf + (t & 1) * 16 * kZStride;
    float* dst = e_out ? e_out + static_cast<size_t>(g0) * 16 : nullptr;
    if (vec) {
      float4* d4 = reinterpret_cast<float4*>(dst);
#pragma unroll
      for (int k = 0; k < PF; ++k) {
        const int i = tid - 32 + k * NP;
        if (i < cnt * 4) {
          float4 e;
          e.x = exp_fast(scaled_logit(x[k].x, mx, inv_t));
          e.y = exp_fast(scaled_logit(x[k].y, mx, inv_t));
          e.z = exp_fast(scaled_logit(x[k].z, mx, inv_t));
          e.w = exp_fast(scaled_logit(x[k].w, mx, inv_t));
          const int m = i >> 2, k0 = (i & 3) * 4;  // terms 4 i .. 4 i + 3: group m, lanes k0 ..
          put(b, m, k0, e.x), put(b, m, k0 + 1, e.y), put(b, m, k0 + 2, e.z), put(b, m, k0 + 3, e.w);
          if (d4) d4[i] = e;
        }
      }
    } else {
      const float* src = l + static_cast<size_t>(g0) * 16;
      for (int i = tid - 32; i < cnt * 16; i += NP) {
        const float e = exp_fast(scaled_logit(src[i], mx, inv_t));
        put(b, i >> 4, i & 15, e);
        if (dst) dst[i] = e;
      }
    }
  };
  float acc = 0.0f;
  if (warp != 0 && ntiles > 0) {
    if (vec) load(0);
    produce(0);
    if (vec && ntiles > 1) load(1);
  }
  __syncthreads();
  for (int t = 0; t < ntiles; ++t) {
    if (warp == 0) {
      if (lane < 16) {
        const float* b = sm.u.zbuf + (t & 1) * 16 * kZStride + lane * kZStride;
        const int cnt = min(kZGroups, M - t * kZGroups);
        // Software-pipelined: the next 16 terms load while the chain adds the current 16, so the
        // chain runs at the add latency rather than the shared-memory latency.
        auto add4 = [&](float4 v) { acc = __fadd_rn(__fadd_rn(__fadd_rn(__fadd_rn(acc, v.x), v.y), v.z), v.w); };
        const float4* b4 = reinterpret_cast<const float4*>(b);
        const int n16 = cnt / 16;
        int m = 0;
        if (n16 > 0) {
          float4 v0 = b4[0], v1 = b4[1], v2 = b4[2], v3 = b4[3];
          for (int i = 1; i < n16; ++i) {
            const float4 w0 = b4[4 * i], w1 = b4[4 * i + 1], w2 = b4[4 * i + 2], w3 = b4[4 * i + 3];
            add4(v0), add4(v1), add4(v2), add4(v3);
            v0 = w0, v1 = w1, v2 = w2, v3 = w3;
          }
          add4(v0), add4(v1), add4(v2), add4(v3);
          m = 16 * n16;
        }
        for (; m < cnt; ++m) acc = __fadd_rn(acc, b[m]);
      }
    } else if (t + 1 < ntiles) {
      produce(t + 1);
      if (vec && t + 2 < ntiles) load(t + 2);
    }
    __syncthreads();
  }
  if (warp == 0 && lane < 16) sm.accs[lane] = acc;
  if (tid == 0) {
    double tail = 0.0;
    for (int j = 16 * M; j < V; ++j) {
      const float e = exp_fast(scaled_logit(l[j], mx, inv_t));
      if (e_out) e_out[j] = e;
      tail += static_cast<double>(e);
    }
    sm.bd[0] = tail;
  }
  __syncthreads();
  double total = sm.bd[0];
  for (int k = 0; k < 16; ++k) total += static_cast<double>(sm.accs[k]);
  __syncthreads();
  return total;
}

// ---------------------------------------------------------------------------------------------
// Radix select: the value of the (rank)-th smallest 32-bit key among the valid elements (0-based),
// with how many valid elements equal it and the rank among those equal elements.

// Keys: by_id == false: desc_key(l[j]) of every element; by_id == true: the id j of the elements
// whose desc_key equals tie_key (to resolve ties at the selection boundary by lowest id).
static __device__ __noinline__ uint32_t radix_select(const float* l, int n, bool by_id, uint32_t tie_key, int rank,
                                              int* count_eq, int* rank_eq, PrepSmem& sm) {
  const int tid = threadIdx.x, lane = lane_id();
  uint32_t prefix = 0, pmask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = tid; b < 256; b += kBlock) sm.hist[b] = 0;
    __syncthreads();
    for (int base = 0; base < n; base += kBlock) {
      const int j = base + tid;
      bool valid = j < n;
      uint32_t k = 0;
      if (valid) {
        const uint32_t dk = desc_key(l[j]);
        k = by_id ? static_cast<uint32_t>(j) : dk;
        valid = (!by_id || dk == tie_key) && (k & pmask) == prefix;
      }
      const uint32_t bucket = valid ? ((k >> shift) & 255u) : 256u;
      const unsigned peers = __match_any_sync(0xffffffffu, bucket);
      if (valid && lane == __ffs(peers) - 1) atomicAdd(&sm.hist[bucket], static_cast<uint32_t>(__popc(peers)));
    }
    __syncthreads();
    if (tid == 0) {
      uint32_t cum = 0;
      int b = 0;
      for (; b < 255; ++b) {
        if (cum + sm.hist[b] > static_cast<uint32_t>(rank)) break;
        cum += sm.hist[b];
      }
      sm.bi[0] = b;
      sm.bi[1] = static_cast<int32_t>(sm.hist[b]);
      sm.bi[2] = rank - static_cast<int>(cum);
    }
    __syncthreads();
    prefix |= static_cast<uint32_t>(sm.bi[0]) << shift;
    pmask |= 255u << shift;
    rank = sm.bi[2];
    *count_eq = sm.bi[1];
    __syncthreads();
  }
  *rank_eq = rank;
  return prefix;
}

// Appends with one shared atomic per warp. Every thread of the block must call it.
__device__ __forceinline__ void block_append(bool take, unsigned long long value, unsigned long long* out,
                                             int32_t* counter) {
  const unsigned mask = __ballot_sync(0xffffffffu, take);
  if (!mask) return;
  const int lane = lane_id();
  int base = 0;
  if (lane == __ffs(mask) - 1) base = atomicAdd(counter, __popc(mask));
  base = __shfl_sync(0xffffffffu, base, __ffs(mask) - 1);
  if (take) out[base + __popc(mask & ((1u << lane) - 1u))] = value;
}

// Bitonic sort (all comparators ascending, so any n works without padding memory).
static __device__ __noinline__ void block_sort_u64(unsigned long long* a, int n) {
  int N = 1;
  while (N < n) N <<= 1;
  for (int k = 2; k <= N; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < N; i += kBlock) {
        const int p = (j == (k >> 1)) ? (i ^ (k - 1)) : (i ^ j);
        if (p > i && p < n) {
          const unsigned long long x = a[i], y = a[p];
          if (x > y) a[i] = y, a[p] = x;
        }
      }
      __syncthreads();
    }
  }
}

// Fast path of select_top_m for m <= kBlock with the candidates in shared memory: threshold, gather,
// sort. The threads' maxima (sm.tmax, disjoint shares of the row) are merged into n_g >= 2m group
// maxima; T = the m-th largest of them. At least m entries are >= T (one per group above it), so
// {x >= T} holds the top m, usually about 1.4 m entries. One pass over the row instead of the radix
// select's four to eight. Returns false (nothing decided) when the set overflows kSmemCand entries.
static __device__ __noinline__ bool select_top_m_fast(const float* l, int V, int m, unsigned long long* cand, PrepSmem& sm) {
  const int tid = threadIdx.x;
  int groups = 32;
  while (groups < 2 * m && groups < kBlock) groups <<= 1;
  const int per = kBlock / groups;  // threads per group: a power of two <= 16, within one warp
  float gm = sm.tmax[tid];
  for (int o = 1; o < per; o <<= 1) {
    const float w = __shfl_xor_sync(0xffffffffu, gm, o);
    gm = w > gm ? w : gm;
  }
  float* gmx = sm.u.zbuf;  // free until the gather below
  if ((tid & (per - 1)) == 0) gmx[tid / per] = gm;
  if (tid == 0) sm.bi[4] = 0;
  __syncthreads();
  if (tid < groups) {
    // Rank by (value desc, group asc): exactly one group has rank m - 1.
    const float mine = gmx[tid];
    int ahead = 0;
    for (int i = 0; i < groups; ++i) {
      const float o = gmx[i];
      ahead += (o > mine || (o == mine && i < tid)) ? 1 : 0;
    }
    if (ahead == m - 1) sm.thr = mine;
  }
  __syncthreads();
  const float T = sm.thr;
  auto take = [&](int j, float x, bool valid) {
    const bool t = valid && x >= T;
    const unsigned mask = __ballot_sync(0xffffffffu, t);
    if (!mask) return;
    const int lane = lane_id();
    int base = 0;
    if (lane == __ffs(mask) - 1) base = atomicAdd(&sm.bi[4], __popc(mask));
    base = __shfl_sync(0xffffffffu, base, __ffs(mask) - 1);
    const int at = base + __popc(mask & ((1u << lane) - 1u));
    if (t && at < kSmemCand) cand[at] = (static_cast<unsigned long long>(desc_key(x)) << 32) | static_cast<uint32_t>(j);
  };
  constexpr int U = 8;  // loads in flight per thread (scalar: float4s here cost the tree walk registers)
  for (int base = 0; base < V; base += U * kBlock) {  // uniform across the warp: the ballots stay warp-wide
    float x[U];
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const int j = base + k * kBlock + tid;
      x[k] = j < V ? l[j] : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < U; ++k) {
      const int j = base + k * kBlock + tid;
      take(j, x[k], j < V);
    }
  }
  __syncthreads();
  const int n = sm.bi[4];
  __syncthreads();
  if (n > kSmemCand) return false;
  block_sort_u64(cand, n);
  return true;
}

// The m best elements of a row by (logit desc, id asc), sorted, as (desc_key << 32 | id).
static __device__ __noinline__ void select_top_m(const float* l, int V, int m, unsigned long long* cand, PrepSmem& sm) {
  const int tid = threadIdx.x;
  if (m < V && m <= kBlock && cand == sm.u.cand && select_top_m_fast(l, V, m, cand, sm)) return;
  if (tid == 0) sm.bi[4] = 0;
  __syncthreads();
  if (m >= V) {
    for (int base = 0; base < V; base += kBlock) {
      const int j = base + tid;
      const bool take = j < V;
      block_append(take, take ? ((static_cast<unsigned long long>(desc_key(l[j])) << 32) | static_cast<uint32_t>(j)) : 0,
                   cand, &sm.bi[4]);
    }
  } else {
    int count_eq = 0, rank_eq = 0;
    const uint32_t tau = radix_select(l, V, false, 0u, m - 1, &count_eq, &rank_eq, sm);
    const int need_eq = rank_eq + 1;
    uint32_t id_cut = 0xffffffffu;  // ties at tau: the need_eq lowest ids
    if (need_eq < count_eq) {
      int ce2 = 0, re2 = 0;
      id_cut = radix_select(l, V, true, tau, need_eq - 1, &ce2, &re2, sm);
    }
    for (int base = 0; base < V; base += kBlock) {
      const int j = base + tid;
      uint32_t k = 0xffffffffu;
      if (j < V) k = desc_key(l[j]);
      const bool take = j < V && (k < tau || (k == tau && static_cast<uint32_t>(j) <= id_cut));
      block_append(take, (static_cast<unsigned long long>(k) << 32) | static_cast<uint32_t>(j), cand, &sm.bi[4]);
    }
  }
  __syncthreads();
  block_sort_u64(cand, m < V ? m : V);
}

// Sequential double sum of the exp terms packed in cand[0..n) (high words), in order, by thread 0;
// with stop_at_target, stops at the first i whose running sum reaches target (*stop = i, else -1).
// Candidates in global memory are staged through shared memory tile by tile.
static __device__ __noinline__ double cand_scan(const unsigned long long* cand, int n, bool staged, bool stop_at_target,
                                                double target, int* stop, PrepSmem& sm) {
  auto e_of = [](unsigned long long c) { return __uint_as_float(static_cast<uint32_t>(c >> 32)); };
  double acc = 0.0;
  int at = -1;
  if (!staged) {
    if (threadIdx.x == 0)
      for (int i = 0; i < n; ++i) {
        acc += static_cast<double>(e_of(cand[i]));
        if (stop_at_target && acc >= target) {
          at = i;
          break;
        }
      }
  } else {
    for (int base = 0; base < n; base += kSeqTileCand) {
      const int cnt = min(kSeqTileCand, n - base);
      for (int i = threadIdx.x; i < cnt; i += kBlock) sm.u.zbuf[i] = e_of(cand[base + i]);
      __syncthreads();
      if (threadIdx.x == 0) {
        for (int i = 0; i < cnt; ++i) {
          acc += static_cast<double>(sm.u.zbuf[i]);
          if (stop_at_target && acc >= target) {
            at = base + i;
            break;
          }
        }
        sm.bi[3] = at;
      }
      __syncthreads();
      const int s = sm.bi[3];
      __syncthreads();
      if (s >= 0) break;
    }
  }
  if (threadIdx.x == 0) sm.bd[3] = acc, sm.bi[3] = at;
  __syncthreads();
  acc = sm.bd[3];
  *stop = sm.bi[3];
  __syncthreads();
  return acc;
}

// ---------------------------------------------------------------------------------------------
// Row preparation: validation, max/argmax, then the warp of the row's mode.

// A thread's (or a warp lane's) share of a row's max pass: entries first, first + kStride, ... in
// increasing index order, so argmax ties stay with the lowest index; four float4 loads in flight
// per thread when the row is aligned. bad: a NaN or +Infinity was seen.
struct RowScan {
  float mx, bv;
  int bidx, bad;
};
template <int kStride>
__device__ __forceinline__ RowScan scan_row(const float* l, int V, int first) {
  RowScan r{-INFINITY, -INFINITY, -1, 0};
  auto visit = [&](float x, int j) {
    r.mx = x > r.mx ? x : r.mx;
    r.bad |= (!(x <= FLT_MAX)) & (x != -INFINITY);
    if (r.bidx < 0 || x > r.bv) r.bv = x, r.bidx = j;
  };
  if (V % 4 == 0 && (reinterpret_cast<uintptr_t>(l) & 15u) == 0) {
    const float4* l4 = reinterpret_cast<const float4*>(l);
    const int V4 = V / 4;
    constexpr int U = 4;
    for (int base = first; base < V4; base += U * kStride) {
      float4 a[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (base + u * kStride < V4) a[u] = __ldg(l4 + base + u * kStride);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int q = base + u * kStride;
        if (q < V4) visit(a[u].x, 4 * q), visit(a[u].y, 4 * q + 1), visit(a[u].z, 4 * q + 2), visit(a[u].w, 4 * q + 3);
      }
    }
  } else {
    for (int j = first; j < V; j += kStride) visit(__ldg(l + j), j);
  }
  return r;
}

static __device__ __noinline__ void prepare_row(const RowTask& t, RowStat* st, const SlotPool& pool, PrepSmem& sm) {
  const int tid = threadIdx.x;
  [[maybe_unused]] const bool timed = tid == 0 && blockIdx.x == 0 && t.mode == kRowDense;  // OSD_PHASE slots 0-2
  OSD_PHASE(timed, 0);
  const int V = t.vocab;
  const float* l = t.logits;
  const RowScan rs = scan_row<kBlock>(l, V, tid);
  float mx = rs.mx;
  int bad = rs.bad;
  sm.tmax[tid] = mx;
  mx = block_max(mx, sm.red);
  bad = block_or(bad, sm.red);
  const int amax = block_argmax(rs.bv, rs.bidx, sm.red);
  if (bad || mx == -INFINITY) {
    if (tid == 0) set_bad_row(st, bad, mx);
    return;
  }
  double z = 0.0;
  float inv_z = 0.0f;
  int nsup = -1;
  if (t.mode == kRowDense) {
    OSD_PHASE(timed, 1);
    z = z_exact(l, V, mx, t.inv_t, t.e_out, sm);
    OSD_PHASE(timed, 2);
    inv_z = __double2float_rn(__ddiv_rn(1.0, z));
  } else if (t.mode == kRowSparse) {
    const bool use_k = t.top_k > 0 && t.top_k < V;
    const bool use_p = t.top_p < 1.0f;
    float cut = -INFINITY;
    if (!use_k) {
      z = z_exact(l, V, mx, t.inv_t, nullptr, sm);
      const double floor_p = 0.5 * (1.0 - static_cast<double>(t.top_p)) / V;
      cut = static_cast<float>(static_cast<double>(mx) + log(floor_p * z) / static_cast<double>(t.inv_t));
    }
    int m = use_k ? t.top_k : min(V, 256);
    int slot = -1;
    unsigned long long* cand = sm.u.cand;
    int keep = 0;
    double kept = 0.0;
    for (;;) {
      if (m > kSmemCand && slot < 0) {
        if (tid == 0) {
          int s = -1;
          for (;;) {
            for (int k = 0; k < pool.n_slots && s < 0; ++k)
              if (atomicCAS(&pool.locks[k], 0, 1) == 0) s = k;
            if (s >= 0) break;
            __nanosleep(1000);
          }
          __threadfence();
          sm.bi[5] = s;
        }
        __syncthreads();
        slot = sm.bi[5];
        cand = pool.base + static_cast<long long>(slot) * pool.slot_elems;
        __syncthreads();
      }
      select_top_m(l, V, m, cand, sm);
      // Replace each key by (exp term << 32 | id), flagging ids below the top-p prefilter cut.
      for (int i = tid; i < m; i += kBlock) {
        const unsigned long long ck = cand[i];
        const float x = desc_key_to_float(static_cast<uint32_t>(ck >> 32));
        const float e = exp_fast(scaled_logit(x, mx, t.inv_t));
        const uint32_t below = (!use_k && !(x >= cut)) ? 0x80000000u : 0u;
        cand[i] = (static_cast<unsigned long long>(__float_as_uint(e)) << 32) | (static_cast<uint32_t>(ck) | below);
      }
      __syncthreads();
      // The CPU's sequential sums over the sorted candidates (warp_row): total, the nucleus, kept.
      const bool staged = cand != sm.u.cand;
      int n_eff = m;
      if (!use_k) {
        int first_below = m;
        for (int i = tid; i < m; i += kBlock)
          if (static_cast<uint32_t>(cand[i]) & 0x80000000u) first_below = min(first_below, i);
        n_eff = block_min_int(first_below, sm.red);
      }
      int stop = -1;
      const double total = use_k ? cand_scan(cand, m, staged, false, 0.0, &stop, sm) : z;
      int kp = n_eff;
      bool found = !use_p;
      if (use_p) {
        cand_scan(cand, n_eff, staged, true, static_cast<double>(t.top_p) * total, &stop, sm);
        if (stop >= 0) kp = stop + 1, found = true;
      }
      const int grow_now = (!found && !use_k && n_eff == m && m < V) ? 1 : 0;
      if (!grow_now) {
        const double kt = cand_scan(cand, kp, staged, false, 0.0, &stop, sm);
        if (tid == 0) sm.bd[1] = kt;
      }
      if (tid == 0) sm.bi[6] = grow_now, sm.bi[7] = kp;
      __syncthreads();
      const int grow = sm.bi[6];
      keep = sm.bi[7];
      kept = sm.bd[1];
      __syncthreads();
      if (!grow) break;
      m = min(V, m * 8);
    }
    for (int j = tid; j < V; j += kBlock) t.prob_out[j] = 0.0f;
    __syncthreads();
    const bool sup = t.sup != nullptr && keep <= kSupCap;
    for (int i = tid; i < keep; i += kBlock) {
      const unsigned long long ck = cand[i];
      const float e = __uint_as_float(static_cast<uint32_t>(ck >> 32));
      const uint32_t id = static_cast<uint32_t>(ck) & 0x7fffffffu;
      const float pr = __double2float_rn(__ddiv_rn(static_cast<double>(e), kept));
      t.prob_out[id] = pr;
      if (sup) cand[i] = (static_cast<unsigned long long>(id) << 32) | __float_as_uint(pr);
    }
    __syncthreads();
    if (sup) {  // the support in id order, as WarpedRow keeps it: the sampler then scans keep entries, not V
      block_sort_u64(cand, keep);
      for (int i = tid; i < keep; i += kBlock) t.sup[i] = cand[i];
      nsup = keep;
      __syncthreads();
    }
    if (slot >= 0 && tid == 0) {
      __threadfence();
      atomicExch(&pool.locks[slot], 0);
    }
  }
  if (tid == 0) {
    st->bad = 0;
    st->max = mx;
    st->argmax = amax;
    st->z = z;
    st->inv_z = inv_z;
    st->nsup = nsup;
  }
}

// ---------------------------------------------------------------------------------------------
// A prepared row as the walks read it (written by other blocks of the same launch: loads go via L2).

struct RowRef {
  const float* e;     // dense: exp terms, or nullptr when they were not stored (recomputed from l)
  const float* l;     // dense: the logits
  const float* prob;  // sparse: probabilities
  const unsigned long long* sup;  // sparse: the support in id order (nsup entries), when nsup >= 0
  int32_t nsup;
  double z;
  float inv_z;
  float mx, inv_t;
  int32_t mode;
  int32_t argmax;
};

__device__ __forceinline__ RowRef load_row(const RowTask& t, const RowStat* st) {
  RowRef r;
  r.e = t.e_out;
  r.l = t.logits;
  r.prob = t.prob_out;
  r.sup = t.sup;
  r.nsup = t.sup ? ld_cg(&st->nsup) : -1;
  r.mode = t.mode;
  r.z = ld_cg(&st->z);
  r.inv_z = ld_cg(&st->inv_z);
  r.mx = ld_cg(&st->max);
  r.inv_t = t.inv_t;
  r.argmax = ld_cg(&st->argmax);
  return r;
}

// A dense row's exp term j: stored, or recomputed with the same bits (z_exact's exp_fast(scaled_logit)).
__device__ __forceinline__ float row_exp(const RowRef& r, int j) {
  return r.e ? ld_cg(r.e + j) : exp_fast(scaled_logit(__ldg(r.l + j), r.mx, r.inv_t));
}
// WarpedRow::to_dense(j).
__device__ __forceinline__ float row_dense(const RowRef& r, int j) {
  return r.mode == kRowSparse ? ld_cg(r.prob + j) : __fmul_rn(row_exp(r, j), r.inv_z);
}
// WarpedRow::prob(x).
__device__ __forceinline__ double row_prob(const RowRef& r, int x) {
  return r.mode == kRowSparse ? static_cast<double>(ld_cg(r.prob + x))
                              : __ddiv_rn(static_cast<double>(row_exp(r, x)), r.z);
}
// The weights sample_row() scans.
__device__ __forceinline__ float row_weight(const RowRef& r, int j) {
  return r.mode == kRowSparse ? ld_cg(r.prob + j) : row_exp(r, j);
}

// ---------------------------------------------------------------------------------------------
// sample_weights(w, n, sum_j w_j in index order, u) for non-negative weights, certified.
// Returns -1 when every weight is 0. Every thread of the block must call it; all get the result.

// The weights the samplers scan, by kind (one instantiation keeps the kernels small).
enum WeightKind : int32_t {
  kWeightRow = 0,       // sample_row(P): exp terms (dense) or probabilities (sparse)
  kWeightDense = 1,     // P.to_dense
  kWeightResidual = 2,  // max(0, P.to_dense - Q.to_dense)
  kWeightPositive = 3,  // max(0, v[j]) over a float vector
  kWeightRaw = 4,       // v[j] as it is (normalise() sums signed values under a planted fault)
  kWeightSupRow = 5,    // sample_row(P) over P's support list: entry i's probability
  kWeightSupResidual = 6,  // sample_residual over P's support: max(0, p_i - Q.prob(id_i))
  kWeightPositiveScaled = 7,  // max(0, v[j] * scale) (a vector whose normalise() is still to apply)
};
struct WeightSrc {
  RowRef p, q;
  const float* v;
  float scale;
  int32_t kind;
};
template <int K>
__device__ __forceinline__ float weight_k(const WeightSrc& w, int j) {
  if (K == kWeightRow) return row_weight(w.p, j);
  if (K == kWeightDense) return row_dense(w.p, j);
  if (K == kWeightResidual) {
    const float r = __fsub_rn(row_dense(w.p, j), row_dense(w.q, j));
    return r > 0.0f ? r : 0.0f;
  }
  if (K == kWeightPositive) {
    const float x = w.v[j];
    return x > 0.0f ? x : 0.0f;
  }
  if (K == kWeightPositiveScaled) {
    const float x = __fmul_rn(w.v[j], w.scale);
    return x > 0.0f ? x : 0.0f;
  }
  if (K == kWeightSupRow) return __uint_as_float(static_cast<uint32_t>(ld_cg(w.p.sup + j)));
  if (K == kWeightSupResidual) {
    const unsigned long long e = ld_cg(w.p.sup + j);
    const float r = __fsub_rn(__uint_as_float(static_cast<uint32_t>(e)), ld_cg(w.q.prob + (e >> 32)));
    return r > 0.0f ? r : 0.0f;
  }
  return w.v[j];
}
__device__ __forceinline__ float weight_at(const WeightSrc& w, int j) {
  switch (w.kind) {
    case kWeightRow:
      return weight_k<kWeightRow>(w, j);
    case kWeightDense:
      return weight_k<kWeightDense>(w, j);
    case kWeightResidual:
      return weight_k<kWeightResidual>(w, j);
    case kWeightPositive:
      return weight_k<kWeightPositive>(w, j);
    case kWeightPositiveScaled:
      return weight_k<kWeightPositiveScaled>(w, j);
    case kWeightSupRow:
      return weight_k<kWeightSupRow>(w, j);
    case kWeightSupResidual:
      return weight_k<kWeightSupResidual>(w, j);
    default:
      return weight_k<kWeightRaw>(w, j);
  }
}
// A lane's share of sum_{lo <= j < hi} w_j (lanes stride by 32), four loads in flight. Any order is
// fine: the samplers' error bounds hold for every summation order.
template <int K>
__device__ __forceinline__ double lane_sum_k(const WeightSrc& w, int lo, int hi) {
  double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
  int j = lo + lane_id();
  for (; j + 224 < hi; j += 256) {  // eight loads in flight
    float x[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) x[k] = weight_k<K>(w, j + 32 * k);
    s0 += x[0], s1 += x[1], s2 += x[2], s3 += x[3];
    s0 += x[4], s1 += x[5], s2 += x[6], s3 += x[7];
  }
  for (; j + 96 < hi; j += 128) {
    const float a = weight_k<K>(w, j), b = weight_k<K>(w, j + 32), c = weight_k<K>(w, j + 64), d = weight_k<K>(w, j + 96);
    s0 += a, s1 += b, s2 += c, s3 += d;
  }
  for (; j < hi; j += 32) s0 += weight_k<K>(w, j);
  return (s0 + s1) + (s2 + s3);
}
__device__ __forceinline__ double lane_sum(const WeightSrc& w, int lo, int hi) {
  switch (w.kind) {
    case kWeightRow:
      return lane_sum_k<kWeightRow>(w, lo, hi);
    case kWeightDense:
      return lane_sum_k<kWeightDense>(w, lo, hi);
    case kWeightResidual:
      return lane_sum_k<kWeightResidual>(w, lo, hi);
    case kWeightPositive:
      return lane_sum_k<kWeightPositive>(w, lo, hi);
    case kWeightPositiveScaled:
      return lane_sum_k<kWeightPositiveScaled>(w, lo, hi);
    case kWeightSupRow:
      return lane_sum_k<kWeightSupRow>(w, lo, hi);
    case kWeightSupResidual:
      return lane_sum_k<kWeightSupResidual>(w, lo, hi);
    default:
      return lane_sum_k<kWeightRaw>(w, lo, hi);
  }
}
__device__ __forceinline__ WeightSrc weights_of(int32_t kind, const RowRef& p, const RowRef& q = RowRef{},
                                                const float* v = nullptr, float scale = 1.0f) {
  WeightSrc w;
  w.p = p;
  w.q = q;
  w.v = v;
  w.scale = scale;
  w.kind = kind;
  return w;
}

// The CPU's sequential loops, literally, for the rare cases the error bounds cannot decide: thread 0
// accumulates in index order while the block stages the weights through shared memory.
constexpr int kSeqTile = 2 * 16 * kZTile;  // floats of PrepSmem::u.zbuf

static __device__ __noinline__ double seq_total(const WeightSrc& w, int n, PrepSmem& sm) {
  double tot = 0.0;
  for (int base = 0; base < n; base += kSeqTile) {
    const int cnt = min(kSeqTile, n - base);
    for (int i = threadIdx.x; i < cnt; i += kBlock) sm.u.zbuf[i] = weight_at(w, base + i);
    __syncthreads();
    if (threadIdx.x == 0)
      for (int i = 0; i < cnt; ++i) tot += static_cast<double>(sm.u.zbuf[i]);
    __syncthreads();
  }
  if (threadIdx.x == 0) sm.bd[3] = tot;
  __syncthreads();
  tot = sm.bd[3];
  __syncthreads();
  return tot;
}

// sample_weights(): the first j with w_j > 0 whose running sum exceeds u * total; the last j with
// w_j > 0 when rounding leaves u * total at the top; -1 when every weight is 0.
static __device__ __noinline__ int seq_sample(const WeightSrc& w, int n, double u, PrepSmem& sm) {
  const double tot = seq_total(w, n, sm);
  if (!(tot > 0.0)) return -1;
  const double tg = u * tot;
  double cum = 0.0;
  int res = -1;
  for (int base = 0; base < n; base += kSeqTile) {
    const int cnt = min(kSeqTile, n - base);
    for (int i = threadIdx.x; i < cnt; i += kBlock) sm.u.zbuf[i] = weight_at(w, base + i);
    __syncthreads();
    if (threadIdx.x == 0) {
      int done = 0;
      for (int i = 0; i < cnt; ++i) {
        const float v = sm.u.zbuf[i];
        if (v <= 0.0f) continue;
        cum += v;
        res = base + i;
        if (cum > tg) {
          done = 1;
          break;
        }
      }
      sm.bi[3] = res;
      sm.bi[4] = done;
    }
    __syncthreads();
    const int done = sm.bi[4];
    res = sm.bi[3];
    __syncthreads();
    if (done) break;
  }
  return res;
}

static __device__ __noinline__ int block_sample(const WeightSrc& w, int n, double u, PrepSmem& sm) {
  const int tid = threadIdx.x, warp = warp_id(), lane = lane_id();
  // status: 0 searching, 1 fallback, 2 done (result in bi[3]), 3 all zero
  int lo = 0, hi = n, status = 0;
  double base = 0.0, target = 0.0, margin = 0.0;
  bool first = true;
  do {
    const int len = hi - lo, L = (len + kWarps - 1) / kWarps;
    const int plo = min(hi, lo + warp * L), phi = min(hi, plo + L);
    double s = warp_sum(lane_sum(w, plo, phi));
    if (lane == 0) sm.red.d[warp] = s;
    __syncthreads();
    if (tid == 0) {
      int st = 0;
      if (first) {
        double tot = 0.0;
        for (int k = 0; k < kWarps; ++k) tot += sm.red.d[k];
        if (tot <= 0.0) st = 3;
        target = u * tot;
        margin = 4.01 * (static_cast<double>(n) + 1.0) * 1.1102230246251565e-16 * tot;
      }
      if (st == 0) {
        double c = base;
        int sel = -1;
        for (int k = 0; k < kWarps; ++k) {
          const double ce = c + sm.red.d[k];
          if (ce > target) {
            sel = k;
            break;
          }
          c = ce;
        }
        if (sel < 0) {
          st = 1;
        } else {
          lo = min(hi, lo + sel * L);
          hi = min(hi, lo + L);
          base = c;
        }
      }
      sm.bi[0] = st, sm.bi[1] = lo, sm.bi[2] = hi;
      sm.bd[0] = base, sm.bd[1] = target, sm.bd[2] = margin;
    }
    __syncthreads();
    status = sm.bi[0], lo = sm.bi[1], hi = sm.bi[2];
    base = sm.bd[0], target = sm.bd[1], margin = sm.bd[2];
    first = false;
    __syncthreads();
  } while (status == 0 && hi - lo > 32);
  if (status == 0) {
    if (warp == 0) {
      const int j = lo + lane;
      const float v = j < hi ? weight_at(w, j) : 0.0f;
      double incl = static_cast<double>(v);
      for (int o = 1; o < 32; o <<= 1) {
        const double y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl = y + incl;
      }
      double excl = __shfl_up_sync(0xffffffffu, incl, 1);
      if (lane == 0) excl = 0.0;
      const double ci = base + incl, ce = base + excl;
      const unsigned hit = __ballot_sync(0xffffffffu, v > 0.0f && ci > target);
      if (hit == 0) {
        if (lane == 0) sm.bi[0] = 1;
      } else if (lane == __ffs(hit) - 1) {
        const bool sure = ci > target + margin && ce < target - margin;
        sm.bi[0] = sure ? 2 : 1;
        sm.bi[3] = j;
      }
    }
    __syncthreads();
    status = sm.bi[0];
    __syncthreads();
  }
  if (status == 1) {  // the error bound cannot decide: the CPU's loops, literally
    const int res = seq_sample(w, n, u, sm);
    if (threadIdx.x == 0) sm.bi[3] = res;
    __syncthreads();
    status = res < 0 ? 3 : 2;
  }
  int result = status == 3 ? -1 : sm.bi[3];
  __syncthreads();
  return result;
}

// normalise(v, n) from verify.cpp decides v *= float(1 / sum v) unless the sum is <= 0. Given the
// block's sum s and absolute sum a of v's entries (any order: the bound holds for every order),
// returns 1 and sets *inv when v is scaled, 0 when it is left as it is; certified like the samplers,
// with the CPU's sequential sum over v when the bound cannot decide. Every thread must call it.
static __device__ __noinline__ int normalise_factor(double s, double a, const float* v, int n, float* inv,
                                                    PrepSmem& sm) {
  if (threadIdx.x == 0) {
    const double m = 2.01 * (static_cast<double>(n) + 1.0) * 1.1102230246251565e-16 * a;
    int st;  // 0 no-op, 1 scale, 2 fallback
    float f = 0.0f;
    if (s - m > 0.0) {
      const float f1 = __double2float_rn(__ddiv_rn(1.0, s - m));
      const float f2 = __double2float_rn(__ddiv_rn(1.0, s + m));
      st = f1 == f2 ? 1 : 2;
      f = f1;
    } else {
      st = (s + m <= 0.0) ? 0 : 2;
    }
    sm.bi[0] = st;
    sm.red.f[0] = f;
  }
  __syncthreads();
  int st = sm.bi[0];
  float f = sm.red.f[0];
  __syncthreads();
  if (st == 2) {  // the CPU's sum, literally
    const double t = seq_total(weights_of(kWeightRaw, RowRef{}, RowRef{}, v), n, sm);
    st = t <= 0.0 ? 0 : 1;
    f = st ? __double2float_rn(__ddiv_rn(1.0, t)) : 0.0f;
  }
  *inv = f;
  return st;
}

}  // namespace cuda
}  // namespace osd
