// Chain and tree verification on the GPU, making the CPU reference's decisions (spec/verify.cpp).
// Build (standalone check of this file): nvcc -std=c++17 -O3 -arch=sm_90 -I native -c cuda/verify.cu
// Parity: test/native/test_cuda.cu (chain_* and tree_* tests): identical accepted counts, paths and
// tokens for identical seeds (tolerance: zero mismatches), plus chi-square exactness on the GPU.
#include <algorithm>
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
  const bool from_target = p.fault == static_cast<int>(Fault::ResidualFromTarget);
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
      if (from_target) {
        // The planted bug: keep using the target itself instead of the residual.
      } else if (!use_draft) {
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

// Floats of scratch a task needs: V (exp terms or probabilities).
size_t task_floats(const RowTask& t) { return t.mode == kRowGreedy ? 0 : static_cast<size_t>(t.vocab); }

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
    offset += task_floats(t);
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
