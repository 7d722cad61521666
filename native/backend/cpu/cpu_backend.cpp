// The CPU backend: the reference ops from spec/ and distill/, spread over the thread pool.
// Parallel splits never change results: every row and sequence is computed by one thread in a
// fixed order, and reductions over rows are summed in row order afterwards.
#include <algorithm>
#include <cmath>
#include <vector>

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

class CpuBackend final : public Backend {
 public:
  std::string name() const override { return "cpu"; }

  void verify_chain_batch(const ChainBatch& in, ChainBatchOut& out, Fault fault) override {
    validate_chain_batch(in);
    const int32_t B = in.batch, V = in.vocab;
    std::vector<size_t> trow(B + 1, 0), drow(B + 1, 0);
    for (int32_t b = 0; b < B; ++b) {
      trow[b + 1] = trow[b] + in.lengths[b] + 1;
      drow[b + 1] = drow[b] + in.lengths[b];
    }
    // Stage 1: validate every row and compute its softmax stats, all rows in parallel.
    std::vector<RowStats> ts(trow[B]), ds(drow[B]);
    std::vector<int32_t> row_seq_t(trow[B]), row_seq_d(drow[B]);
    for (int32_t b = 0; b < B; ++b) {
      for (size_t r = trow[b]; r < trow[b + 1]; ++r) row_seq_t[r] = b;
      for (size_t r = drow[b]; r < drow[b + 1]; ++r) row_seq_d[r] = b;
    }
    const size_t nt = trow[B], total = trow[B] + (in.draft ? drow[B] : 0);
    // Small inputs stay on the calling thread: a pool hop costs more than a few short rows.
    const size_t grain = std::max<size_t>(1, (size_t(1) << 16) / static_cast<size_t>(V));
    default_pool().parallel_for(total, grain, [&](size_t lo, size_t hi) {
      for (size_t i = lo; i < hi; ++i) {
        if (i < nt) {
          const Sampling& s = in.sampling[row_seq_t[i]];
          compute_row_stats(in.target + i * V, V, s, "targetLogits", i, ts[i]);
        } else {
          const size_t r = i - nt;
          const Sampling& s = in.sampling[row_seq_d[r]];
          if (!s.greedy()) compute_row_stats(in.draft + r * V, V, s, "draftLogits", r, ds[r]);
        }
      }
    });
    // Stage 2: the accept/reject walk of each sequence.
    default_pool().parallel_for(B, B >= 4 ? 1 : B, [&](size_t lo, size_t hi) {
      for (size_t b = lo; b < hi; ++b) {
        ChainInput ci;
        ci.target = in.target + trow[b] * V;
        ci.draft = in.draft ? in.draft + drow[b] * V : nullptr;
        ci.tokens = in.tokens + drow[b];
        ci.g = in.lengths[b];
        ci.vocab = V;
        ci.target_stats = ts.data() + trow[b];
        ci.draft_stats = ds.data() + drow[b];
        ChainResult r = verify_chain(ci, in.sampling[b], in.seed, in.streams[b], out.tokens + trow[b], fault);
        out.accepted[b] = r.accepted;
      }
    });
  }

  TreeResult verify_tree(const TreeInput& in, const Sampling& s, TreeChildren mode, uint64_t seed, uint64_t stream,
                         int32_t* path, int32_t* out, Fault fault) override {
    return osd::verify_tree(in, s, mode, seed, stream, path, out, fault);
  }

  double distill_loss(const DistillInput& in, float* grad) override {
    validate_distill(in);
    int32_t counted = 0;
    for (int32_t r = 0; r < in.rows; ++r) counted += (!in.mask || in.mask[r]) ? 1 : 0;
    if (grad && counted < in.rows)
      for (int32_t r = 0; r < in.rows; ++r)
        if (in.mask && !in.mask[r]) std::fill(grad + static_cast<size_t>(r) * in.vocab, grad + static_cast<size_t>(r + 1) * in.vocab, 0.0f);
    if (counted == 0) return 0.0;
    const float scale = 1.0f / static_cast<float>(counted);
    std::vector<double> row_loss(in.rows, 0.0);
    default_pool().parallel_for(in.rows, 1, [&](size_t lo, size_t hi) {
      for (size_t r = lo; r < hi; ++r) {
        if (in.mask && !in.mask[r]) continue;
        row_loss[r] = distill_row(in, static_cast<int32_t>(r), scale, grad ? grad + r * in.vocab : nullptr);
      }
    });
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
