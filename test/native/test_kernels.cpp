// Native tests of the kernel reference: Philox known answers, the exp approximation, warping,
// verification invariants, distillation gradients against finite differences, AdamW, the pool.
#include <atomic>
#include <cmath>
#include <random>
#include <vector>

#include "backend/backend.h"
#include "check.h"
#include "core/error.h"
#include "core/fast_math.h"
#include "core/philox.h"
#include "core/thread_pool.h"

using namespace osd;

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
  double worst = 0;
  for (float x = -87.0f; x < 88.0f; x += 0.001953125f) {
    double ref = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::fabs(exp_approx(x) - ref) / ref);
  }
  CHECK(worst < 4e-7);
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
  ThreadPool pool(3);
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

OSD_TEST_MAIN()
