// Warping on the GPU (temperature, top-k, top-p), validated against WarpedRow::to_dense.
// Build (standalone check of this file): nvcc -std=c++17 -O3 -arch=sm_90 -I native -c cuda/warp.cu
// Parity: test/native/test_cuda.cu (warp_rows_match_cpu), tolerance 0 (bit-identical floats).
#include <algorithm>
#include <string>

#include "core/error.h"
#include "warp_device.cuh"

namespace osd {
namespace cuda {

int device_sm_count(Workspace& ws) {
  if (ws.sm_count == 0) {
    int dev = 0;
    OSD_CUDA_CHECK(cudaGetDevice(&dev));
    OSD_CUDA_CHECK(cudaDeviceGetAttribute(&ws.sm_count, cudaDevAttrMultiProcessorCount, dev));
  }
  return ws.sm_count;
}

int32_t row_mode(const Sampling& s, int32_t vocab) {
  if (s.greedy()) return kRowGreedy;
  const bool use_k = s.top_k > 0 && s.top_k < vocab;
  const bool use_p = s.top_p < 1.0f;
  return (use_k || use_p) ? kRowSparse : kRowDense;
}

RowTask make_row_task(const float* logits, int32_t vocab, const Sampling& s, int32_t owner) {
  RowTask t{};
  t.logits = logits;
  t.vocab = vocab;
  t.mode = row_mode(s, vocab);
  t.inv_t = s.greedy() ? 1.0f : 1.0f / s.temperature;
  t.top_k = s.top_k;
  t.top_p = s.top_p;
  t.owner = owner;
  return t;
}

SlotPool make_slot_pool(Workspace& ws, int32_t n_sparse_rows, int32_t vocab, int32_t grid, cudaStream_t stream) {
  SlotPool p{};
  if (n_sparse_rows <= 0) return p;
  p.n_slots = std::max(1, std::min({n_sparse_rows, grid, 32}));
  p.slot_elems = vocab;
  p.base = ws.pool.as<unsigned long long>(static_cast<size_t>(p.n_slots) * vocab);
  p.locks = ws.locks.as<int32_t>(p.n_slots);
  OSD_CUDA_CHECK(cudaMemsetAsync(p.locks, 0, sizeof(int32_t) * p.n_slots, stream));
  return p;
}

std::string first_row_error(Workspace& ws, const std::vector<RowOrigin>& origins, cudaStream_t stream,
                            bool tree_order, const char* target_name, const char* draft_name) {
  std::vector<RowStat> st(origins.size());
  if (!st.empty())
    OSD_CUDA_CHECK(cudaMemcpyAsync(st.data(), ws.stats.get(), st.size() * sizeof(RowStat), cudaMemcpyDeviceToHost,
                                   stream));
  OSD_CUDA_CHECK(cudaStreamSynchronize(stream));
  auto before = [&](const RowOrigin& a, const RowOrigin& b) {
    if (tree_order) {
      if (a.owner != b.owner) return a.owner < b.owner;
      if (a.index != b.index) return a.index < b.index;
      return a.draft < b.draft;
    }
    if (a.draft != b.draft) return a.draft < b.draft;
    return a.index < b.index;
  };
  const RowOrigin* best = nullptr;
  int32_t best_bad = 0;
  for (size_t i = 0; i < st.size(); ++i)
    if (st[i].bad != 0 && (!best || before(origins[i], *best))) best = &origins[i], best_bad = st[i].bad;
  if (!best) return "";
  const std::string what = std::string(best->draft ? draft_name : target_name) + " row " + std::to_string(best->index);
  return best_bad == 1 ? what + " contains NaN or +Infinity" : what + " is all -Infinity (no token has probability > 0)";
}

namespace {

struct WarpParams {
  const RowTask* tasks;
  RowStat* stats;
  int32_t n_tasks;
  SlotPool pool;
};

__global__ void __launch_bounds__(kBlock) warp_rows_kernel(WarpParams p) {
  __shared__ PrepSmem sm;
  for (int t = blockIdx.x; t < p.n_tasks; t += gridDim.x) {
    const RowTask task = p.tasks[t];
    prepare_row(task, p.stats + t, p.pool, sm);
    __syncthreads();
    if (task.mode == kRowDense && task.e_out) {
      // to_dense: e_j * float(1 / z), in place over the stored exp terms.
      const float inv_z = p.stats[t].inv_z;
      if (p.stats[t].bad == 0)
        for (int j = threadIdx.x; j < task.vocab; j += kBlock) task.e_out[j] = __fmul_rn(task.e_out[j], inv_z);
    }
    __syncthreads();
  }
}

int warp_grid(Workspace& ws, int n_tasks) {
  static int per_sm = 0;
  if (per_sm == 0) OSD_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, warp_rows_kernel, kBlock, 0));
  return std::max(1, std::min(n_tasks, std::max(1, per_sm) * device_sm_count(ws)));
}

}  // namespace

void warp_rows_launch(const float* logits, int32_t rows, int32_t vocab, const Sampling& s, float* out, Workspace& ws,
                      cudaStream_t stream, std::vector<RowOrigin>* row_origins) {
  validate_sampling(s);
  if (s.greedy()) throw_range("sampling.temperature must be > 0 to warp a distribution (0 means greedy)");
  if (rows <= 0) return;
  std::vector<RowTask> tasks(rows);
  int n_sparse = 0;
  for (int32_t r = 0; r < rows; ++r) {
    RowTask t = make_row_task(logits + static_cast<size_t>(r) * vocab, vocab, s, r);
    float* dst = out + static_cast<size_t>(r) * vocab;
    if (t.mode == kRowDense) t.e_out = dst; else t.prob_out = dst, ++n_sparse;
    tasks[r] = t;
  }
  if (row_origins) {
    row_origins->resize(rows);
    for (int32_t r = 0; r < rows; ++r) (*row_origins)[r] = RowOrigin{r, 0, r};
  }
  const int grid = warp_grid(ws, rows);
  WarpParams p{};
  p.n_tasks = rows;
  p.tasks = ws.tasks.as<RowTask>(rows);
  p.stats = ws.stats.as<RowStat>(rows);
  p.pool = make_slot_pool(ws, n_sparse, vocab, grid, stream);
  ws.host_tasks.assign(reinterpret_cast<unsigned char*>(tasks.data()),
                       reinterpret_cast<unsigned char*>(tasks.data() + rows));
  OSD_CUDA_CHECK(cudaMemcpyAsync(const_cast<RowTask*>(p.tasks), ws.host_tasks.data(), sizeof(RowTask) * rows,
                                 cudaMemcpyHostToDevice, stream));
  record_start(ws, stream);
  warp_rows_kernel<<<grid, kBlock, 0, stream>>>(p);
  OSD_CUDA_CHECK_LAUNCH();
  record_stop(ws, stream);
}

}  // namespace cuda
}  // namespace osd
