// The CPU backend: the ops from spec/ and distill/ (the fast blocked versions where they exist,
// else the reference), spread over the thread pool. Parallel splits never change results: every
// row, block and sequence is computed by one thread in a fixed order, and reductions over blocks
// and rows are summed in block and row order afterwards.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "backend/backend.h"
#include "core/error.h"
#include "core/thread_pool.h"

namespace osd {

void validate_chain_batch(const ChainBatch& in) {
  size_t off = 0;
  for (int32_t b = 0; b < in.batch; ++b) {
    validate_sampling(in.sampling[b], in.batch > 1 ? "sampling[" + std::to_string(b) + "]" : "sampling");
    for (int32_t i = 0; i < in.lengths[b]; ++i, ++off) {
      const int32_t t = in.tokens[off];
      if (t < 0 || t >= in.vocab)
        throw_range("draftTokens[" + std::to_string(off) + "] = " + std::to_string(t) +
                    " is out of range for vocabSize " + std::to_string(in.vocab));
    }
  }
}

namespace {

// A gradient is written in full, usually into a fresh allocation (N-API hands out a new array per
// call): ask for transparent huge pages over it (a hint), so that first touch costs one fault per
// 2 MiB instead of one per 4 KiB. On a VM the 4 KiB faults cost about as much as the loss itself.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)p, (void)bytes;
#endif
}

// A gradient larger than this is written past the caches (the `stream` of forward_kl_row_blocked and
// divergence_row_blocked): half a 32 MiB L3 (one chiplet's on current server parts; sysconf's figure
// on a VM can be the host's).
constexpr size_t kStreamGradBytes = size_t(16) << 20;

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }

  void verify_chain_batch(const ChainBatch& in, ChainBatchOut& out, Fault fault) override {
    validate_chain_batch(in);
    const int32_t B = in.batch, V = in.vocab;
    // Per-call bookkeeping lives in thread-local buffers: a call at small V costs a few
    // microseconds, and fresh vectors were a measurable part of that.
    // (References: the lambdas below run on pool threads, where a thread_local name would mean
    // that thread's copy.)
    struct Rows {
      std::vector<size_t> trow, drow;
      std::vector<RowCheck> tcheck, dcheck;
      std::vector<float> tmax, dmax;
    };
    thread_local Rows rows;
    auto &trow = rows.trow, &drow = rows.drow;
    auto &tcheck = rows.tcheck, &dcheck = rows.dcheck;
    auto &tmax = rows.tmax, &dmax = rows.dmax;
    trow.assign(B + 1, 0);
    drow.assign(B + 1, 0);
    for (int32_t b = 0; b < B; ++b) {
      trow[b + 1] = trow[b] + in.lengths[b] + 1;
      drow[b + 1] = drow[b] + in.lengths[b];
    }
    // Every row is validated, visited or not, so bad input fails the same way for every seed; the
    // error names the first bad row, target rows before draft rows.
    tcheck.assign(trow[B], RowCheck::Unchecked);
    dcheck.assign(drow[B], RowCheck::Unchecked);
    tmax.resize(trow[B]);
    dmax.resize(drow[B]);
    // Sequences over threads when there are enough of them; otherwise one after the other, each
    // spreading its rows' blocks over the threads (nested parallel_for calls run inline).
    const bool spread = B < default_pool().size();
    auto sequence = [&](size_t b) {
      const Sampling& s = in.sampling[b];
      const int32_t g = in.lengths[b];
      ChainInput ci;
      ci.target = in.target + trow[b] * V;
      ci.draft = in.draft ? in.draft + drow[b] * V : nullptr;
      ci.tokens = in.tokens + drow[b];
      ci.g = g;
      ci.vocab = V;
      RowCheck* tc = tcheck.data() + trow[b];
      RowCheck* dc = dcheck.data() + drow[b];
      if (fault == Fault::None && !s.greedy() && s.dense()) {
        // Temperature only: the blocked fast path, which validates every row itself.
        thread_local BlockedChainScratch scratch;
        out.accepted[b] =
            verify_chain_blocked(ci, s, in.seed, in.streams[b], out.tokens + trow[b], scratch, tc, dc, spread).accepted;
        return;
      }
      // Greedy, top-k / top-p, and the planted faults: the reference walk.
      check_rows(ci.target, g + 1, V, tc, tmax.data() + trow[b]);
      if (!s.greedy()) check_rows(ci.draft, g, V, dc, dmax.data() + drow[b]);
      for (int32_t i = 0; i <= g; ++i)
        if (tc[i] != RowCheck::Ok || (i < g && !s.greedy() && dc[i] != RowCheck::Ok)) return;
      std::vector<RowStats> ts(g + 1), ds(g);
      for (int32_t i = 0; i <= g; ++i) ts[i].max = tmax[trow[b] + i];
      for (int32_t i = 0; i < g; ++i) ds[i].max = dmax[drow[b] + i];
      if (s.greedy() || !s.dense()) {  // else (a fault) verify_chain computes z itself
        ci.target_stats = ts.data();
        ci.draft_stats = ds.data();
      }
      out.accepted[b] = verify_chain(ci, s, in.seed, in.streams[b], out.tokens + trow[b], fault).accepted;
    };
    if (!spread) {
      // Chunks of at least 64K logits: small batches of short rows stay on the calling thread.
      const size_t logits = (trow[B] + drow[B]) * static_cast<size_t>(V);
      const size_t grain = std::max<size_t>(1, (size_t(1) << 16) * B / std::max<size_t>(1, logits));
      default_pool().parallel_for(B, grain, [&](size_t lo, size_t hi) {
        for (size_t b = lo; b < hi; ++b) sequence(b);
      });
    } else {
      for (int32_t b = 0; b < B; ++b) sequence(b);
    }
    for (size_t r = 0; r < tcheck.size(); ++r) throw_row_check(tcheck[r], "targetLogits", r);
    for (size_t r = 0; r < dcheck.size(); ++r) throw_row_check(dcheck[r], "draftLogits", r);
  }

  TreeResult verify_tree(const TreeInput& in, const Sampling& s, TreeChildren mode, uint64_t seed, uint64_t stream,
                         int32_t* path, int32_t* out, Fault fault) override {
    return osd::verify_tree(in, s, mode, seed, stream, path, out, fault);
  }

  double distill_loss(const DistillInput& in, float* grad) override {
    validate_distill(in);
    if (grad) advise_huge_pages(grad, static_cast<size_t>(in.rows) * in.vocab * sizeof(float));
    int32_t counted = 0;
    for (int32_t r = 0; r < in.rows; ++r) counted += (!in.mask || in.mask[r]) ? 1 : 0;
    if (grad && counted < in.rows)
      for (int32_t r = 0; r < in.rows; ++r)
        if (in.mask && !in.mask[r]) std::fill(grad + static_cast<size_t>(r) * in.vocab, grad + static_cast<size_t>(r + 1) * in.vocab, 0.0f);
    if (counted == 0) return 0.0;
    const float scale = 1.0f / static_cast<float>(counted);
    std::vector<double> row_loss(in.rows, 0.0);
    // A dense teacher's rows are blocked (distill_row_fast), so a single row can spread over the threads.
    const bool blocked = in.teacher != nullptr;
    // A gradient larger than kStreamGradBytes is written past the caches: it would not stay there
    // for its reader anyway, and the stores then skip the read for ownership.
    const bool stream = grad && static_cast<size_t>(in.rows) * in.vocab * sizeof(float) > kStreamGradBytes;
    auto row = [&](size_t r) {
      if (in.mask && !in.mask[r]) return;
      float* g = grad ? grad + r * in.vocab : nullptr;
      row_loss[r] = distill_row_fast(in, static_cast<int32_t>(r), scale, g, stream);
    };
    if (blocked && in.rows < default_pool().size()) {
      // Fewer rows than threads: rows one after the other, each spreading its blocks over the threads.
      for (int32_t r = 0; r < in.rows; ++r) row(r);
    } else {
      const size_t grain = std::max<size_t>(1, (size_t(1) << 15) / static_cast<size_t>(in.vocab));
      default_pool().parallel_for(in.rows, grain, [&](size_t lo, size_t hi) {
        for (size_t r = lo; r < hi; ++r) row(r);
      });
    }
    double loss = 0.0;
    for (double l : row_loss) loss += l;
    return loss / counted;
  }

  void adamw_step(float* params, const float* grads, float* m, float* v, size_t n, const AdamWConfig& c) override {
    validate_adamw(c);
    default_pool().parallel_for(n, 1 << 14, [&](size_t lo, size_t hi) { adamw_update(params, grads, m, v, lo, hi, c); });
  }

  double global_norm(const float* x, size_t n) override {
    // Fixed-size blocks summed in order, so the result does not depend on the thread count.
    const size_t block = 1 << 16, nb = (n + block - 1) / block;
    std::vector<double> part(nb, 0.0);
    default_pool().parallel_for(nb, 1, [&](size_t lo, size_t hi) {
      for (size_t b = lo; b < hi; ++b) part[b] = sum_squares(x, b * block, std::min(n, (b + 1) * block));
    });
    double t = 0.0;
    for (double p : part) t += p;
    return std::sqrt(t);
  }
};

}  // namespace

Backend& cpu_backend() {
  static CpuBackend backend;
  return backend;
}

}  // namespace osd
