#include "spec/verify.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/error.h"
#include "core/fast_math.h"
#include "core/philox.h"

namespace osd {

void compute_row_stats(const float* row, int32_t vocab, const Sampling& s, const char* what, size_t row_index,
                       RowStats& out) {
  out.max = checked_row_max(row, vocab, what, row_index);
  out.z = 0.0;
  if (!s.greedy() && s.dense()) {
    WarpedRow w;
    warp_row(row, vocab, out.max, s, w);
    out.z = w.z;
  }
}

namespace {

// The warped distribution of a row, reusing precomputed stats where the row is dense.
void warp_with_stats(const float* row, int32_t vocab, const RowStats& st, const Sampling& s, WarpedRow& out) {
  if (s.dense()) {
    out.logits = row;
    out.vocab = vocab;
    out.dense = true;
    out.max = st.max;
    out.inv_t = 1.0f / s.temperature;
    out.z = st.z;
    out.ids.clear();
    out.probs.clear();
  } else {
    warp_row(row, vocab, st.max, s, out);
  }
}

// Samples from norm(max(0, p - q)); falls back to p when the residual has no mass
// (p == q up to rounding, where a rejection cannot happen in exact arithmetic).
int32_t sample_residual(const WarpedRow& p, const WarpedRow& q, double u, Fault fault, std::vector<float>& scratch) {
  const int32_t V = p.vocab;
  if (!p.dense && fault == Fault::None) {
    // Top-k / top-p: max(0, p - q) is 0 outside p's support, so only the support (ascending ids) is
    // summed and scanned: the same floats, sums and token as the dense scan below, in O(k).
    const size_t n = p.ids.size();
    scratch.resize(n);
    double total = 0.0;
    for (size_t i = 0; i < n; ++i) {
      const float r = p.probs[i] - static_cast<float>(q.prob(p.ids[i]));
      scratch[i] = r > 0.0f ? r : 0.0f;
      total += scratch[i];
    }
    if (total <= 0.0) return sample_row(p, u);
    return p.ids[sample_weights(scratch.data(), static_cast<int32_t>(n), total, u)];
  }
  scratch.resize(2 * static_cast<size_t>(V));
  float* pd = scratch.data();
  float* qd = pd + V;
  p.to_dense(pd);
  q.to_dense(qd);
  if (fault == Fault::ResidualFromTarget) return sample_weights(pd, V, [&] {
      double t = 0; for (int32_t j = 0; j < V; ++j) t += pd[j]; return t; }(), u);
  if (fault == Fault::ResidualNoClamp) {
    // Signed weights scanned as if they were a distribution: the planted bug.
    double total = 0.0;
    for (int32_t j = 0; j < V; ++j) total += pd[j] - qd[j];
    double target = u * total, cum = 0.0;
    for (int32_t j = 0; j < V; ++j) {
      cum += pd[j] - qd[j];
      if (cum > target) return j;
    }
    return V - 1;
  }
  double total = 0.0;
  for (int32_t j = 0; j < V; ++j) {
    float r = pd[j] - qd[j];
    pd[j] = r > 0.0f ? r : 0.0f;
    total += pd[j];
  }
  if (total <= 0.0) return sample_row(p, u);
  return sample_weights(pd, V, total, u);
}

}  // namespace

ChainResult verify_chain(const ChainInput& in, const Sampling& s, uint64_t seed, uint64_t stream, int32_t* out,
                         Fault fault) {
  const int32_t g = in.g, V = in.vocab;
  std::vector<RowStats> local_t, local_d;
  const RowStats* ts = in.target_stats;
  const RowStats* ds = in.draft_stats;
  if (!ts) {
    local_t.resize(g + 1);
    for (int32_t i = 0; i <= g; ++i)
      compute_row_stats(in.target + static_cast<size_t>(i) * V, V, s, "targetLogits", i, local_t[i]);
    ts = local_t.data();
  }
  if (!ds && !s.greedy()) {
    local_d.resize(g);
    for (int32_t i = 0; i < g; ++i)
      compute_row_stats(in.draft + static_cast<size_t>(i) * V, V, s, "draftLogits", i, local_d[i]);
    ds = local_d.data();
  }
  ChainResult r;
  if (s.greedy()) {
    for (int32_t i = 0; i < g; ++i) {
      int32_t best = argmax_row(in.target + static_cast<size_t>(i) * V, V);
      if (best != in.tokens[i]) {
        out[i] = best;
        r.accepted = i;
        r.emitted = i + 1;
        return r;
      }
      out[i] = in.tokens[i];
    }
    out[g] = argmax_row(in.target + static_cast<size_t>(g) * V, V);
    r.accepted = g;
    r.emitted = g + 1;
    return r;
  }
  WarpedRow p, q;
  std::vector<float> scratch;
  for (int32_t i = 0; i < g; ++i) {
    const float* trow = in.target + static_cast<size_t>(i) * V;
    const float* drow = in.draft + static_cast<size_t>(i) * V;
    warp_with_stats(trow, V, ts[i], s, p);
    warp_with_stats(drow, V, ds[i], s, q);
    const int32_t x = in.tokens[i];
    const double px = p.prob(x), qx = q.prob(x);
    const double u = philox_uniform(seed, stream, static_cast<uint32_t>(i + 1), kLaneAccept);
    // Accept with probability min(1, p/q); a token the draft could not have sampled (q = 0) is rejected.
    if (qx > 0.0 && u * qx < px) {
      out[i] = x;
      continue;
    }
    out[i] = sample_residual(p, q, philox_uniform(seed, stream, static_cast<uint32_t>(i), kLaneSample), fault, scratch);
    r.accepted = i;
    r.emitted = i + 1;
    return r;
  }
  warp_with_stats(in.target + static_cast<size_t>(g) * V, V, ts[g], s, p);
  out[g] = sample_row(p, philox_uniform(seed, stream, static_cast<uint32_t>(g), kLaneSample));
  r.accepted = g;
  r.emitted = g + 1;
  return r;
}

ChainResult verify_chain_dense(const ChainInput& in, const Sampling& s, uint64_t seed, uint64_t stream, int32_t* out,
                               DenseChainScratch& w, RowCheck* tcheck, RowCheck* dcheck) {
  const int32_t g = in.g, V = in.vocab;
  const float inv_t = 1.0f / s.temperature;
  DenseRow* pq[2] = {&w.p, &w.q};
  ChainResult r;
  for (int32_t i = 0; i < g; ++i) {
    const float* rows[2] = {in.target + static_cast<size_t>(i) * V, in.draft + static_cast<size_t>(i) * V};
    dense_rows(rows, 2, V, inv_t, pq);
    tcheck[i] = w.p.check;
    dcheck[i] = w.q.check;
    if (w.p.check != RowCheck::Ok || w.q.check != RowCheck::Ok) return r;
    const int32_t x = in.tokens[i];
    const double px = w.p.prob(x), qx = w.q.prob(x);
    const double u = philox_uniform(seed, stream, static_cast<uint32_t>(i + 1), kLaneAccept);
    if (qx > 0.0 && u * qx < px) {
      out[i] = x;
      continue;
    }
    out[i] = sample_residual_dense(w.p, w.q, philox_uniform(seed, stream, static_cast<uint32_t>(i), kLaneSample),
                                   w.r, w.rmass);
    r.accepted = i;
    r.emitted = i + 1;
    return r;
  }
  const float* row = in.target + static_cast<size_t>(g) * V;
  dense_rows(&row, 1, V, inv_t, pq);
  tcheck[g] = w.p.check;
  if (w.p.check != RowCheck::Ok) return r;
  out[g] = sample_dense(w.p, philox_uniform(seed, stream, static_cast<uint32_t>(g), kLaneSample));
  r.accepted = g;
  r.emitted = g + 1;
  return r;
}

void validate_tree(const TreeInput& in) {
  for (int32_t i = 0; i < in.n; ++i) {
    const int32_t p = in.parents[i];
    if (p < -1 || p >= i)
      throw_range("parents[" + std::to_string(i) + "] = " + std::to_string(p) +
                  " must be -1 or an earlier node index (nodes are in topological order)");
    const int32_t t = in.tokens[i];
    if (t < 0 || t >= in.vocab)
      throw_range("tokens[" + std::to_string(i) + "] = " + std::to_string(t) + " is out of range for vocabSize " +
                  std::to_string(in.vocab));
  }
}

namespace {

void normalise(float* v, int32_t n) {
  double total = 0.0;
  for (int32_t j = 0; j < n; ++j) total += v[j];
  if (total <= 0.0) return;
  const float inv = static_cast<float>(1.0 / total);
  for (int32_t j = 0; j < n; ++j) v[j] *= inv;
}

}  // namespace

TreeResult verify_tree(const TreeInput& in, const Sampling& s, TreeChildren mode, uint64_t seed, uint64_t stream,
                       int32_t* path, int32_t* out, Fault fault) {
  validate_tree(in);
  const int32_t n = in.n, V = in.vocab;
  const bool use_draft = !s.greedy() && mode != TreeChildren::Deterministic;
  // Every row is validated, visited or not, so bad input fails the same way for every seed. Only the
  // maxima are kept: the walk warps the rows it visits itself, so no normaliser is computed here.
  // All (row, block) pairs over the thread pool; the error names the first bad row in row order,
  // the target's before the draft's.
  std::vector<RowStats> ts(n + 1), ds(use_draft ? n + 1 : 0);
  {
    std::vector<RowCheck> tc(n + 1), dc(use_draft ? n + 1 : 0);
    std::vector<float> tm(n + 1), dm(use_draft ? n + 1 : 0);
    check_rows(in.target, n + 1, V, tc.data(), tm.data());
    if (use_draft) check_rows(in.draft, n + 1, V, dc.data(), dm.data());
    for (int32_t r = 0; r <= n; ++r) {
      throw_row_check(tc[r], "targetLogits", r);
      if (use_draft) throw_row_check(dc[r], "draftLogits", r);
      ts[r].max = tm[r];
      if (use_draft) ds[r].max = dm[r];
    }
  }
  // Children lists in node order.
  std::vector<int32_t> first(n + 1, -1), next(n, -1), last(n + 1, -1);
  for (int32_t i = 0; i < n; ++i) {
    const int32_t slot = in.parents[i] + 1;
    if (last[slot] < 0) first[slot] = i; else next[last[slot]] = i;
    last[slot] = i;
  }
  TreeResult res;
  int32_t row = 0;  // logits row of the current node (0 = root)
  std::vector<float> pd(V), qd(use_draft ? V : 0);
  WarpedRow w;
  for (;;) {
    const float* trow = in.target + static_cast<size_t>(row) * V;
    if (s.greedy()) {
      const int32_t best = argmax_row(trow, V);
      int32_t hit = -1;
      for (int32_t c = first[row]; c >= 0; c = next[c])
        if (in.tokens[c] == best) { hit = c; break; }
      if (hit < 0) {
        out[res.path_len] = best;
        res.emitted = res.path_len + 1;
        return res;
      }
      path[res.path_len] = hit;
      out[res.path_len++] = best;
      row = hit + 1;
      continue;
    }
    warp_row(trow, V, ts[row].max, s, w);
    if (first[row] < 0) {  // a leaf: the bonus token comes from the target
      out[res.path_len] = sample_row(w, philox_uniform(seed, stream, static_cast<uint32_t>(row), kLaneSample));
      res.emitted = res.path_len + 1;
      return res;
    }
    w.to_dense(pd.data());
    if (use_draft) {
      WarpedRow wq;
      warp_row(in.draft + static_cast<size_t>(row) * V, V, ds[row].max, s, wq);
      wq.to_dense(qd.data());
    }
    int32_t accepted = -1;
    for (int32_t c = first[row]; c >= 0; c = next[c]) {
      const int32_t x = in.tokens[c];
      const double px = pd[x];
      const double qx = use_draft ? qd[x] : 1.0;  // deterministic children: q is one-hot on x
      const double u = philox_uniform(seed, stream, static_cast<uint32_t>(c + 1), kLaneAccept);
      if (qx > 0.0 && u * qx < px) {
        accepted = c;
        break;
      }
      // Rejected: p <- norm(max(0, p - q)); without replacement, also drop x from q.
      if (fault == Fault::ResidualFromTarget) {
        // The planted bug: keep using the target itself instead of the residual.
      } else if (!use_draft) {
        pd[x] = 0.0f;
      } else {
        for (int32_t j = 0; j < V; ++j) {
          float r = pd[j] - qd[j];
          pd[j] = (fault == Fault::ResidualNoClamp) ? r : (r > 0.0f ? r : 0.0f);
        }
        if (mode == TreeChildren::WithoutReplacement) {
          qd[x] = 0.0f;
          normalise(qd.data(), V);
        }
      }
      normalise(pd.data(), V);
    }
    if (accepted < 0) {
      double total = 0.0;
      for (int32_t j = 0; j < V; ++j) total += pd[j] > 0.0f ? pd[j] : 0.0f;
      const double u = philox_uniform(seed, stream, static_cast<uint32_t>(row), kLaneSample);
      out[res.path_len] = total > 0.0 ? sample_weights(pd.data(), V, total, u) : sample_row(w, u);
      res.emitted = res.path_len + 1;
      return res;
    }
    path[res.path_len] = accepted;
    out[res.path_len++] = in.tokens[accepted];
    row = accepted + 1;
  }
}

}  // namespace osd
