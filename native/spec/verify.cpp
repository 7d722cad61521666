#include "spec/verify.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/error.h"
#include "core/fast_math.h"
#include "core/philox.h"
#include "core/thread_pool.h"

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
    size_t k = 0;  // q's support is sorted by id too: walk it alongside (q.prob would search it)
    for (size_t i = 0; i < n; ++i) {
      float qi;
      if (q.dense) {
        qi = static_cast<float>(q.prob(p.ids[i]));
      } else {
        while (k < q.ids.size() && q.ids[k] < p.ids[i]) ++k;
        qi = k < q.ids.size() && q.ids[k] == p.ids[i] ? q.probs[k] : 0.0f;
      }
      const float r = p.probs[i] - qi;
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
    if (s.dense()) {
      warp_with_stats(trow, V, ts[i], s, p);
      warp_with_stats(drow, V, ds[i], s, q);
    } else {
      // Top-k / top-p warps select and sort: the two rows on two threads (inline inside the pool,
      // where a batch already spreads its sequences).
      default_pool().parallel_for(2, 1, [&](size_t lo, size_t hi) {
        for (size_t k = lo; k < hi; ++k) {
          if (k == 0)
            warp_with_stats(trow, V, ts[i], s, p);
          else
            warp_with_stats(drow, V, ds[i], s, q);
        }
      });
    }
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

ChainResult verify_chain_blocked(const ChainInput& in, const Sampling& s, uint64_t seed, uint64_t stream,
                                 int32_t* out, BlockedChainScratch& w, RowCheck* tcheck, RowCheck* dcheck,
                                 bool spread) {
  const int32_t g = in.g, V = in.vocab, nb = stat_blocks(V);
  const size_t G = static_cast<size_t>(g), rows = 2 * G + 1;
  const float inv_t = 1.0f / s.temperature;
  w.stats.resize(rows * nb);
  w.scale.resize(rows * nb);
  w.mass.resize(rows * nb);
  w.rmass.resize(nb);
  w.e.resize(2 * static_cast<size_t>(V));
  // Row k: target rows 0..g, then draft rows g + 1..2g. The pair under test keeps its exp terms
  // (a rejection's residual needs all of them: stored, they cost a write; recomputed, two exps per
  // entry, which bound this loop on the CPU). So does the bonus row, in the target's half once no
  // pair needs it: its sample then forms the chosen block without exps.
  auto logits = [&](size_t k) { return k <= G ? in.target + k * V : in.draft + (k - G - 1) * V; };
  auto pair_e = [&](size_t k) { return k <= G ? w.e.data() : w.e.data() + V; };
  auto row = [&](size_t k, bool with_e) {
    BlockedRow r;
    r.logits = logits(k);
    r.vocab = V;
    r.inv_t = inv_t;
    r.blocks = w.stats.data() + k * nb;
    r.e = with_e ? pair_e(k) : nullptr;
    r.scale = w.scale.data() + k * nb;
    r.mass = w.mass.data() + k * nb;
    return r;
  };
  // Reads rows ks[0..n): the first n_sum summed (keeping a tested pair's exp terms), the others
  // for their maxima only. Called outside the pool, the blocks are split over its threads by block
  // range, the same range of every row on one thread: one chunk per thread (each claim and each
  // shared line costs a trip between cores), and a later pass over the same split (the residual,
  // the bonus row) finds its blocks in the cache of the thread that read them.
  // While a summed block's exps run, its share of the chunk's range of rows side[0..n_side) is
  // prefetched (rows read soon after: max-only reads are otherwise bound by memory alone, and the
  // exps by the FPU alone).
  // With `known`, the rows' maxima are in w.stats already (spread's first pass): only sums are
  // left, and the blocks are not read for their maxima again.
  auto read = [&](const size_t* ks, size_t n, size_t n_sum, const size_t* side = nullptr, size_t n_side = 0,
                  bool known = false) {
    auto body = [&](size_t b0, size_t b1) {
      const size_t j0 = b0 * kStatBlock, span = std::min<size_t>(V, b1 * kStatBlock) - j0;
      for (size_t i = 0; i < n + n_side; ++i) touch_pages(logits(i < n ? ks[i] : side[i - n]) + j0, span);
      // Side share of the s-th summed block: floats [f0, f1) of the side rows' ranges laid end to end.
      const size_t summed = n_sum * (b1 - b0), side_floats = n_side * span;
      size_t s = 0;
      for (size_t i = 0; i < n; ++i) {
        const size_t k = ks[i];
        for (size_t bb = b0; bb < b1; ++bb) {
          const int32_t b = static_cast<int32_t>(bb), jb = b * kStatBlock, len = std::min(kStatBlock, V - jb);
          float* e = i < n_sum ? pair_e(k) : nullptr;
          const float* sp = nullptr;
          int32_t sn = 0;
          if (i < n_sum && n_side) {
            const size_t f0 = s * side_floats / summed, f1 = (s + 1) * side_floats / summed, off = f0 % span;
            sp = logits(side[f0 / span]) + j0 + off;
            sn = static_cast<int32_t>(std::min(f1 - f0, span - off));
            ++s;
          }
          if (known && i < n_sum)
            block_sum(logits(k) + jb, len, inv_t, w.stats[k * nb + b], e ? e + jb : nullptr, sp, sn);
          else
            block_stats(logits(k) + jb, len, inv_t, i < n_sum, w.stats[k * nb + b], e ? e + jb : nullptr, sp, sn);
        }
      }
    };
    // At least 8K logits per chunk: short rows stay on the calling thread.
    const size_t per_block = n * static_cast<size_t>(std::min(V, kStatBlock));
    default_pool().parallel_for(nb, default_pool().grain_per_thread(nb, ((size_t(1) << 13) + per_block - 1) / per_block), body);
  };
  auto set_check = [&](size_t k, RowCheck c) { (k <= G ? tcheck[k] : dcheck[k - G - 1]) = c; };
  auto check_all = [&](size_t from) {  // rows of positions >= from
    bool ok = true;
    for (size_t k = 0; k < rows; ++k) {
      if ((k <= G ? k : k - G - 1) < from) continue;
      BlockedRow r = row(k, false);
      finish_row_check(r);
      set_check(k, r.check);
      ok &= r.check == RowCheck::Ok;
    }
    return ok;
  };
  if (spread) {
    // Every row is read (and validated) in one pass; the first position is always tested, so its
    // rows are summed on the way. Later positions are summed when the walk gets there, from cache.
    w.order.clear();
    w.order.push_back(0);
    if (G > 0) w.order.push_back(G + 1);
    for (size_t k = 1; k < rows; ++k)
      if (k != G + 1) w.order.push_back(k);
    const size_t n_sum = G > 0 ? 2 : 1;
    read(w.order.data(), rows, n_sum, w.order.data() + n_sum, rows - n_sum);
    if (!check_all(0)) return ChainResult{};
  }
  ChainResult res;
  size_t next = 0;  // without spread: the first position whose rows are not read yet
  auto walk = [&]() {
    for (size_t i = 0; i < G; ++i) {
      const size_t pair[2] = {i, G + 1 + i};
      if (!spread) {
        // The rows of later positions, next pair first: the walk or the final check reads them.
        w.side.clear();
        for (size_t k = i + 1; k <= G; ++k) {
          w.side.push_back(k);
          if (k < G) w.side.push_back(G + 1 + k);
        }
        read(pair, 2, 2, w.side.data(), w.side.size());
      } else if (i > 0) {
        read(pair, 2, 2, nullptr, 0, true);
      }
      next = i + 1;
      BlockedRow p = row(i, true), q = row(G + 1 + i, true);
      finish_row(p);
      finish_row(q);
      tcheck[i] = p.check;
      dcheck[i] = q.check;
      if (p.check != RowCheck::Ok || q.check != RowCheck::Ok) return;
      const int32_t x = in.tokens[i];
      const double px = p.prob(x), qx = q.prob(x);
      const uint32_t pos = static_cast<uint32_t>(i);
      const double u = philox_uniform(seed, stream, pos + 1, kLaneAccept);
      if (qx > 0.0 && u * qx < px) {
        out[i] = x;
        continue;
      }
      out[i] = sample_residual_blocked(p, q, philox_uniform(seed, stream, pos, kLaneSample), w.rmass.data());
      res.accepted = static_cast<int32_t>(i);
      res.emitted = res.accepted + 1;
      return;
    }
    if (!spread || G > 0) read(&G, 1, 1, nullptr, 0, spread);
    next = G + 1;
    BlockedRow p = row(G, true);
    finish_row(p);
    tcheck[G] = p.check;
    if (p.check != RowCheck::Ok) return;
    out[G] = sample_blocked(p, philox_uniform(seed, stream, static_cast<uint32_t>(G), kLaneSample));
    res.accepted = g;
    res.emitted = g + 1;
  };
  walk();
  // The rows the walk did not reach are validated only: their maxima, no exp.
  if (!spread && next <= G) {
    for (size_t k = 0; k < rows; ++k) {
      if ((k <= G ? k : k - G - 1) < next) continue;
      for (int32_t b = 0; b < nb; ++b)
        block_stats(logits(k) + b * kStatBlock, std::min(kStatBlock, V - b * kStatBlock), inv_t, false,
                    w.stats[k * nb + b]);
    }
    check_all(next);
  }
  return res;
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
