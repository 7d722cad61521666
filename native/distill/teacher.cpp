#include "distill/teacher.h"

#include <algorithm>
#include <numeric>
#include <vector>

#include "core/error.h"
#include "core/thread_pool.h"
#include "spec/sampling.h"

namespace osd {

namespace {

void check_args(size_t rows, int32_t vocab, int32_t k) {
  if (vocab < 1) throw_range("vocab must be >= 1");
  if (k < 1 || k > vocab) throw_range("k must be in [1, vocab]");
  (void)rows;
}

// Probabilities of the chosen ids and the mass left outside them.
template <class Row>
void finish(const Row& row, int32_t k, const int32_t* ids, float* probs, float* residual) {
  double mass = 0.0;
  for (int32_t i = 0; i < k; ++i) {
    const double p = row.prob(ids[i]);
    probs[i] = static_cast<float>(p);
    mass += p;
  }
  *residual = static_cast<float>(std::max(0.0, 1.0 - mass));
}

}  // namespace

void teacher_top_k_reference(const float* logits, size_t rows, int32_t vocab, int32_t k, int32_t* ids, float* probs,
                             float* residual, const char* what) {
  check_args(rows, vocab, k);
  std::vector<int32_t> order(vocab);
  for (size_t r = 0; r < rows; ++r) {
    const float* l = logits + r * vocab;
    DenseRow d;
    DenseRow* out[1] = {&d};
    dense_rows(&l, 1, vocab, 1.0f, out);
    throw_row_check(d.check, what, r);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return l[a] > l[b]; });
    std::copy(order.begin(), order.begin() + k, ids + r * k);
    finish(d, k, ids + r * k, probs + r * k, residual + r);
  }
}

void teacher_top_k(const float* logits, size_t rows, int32_t vocab, int32_t k, int32_t* ids, float* probs,
                   float* residual, const char* what) {
  check_args(rows, vocab, k);
  const int32_t nb = stat_blocks(vocab);
  std::vector<RowCheck> checks(rows, RowCheck::Unchecked);
  auto one = [&](size_t r) {
    const float* l = logits + r * vocab;
    std::vector<BlockStat> blocks(nb);
    std::vector<float> scale(nb), mass(nb);
    for (int32_t b = 0; b < nb; ++b)
      block_stats(l + b * kStatBlock, std::min(kStatBlock, vocab - b * kStatBlock), 1.0f, true, blocks[b]);
    BlockedRow row;
    row.logits = l;
    row.vocab = vocab;
    row.blocks = blocks.data();
    row.scale = scale.data();
    row.mass = mass.data();
    finish_row(row);
    checks[r] = row.check;
    if (row.check != RowCheck::Ok) return;
    // A min-heap of the k best, its root the worst: a lower logit, or an equal one with a higher id.
    // A later id never beats an equal logit, so one compare with the root rejects most entries.
    std::vector<float> hv(k);
    std::vector<int32_t> hi(k);
    auto worse = [&](float av, int32_t ai, float bv, int32_t bi) { return av < bv || (av == bv && ai > bi); };
    auto sift_down = [&](int32_t i, int32_t n) {
      for (;;) {
        int32_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && worse(hv[c + 1], hi[c + 1], hv[c], hi[c])) ++c;
        if (!worse(hv[c], hi[c], hv[i], hi[i])) break;
        std::swap(hv[c], hv[i]);
        std::swap(hi[c], hi[i]);
        i = c;
      }
    };
    for (int32_t j = 0; j < k; ++j) hv[j] = l[j], hi[j] = j;
    for (int32_t i = k / 2 - 1; i >= 0; --i) sift_down(i, k);
    for (int32_t j = k; j < vocab; ++j)
      if (l[j] > hv[0]) {
        hv[0] = l[j];
        hi[0] = j;
        sift_down(0, k);
      }
    std::vector<int32_t> order(k);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return worse(hv[b], hi[b], hv[a], hi[a]); });
    int32_t* out = ids + r * k;
    for (int32_t i = 0; i < k; ++i) out[i] = hi[order[i]];
    finish(row, k, out, probs + r * k, residual + r);
  };
  if (rows == 1) {
    one(0);
  } else {
    const size_t grain = std::max<size_t>(1, (size_t(1) << 15) / static_cast<size_t>(vocab));
    default_pool().parallel_for(rows, grain, [&](size_t a, size_t b) {
      for (size_t r = a; r < b; ++r) one(r);
    });
  }
  for (size_t r = 0; r < rows; ++r) throw_row_check(checks[r], what, r);
}

}  // namespace osd
