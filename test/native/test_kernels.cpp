// Native tests of the kernel reference: Philox known answers, the exp approximation, warping,
// verification invariants, distillation gradients against finite differences, AdamW, the pool;
// and every fast (blocked) path against the reference it replaces.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <thread>
#include <vector>

#include "backend/backend.h"
#include "check.h"
#include "core/error.h"
#include "core/fast_math.h"
#include "core/philox.h"
#include "core/thread_pool.h"
#include "distill/teacher.h"

using namespace osd;

// The SIMD helpers of core/fast_math.h are always inlined: GCC's ABI warning about returning a
// vector from baseline-compiled code does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

OSD_TEST(philox_known_answers) {
  // Random123's known-answer vectors for philox4x32_10 (counter words c0..c3, key k0, k1).
  Philox4 a = philox4x32_10(0, 0, 0, 0);
  CHECK_EQ(a.v[0], 0x6627e8d5u);
  CHECK_EQ(a.v[1], 0xe169c58du);
  CHECK_EQ(a.v[2], 0xbc57ac4cu);
  CHECK_EQ(a.v[3], 0x9b00dbd8u);
  Philox4 b = philox4x32_10(~0ull, ~0ull, ~0u, ~0u);
  CHECK_EQ(b.v[0], 0x408f276du);
  CHECK_EQ(b.v[1], 0x41c83b0eu);
  CHECK_EQ(b.v[2], 0xa20bc7c6u);
  CHECK_EQ(b.v[3], 0x6d5451fdu);
  Philox4 c = philox4x32_10(0x299f31d0a4093822ull, 0x0370734413198a2eull, 0x243f6a88u, 0x85a308d3u);
  CHECK_EQ(c.v[0], 0xd16cfe09u);
  CHECK_EQ(c.v[1], 0x94fdccebu);
  CHECK_EQ(c.v[2], 0x5001e420u);
  CHECK_EQ(c.v[3], 0x24126ea1u);
}

OSD_TEST(philox_uniform_range_and_mean) {
  double sum = 0, lo = 1, hi = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    double u = philox_uniform(42, 7, static_cast<uint32_t>(i), kLaneSample);
    sum += u;
    lo = std::min(lo, u);
    hi = std::max(hi, u);
  }
  CHECK(lo >= 0.0);
  CHECK(hi < 1.0);
  CHECK_NEAR(sum / n, 0.5, 0.005);
}

OSD_TEST(exp_approx_relative_error) {
  // The polynomial's error, plus |n| * 1.9e-9 from the one-step reduction by a rounded ln2.
  double worst = 0, near = 0;
  for (float x = -87.0f; x < 88.0f; x += 0.001953125f) {
    double ref = std::exp(static_cast<double>(x));
    const double err = std::fabs(exp_approx(x) - ref) / ref;
    worst = std::max(worst, err);
    if (std::fabs(x) < 15.0f) near = std::max(near, err);
  }
  std::printf("  exp_approx relative error: %.3g on [-87, 88], %.3g on (-15, 15)\n", worst, near);
  CHECK(worst < 4.2e-7);
  CHECK(near < 2.2e-7);
  CHECK_EQ(exp_approx(-1000.0f), 0.0f);
  CHECK_EQ(exp_approx(-std::numeric_limits<float>::infinity()), 0.0f);
  CHECK(std::isfinite(exp_approx(1000.0f)));
}

OSD_TEST(warp_top_k_and_top_p) {
  // logits give probabilities proportional to 8, 4, 2, 1, 1 (temperature 1).
  std::vector<float> l = {std::log(8.f), std::log(4.f), std::log(2.f), 0.f, 0.f};
  Sampling s;
  s.top_k = 2;
  WarpedRow w;
  warp_row(l.data(), 5, checked_row_max(l.data(), 5, "x", 0), s, w);
  CHECK_EQ(w.ids.size(), size_t(2));
  CHECK_NEAR(w.prob(0), 8.0 / 12, 1e-6);
  CHECK_NEAR(w.prob(1), 4.0 / 12, 1e-6);
  CHECK_EQ(w.prob(2), 0.0);
  // Ties at the k-th place go to the lower id: ids 3 and 4 tie.
  s.top_k = 4;
  warp_row(l.data(), 5, checked_row_max(l.data(), 5, "x", 0), s, w);
  CHECK(w.prob(3) > 0.0);
  CHECK_EQ(w.prob(4), 0.0);
  // top-p: masses 0.5, 0.25, 0.125, 0.0625, 0.0625. p = 0.75 keeps exactly {0, 1}; 0.76 adds 2.
  s.top_k = 0;
  s.top_p = 0.75f;
  warp_row(l.data(), 5, checked_row_max(l.data(), 5, "x", 0), s, w);
  CHECK_EQ(w.ids.size(), size_t(2));
  s.top_p = 0.76f;
  warp_row(l.data(), 5, checked_row_max(l.data(), 5, "x", 0), s, w);
  CHECK_EQ(w.ids.size(), size_t(3));
  CHECK_NEAR(w.prob(2), 2.0 / 14, 1e-6);
}

OSD_TEST(row_checks_find_every_bad_entry) {
  // The vectorised max passes flag a bad entry at any position (vector body or scalar tail).
  for (int32_t n : {16, 37, 100}) {
    std::vector<float> l(n, 1.0f);
    for (int32_t pos = 0; pos < n; ++pos) {
      bool bad;
      l[pos] = NAN;
      block_max(l.data(), n, &bad);
      CHECK(bad);
      l[pos] = INFINITY;
      block_max(l.data(), n, &bad);
      CHECK(bad);
      l[pos] = -INFINITY;
      CHECK_EQ(block_max(l.data(), n, &bad), 1.0f);
      CHECK(!bad);
      l[pos] = 3.0f;
      CHECK_EQ(block_max(l.data(), n, &bad), 3.0f);
      // Distillation needs finite logits: -Infinity is bad there too.
      std::vector<float> t(n, 0.0f), g(n);
      DistillInput in;
      in.student = l.data();
      in.teacher = t.data();
      in.rows = 1;
      in.vocab = n;
      for (float x : {NAN, INFINITY, -INFINITY}) {
        l[pos] = x;
        CHECK_THROWS(Error, forward_kl_row_blocked(in, 0, 1.0f, g.data()), "studentLogits row 0 contains NaN");
        CHECK_THROWS(Error, distill_row(in, 0, 1.0f, g.data()), "studentLogits row 0 contains NaN");
      }
      l[pos] = 1.0f;
    }
  }
}

OSD_TEST(row_validation) {
  std::vector<float> l = {0.f, NAN, 1.f};
  CHECK_THROWS(Error, checked_row_max(l.data(), 3, "targetLogits", 5), "targetLogits row 5");
  l[1] = INFINITY;
  CHECK_THROWS(Error, checked_row_max(l.data(), 3, "targetLogits", 0), "NaN or +Infinity");
  l = {-INFINITY, -INFINITY};
  CHECK_THROWS(Error, checked_row_max(l.data(), 2, "draftLogits", 1), "all -Infinity");
  l = {-INFINITY, 2.f};
  CHECK_EQ(checked_row_max(l.data(), 2, "x", 0), 2.0f);
}

namespace {

std::vector<float> random_logits(std::mt19937& rng, size_t n, float scale) {
  std::normal_distribution<float> nd(0.f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

}  // namespace

namespace {

// warp_row's support, written out literally: sort the whole row (logit desc, id asc), keep the k
// best, then the shortest prefix whose mass reaches top_p of the full mass (top-p alone) or of the
// k kept (top-k and top-p).
void warp_literal(const std::vector<float>& l, const Sampling& s, std::vector<int32_t>& ids, std::vector<float>& probs) {
  const int32_t V = static_cast<int32_t>(l.size());
  const float mx = checked_row_max(l.data(), V, "x", 0);
  const float it = 1.0f / s.temperature;
  std::vector<int32_t> order(V);
  for (int32_t j = 0; j < V; ++j) order[j] = j;
  std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
  if (s.top_k > 0 && s.top_k < V) order.resize(s.top_k);
  std::vector<double> w(order.size());
  double total = 0.0;
  for (size_t i = 0; i < order.size(); ++i) total += (w[i] = exp_approx((l[order[i]] - mx) * it));
  if (!(s.top_k > 0 && s.top_k < V)) {
    Sampling t = s;
    t.top_p = 1.0f;
    WarpedRow dense;
    warp_row(l.data(), V, mx, t, dense);
    total = dense.z;
  }
  size_t keep = order.size();
  double cum = 0.0;
  if (s.top_p < 1.0f)
    for (size_t i = 0; i < order.size(); ++i)
      if ((cum += w[i]) >= static_cast<double>(s.top_p) * total) {
        keep = i + 1;
        break;
      }
  double kept = 0.0;
  for (size_t i = 0; i < keep; ++i) kept += w[i];
  std::vector<std::pair<int32_t, float>> sup(keep);
  for (size_t i = 0; i < keep; ++i) sup[i] = {order[i], static_cast<float>(w[i] / kept)};
  std::sort(sup.begin(), sup.end());
  ids.clear(), probs.clear();
  for (auto& [id, p] : sup) ids.push_back(id), probs.push_back(p);
}

}  // namespace

OSD_TEST(warp_row_matches_full_sort) {
  // The prefilters of warp_row (chunk maxima for top-k, per-bin masses for top-p) and its integer
  // sort keys never change the support or its probabilities: the same bits as sorting the whole
  // row. Ties included, -0 and +0 among them.
  std::mt19937 rng(17);
  int checked = 0;
  for (int32_t V : {2, 5, 64, 65, 1000, 5000, 40000}) {
    for (int trial = 0; trial < 12; ++trial) {
      auto l = random_logits(rng, V, trial % 3 == 0 ? 0.3f : 3.f);
      if (trial % 4 == 1)  // many exact ties
        for (auto& x : l) x = std::round(x);
      if (trial % 4 == 2)
        for (int i = 0; i < V / 10; ++i) l[rng() % V] = -INFINITY;
      l[rng() % V] = 2.0f;
      if (trial % 4 == 3) {  // -0 and +0 tie at the top
        for (auto& x : l) x = -std::fabs(x) - 0.5f;
        l[0] = -0.0f;
        l[V - 1] = 0.0f;
      }
      Sampling s;
      s.temperature = trial % 2 ? 0.7f : 1.5f;
      // k < V; k >= 256 sorts its candidates by radix, smaller k by std::sort
      s.top_k = trial % 3 == 2 ? 0
                : trial % 6 == 0 && V > 1000 ? 256 + static_cast<int32_t>(rng() % 800)
                                              : 1 + static_cast<int32_t>(rng() % std::min(V - 1, 100));
      const float top_p[] = {0.999f, 0.6f, 0.05f, 0.8f, 0.9f, 0.999999f};
      s.top_p = trial % 3 == 1 ? 1.0f : top_p[trial % 6];
      std::vector<int32_t> ids;
      std::vector<float> probs;
      warp_literal(l, s, ids, probs);
      WarpedRow w;
      warp_row(l.data(), V, checked_row_max(l.data(), V, "x", 0), s, w);
      CHECK(w.ids == ids);
      CHECK(w.probs == probs);
      ++checked;
    }
  }
  CHECK_EQ(checked, 84);
}

OSD_TEST(greedy_chain_matches_argmax_walk) {
  std::mt19937 rng(1);
  const int V = 3;
  Sampling s;
  s.temperature = 0;
  for (int trial = 0; trial < 2000; ++trial) {
    const int g = 1 + trial % 5;
    auto t = random_logits(rng, (g + 1) * V, 1.f);
    std::vector<int32_t> tok(g), out(g + 1);
    for (auto& x : tok) x = rng() % V;
    ChainInput in;
    in.target = t.data();
    in.tokens = tok.data();
    in.g = g;
    in.vocab = V;
    ChainResult r = verify_chain(in, s, 1, 0, out.data());
    int expect = 0;
    while (expect < g && tok[expect] == argmax_row(t.data() + expect * V, V)) ++expect;
    CHECK_EQ(r.accepted, expect);
    CHECK_EQ(out[expect], argmax_row(t.data() + expect * V, V));
  }
}

OSD_TEST(chain_equals_chain_shaped_tree) {
  std::mt19937 rng(2);
  const int V = 7;
  Sampling s;
  s.temperature = 0.9f;
  int mismatches = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    const int g = 1 + trial % 4;
    auto t = random_logits(rng, (g + 1) * V, 1.5f);
    auto d = random_logits(rng, (g + 1) * V, 1.5f);  // the tree layout has one more draft row
    std::vector<int32_t> tok(g), parents(g), out(g + 1), tout(g + 1), path(g);
    for (int i = 0; i < g; ++i) tok[i] = rng() % V, parents[i] = i - 1;
    ChainInput ci;
    ci.target = t.data();
    ci.draft = d.data();
    ci.tokens = tok.data();
    ci.g = g;
    ci.vocab = V;
    ChainResult cr = verify_chain(ci, s, 99, trial, out.data());
    TreeInput ti;
    ti.parents = parents.data();
    ti.tokens = tok.data();
    ti.n = g;
    ti.target = t.data();
    ti.draft = d.data();
    ti.vocab = V;
    TreeResult tr = verify_tree(ti, s, TreeChildren::WithReplacement, 99, trial, path.data(), tout.data());
    bool same = cr.emitted == tr.emitted;
    for (int i = 0; same && i < cr.emitted; ++i) same = out[i] == tout[i];
    mismatches += !same;
  }
  CHECK_EQ(mismatches, 0);
}

OSD_TEST(tree_validation_names_argument) {
  std::vector<int32_t> parents = {-1, 1}, tokens = {0, 1};
  std::vector<float> t(3 * 4, 0.f);
  TreeInput ti;
  ti.parents = parents.data();
  ti.tokens = tokens.data();
  ti.n = 2;
  ti.target = t.data();
  ti.vocab = 4;
  CHECK_THROWS(Error, validate_tree(ti), "parents[1]");
  parents[1] = 0;
  tokens[0] = 4;
  CHECK_THROWS(Error, validate_tree(ti), "tokens[0]");
}

// ---- The blocked fast paths against the reference -------------------------------------------
// Tolerances: vexp bit-identical to exp_approx; block sums bit-identical to the scheme
// written out literally below; z and probabilities within 1e-5 (relative) of the reference's
// one-pass sums (whose own float lanes carry a few 1e-6); chain tokens identical to the reference walk on every case here (the summation
// order only matters when a uniform lands within ~1e-7 of a decision boundary); forward KL loss
// within 1e-5 * max(1, |loss|), gradient within 1e-7 + 1e-5 |g|.

// Both vector widths, 8 and 16 lanes (the kernels pick one per CPU).
template <class V> long vexp_mismatches(long* tested) {
  constexpr int L = kLanes<V>;
  // Every 61st float (all exponents, both signs; NaN and x > 88.3 are outside the contract).
  long mismatches = 0;
  float x[L], got[L];
  int k = 0;
  for (uint64_t u = 0; u < (1ull << 32); u += 61) {
    uint32_t bits = static_cast<uint32_t>(u);
    float v;
    std::memcpy(&v, &bits, sizeof v);
    if (!(v <= 88.3f)) continue;
    x[k++] = v;
    if (k < L) continue;
    vstore(got, vexp(vload<V>(x)));
    for (int i = 0; i < L; ++i) {
      const float want = exp_approx(x[i]);
      mismatches += std::memcmp(&want, &got[i], sizeof want) != 0;
    }
    *tested += L;
    k = 0;
  }
  const float edge[16] = {-87.3f,  -87.29f, -INFINITY, -1e30f, 0.0f,   -0.0f,      88.3f, -126.0f,
                          -1e-30f, -1e-45f, -0.5f,     -0.35f, -86.0f, -0.693147f, 1.0f,  -100.0f};
  for (int i = 0; i < 16; i += L) {
    vstore(got, vexp(vload<V>(edge + i)));
    for (int j = 0; j < L; ++j) mismatches += got[j] != exp_approx(edge[i + j]);
  }
  return mismatches;
}

OSD_TEST(vexp_matches_exp_approx) {
  std::printf("    the kernels run %d-lane vectors here\n", simd_wide() ? 16 : 8);
  long tested8 = 0, tested16 = 0;
  CHECK_EQ(vexp_mismatches<f32x8>(&tested8), 0L);
  CHECK_EQ(vexp_mismatches<f32x16>(&tested16), 0L);
  CHECK(tested8 > 40000000);
  CHECK(tested16 > 40000000);
}

namespace {

// The block scheme of sampling.h, written out literally (scalar, one lane at a time).
float lane_sum_literal(const float* e, int32_t n) {
  float a[32] = {};
  for (int32_t j = 0; j < n; ++j) a[j % 32] = a[j % 32] + e[j];
  for (int w = 16; w >= 1; w /= 2)
    for (int k = 0; k < w; ++k) a[k] = a[k] + a[k + w];
  return a[0];
}

std::vector<float> logits_with_neg_inf(std::mt19937& rng, int32_t n, float scale, double neg_inf_fraction) {
  auto v = random_logits(rng, n, scale);
  std::uniform_real_distribution<double> u(0, 1);
  for (auto& x : v)
    if (u(rng) < neg_inf_fraction) x = -INFINITY;
  v[rng() % n] = 1.0f;  // at least one finite entry
  return v;
}

}  // namespace

OSD_TEST(dense_row_block_scheme) {
  std::mt19937 rng(11);
  for (int32_t V : {1, 5, 31, 32, 33, 2047, 2048, 2049, 5000, 32000, 70001}) {
    for (float T : {1.0f, 0.7f, 2.5f}) {
      auto l = logits_with_neg_inf(rng, V, 3.f, V > 100 ? 0.02 : 0.2);
      if (V > 4096) std::fill(l.begin() + 2048, l.begin() + 4096, -INFINITY);  // a whole -Infinity block
      const float it = 1.0f / T;
      DenseRow d;
      DenseRow* out = &d;
      const float* rows = l.data();
      dense_rows(&rows, 1, V, it, &out);
      CHECK(d.check == RowCheck::Ok);
      CHECK_EQ(d.max, checked_row_max(l.data(), V, "x", 0));
      // Every quantity bit for bit as the scheme defines it (the build does not contract
      // multiply-adds, so the cloned SIMD kernels round exactly as this scalar code does).
      double z = 0.0;
      bool exact = true;
      for (int32_t b = 0; b < stat_blocks(V); ++b) {
        const int32_t j0 = b * kStatBlock, n = std::min(kStatBlock, V - j0);
        float bm = -INFINITY;
        for (int32_t j = j0; j < j0 + n; ++j) bm = std::max(bm, l[j]);
        std::vector<float> e(n, 0.0f);
        if (bm != -INFINITY)
          for (int32_t j = 0; j < n; ++j) e[j] = exp_approx((l[j0 + j] - bm) * it);
        const float sb = lane_sum_literal(e.data(), n);
        const float cb = bm == -INFINITY ? 0.0f : exp_approx((bm - d.max) * it);
        exact &= std::memcmp(d.e.data() + j0, e.data(), n * sizeof(float)) == 0;
        exact &= d.bmax[b] == bm && d.bsum[b] == sb && d.scale[b] == cb && d.mass[b] == sb * cb;
        z += static_cast<double>(sb * cb);
      }
      CHECK(exact);
      CHECK_EQ(d.z, z);
      // Against the reference's one-pass normaliser and probabilities.
      Sampling s;
      s.temperature = T;
      WarpedRow w;
      warp_row(l.data(), V, d.max, s, w);
      CHECK_NEAR(d.z, w.z, 1e-5 * w.z);
      for (int i = 0; i < 50; ++i) {
        const int32_t x = rng() % V;
        CHECK_NEAR(d.prob(x), w.prob(x), 1e-5 * w.prob(x));
      }
    }
  }
  // Validation outcomes.
  std::vector<float> l(3000, 0.0f);
  l[2500] = NAN;
  DenseRow d;
  DenseRow* out = &d;
  const float* rows = l.data();
  dense_rows(&rows, 1, 3000, 1.0f, &out);
  CHECK(d.check == RowCheck::NotFinite);
  std::fill(l.begin(), l.end(), -INFINITY);
  dense_rows(&rows, 1, 3000, 1.0f, &out);
  CHECK(d.check == RowCheck::AllNegInf);
  CHECK_THROWS(Error, throw_row_check(RowCheck::AllNegInf, "draftLogits", 4), "draftLogits row 4 is all -Infinity");
}

OSD_TEST(sample_dense_matches_sample_row) {
  // Inverse CDF by blocks against the reference's one pass over the row: the same token for every
  // u except within rounding of a CDF step (none among these draws).
  std::mt19937 rng(12);
  std::uniform_real_distribution<double> uni(0, 1);
  int mismatches = 0;
  for (int32_t V : {3, 100, 2048, 2049, 9000}) {
    auto l = logits_with_neg_inf(rng, V, 2.f, 0.1);
    DenseRow d;
    DenseRow* out = &d;
    const float* rows = l.data();
    dense_rows(&rows, 1, V, 1.0f / 0.8f, &out);
    Sampling s;
    s.temperature = 0.8f;
    WarpedRow w;
    warp_row(l.data(), V, d.max, s, w);
    for (int i = 0; i < 2000; ++i) {
      const double u = uni(rng);
      const int32_t a = sample_dense(d, u), b = sample_row(w, u);
      mismatches += a != b;
      CHECK(l[a] != -INFINITY);
    }
    CHECK(l[sample_dense(d, std::nextafter(1.0, 0.0))] != -INFINITY);
    CHECK_EQ(sample_dense(d, 0.0), sample_row(w, 0.0));
  }
  CHECK_EQ(mismatches, 0);
}

OSD_TEST(sample_token_sparse_matches_sample_token) {
  // A restricted head's row (-Infinity outside its ids): the sparse sampler's token is sample_token's
  // for every seed, position and sampling, with rows cut to a shared vocabulary too; its errors are
  // sample_token's.
  std::mt19937 rng(77);
  std::normal_distribution<float> nrm(0.0f, 2.5f);
  int checked = 0, sampled_outside = 0;
  for (int32_t V : {7, 300, 5000, 49152}) {
    for (double keep : {0.05, 0.5, 0.97}) {
      std::vector<int32_t> ids;
      std::bernoulli_distribution in(keep);
      for (int32_t j = 0; j < V; ++j)
        if (in(rng)) ids.push_back(j);
      if (ids.empty()) ids.push_back(V / 2);
      std::vector<float> row(static_cast<size_t>(V), -INFINITY);
      for (int32_t id : ids) row[id] = nrm(rng);
      row[ids[ids.size() / 2]] = row[ids[0]];  // a tie for the greedy pick
      for (int32_t cut : {V, std::max<int32_t>(1, ids[ids.size() / 2] + 1)}) {
        for (int sc = 0; sc < 5; ++sc) {
          Sampling s;
          s.temperature = sc == 0 ? 0.0f : sc == 1 ? 1.0f : sc == 2 ? 0.4f : sc == 3 ? 1.7f : 0.9f;
          if (sc == 4) s.top_k = 5, s.top_p = 0.9f;  // through sample_token
          for (uint32_t pos = 0; pos < 200; ++pos) {
            const int32_t a = sample_token(row.data(), cut, s, 9, 3, pos);
            const int32_t b = sample_token_sparse(row.data(), cut, ids.data(), static_cast<int32_t>(ids.size()), s, 9, 3, pos);
            CHECK_EQ(a, b);
            sampled_outside += row[b] == -INFINITY;
            ++checked;
          }
        }
      }
    }
  }
  CHECK_EQ(sampled_outside, 0);
  std::printf("    %d draws identical\n", checked);
  // Errors: NaN or +Infinity among the ids, or no id with a finite logit (all cut away).
  std::vector<float> row(100, -INFINITY);
  const std::vector<int32_t> ids = {3, 50, 90};
  row[3] = 1.0f, row[50] = NAN, row[90] = 2.0f;
  Sampling s;
  s.temperature = 1.0f;
  CHECK_THROWS(Error, sample_token_sparse(row.data(), 100, ids.data(), 3, s, 1, 1, 0, "draft logits", 2),
               "draft logits row 2 contains NaN or +Infinity");
  row[50] = 0.0f;
  CHECK_THROWS(Error, sample_token_sparse(row.data(), 3, ids.data(), 3, s, 1, 1, 0, "draft logits", 0),
               "draft logits row 0 is all -Infinity");
}

OSD_TEST(find_crossing_matches_sequential_scan) {
  // The group-sum search against the scan it replaces, the first j with cum0 + w_0 + ... + w_j >
  // target added one by one in double: random targets are decided (and must agree); targets on or
  // one ulp beside a partial sum must agree or fall back (-1), never differ.
  std::mt19937 rng(31);
  std::uniform_real_distribution<double> uni(0, 1);
  std::normal_distribution<float> nrm(0.0f, 1.0f);
  auto literal = [](const std::vector<float>& w, double cum, double target) {
    for (size_t j = 0; j < w.size(); ++j)
      if ((cum += static_cast<double>(w[j])) > target) return static_cast<int32_t>(j);
    return int32_t{-1};
  };
  int decided = 0, random_targets = 0, wrong = 0, tie_decided = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    const int32_t n = trial % 7 == 0 ? 1 + trial % 61 : 1 + static_cast<int32_t>(uni(rng) * kStatBlock);
    const float spread = trial % 3 == 0 ? 12.0f : 3.0f;  // wide: weights down to the denormals
    std::vector<float> w(n);
    for (auto& x : w) x = uni(rng) < 0.4 ? 0.0f : std::exp(spread * nrm(rng) - 20.0f);
    const double cum0 = trial % 2 ? uni(rng) * 1e-3 : 0.0;
    std::vector<double> partial(n);
    double c = cum0;
    for (int32_t j = 0; j < n; ++j) partial[j] = c += static_cast<double>(w[j]);
    for (int k = 0; k < 8; ++k) {
      double target;
      const bool tie = k >= 4;
      if (!tie) {
        target = cum0 + uni(rng) * (partial[n - 1] - cum0) * 1.01;  // past the end sometimes
        ++random_targets;
      } else {
        const double at = partial[static_cast<size_t>(uni(rng) * n)];
        target = k == 4 ? at : k == 5 ? std::nextafter(at, 0.0) : k == 6 ? std::nextafter(at, 1.0) : at * (1 + 1e-15);
      }
      const int32_t fast = find_crossing(w.data(), n, cum0, target), want = literal(w, cum0, target);
      if (fast >= 0) {
        wrong += fast != want;
        (tie ? tie_decided : decided) += 1;
      }
    }
  }
  CHECK_EQ(wrong, 0);
  // Nearly all random targets are decided without the fallback (the ones past the end are not).
  CHECK(decided > random_targets * 9 / 10);
  CHECK(tie_decided < 12000);  // ties sit inside the margin: most fall back
}

OSD_TEST(blocked_row_matches_dense_row) {
  // The blocked row without stored exp terms against DenseRow, bit for bit: statistics, prob,
  // samples and residual samples (with -Infinity entries and blocks, and p == q where the residual
  // has no mass and falls back to p).
  std::mt19937 rng(15);
  std::uniform_real_distribution<double> uni(0, 1);
  int diffs = 0;
  for (int32_t V : {1, 3, 100, 2048, 2049, 6001, 20000}) {
    for (int rep = 0; rep < 3; ++rep) {
      auto lp = logits_with_neg_inf(rng, V, 2.f, 0.1);
      auto lq = rep == 2 ? lp : logits_with_neg_inf(rng, V, 2.f, 0.1);
      if (V > 4096) std::fill(lq.begin() + 2048, lq.begin() + 4096, -INFINITY);
      const float it = rep == 0 ? 1.0f : 1.0f / 0.7f;
      DenseRow dp, dq;
      DenseRow* outs[2] = {&dp, &dq};
      const float* rows[2] = {lp.data(), lq.data()};
      dense_rows(rows, 2, V, it, outs);
      const int32_t nb = stat_blocks(V);
      std::vector<BlockStat> sp(nb), sq(nb);
      std::vector<float> scp(nb), msp(nb), scq(nb), msq(nb), rm(nb);
      for (int32_t b = 0; b < nb; ++b) {
        const int32_t j0 = b * kStatBlock, n = std::min(kStatBlock, V - j0);
        block_stats(lp.data() + j0, n, it, true, sp[b]);
        block_stats(lq.data() + j0, n, it, true, sq[b]);
      }
      BlockedRow p, q;
      p.logits = lp.data(), p.vocab = V, p.inv_t = it, p.blocks = sp.data(), p.scale = scp.data(), p.mass = msp.data();
      q = p;
      q.logits = lq.data(), q.blocks = sq.data(), q.scale = scq.data(), q.mass = msq.data();
      finish_row(p);
      finish_row(q);
      CHECK(p.check == RowCheck::Ok && q.check == RowCheck::Ok);
      diffs += p.max != dp.max || p.z != dp.z || q.z != dq.z;
      for (int32_t b = 0; b < nb; ++b) diffs += scp[b] != dp.scale[b] || msp[b] != dp.mass[b];
      for (int32_t x = 0; x < V; x += 1 + V / 300) diffs += p.prob(x) != dp.prob(x);
      std::vector<float> r, rmass;
      for (int i = 0; i < 300; ++i) {
        const double u = i == 0 ? 0.0 : i == 1 ? std::nextafter(1.0, 0.0) : uni(rng);
        diffs += sample_blocked(p, u) != sample_dense(dp, u);
        diffs += sample_residual_blocked(p, q, u, rm.data()) != sample_residual_dense(dp, dq, u, r, rmass);
      }
    }
  }
  CHECK_EQ(diffs, 0);
}

namespace {

struct RandomChain {
  int32_t V, g;
  std::vector<float> t, d;
  std::vector<int32_t> tok;
};

RandomChain random_chain(std::mt19937& rng, int32_t V, int32_t g, float noise) {
  RandomChain c{V, g, random_logits(rng, (g + 1) * V, 2.f), {}, std::vector<int32_t>(g)};
  c.d = c.t;
  c.d.resize(g * V);
  std::normal_distribution<float> nd(0.f, noise);
  for (auto& x : c.d) x += nd(rng);
  for (int32_t i = 0; i < g; ++i)  // the draft's likeliest token, or a random one
    c.tok[i] = (rng() % 2) ? static_cast<int32_t>(std::max_element(c.d.begin() + i * V, c.d.begin() + (i + 1) * V) -
                                                  (c.d.begin() + i * V))
                           : static_cast<int32_t>(rng() % V);
  return c;
}

// The blocked scheme walked literally, one DenseRow pair per position with every e_j stored (the
// CPU backend's fast path before it stopped storing exp terms): verify_chain_blocked must give its
// tokens bit for bit, for every input.
ChainResult verify_chain_dense_literal(const ChainInput& in, const Sampling& s, uint64_t seed, uint64_t stream,
                                       int32_t* out) {
  const int32_t g = in.g, V = in.vocab;
  const float inv_t = 1.0f / s.temperature;
  DenseRow p, q;
  DenseRow* pq[2] = {&p, &q};
  std::vector<float> r, rmass;
  ChainResult res;
  for (int32_t i = 0; i < g; ++i) {
    const float* rows[2] = {in.target + static_cast<size_t>(i) * V, in.draft + static_cast<size_t>(i) * V};
    dense_rows(rows, 2, V, inv_t, pq);
    const int32_t x = in.tokens[i];
    const double px = p.prob(x), qx = q.prob(x);
    const double u = philox_uniform(seed, stream, static_cast<uint32_t>(i + 1), kLaneAccept);
    if (qx > 0.0 && u * qx < px) {
      out[i] = x;
      continue;
    }
    out[i] = sample_residual_dense(p, q, philox_uniform(seed, stream, static_cast<uint32_t>(i), kLaneSample), r, rmass);
    res.accepted = i;
    res.emitted = i + 1;
    return res;
  }
  const float* row = in.target + static_cast<size_t>(g) * V;
  dense_rows(&row, 1, V, inv_t, pq);
  out[g] = sample_dense(p, philox_uniform(seed, stream, static_cast<uint32_t>(g), kLaneSample));
  res.accepted = g;
  res.emitted = g + 1;
  return res;
}

}  // namespace

OSD_TEST(verify_chain_blocked_matches_literal_and_reference) {
  // Both modes of the fast path (spread over the pool, and one thread walking) against the literal
  // blocked walk (bit for bit, always) and the reference verify_chain (the same tokens unless a
  // draw falls within rounding of a boundary: none among these cases). Rows with -Infinity entries,
  // whole -Infinity blocks, V below, at and off multiples of kStatBlock, g = 0.
  std::mt19937 rng(13);
  BlockedChainScratch scratch;
  int vs_literal = 0, vs_reference = 0, cases = 0, rejected = 0;
  for (int32_t V : {1, 2, 7, 50, 2047, 2048, 2049, 3000, 5000, 20000}) {
    const int trials = V > 2048 ? 120 : 400;
    for (int trial = 0; trial < trials; ++trial) {
      const int32_t g = trial % 7;
      RandomChain c = random_chain(rng, V, g, trial % 3 == 0 ? 0.3f : 1.5f);
      if (trial % 5 == 1) {  // -Infinity entries, the same ones in both rows most of the time
        for (size_t j = 0; j < c.d.size(); ++j)
          if (rng() % 4 == 0) c.d[j] = -INFINITY, c.t[j] = rng() % 2 ? -INFINITY : c.t[j];
        for (int32_t i = 0; i < g; ++i) c.d[i * V + c.tok[i]] = 0.0f, c.d[i * V] = 1.0f, c.t[i * V] = 1.0f;
      }
      if (trial % 5 == 2 && V > 4096)  // a whole -Infinity block in every row
        for (int32_t i = 0; i <= g; ++i) {
          std::fill(c.t.begin() + i * V + 2048, c.t.begin() + i * V + 4096, -INFINITY);
          if (i < g) std::fill(c.d.begin() + i * V + 2048, c.d.begin() + i * V + 4096, -INFINITY);
        }
      Sampling s;
      s.temperature = trial % 4 == 0 ? 1.0f : 0.6f + 0.1f * (trial % 5);
      ChainInput in;
      in.target = c.t.data();
      in.draft = c.d.data();
      in.tokens = c.tok.data();
      in.g = g;
      in.vocab = V;
      std::vector<int32_t> ref(g + 1), lit(g + 1);
      const ChainResult a = verify_chain(in, s, 5, trial, ref.data());
      const ChainResult l = verify_chain_dense_literal(in, s, 5, trial, lit.data());
      for (bool spread : {true, false}) {
        std::vector<int32_t> fast(g + 1);
        std::vector<RowCheck> tc(g + 1, RowCheck::Unchecked), dc(g, RowCheck::Unchecked);
        const ChainResult b = verify_chain_blocked(in, s, 5, trial, fast.data(), scratch, tc.data(), dc.data(), spread);
        bool same_lit = l.accepted == b.accepted && l.emitted == b.emitted;
        for (int32_t i = 0; same_lit && i < l.emitted; ++i) same_lit = lit[i] == fast[i];
        bool same_ref = a.accepted == b.accepted && a.emitted == b.emitted;
        for (int32_t i = 0; same_ref && i < a.emitted; ++i) same_ref = ref[i] == fast[i];
        vs_literal += !same_lit;
        vs_reference += !same_ref;
        // Every row was validated, reached by the walk or not.
        for (int32_t i = 0; i <= g; ++i) CHECK(tc[i] == RowCheck::Ok);
        for (int32_t i = 0; i < g; ++i) CHECK(dc[i] == RowCheck::Ok);
      }
      rejected += a.accepted < g;
      ++cases;
    }
  }
  CHECK_EQ(vs_literal, 0);
  CHECK_EQ(vs_reference, 0);
  CHECK(rejected > cases / 4);
}

OSD_TEST(verify_chain_blocked_validates_every_row) {
  // A bad row anywhere is reported in its slot by both modes, whatever the walk reached; the other
  // rows are Ok.
  std::mt19937 rng(21);
  BlockedChainScratch scratch;
  const int32_t V = 5000, g = 4;
  for (int trial = 0; trial < 40; ++trial) {
    RandomChain c = random_chain(rng, V, g, 1.0f);
    const bool in_target = trial % 2 == 0;
    const int32_t r = static_cast<int32_t>(rng() % (in_target ? g + 1 : g));
    float* row = (in_target ? c.t.data() : c.d.data()) + static_cast<size_t>(r) * V;
    const int kind = trial % 3;
    if (kind == 0) row[rng() % V] = NAN;
    if (kind == 1) row[rng() % V] = INFINITY;
    if (kind == 2) std::fill(row, row + V, -INFINITY);
    const RowCheck want = kind == 2 ? RowCheck::AllNegInf : RowCheck::NotFinite;
    Sampling s;
    ChainInput in;
    in.target = c.t.data(), in.draft = c.d.data(), in.tokens = c.tok.data(), in.g = g, in.vocab = V;
    for (bool spread : {true, false}) {
      std::vector<int32_t> out(g + 1);
      std::vector<RowCheck> tc(g + 1, RowCheck::Unchecked), dc(g, RowCheck::Unchecked);
      verify_chain_blocked(in, s, 3, trial, out.data(), scratch, tc.data(), dc.data(), spread);
      for (int32_t i = 0; i <= g; ++i) CHECK(tc[i] == (in_target && i == r ? want : RowCheck::Ok));
      for (int32_t i = 0; i < g; ++i) CHECK(dc[i] == (!in_target && i == r ? want : RowCheck::Ok));
    }
  }
}

OSD_TEST(chain_batch_fast_path_does_not_depend_on_split) {
  // A sequence verified alone (its blocks spread over the threads) and inside a batch larger than
  // the pool (one thread per sequence) gives the same tokens.
  std::mt19937 rng(14);
  const int32_t V = 9000, B = 2 * default_pool().size() + 3;
  std::vector<RandomChain> cs;
  std::vector<float> t, d;
  std::vector<int32_t> tok, len;
  for (int32_t b = 0; b < B; ++b) {
    cs.push_back(random_chain(rng, V, b % 4, 1.0f));
    t.insert(t.end(), cs[b].t.begin(), cs[b].t.end());
    d.insert(d.end(), cs[b].d.begin(), cs[b].d.end());
    tok.insert(tok.end(), cs[b].tok.begin(), cs[b].tok.end());
    len.push_back(cs[b].g);
  }
  std::vector<Sampling> samp(B);
  for (auto& s : samp) s.temperature = 0.9f;
  std::vector<uint64_t> streams(B);
  for (int32_t b = 0; b < B; ++b) streams[b] = 100 + b;
  ChainBatch in;
  in.target = t.data(), in.draft = d.data(), in.tokens = tok.data(), in.lengths = len.data();
  in.streams = streams.data(), in.sampling = samp.data(), in.batch = B, in.vocab = V, in.seed = 77;
  std::vector<int32_t> acc(B), out(t.size() / V);
  ChainBatchOut o{acc.data(), out.data()};
  cpu_backend().verify_chain_batch(in, o);
  size_t off = 0;
  for (int32_t b = 0; b < B; ++b) {
    ChainBatch one = in;
    one.target = cs[b].t.data(), one.draft = cs[b].d.data(), one.tokens = cs[b].tok.data();
    one.lengths = &len[b], one.streams = &streams[b], one.sampling = &samp[b], one.batch = 1;
    int32_t acc1;
    std::vector<int32_t> out1(cs[b].g + 1);
    ChainBatchOut o1{&acc1, out1.data()};
    cpu_backend().verify_chain_batch(one, o1);
    CHECK_EQ(acc1, acc[b]);
    for (int32_t i = 0; i <= acc1; ++i) CHECK_EQ(out1[i], out[off + i]);
    off += cs[b].g + 1;
  }
}

OSD_TEST(chain_batch_validates_rows_the_walk_skips) {
  // Row 0 rejects its token for sure (q puts all mass on it, p none), so the walk stops there; a
  // bad row later in the chain is still found, and the first bad row in order is the one named.
  const int32_t V = 3000, g = 3;
  std::vector<float> t((g + 1) * V, 0.0f), d(g * V, 0.0f);
  std::vector<int32_t> tok(g, 5), len = {g}, acc(1), out(g + 1);
  t[5] = -INFINITY;
  d[5] = 50.0f;
  Sampling s;
  uint64_t stream = 0;
  ChainBatch in;
  in.target = t.data(), in.draft = d.data(), in.tokens = tok.data(), in.lengths = len.data();
  in.streams = &stream, in.sampling = &s, in.batch = 1, in.vocab = V;
  ChainBatchOut o{acc.data(), out.data()};
  cpu_backend().verify_chain_batch(in, o);
  CHECK_EQ(acc[0], 0);
  d[2 * V + 2999] = NAN;
  CHECK_THROWS(Error, cpu_backend().verify_chain_batch(in, o), "draftLogits row 2 contains NaN");
  std::fill(t.begin() + 3 * V, t.end(), -INFINITY);
  CHECK_THROWS(Error, cpu_backend().verify_chain_batch(in, o), "targetLogits row 3 is all -Infinity");
  t[V + 1] = INFINITY;
  CHECK_THROWS(Error, cpu_backend().verify_chain_batch(in, o), "targetLogits row 1 contains NaN or +Infinity");
}

namespace {

double loss_at(DistillInput in, std::vector<float>& s) {
  in.student = s.data();
  return cpu_backend().distill_loss(in, nullptr);
}

void check_gradient(DistillKind kind, bool sparse) {
  std::mt19937 rng(static_cast<unsigned>(kind) * 10 + sparse);
  const int V = 11, N = 3, K = 4;
  auto s = random_logits(rng, N * V, 1.f);
  auto t = random_logits(rng, N * V, 1.f);
  std::vector<int32_t> ids(N * K);
  std::vector<float> probs(N * K);
  for (int r = 0; r < N; ++r)
    for (int i = 0; i < K; ++i) ids[r * K + i] = (r + 3 * i) % V, probs[r * K + i] = 0.15f + 0.05f * i;
  std::vector<uint8_t> mask = {1, 0, 1};
  DistillInput in;
  in.kind = kind;
  in.rows = N;
  in.vocab = V;
  in.temperature = 1.3f;
  in.beta = 0.3f;
  in.mask = mask.data();
  if (sparse) {
    in.topk_ids = ids.data();
    in.topk_probs = probs.data();
    in.k = K;
  } else {
    in.teacher = t.data();
  }
  in.student = s.data();
  std::vector<float> grad(N * V);
  cpu_backend().distill_loss(in, grad.data());
  for (int j = 0; j < N * V; ++j) {
    const float h = 1e-2f;
    auto sp = s, sm = s;
    sp[j] += h;
    sm[j] -= h;
    double fd = (loss_at(in, sp) - loss_at(in, sm)) / (2 * h);
    if (kind == DistillKind::TVD && std::fabs(fd - grad[j]) > 1e-3) {
      // |p - q| has kinks; skip coordinates where the central difference straddles one.
      continue;
    }
    CHECK_NEAR(grad[j], fd, 2e-3 + 2e-2 * std::fabs(fd));
  }
  for (int j = V; j < 2 * V; ++j) CHECK_EQ(grad[j], 0.0f);  // masked row
}

}  // namespace

OSD_TEST(distill_gradients_match_finite_differences) {
  for (auto kind : {DistillKind::ForwardKL, DistillKind::ReverseKL, DistillKind::JSD, DistillKind::TVD}) {
    check_gradient(kind, false);
    check_gradient(kind, true);
  }
}

OSD_TEST(forward_kl_closed_form) {
  std::mt19937 rng(5);
  const int V = 50, N = 4;
  auto s = random_logits(rng, N * V, 2.f);
  auto t = random_logits(rng, N * V, 2.f);
  DistillInput in;
  in.kind = DistillKind::ForwardKL;
  in.student = s.data();
  in.teacher = t.data();
  in.rows = N;
  in.vocab = V;
  in.temperature = 2.0f;
  std::vector<float> grad(N * V);
  cpu_backend().distill_loss(in, grad.data());
  for (int r = 0; r < N; ++r) {
    double zs = 0, zt = 0;
    for (int j = 0; j < V; ++j) zs += std::exp(s[r * V + j] / 2.0), zt += std::exp(t[r * V + j] / 2.0);
    for (int j = 0; j < V; ++j) {
      double q = std::exp(s[r * V + j] / 2.0) / zs, p = std::exp(t[r * V + j] / 2.0) / zt;
      CHECK_NEAR(grad[r * V + j], (q - p) / 2.0 / N, 1e-7);
    }
  }
}

OSD_TEST(distill_stable_for_large_logits) {
  const int V = 6;
  std::vector<float> s = {1e4f, -1e4f, 0.f, 5e3f, -5e3f, 1e4f - 1.f};
  std::vector<float> t = {-1e4f, 1e4f, 0.f, 1e4f - 2.f, 3.f, -1e4f};
  for (auto kind : {DistillKind::ForwardKL, DistillKind::ReverseKL, DistillKind::JSD, DistillKind::TVD}) {
    DistillInput in;
    in.kind = kind;
    in.student = s.data();
    in.teacher = t.data();
    in.rows = 1;
    in.vocab = V;
    std::vector<float> grad(V);
    double loss = cpu_backend().distill_loss(in, grad.data());
    CHECK(std::isfinite(loss));
    for (float g : grad) CHECK(std::isfinite(g));
  }
}

OSD_TEST(forward_kl_blocked_matches_reference) {
  std::mt19937 rng(15);
  for (int32_t V : {1, 7, 33, 2048, 2049, 5000, 40000}) {
    for (float T : {1.0f, 0.5f, 3.0f}) {
      for (float scale_logits : {1.f, 4.f}) {
        auto s = random_logits(rng, V, scale_logits);
        auto t = random_logits(rng, V, scale_logits);
        DistillInput in;
        in.kind = DistillKind::ForwardKL;
        in.student = s.data();
        in.teacher = t.data();
        in.rows = 1;
        in.vocab = V;
        in.temperature = T;
        std::vector<float> ga(V), gb(V);
        const double la = distill_row(in, 0, 0.25f, ga.data());
        const double lb = forward_kl_row_blocked(in, 0, 0.25f, gb.data());
        CHECK_NEAR(lb, la, 1e-5 * std::max(1.0, std::fabs(la)));
        CHECK_NEAR(forward_kl_row_blocked(in, 0, 0.25f, nullptr), lb, 1e-12 * std::max(1.0, std::fabs(lb)));
        double worst = 0;
        for (int32_t j = 0; j < V; ++j) worst = std::max(worst, std::fabs(gb[j] - ga[j]) - 1e-5 * std::fabs(ga[j]));
        CHECK(worst <= 1e-7);
      }
    }
  }
  // Large logits: finite, and the same loss as the reference.
  std::vector<float> s = {1e4f, -1e4f, 0.f, 5e3f, -5e3f, 1e4f - 1.f}, t = {-1e4f, 1e4f, 0.f, 1e4f - 2.f, 3.f, -1e4f};
  DistillInput in;
  in.student = s.data();
  in.teacher = t.data();
  in.rows = 1;
  in.vocab = 6;
  std::vector<float> ga(6), gb(6);
  const double la = distill_row(in, 0, 1.0f, ga.data()), lb = forward_kl_row_blocked(in, 0, 1.0f, gb.data());
  CHECK_NEAR(lb, la, 1e-5 * std::fabs(la));
  for (int j = 0; j < 6; ++j) CHECK_NEAR(gb[j], ga[j], 1e-7 + 1e-5 * std::fabs(ga[j]));
  s[3] = INFINITY;
  CHECK_THROWS(Error, forward_kl_row_blocked(in, 0, 1.0f, gb.data()), "studentLogits row 0 contains NaN");
}

// A dense-teacher distillation input over rows x V logits.
static DistillInput dense_input(DistillKind kind, const float* student, const float* teacher, int32_t rows, int32_t V, float temperature = 1.0f) {
  DistillInput in;
  in.kind = kind;
  in.student = student;
  in.teacher = teacher;
  in.rows = rows;
  in.vocab = V;
  in.temperature = temperature;
  return in;
}

OSD_TEST(blocked_losses_do_not_depend_on_split) {
  // One row (blocks over the threads) and the same row among many (one thread per row): same bits.
  std::mt19937 rng(16);
  const int32_t V = 20000, N = 2 * default_pool().size() + 1;
  auto s = random_logits(rng, N * V, 3.f), t = random_logits(rng, N * V, 3.f);
  for (auto kind : {DistillKind::ForwardKL, DistillKind::JSD}) {
    const DistillInput in = dense_input(kind, s.data(), t.data(), N, V, 0.8f);
    std::vector<float> g(N * V), g1(V);
    const double loss = cpu_backend().distill_loss(in, g.data());
    double sum = 0.0;
    for (int32_t r = 0; r < N; ++r) {
      sum += distill_row_fast(in, r, 1.0f / N, g1.data());
      CHECK(std::memcmp(g1.data(), g.data() + r * V, V * sizeof(float)) == 0);
    }
    CHECK_EQ(loss, sum / N);
  }
}

OSD_TEST(streamed_gradients_have_the_same_bits) {
  // The gradient written past the caches (stream) equals the plain one bit for bit, with the row
  // starting at every float position of a 64-byte line, and for rows whose blocks end inside one.
  std::mt19937 rng(17);
  for (auto kind : {DistillKind::ForwardKL, DistillKind::ReverseKL, DistillKind::JSD, DistillKind::TVD}) {
    for (int32_t V : {1, 7, 33, 2049, 40000}) {
      auto s = random_logits(rng, V, 3.f), t = random_logits(rng, V, 3.f);
      const DistillInput in = dense_input(kind, s.data(), t.data(), 1, V, 0.7f);
      std::vector<float> plain(V), buf(V + 64);
      const double lp = distill_row_fast(in, 0, 0.5f, plain.data());
      // base: a float of buf on a 64-byte boundary with 16 floats before it; the row at base + off.
      const size_t base = ((64 - reinterpret_cast<uintptr_t>(buf.data()) % 64) % 64) / sizeof(float) + 16;
      for (size_t off = 0; off < 16; ++off) {
        std::fill(buf.begin(), buf.end(), -7.0f);
        float* g = buf.data() + base + off;
        CHECK_EQ(distill_row_fast(in, 0, 0.5f, g, true), lp);
        CHECK(std::memcmp(g, plain.data(), V * sizeof(float)) == 0);
        CHECK(g[V] == -7.0f && g[-1] == -7.0f);  // nothing written outside the row
      }
    }
  }
  // Through the backend: a gradient above the streaming threshold (16 MiB), with masked rows.
  const int32_t V = 32001, N = 140;
  auto s = random_logits(rng, size_t(N) * V, 3.f), t = random_logits(rng, size_t(N) * V, 3.f);
  std::vector<uint8_t> mask(N, 1);
  mask[3] = mask[77] = 0;
  for (auto kind : {DistillKind::ForwardKL, DistillKind::JSD}) {
    DistillInput in = dense_input(kind, s.data(), t.data(), N, V);
    in.mask = mask.data();
    std::vector<float> g(size_t(N) * V, 1.0f), g1(V);
    const double loss = cpu_backend().distill_loss(in, g.data());
    double sum = 0.0;
    for (int32_t r = 0; r < N; ++r) {
      if (!mask[r]) {
        CHECK(std::all_of(g.begin() + size_t(r) * V, g.begin() + size_t(r + 1) * V, [](float x) { return x == 0.0f; }));
        continue;
      }
      sum += distill_row_fast(in, r, 1.0f / (N - 2), g1.data());
      CHECK(std::memcmp(g1.data(), g.data() + size_t(r) * V, V * sizeof(float)) == 0);
    }
    CHECK_EQ(loss, sum / (N - 2));
  }
  // One row above the threshold: fewer rows than threads, so its blocks spread over the threads.
  const int32_t V1 = (16 << 20) / 4 + 5;
  auto s1 = random_logits(rng, V1, 3.f), t1 = random_logits(rng, V1, 3.f);
  DistillInput one;
  one.student = s1.data();
  one.teacher = t1.data();
  one.rows = 1;
  one.vocab = V1;
  std::vector<float> g(V1), g1(V1);
  CHECK_EQ(cpu_backend().distill_loss(one, g.data()), distill_row_fast(one, 0, 1.0f, g1.data()));
  CHECK(std::memcmp(g.data(), g1.data(), V1 * sizeof(float)) == 0);
}

template <class V> double vlog_worst() {
  constexpr int L = kLanes<V>;
  // Every 61st positive normal float, and the JSD range near 1 densely.
  double worst = 0;
  float x[L], got[L];
  int k = 0;
  auto flush = [&] {
    vstore(got, vlog(vload<V>(x)));
    for (int i = 0; i < L; ++i) {
      const double ref = std::log(static_cast<double>(x[i]));
      worst = std::max(worst, std::fabs(got[i] - ref) / std::max(std::fabs(ref), 1e-30));
    }
    k = 0;
  };
  for (uint64_t u = 0x00800000u; u < 0x7f800000u; u += 61) {
    const uint32_t bits = static_cast<uint32_t>(u);
    std::memcpy(&x[k++], &bits, sizeof(float));
    if (k == L) flush();
  }
  for (float v = 0.25f; v <= 1.0f; v = std::nextafter(v, 2.0f)) {
    x[k++] = v;
    if (k == L) flush();
  }
  return worst;
}

OSD_TEST(vlog_relative_error) {
  const double w8 = vlog_worst<f32x8>(), w16 = vlog_worst<f32x16>();
  std::printf("    vlog: worst relative error %.3g (8 lanes), %.3g (16 lanes)\n", w8, w16);
  CHECK(w8 < 3e-7);
  CHECK(w16 < 3e-7);
}

// Reverse KL, JSD and TVD (dense) and every loss against a sparse teacher: the fast paths against
// distill_row. Loss within 1e-5 * max(1, |loss|) (as forward_kl_blocked_matches_reference), gradient
// within 1e-6 max|g| + 1e-5 |g_j| + 1e-5 (the size of its terms, below); the loss alone as with the
// gradient. Both sides round log q - log p in float, so near-cancelling gradients (a student close
// to its teacher, a saturated JSD) differ by that rounding, not by more.
namespace {

struct FastCase {
  double loss_err = 0, grad_err = 0;  // as fractions of the tolerance
};

void compare_fast(const DistillInput& in, float scale, FastCase& worst) {
  const int32_t V = in.vocab;
  std::vector<float> ga(V), gb(V);
  const double la = distill_row(in, 0, scale, ga.data());
  const double lb = distill_row_fast(in, 0, scale, gb.data());
  const double lc = distill_row_fast(in, 0, scale, nullptr);
  CHECK(std::isfinite(lb));
  // Both vector widths give the same bits (fast_math.h): again with 8 lanes.
  simd_force_lanes(8);
  std::vector<float> g8(V);
  const double l8 = distill_row_fast(in, 0, scale, g8.data());
  simd_force_lanes(0);
  CHECK(std::memcmp(&l8, &lb, sizeof l8) == 0);
  CHECK(std::memcmp(g8.data(), gb.data(), V * sizeof(float)) == 0);
  CHECK_NEAR(lc, lb, 1e-12 * std::max(1.0, std::fabs(lb)));
  worst.loss_err = std::max(worst.loss_err, std::fabs(lb - la) / (1e-5 * std::max(1.0, std::fabs(la))));
  float gmax = 0.0f;
  for (float g : ga) gmax = std::max(gmax, std::fabs(g));
  // The gradient is the difference of q_j g_j and q_j E_q[g], whose float rounding scales with |g|:
  // up to |log q_j| plus, for reverse KL, |log p_j| <= |log 1e-12| = 27.6 (its floor).
  const float* s = in.student;
  double mx = s[0], z = 0.0;
  for (int32_t j = 0; j < V; ++j) mx = std::max(mx, double(s[j]));
  for (int32_t j = 0; j < V; ++j) z += std::exp((s[j] - mx) / in.temperature);
  const double gs = scale / in.temperature;
  for (int32_t j = 0; j < V; ++j) {
    const double lq = (s[j] - mx) / in.temperature - std::log(z);
    const double term = gs * std::exp(lq) * (1.0 - lq + (in.kind == DistillKind::ReverseKL ? 27.7 : 0.0));
    worst.grad_err = std::max(worst.grad_err, std::fabs(gb[j] - ga[j]) / (1e-6 * gmax + 1e-5 * std::fabs(ga[j]) + 1e-5 * term));
  }
}

}  // namespace

OSD_TEST(distill_fast_paths_match_reference) {
  std::mt19937 rng(17);
  FastCase dense, sparse;
  int cases = 0;
  for (int32_t V : {1, 7, 33, 2048, 2049, 5000, 40000})
    for (float T : {1.0f, 0.5f, 3.0f})
      for (int shape = 0; shape < 3; ++shape) {
        // shape 0: unrelated rows; 1: larger logits; 2: a student close to its teacher.
        auto t = random_logits(rng, V, shape == 1 ? 4.f : 2.f);
        auto s = random_logits(rng, V, shape == 1 ? 4.f : 2.f);
        if (shape == 2)
          for (int32_t j = 0; j < V; ++j) s[j] = t[j] + 0.01f * s[j] + 3.0f;
        for (auto kind : {DistillKind::ForwardKL, DistillKind::ReverseKL, DistillKind::JSD, DistillKind::TVD}) {
          DistillInput in;
          in.kind = kind;
          in.student = s.data();
          in.rows = 1;
          in.vocab = V;
          in.temperature = T;
          in.beta = shape == 1 ? 0.1f : 0.5f;
          if (kind != DistillKind::ForwardKL) {
            in.teacher = t.data();
            compare_fast(in, 0.25f, dense);
            ++cases;
          }
          // Sparse: the teacher's top k (k = V included), with and without an explicit residual.
          const int32_t k = std::min<int32_t>(V, shape == 0 ? 32 : 5);
          std::vector<int32_t> order(V);
          for (int32_t j = 0; j < V; ++j) order[j] = j;
          std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) { return t[a] > t[b]; });
          double z = 0;
          for (float x : t) z += std::exp(static_cast<double>(x - t[order[0]]) / T);
          std::vector<int32_t> ids(order.begin(), order.begin() + k);
          std::vector<float> probs(k);
          double psum = 0;
          for (int32_t i = 0; i < k; ++i) psum += probs[i] = static_cast<float>(std::exp((t[ids[i]] - t[order[0]]) / T) / z);
          const float res = static_cast<float>(std::max(0.0, 1.0 - psum));
          in.teacher = nullptr;
          in.topk_ids = ids.data();
          in.topk_probs = probs.data();
          in.k = k;
          in.residual = shape == 1 ? &res : nullptr;
          compare_fast(in, 0.25f, sparse);
          ++cases;
        }
      }
  std::printf("    %d cases: worst dense loss %.3f, grad %.3f; sparse loss %.3f, grad %.3f (of tolerance)\n", cases,
              dense.loss_err, dense.grad_err, sparse.loss_err, sparse.grad_err);
  CHECK(dense.loss_err <= 1.0);
  CHECK(dense.grad_err <= 1.0);
  CHECK(sparse.loss_err <= 1.0);
  CHECK(sparse.grad_err <= 1.0);
}

OSD_TEST(distill_fast_paths_extreme_logits) {
  // Logits of +-1e4: finite, and as the reference. A sparse row whose top-k hold all but ~e^-1e4 of
  // the student's mass goes to the reference, bit for bit.
  std::vector<float> s = {1e4f, -1e4f, 0.f, 5e3f, -5e3f, 1e4f - 1.f}, t = {-1e4f, 1e4f, 0.f, 1e4f - 2.f, 3.f, -1e4f};
  std::vector<int32_t> ids = {0, 5};
  std::vector<float> probs = {0.6f, 0.3f};
  for (auto kind : {DistillKind::ForwardKL, DistillKind::ReverseKL, DistillKind::JSD, DistillKind::TVD})
    for (bool sparse : {false, true}) {
      DistillInput in;
      in.kind = kind;
      in.student = s.data();
      in.rows = 1;
      in.vocab = 6;
      if (sparse)
        in.topk_ids = ids.data(), in.topk_probs = probs.data(), in.k = 2;
      else
        in.teacher = t.data();
      std::vector<float> ga(6), gb(6);
      const double la = distill_row(in, 0, 1.0f, ga.data()), lb = distill_row_fast(in, 0, 1.0f, gb.data());
      CHECK(std::isfinite(lb));
      CHECK_NEAR(lb, la, 1e-5 * std::fabs(la));
      for (int j = 0; j < 6; ++j) CHECK_NEAR(gb[j], ga[j], 1e-7 + 1e-5 * std::fabs(ga[j]));
      if (sparse) CHECK(std::memcmp(ga.data(), gb.data(), sizeof(float) * 6) == 0);
    }
  s[2] = NAN;
  DistillInput in;
  in.kind = DistillKind::JSD;
  in.student = s.data();
  in.teacher = t.data();
  in.rows = 1;
  in.vocab = 6;
  CHECK_THROWS(Error, distill_row_fast(in, 0, 1.0f, nullptr), "studentLogits row 0 contains NaN");
  in.teacher = nullptr, in.topk_ids = ids.data(), in.topk_probs = probs.data(), in.k = 2;
  CHECK_THROWS(Error, distill_row_fast(in, 0, 1.0f, nullptr), "studentLogits row 0 contains NaN");
}

OSD_TEST(adamw_matches_formula) {
  std::vector<float> p = {1.f, -2.f}, g = {0.5f, -0.25f}, m(2, 0.f), v(2, 0.f);
  AdamWConfig c;
  c.lr = 0.1f;
  c.weight_decay = 0.01f;
  std::vector<double> pd = {1.0, -2.0}, md(2, 0.0), vd(2, 0.0);
  for (int step = 1; step <= 3; ++step) {
    c.step = step;
    cpu_backend().adamw_step(p.data(), g.data(), m.data(), v.data(), 2, c);
    for (int i = 0; i < 2; ++i) {
      pd[i] *= 1 - 0.1 * 0.01;
      md[i] = 0.9 * md[i] + 0.1 * g[i];
      vd[i] = 0.999 * vd[i] + 0.001 * g[i] * g[i];
      double mh = md[i] / (1 - std::pow(0.9, step)), vh = vd[i] / (1 - std::pow(0.999, step));
      pd[i] -= 0.1 * mh / (std::sqrt(vh) + 1e-8);
      CHECK_NEAR(p[i], pd[i], 1e-5);
    }
  }
}

OSD_TEST(thread_pool_covers_range_and_propagates_errors) {
  // 3 threads: 12 chunks, a claim bit each; 8 threads: 32 chunks, more than the claim bits, taken
  // by counting instead.
  for (int threads : {3, 8}) {
    ThreadPool pool(threads);
    std::vector<int> hit(10007, 0);
    pool.parallel_for(hit.size(), 1, [&](size_t lo, size_t hi) {
      for (size_t i = lo; i < hi; ++i) hit[i]++;
    });
    int ok = 1;
    for (int h : hit) ok &= h == 1;
    CHECK(ok);
    CHECK_THROWS(Error, pool.parallel_for(100, 1, [&](size_t lo, size_t) {
      if (lo > 0) throw_range("chunk failed");
    }), "chunk failed");
    // The pool stays usable after an error.
    std::atomic<int> count{0};
    pool.parallel_for(100, 1, [&](size_t lo, size_t hi) { count += static_cast<int>(hi - lo); });
    CHECK_EQ(count.load(), 100);
  }
}

OSD_TEST(thread_pool_threads_keep_their_share) {
  // Each thread takes its own share of the chunks first: back to back, the caller runs chunk 0 of a
  // job of one chunk per thread (taken in order, a spinning worker won it about a quarter of the
  // time, and a later pass split alike then read what the other core had touched). Chunk 1 holds
  // its thread until chunk 0 is claimed (at most 20 ms), so that the claim order decides, not how
  // soon a worker done with its own share takes the caller's leftover (on a loaded host the caller
  // can be descheduled for longer than an empty chunk takes). Only a caller descheduled for that
  // long between publishing and claiming leaves chunk 0 to a worker.
  ThreadPool pool(2);
  const std::thread::id caller = std::this_thread::get_id();
  int mine = 0;
  const int jobs = 2000;
  for (int i = 0; i < jobs; ++i) {
    bool first = false;
    std::atomic<bool> zero_claimed{false};
    pool.parallel_for(2, 1, [&](size_t lo, size_t) {
      if (lo == 0) {
        first = std::this_thread::get_id() == caller;
        zero_claimed = true;
        return;
      }
      const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(20);
      while (!zero_claimed && std::chrono::steady_clock::now() < until) std::this_thread::yield();
    });
    mine += first;
  }
  std::printf("  the caller ran chunk 0 in %d of %d jobs\n", mine, jobs);
  CHECK(mine >= jobs * 9 / 10);
}

OSD_TEST(radix_sort_matches_stable_sort) {
  std::mt19937_64 rng(7);
  for (size_t n : {0, 1, 2, 3, 255, 256, 257, 1000, 5000, 40000})
    for (int from_bit : {0, 11, 32, 60})
      for (int kind = 0; kind < 3; ++kind) {
        std::vector<uint64_t> keys(n);
        for (auto& k : keys) {
          const uint64_t r = rng();
          // random; few distinct values (duplicates, stability); the shape of the top-k keys
          // (a narrow logit range above, ids below 2^17)
          k = kind == 0 ? r : kind == 1 ? (r % 5) << 40 | (r >> 50) : (0xbf800000ull + (r & 0xfffff)) << 32 | (r >> 47);
        }
        std::vector<uint64_t> want = keys;
        const uint64_t mask = ~uint64_t{0} << from_bit;
        std::stable_sort(want.begin(), want.end(), [mask](uint64_t a, uint64_t b) { return (a & mask) < (b & mask); });
        radix_sort_u64(keys.data(), keys.size(), from_bit);
        CHECK(keys == want);
      }
}

OSD_TEST(thread_pool_many_jobs_with_sleeps_between) {
  // Jobs back to back (workers spinning) and after pauses longer than the spin (workers asleep):
  // every item once, errors still delivered, and every worker wakes for a job: after each pause,
  // a job of size() chunks that each wait until all size() run at once (the caller alone would
  // otherwise run them one by one, and a worker that missed its wake-up would go unnoticed).
  for (int threads : {2, 3}) {
    ThreadPool pool(threads);
    long bad = 0, not_woken = 0;
    auto all_at_once = [&] {
      std::atomic<int> running{0};
      std::atomic<bool> timed_out{false};
      pool.parallel_for(static_cast<size_t>(pool.size()), 1, [&](size_t, size_t) {
        ++running;
        const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
        while (running.load() < pool.size() && !timed_out.load()) {
          if (std::chrono::steady_clock::now() > until) timed_out = true;
          std::this_thread::yield();
        }
      });
      not_woken += timed_out.load();
    };
    for (int it = 0; it < 3000; ++it) {
      const size_t n = 1 + (it * 7919) % 97;
      std::vector<int> hit(n, 0);
      pool.parallel_for(n, 1, [&](size_t lo, size_t hi) {
        for (size_t i = lo; i < hi; ++i) hit[i]++;
      });
      for (int h : hit) bad += h != 1;
      if (it % 500 == 0) {
        CHECK_THROWS(Error, pool.parallel_for(50, 1, [&](size_t lo, size_t) {
          if (lo > 0) throw_range("chunk failed");
        }), "chunk failed");
        std::this_thread::sleep_for(std::chrono::milliseconds(2));  // past the workers' spin
        all_at_once();
      }
    }
    CHECK_EQ(bad, 0L);
    CHECK_EQ(not_woken, 0L);
  }
}

OSD_TEST(default_pool_resizes_while_calls_run) {
  // set_default_threads while other threads run parallel_for on the default pool: each call
  // finishes on the pool it started on (the pool was once freed under running calls: a crash or a
  // hang). Every item must be covered exactly once.
  const int before = default_threads();
  std::atomic<bool> stop{false};
  std::atomic<int> bad{0}, calls{0};
  std::vector<std::thread> users;
  for (int u = 0; u < 2; ++u)
    users.emplace_back([&] {
      std::vector<int> hit(4096);
      while (!stop.load()) {
        std::fill(hit.begin(), hit.end(), 0);
        default_pool().parallel_for(hit.size(), 1, [&](size_t lo, size_t hi) {
          for (size_t i = lo; i < hi; ++i) hit[i]++;
        });
        for (int h : hit) bad += h != 1;
        ++calls;
      }
    });
  for (int k = 0; k < 400; ++k) set_default_threads(2 + k % 3);
  while (calls.load() < 200) std::this_thread::yield();
  stop = true;
  for (auto& t : users) t.join();
  set_default_threads(before);
  CHECK_EQ(bad.load(), 0);
  CHECK_EQ(default_threads(), before);
}

OSD_TEST(num_str_writes_numbers_as_javascript_does) {
  // Error messages quote numbers as String(x) would in JavaScript (the expected strings are Node's).
  const struct {
    double v;
    const char* js;
  } cases[] = {{100, "100"}, {-10, "-10"}, {1000, "1000"}, {3e9, "3000000000"}, {1e16, "10000000000000000"},
               {1e-7, "1e-7"}, {2.5e-5, "0.000025"}, {0.1, "0.1"}, {-1, "-1"}, {1.5, "1.5"}, {1e21, "1e+21"},
               {1.2345e21, "1.2345e+21"}, {123.456, "123.456"}, {1e-6, "0.000001"}, {9007199254740991.0, "9007199254740991"},
               {5e-324, "5e-324"}, {1.7976931348623157e308, "1.7976931348623157e+308"}, {-0.0, "0"},
               {std::nan(""), "NaN"}, {-INFINITY, "-Infinity"}};
  for (const auto& c : cases) {
    if (num_str(c.v) != c.js) std::fprintf(stderr, "  num_str: got %s, want %s\n", num_str(c.v).c_str(), c.js);
    CHECK(num_str(c.v) == c.js);
  }
  // A float gets its own shortest digits: 0.1f is 0.1, not 0.10000000149011612.
  CHECK(num_str(0.1f) == "0.1");
  CHECK(num_str(3.14159274f) == "3.1415927");
  CHECK(num_str(20.0f) == "20");
  CHECK(num_str(1e-8f) == "1e-8");
}

// The fast sparse teacher gives the reference's bits: the same ids in the same order, the same
// probabilities and residual, over vocabularies around the 2048-entry blocks, ties (logits on a
// coarse grid), -Infinity entries and whole -Infinity blocks, k from 1 to V; and the ids are the k
// largest logits, ties to the lower id.
OSD_TEST(teacher_top_k_fast_equals_reference) {
  std::mt19937 rng(7);
  int cases = 0, mismatches = 0;
  for (int32_t V : {1, 5, 63, 2047, 2048, 2049, 6000, 49152}) {
    for (int32_t k : {1, 3, 64, 300, V}) {
      if (k > V) continue;
      for (int variant = 0; variant < 4; ++variant) {
        const size_t rows = variant == 3 ? 5 : 2;
        std::vector<float> l(rows * V);
        std::normal_distribution<float> nd(0.0f, 3.0f);
        for (auto& x : l) x = nd(rng);
        if (variant == 1)  // ties everywhere
          for (auto& x : l) x = std::round(x * 2.0f) / 2.0f;
        if (variant == 2) {  // -Infinity entries, and the second block all -Infinity
          for (size_t j = 0; j < l.size(); j += 3) l[j] = -INFINITY;
          for (int32_t j = 2048; j < std::min(V, 4096); ++j) l[j] = -INFINITY;
          l[V - 1] = 1.0f;  // every row keeps a finite entry
          l[l.size() - 1] = 1.0f;
        }
        std::vector<int32_t> ia(rows * k), ib(rows * k);
        std::vector<float> pa(rows * k), pb(rows * k), ra(rows), rb(rows);
        osd::teacher_top_k_reference(l.data(), rows, V, k, ia.data(), pa.data(), ra.data());
        osd::teacher_top_k(l.data(), rows, V, k, ib.data(), pb.data(), rb.data());
        ++cases;
        const bool same = ia == ib && std::memcmp(pa.data(), pb.data(), pa.size() * 4) == 0 &&
                          std::memcmp(ra.data(), rb.data(), ra.size() * 4) == 0;
        if (!same) ++mismatches;
        for (size_t r = 0; r < rows; ++r) {
          const float* row = l.data() + r * V;
          // Brute force: entry i of the answer beats every later one and every id left out.
          std::vector<char> in(V, 0);
          double mass = 0.0;
          for (int32_t i = 0; i < k; ++i) {
            const int32_t a = ia[r * k + i];
            in[a] = 1;
            mass += pa[r * k + i];
            if (i + 1 < k) {
              const int32_t b = ia[r * k + i + 1];
              CHECK(row[a] > row[b] || (row[a] == row[b] && a < b));
            }
          }
          const int32_t last = ia[r * k + k - 1];
          for (int32_t j = 0; j < V; ++j)
            if (!in[j]) CHECK(row[j] < row[last] || (row[j] == row[last] && j > last));
          CHECK_NEAR(mass + ra[r], 1.0, 1e-5);
        }
      }
    }
  }
  CHECK_EQ(mismatches, 0);
  CHECK(cases > 100);
  std::vector<float> bad(3 * 10, 0.0f);
  bad[2 * 10 + 4] = NAN;
  std::vector<int32_t> ids(3 * 2);
  std::vector<float> probs(3 * 2), res(3);
  CHECK_THROWS(osd::Error, osd::teacher_top_k(bad.data(), 3, 10, 2, ids.data(), probs.data(), res.data()),
               "logits row 2 contains NaN or +Infinity");
  CHECK_THROWS(osd::Error, osd::teacher_top_k_reference(bad.data(), 3, 10, 2, ids.data(), probs.data(), res.data()),
               "logits row 2 contains NaN or +Infinity");
  std::vector<float> ninf(10, -INFINITY);
  CHECK_THROWS(osd::Error, osd::teacher_top_k(ninf.data(), 1, 10, 2, ids.data(), probs.data(), res.data()), "all -Infinity");
  CHECK_THROWS(osd::Error, osd::teacher_top_k(ninf.data(), 1, 10, 11, ids.data(), probs.data(), res.data()), "k must be in");
}

OSD_TEST_MAIN()
