// Chain and tree verification on the GPU, making the CPU reference's decisions (spec/verify.cpp).
// Build (standalone check of this file): nvcc -std=c++17 -O3 -arch=sm_90 -I native -c cuda/verify.cu
// Parity: test/native/test_cuda.cu (chain_* and tree_* tests): identical accepted counts, paths and
// tokens for identical seeds (tolerance: zero mismatches), plus chi-square exactness on the GPU.
#include <algorithm>
#include <string>
#include <vector>

#include "core/error.h"
#include "verify.cuh"
#include "warp_device.cuh"

namespace osd {
namespace cuda {

namespace {

// ---------------------------------------------------------------------------------------------
// Chains

struct ChainSeq {
  uint64_t stream;
  int32_t g, t0, d0, tok_off, out_off, greedy, ntasks, nunits;  // nunits: work units of its rows
};

// Work units of a chain launch: units [0, n_whole) prepare whole rows (tasks unit_task[u]); the
// units after them prepare bpu kStatBlock-blocks each of the rows split block by block (greedy and
// blocked rows, all of one vocabulary; upr units per row): unit n_whole + s * upr + r is blocks
// r * bpu .. of row unit_task[n_whole + s]. With bpu = 1 the whole CTA takes the block (the least
// latency when the launch has few blocks), else one warp per block (more blocks in flight).
struct ChainParams {
  const RowTask* tasks;
  RowStat* stats;
  int32_t n_tasks;
  int32_t n_units, n_whole, nb, bpu, upr;
  const int32_t* unit_task;
  UnitStat* ustats;
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

// Residual sample from norm(max(0, p - q)) (sample_residual in verify.cpp; for blocked rows
// sample_residual_dense in sampling.cpp, then sample_dense(p) when the residual has no mass).
__device__ __noinline__ int chain_residual(const RowRef& P, const RowRef& Q, int V, double u, int fault, PrepSmem& sm) {
  if (P.mode == kRowBlocked) {  // only without a fault, like the CPU's fast path
    blocked_residual_masses(P, Q, V);
    BlkWeights w;
    w.p = P;
    w.q = Q;
    w.residual = 1;
    int y = blocked_sample(w, V, u, sm);
    if (y < 0) {
      w.residual = 0;
      y = blocked_sample(w, V, u, sm);
    }
    return y;
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
  // Rows prepared block by block get their RowStat (and c_b, W_b) here, one warp per row.
  for (int i = warp_id(); i < q.ntasks; i += kWarps) {
    const RowTask& t = p.tasks[q.t0 + i];  // a sequence's tasks are contiguous
    if (t.unit0 >= 0) finalize_row(t, p.stats + q.t0 + i, p.ustats + t.unit0);
  }
  __syncthreads();
  int bad = 0;
  for (int i = tid; i < q.ntasks; i += kBlock) bad |= ld_cg(&p.stats[q.t0 + i].bad);
  bad = block_or(bad, sm.red);
  if (bad) {
    if (tid == 0) p.accepted[b] = -1;
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
      p.accepted[b] = miss;
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
      p.accepted[b] = rej;
    }
    return;
  }
  const RowRef P = load_row(p.tasks[q.t0 + q.g], p.stats + q.t0 + q.g);
  const double u = philox_uniform(p.seed, q.stream, static_cast<uint32_t>(q.g), kLaneSample);
  int y;
  if (P.mode == kRowBlocked) {
    BlkWeights w;
    w.p = P;
    w.q = P;
    w.residual = 0;
    y = blocked_sample(w, V, u, sm);
  } else {
    y = block_sample(weights_of(kWeightRow, P), V, u, sm);
  }
  if (tid == 0) {
    out[q.g] = y;
    p.accepted[b] = q.g;
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

__global__ void __launch_bounds__(kBlock) chain_kernel(ChainParams p) {
  __shared__ PrepSmem sm;
  for (int u = blockIdx.x; u < p.n_units; u += gridDim.x) {
    int owner;
    if (u < p.n_whole) {
      const int t = p.unit_task[u];
      const RowTask task = p.tasks[t];
      prepare_row(task, p.stats + t, p.pool, sm);
      owner = task.owner;
    } else {
      const int k = u - p.n_whole, s = k / p.upr, b0 = (k - s * p.upr) * p.bpu;
      const RowTask task = p.tasks[p.unit_task[p.n_whole + s]];
      UnitStat* us = p.ustats + static_cast<size_t>(s) * p.nb + b0;
      if (p.bpu == 1) prepare_block(task, b0, us, sm);
      else prepare_blocks_warp(task, b0, min(p.bpu, p.nb - b0), us);
      owner = task.owner;
    }
    if (finished_owner(p.done, owner, p.seqs[owner].nunits, sm)) chain_walk(p, owner, sm);
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

// dst[j] = P.to_dense(j) for a dense or sparse row, four floats per access where aligned, several
// loads in flight per thread.
__device__ __noinline__ void copy_dense(float* dst, const RowRef& P, int V) {
  const float* src = P.mode == kRowSparse ? P.prob : P.e;
  const bool sparse = P.mode == kRowSparse;
  const float inv = P.inv_z;
  if (V % 4 == 0 && ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) & 15u) == 0) {
    const float4* s4 = reinterpret_cast<const float4*>(src);
    float4* d4 = reinterpret_cast<float4*>(dst);
    const int V4 = V / 4;
    constexpr int U = 4;
    for (int base = threadIdx.x; base < V4; base += U * kBlock) {
      float4 x[U];
#pragma unroll
      for (int k = 0; k < U; ++k)
        if (base + k * kBlock < V4) x[k] = __ldcg(s4 + base + k * kBlock);
#pragma unroll
      for (int k = 0; k < U; ++k)
        if (base + k * kBlock < V4) {
          float4 y = x[k];
          if (!sparse) y = make_float4(__fmul_rn(y.x, inv), __fmul_rn(y.y, inv), __fmul_rn(y.z, inv), __fmul_rn(y.w, inv));
          d4[base + k * kBlock] = y;
        }
    }
  } else {
    for (int j = threadIdx.x; j < V; j += kBlock) dst[j] = row_dense(P, j);
  }
}

// pd[j] = max(0, pd[j] - qd[j]) (without the clamp under the planted fault), vectorised where aligned.
__device__ __noinline__ void residual_update(float* pd, const float* qd, int V, bool noclamp) {
  auto one = [noclamp](float a, float b) {
    const float d = __fsub_rn(a, b);
    return noclamp ? d : (d > 0.0f ? d : 0.0f);
  };
  if (V % 4 == 0 && ((reinterpret_cast<uintptr_t>(pd) | reinterpret_cast<uintptr_t>(qd)) & 15u) == 0) {
    float4* p4 = reinterpret_cast<float4*>(pd);
    const float4* q4 = reinterpret_cast<const float4*>(qd);
    const int V4 = V / 4;
    constexpr int U = 4;
    for (int base = threadIdx.x; base < V4; base += U * kBlock) {
      float4 a[U], b[U];
#pragma unroll
      for (int k = 0; k < U; ++k)
        if (base + k * kBlock < V4) a[k] = p4[base + k * kBlock], b[k] = q4[base + k * kBlock];
#pragma unroll
      for (int k = 0; k < U; ++k)
        if (base + k * kBlock < V4)
          p4[base + k * kBlock] = make_float4(one(a[k].x, b[k].x), one(a[k].y, b[k].y), one(a[k].z, b[k].z), one(a[k].w, b[k].w));
    }
  } else {
    for (int j = threadIdx.x; j < V; j += kBlock) pd[j] = one(pd[j], qd[j]);
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
  if (tid == 0) {
    int bad = 0;
    for (int i = 0; i < q.ntasks; ++i) bad |= ld_cg(&p.stats[q.t0 + i].bad);
    sm.bi[0] = bad;
  }
  __syncthreads();
  const int bad = sm.bi[0];
  __syncthreads();
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
  const bool without = q.mode == static_cast<int>(TreeChildren::WithoutReplacement);
  const bool noclamp = p.fault == static_cast<int>(Fault::ResidualNoClamp);
  float* pd = q.pd;
  float* qd = q.qd;
  int row = 0, plen = 0;
  for (;;) {
    const RowRef P = load_row(p.tasks[q.t0 + row], p.stats + q.t0 + row);
    if (first[row] < 0) {  // a leaf: the bonus token comes from the target
      const double u = philox_uniform(p.seed, q.stream, static_cast<uint32_t>(row), kLaneSample);
      const int y = block_sample(weights_of(kWeightRow, P), V, u, sm);
      if (tid == 0) out[plen] = y, counts[0] = plen, counts[1] = plen + 1;
      return;
    }
    RowRef Q{};
    if (use_draft) Q = load_row(p.tasks[q.d0 + row], p.stats + q.d0 + row);
    // pd and qd (P.to_dense, Q.to_dense) are materialised only at the first rejection: until then
    // the children's tests read the same floats straight from the prepared rows.
    bool dense = false;
    int accepted = -1;
    for (int c = first[row]; c >= 0; c = next[c]) {
      const int x = tokens[c];
      if (tid == 0) {
        const double px = static_cast<double>(dense ? pd[x] : row_dense(P, x));
        const double qx = use_draft ? static_cast<double>(dense ? qd[x] : row_dense(Q, x)) : 1.0;
        const double u = philox_uniform(p.seed, q.stream, static_cast<uint32_t>(c + 1), kLaneAccept);
        sm.bi[1] = (qx > 0.0 && __dmul_rn(u, qx) < px) ? 1 : 0;
      }
      __syncthreads();
      const int acc = sm.bi[1];
      __syncthreads();
      if (acc) {
        accepted = c;
        break;
      }
      if (!dense) {
        copy_dense(pd, P, V);
        if (use_draft) copy_dense(qd, Q, V);
        __syncthreads();
        dense = true;
      }
      if (!use_draft) {
        if (tid == 0) pd[x] = 0.0f;
        __syncthreads();
      } else {
        residual_update(pd, qd, V, noclamp);
        __syncthreads();
        if (without) {
          if (tid == 0) qd[x] = 0.0f;
          __syncthreads();
          block_normalise(qd, V, sm);
        }
      }
      block_normalise(pd, V, sm);
    }
    if (accepted < 0) {
      const double u = philox_uniform(p.seed, q.stream, static_cast<uint32_t>(row), kLaneSample);
      int y = block_sample(weights_of(kWeightPositive, P, RowRef{}, pd), V, u, sm);
      if (y < 0) y = block_sample(weights_of(kWeightRow, P), V, u, sm);
      if (tid == 0) out[plen] = y, counts[0] = plen, counts[1] = plen + 1;
      return;
    }
    if (tid == 0) path[plen] = accepted, out[plen] = tokens[accepted];
    ++plen;
    row = accepted + 1;
    __syncthreads();
  }
}

__global__ void __launch_bounds__(kBlock) tree_kernel(TreeParams p) {
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

template <class T>
T* upload(DeviceBuffer& buf, std::vector<unsigned char>& host, const std::vector<T>& v, cudaStream_t stream) {
  T* d = buf.as<T>(v.size());
  host.assign(reinterpret_cast<const unsigned char*>(v.data()), reinterpret_cast<const unsigned char*>(v.data() + v.size()));
  if (!v.empty()) OSD_CUDA_CHECK(cudaMemcpyAsync(d, host.data(), host.size(), cudaMemcpyHostToDevice, stream));
  return d;
}

// Chains prepare blocked rows, and greedy rows of 32 blocks or more, block by block (prepare_block),
// the others whole. (A greedy row is read once; measured on an H200, a CTA that reads a whole row of
// 16 blocks, V = 32000, finished sooner than the block units plus their combination.)
bool split_row(const RowTask& t) {
  return t.mode == kRowBlocked || (t.mode == kRowGreedy && stat_blocks(t.vocab) >= 32);
}

// Floats of scratch a task needs: V (exp terms or probabilities), plus for a blocked row c_b, W_b
// and the walk's residual masses (3 per block).
size_t task_floats(const RowTask& t) {
  if (t.mode == kRowGreedy) return 0;
  return static_cast<size_t>(t.vocab) + (t.mode == kRowBlocked ? 3 * static_cast<size_t>(stat_blocks(t.vocab)) : 0);
}

// Gives every non-greedy task its scratch; returns how many rows are sparse (they may need a
// candidate slot).
int assign_rows(std::vector<RowTask>& tasks, Workspace& ws) {
  size_t floats = 0;
  for (auto& t : tasks) floats += task_floats(t);
  float* rows = ws.rows.as<float>(std::max<size_t>(floats, 1));
  size_t offset = 0;
  int n_sparse = 0;
  for (auto& t : tasks) {
    if (t.mode == kRowGreedy) continue;
    if (t.mode == kRowSparse) t.prob_out = rows + offset; else t.e_out = rows + offset;
    if (t.mode == kRowBlocked) t.blk_out = rows + offset + t.vocab;
    offset += task_floats(t);
    n_sparse += t.mode == kRowSparse;
  }
  return n_sparse;
}

}  // namespace

void chain_verify_launch(const ChainBatchDevice& in, Fault fault, Workspace& ws, cudaStream_t stream,
                         std::vector<RowOrigin>* row_origins) {
  const int32_t B = in.batch, V = in.vocab;
  const int32_t nb = stat_blocks(V);
  std::vector<RowTask> tasks;
  std::vector<ChainSeq> seqs(B);
  std::vector<RowOrigin> origins;
  size_t trow = 0, drow = 0;
  for (int32_t b = 0; b < B; ++b) {
    const Sampling& s = in.sampling[b];
    const int32_t g = in.lengths[b];
    ChainSeq& q = seqs[b];
    q.stream = in.streams[b];
    q.g = g;
    q.greedy = s.greedy() ? 1 : 0;
    q.tok_off = static_cast<int32_t>(drow);
    q.out_off = static_cast<int32_t>(trow);
    // Exactly where the CPU backend runs verify_chain_dense (sampled, s.dense(), no planted fault)
    // the rows follow its blocked scheme; elsewhere the reference walk's modes. (A top-k >= V is a
    // dense row for warp_row but not s.dense(): the CPU then walks the reference, so kRowDense.)
    const bool blocked = fault == Fault::None && !s.greedy() && s.dense();
    auto task = [&](const float* row) {
      RowTask t = make_row_task(row, V, s, b);
      if (blocked) t.mode = kRowBlocked;
      return t;
    };
    q.t0 = static_cast<int32_t>(tasks.size());
    for (int32_t i = 0; i <= g; ++i) {
      tasks.push_back(task(in.target + (trow + i) * V));
      origins.push_back(RowOrigin{b, 0, static_cast<int32_t>(trow + i)});
    }
    q.d0 = -1;
    if (!q.greedy) {
      q.d0 = static_cast<int32_t>(tasks.size());
      for (int32_t i = 0; i < g; ++i) {
        tasks.push_back(task(in.draft + (drow + i) * V));
        origins.push_back(RowOrigin{b, 1, static_cast<int32_t>(drow + i)});
      }
    }
    q.ntasks = static_cast<int32_t>(tasks.size()) - q.t0;
    q.nunits = 0;  // set below, once the blocks per unit are known
    trow += g + 1;
    drow += g;
  }
  if (row_origins) *row_origins = origins;
  if (B == 0) return;
  const int n_sparse = assign_rows(tasks, ws);
  const int n_tasks = static_cast<int>(tasks.size());
  // Whole rows first (the slow top-k / top-p rows start early), then the split rows' blocks.
  std::vector<int32_t> unit_task;
  unit_task.reserve(tasks.size());
  for (int32_t t = 0; t < n_tasks; ++t)
    if (!split_row(tasks[t])) unit_task.push_back(t);
  int n_whole = static_cast<int>(unit_task.size());
  for (int32_t t = 0; t < n_tasks; ++t)
    if (split_row(tasks[t])) tasks[t].unit0 = static_cast<int32_t>(unit_task.size() - n_whole) * nb, unit_task.push_back(t);
  int n_split = static_cast<int>(unit_task.size()) - n_whole;
  // Blocks per unit: 1 while every block gets a CTA of its own, else up to one per warp. When even
  // that needs more than about one wave of CTAs, the rows are prepared whole (prepare_row) after all:
  // measured on an H200, block units then ran slower than whole rows.
  const int max_grid = kernel_grid(ws, chain_kernel, 1 << 30);
  auto units_with = [&](int b) { return n_whole + static_cast<long long>(n_split) * ((nb + b - 1) / b); };
  int bpu = 1;
  while (bpu < kWarps && bpu < nb && units_with(bpu) > max_grid) bpu *= 2;
  if (n_split > 0 && units_with(bpu) > max_grid + max_grid / 4) {
    for (int32_t t = 0; t < n_tasks; ++t)
      if (split_row(tasks[t])) tasks[t].unit0 = -1;
    unit_task.resize(n_tasks);
    for (int32_t t = 0; t < n_tasks; ++t) unit_task[t] = t;
    n_whole = n_tasks;
    n_split = 0;
  }
  const int upr = (nb + bpu - 1) / bpu;
  const int n_units = n_whole + n_split * upr;
  for (auto& q : seqs) {
    q.nunits = 0;
    for (int32_t i = q.t0; i < q.t0 + q.ntasks; ++i) q.nunits += tasks[i].unit0 >= 0 ? upr : 1;
  }
  const int grid = std::min(max_grid, n_units);
  ChainParams p{};
  p.n_tasks = n_tasks;
  p.n_units = n_units;
  p.n_whole = n_whole;
  p.nb = nb;
  p.bpu = bpu;
  p.upr = upr;
  p.unit_task = upload(ws.units, ws.host_units, unit_task, stream);
  p.ustats = ws.ustats.as<UnitStat>(std::max<size_t>(1, static_cast<size_t>(n_split) * nb));
  p.tasks = upload(ws.tasks, ws.host_tasks, tasks, stream);
  p.seqs = upload(ws.seqs, ws.host_seqs, seqs, stream);
  p.stats = ws.stats.as<RowStat>(n_tasks);
  p.done = ws.done.as<int32_t>(B);
  OSD_CUDA_CHECK(cudaMemsetAsync(p.done, 0, sizeof(int32_t) * B, stream));
  p.tokens = in.tokens;
  p.out_tokens = in.out_tokens;
  p.accepted = in.accepted;
  p.seed = in.seed;
  p.fault = static_cast<int32_t>(fault);
  p.vocab = V;
  p.pool = make_slot_pool(ws, n_sparse, V, grid, stream);
  record_start(ws, stream);
  chain_kernel<<<grid, kBlock, 0, stream>>>(p);
  OSD_CUDA_CHECK_LAUNCH();
  record_stop(ws, stream);
}

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
  const int n_sparse = assign_rows(tasks, ws);
  float* pdqd = ws.misc.as<float>(std::max<size_t>(scratch, 1));
  size_t off = 0;
  for (auto& q : rq) {
    if (q.greedy) continue;
    q.pd = pdqd + off;
    q.qd = pdqd + off + q.V;
    off += 2 * static_cast<size_t>(q.V);
  }
  const int n_tasks = static_cast<int>(tasks.size());
  const int grid = kernel_grid(ws, tree_kernel, n_tasks);
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
  p.done = ws.done.as<int32_t>(count);
  OSD_CUDA_CHECK(cudaMemsetAsync(p.done, 0, sizeof(int32_t) * count, stream));
  p.seed = seed;
  p.fault = static_cast<int32_t>(fault);
  p.pool = make_slot_pool(ws, n_sparse, vmax, grid, stream);
  record_start(ws, stream);
  tree_kernel<<<grid, kBlock, 0, stream>>>(p);
  OSD_CUDA_CHECK_LAUNCH();
  record_stop(ws, stream);
}

}  // namespace cuda
}  // namespace osd
