#include "model/sequence.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>

#include "core/error.h"
#include "core/fp16.h"
#include "core/thread_pool.h"

namespace osd {

const char* kv_type_name(KvType t) { return t == KvType::F16 ? "f16" : "f32"; }

Sequence::Sequence(std::shared_ptr<const Model> model, int32_t capacity, KvType kv)
    : Sequence(model, capacity, kv, model->device_pass()) {}

Sequence::Sequence(std::shared_ptr<const Model> model, int32_t capacity, KvType kv, std::shared_ptr<DevicePass> pass)
    : model_(std::move(model)), kv_(kv), pass_(std::move(pass)) {
  const int32_t ctx = model_->config().context;
  capacity_ = capacity > 0 ? std::min(capacity, ctx) : ctx;
  if (pass_) {
    device_ = pass_->new_cache(capacity_, kv_);
    return;
  }
  const size_t layers = model_->config().n_layers;
  with_cache([&](auto& c) {
    c.k.resize(layers);
    c.v.resize(layers);
  });
}

void Sequence::reserve(int32_t slots) {
  if (slots <= allocated_ || device_) return;  // a device cache grows itself
  int32_t grow = std::max<int32_t>(64, allocated_);
  while (grow < slots) grow *= 2;
  grow = std::min(grow, capacity_);
  // Head-major: each key-value head's slots are contiguous, so the new planes are laid out again.
  const size_t heads = model_->config().n_kv_heads, hd = model_->config().head_dim;
  with_cache([&](auto& c) {
    for (auto* cache : {&c.k, &c.v})
      for (auto& layer : *cache) {
        std::remove_reference_t<decltype(layer)> next(heads * grow * hd);
        for (size_t h = 0; h < heads && length_ > 0; ++h)
          std::memcpy(&next[h * grow * hd], &layer[h * allocated_ * hd], length_ * hd * sizeof(layer[0]));
        layer.swap(next);
      }
  });
  allocated_ = grow;
}

void rope_angles(const ModelConfig& c, const int32_t* pos, int32_t n, float* cos_out, float* sin_out) {
  const int64_t hd = c.head_dim, half = hd / 2;
  for (int32_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < half; ++k) {
      double freq = std::pow(static_cast<double>(c.rope_theta), -2.0 * k / hd) * c.rope_freq_scale;
      if (!c.rope_factors.empty()) freq /= c.rope_factors[k];
      const double angle = pos[i] * freq;
      cos_out[i * half + k] = static_cast<float>(std::cos(angle));
      sin_out[i * half + k] = static_cast<float>(std::sin(angle));
    }
}

void Sequence::truncate(int32_t n) {
  if (n < 0 || n > length_)
    throw_range("truncate: length " + std::to_string(n) + " is outside [0, " + std::to_string(length_) + "]");
  length_ = n;
}

void Sequence::keep_path(int32_t base, const int32_t* path, int32_t k) {
  if (base < 0 || base > length_) throw_range("keep_path: base is outside the sequence");
  // A root-to-node path of the batch: at most its length, each node after its parent. A longer
  // path would write past the cache.
  if (k > length_ - base)
    throw_range("keep_path: path has length " + std::to_string(k) + ", more than the " + std::to_string(length_ - base) +
                " nodes evaluated after base");
  for (int32_t i = 1; i < k; ++i)
    if (path[i] <= path[i - 1])
      throw_range("keep_path: path[" + std::to_string(i) + "] = " + std::to_string(path[i]) +
                  " must be a later batch index than path[" + std::to_string(i - 1) + "] (a child follows its parent)");
  for (int32_t i = 0; i < k; ++i)
    if (path[i] < 0 || base + path[i] >= length_)
      throw_range("keep_path: path[" + std::to_string(i) + "] is not an evaluated node");
  if (pass_) {
    pass_->keep_path(*device_, base, path, k);
    length_ = base + k;
    return;
  }
  const size_t heads = model_->config().n_kv_heads, hd = model_->config().head_dim;
  for (int32_t i = 0; i < k; ++i) {
    const int32_t src = base + path[i];
    if (src == base + i) continue;
    // Nodes keep their RoPE: node path[i] sits at depth i, the position it was evaluated at.
    with_cache([&](auto& c) {
      for (size_t l = 0; l < c.k.size(); ++l)
        for (size_t h = 0; h < heads; ++h) {
          const size_t plane = h * allocated_, bytes = hd * sizeof(c.k[l][0]);
          std::memcpy(&c.k[l][(plane + base + i) * hd], &c.k[l][(plane + src) * hd], bytes);
          std::memcpy(&c.v[l][(plane + base + i) * hd], &c.v[l][(plane + src) * hd], bytes);
        }
    });
  }
  length_ = base + k;
}

std::unique_ptr<Sequence> Sequence::fork() const {
  // Where this sequence is: a sequence made before its model moved to a device stays on the CPU.
  std::unique_ptr<Sequence> s(new Sequence(model_, capacity_, kv_, pass_));
  if (pass_) {
    s->device_ = pass_->fork(*device_, length_);
    s->length_ = length_;
    return s;
  }
  s->reserve(length_);
  const size_t heads = model_->config().n_kv_heads, hd = model_->config().head_dim;
  const size_t to = s->allocated_, from = allocated_;
  auto copy = [&](auto& dst, const auto& src) {
    for (size_t l = 0; l < src.k.size() && length_ > 0; ++l)
      for (size_t h = 0; h < heads; ++h) {
        const size_t bytes = length_ * hd * sizeof(src.k[l][0]);
        std::memcpy(&dst.k[l][h * to * hd], &src.k[l][h * from * hd], bytes);
        std::memcpy(&dst.v[l][h * to * hd], &src.v[l][h * from * hd], bytes);
      }
  };
  if (kv_ == KvType::F16) copy(s->f16_, f16_);
  else copy(s->f32_, f32_);
  s->length_ = length_;
  return s;
}

void Sequence::evaluate(const int32_t* tokens, int32_t n, const int32_t* parents, float* logits, bool last_only) {
  const EvalPart part{this, tokens, n, parents, logits, last_only};
  evaluate_parts(&part, 1);
}

void Sequence::evaluate_parts(const EvalPart* parts, int32_t count) {
  if (count <= 0) throw_range("evaluate: at least one sequence is needed");
  for (int32_t k = 0; k < count; ++k) {
    if (!parts[k].seq) throw_range("evaluate: part " + std::to_string(k) + " has no sequence");
    if (parts[k].seq->model_ != parts[0].seq->model_)
      throw_range("evaluate: the sequences of one pass must share one model (part " + std::to_string(k) + " does not)");
    for (int32_t j = 0; j < k; ++j)
      if (parts[j].seq == parts[k].seq) throw_range("evaluate: part " + std::to_string(k) + " repeats the sequence of part " + std::to_string(j));
  }
  const Model& m = *parts[0].seq->model_;
  const ModelConfig& c = m.config();
  // Every part checked before any cache changes (a part named when there are several).
  for (int32_t k = 0; k < count; ++k) {
    const EvalPart& pt = parts[k];
    const std::string part = count > 1 ? "part " + std::to_string(k) + ": " : "";
    if (pt.n <= 0) throw_range(part + "evaluate: at least one token is needed");
    for (int32_t i = 0; i < pt.n; ++i) {
      if (pt.tokens[i] < 0 || pt.tokens[i] >= c.vocab)
        throw_range(part + "tokens[" + std::to_string(i) + "] = " + std::to_string(pt.tokens[i]) +
                    " is out of range for a vocabulary of " + std::to_string(c.vocab));
      if (pt.parents && (pt.parents[i] < -1 || pt.parents[i] >= i))
        throw_range(part + "treeParents[" + std::to_string(i) + "] = " + std::to_string(pt.parents[i]) +
                    " must be -1 or an earlier index in the batch");
    }
    const Sequence& s = *pt.seq;
    if (static_cast<int64_t>(s.length_) + pt.n > s.capacity_)
      throw_range(part + "the sequence would hold " + std::to_string(int64_t(s.length_) + pt.n) +
                  " tokens, more than its context of " + std::to_string(s.capacity_));
  }
  // Each sequence runs where it was made (a model's sequences made before it moved to a device stay
  // on the CPU); one pass runs on one device.
  const std::shared_ptr<DevicePass>& pass = parts[0].seq->pass_;
  for (int32_t k = 1; k < count; ++k)
    if (parts[k].seq->pass_ != pass) {
      auto where = [](const Sequence& s) { return s.pass_ ? s.pass_->name() : std::string("cpu"); };
      throw_state("evaluate: part " + std::to_string(k) + "'s sequence is on " + where(*parts[k].seq) + " and part 0's on " +
                  where(*parts[0].seq) + ": the sequences of one pass must be on one device");
    }
  if (pass) {
    std::vector<DevicePass::Cache*> caches(count);
    std::vector<int32_t> lengths(count);
    for (int32_t k = 0; k < count; ++k) caches[k] = parts[k].seq->device_.get(), lengths[k] = parts[k].seq->length_;
    pass->evaluate(parts, caches.data(), lengths.data(), count);
    for (int32_t k = 0; k < count; ++k) parts[k].seq->length_ += parts[k].n;
    return;
  }
  for (int32_t k = 0; k < count; ++k) parts[k].seq->reserve(parts[k].seq->length_ + parts[k].n);

  // Rows: the parts' tokens one after another (part k's are rows first[k] .. first[k + 1] - 1).
  std::vector<int32_t> first(count + 1, 0);
  for (int32_t k = 0; k < count; ++k) first[k + 1] = first[k] + parts[k].n;
  const int32_t n = first[count];
  std::vector<int32_t> part_of(n);
  for (int32_t k = 0; k < count; ++k) std::fill(part_of.begin() + first[k], part_of.begin() + first[k + 1], k);

  // Positions and the visible batch tokens of each token (ancestors and itself, in index order,
  // as indices within its part).
  std::vector<int32_t> pos(n);
  std::vector<std::vector<int32_t>> visible(n);
  for (int32_t k = 0; k < count; ++k) {
    const int32_t base = parts[k].seq->length_, r0 = first[k];
    for (int32_t i = 0; i < parts[k].n; ++i) {
      const int32_t p = parts[k].parents ? parts[k].parents[i] : i - 1;
      pos[r0 + i] = base + (p < 0 ? 0 : pos[r0 + p] - base + 1);
      if (p >= 0) visible[r0 + i] = visible[r0 + p];
      visible[r0 + i].push_back(i);
    }
  }

  const int64_t D = c.dim, QD = c.q_dim(), KVD = c.kv_dim(), F = c.ffn_dim, HD = c.head_dim;
  const int32_t group = c.n_heads / c.n_kv_heads;
  std::vector<float> x(n * D), xb(n * D), q(n * QD), kv_k(n * KVD), kv_v(n * KVD), att(n * QD), h(n * F), g(n * F),
      tmp(n * std::max(D, F));
  for (int32_t k = 0; k < count; ++k)
    for (int32_t i = 0; i < parts[k].n; ++i) dequantize_row(m.token_embd, parts[k].tokens[i], &x[(first[k] + i) * D]);
  const float inv_sqrt_hd = 1.0f / std::sqrt(static_cast<float>(HD));
  // RoPE angles once per token for every head and layer (the same formulas as rope(), so the
  // rotation is bit-identical to it).
  const int64_t half = HD / 2;
  std::vector<float> rope_cos(n * half), rope_sin(n * half);
  rope_angles(c, pos.data(), n, rope_cos.data(), rope_sin.data());
  auto rotate = [&](float* v, const float* cs, const float* sn) {
    for (int64_t k = 0; k < half; ++k) {
      const int64_t a = c.rope_neox ? k : 2 * k, b = c.rope_neox ? k + half : 2 * k + 1;
      const float x0 = v[a], x1 = v[b];
      v[a] = x0 * cs[k] - x1 * sn[k];
      v[b] = x0 * sn[k] + x1 * cs[k];
    }
  };

  // Attention tasks: one key-value head of one part and a run of its tokens, all their query heads
  // over it attended together (attend_heads: the keys and values they share are read once, the same
  // bits). Runs of up to 64 tokens, at least two per head when a part has two tokens, so that both
  // of two threads have work with three key-value heads.
  struct Task {
    int32_t part, kh, i0, i1;
  };
  std::vector<Task> tasks;
  double task_work = 0;
  for (int32_t k = 0; k < count; ++k) {
    const int32_t pn = parts[k].n;
    const int32_t per_head =
        std::min<int32_t>(pn, std::max<int32_t>((pn + 63) / 64, (2 * default_pool().size() + c.n_kv_heads - 1) / c.n_kv_heads));
    const int32_t run = (pn + per_head - 1) / per_head;
    for (int32_t kh = 0; kh < c.n_kv_heads; ++kh)
      for (int32_t i0 = 0; i0 < pn; i0 += run) tasks.push_back({k, kh, i0, std::min(pn, i0 + run)});
    task_work = std::max(task_work, 4.0 * HD * group * run * (static_cast<double>(parts[k].seq->length_) + pn));
  }
  const size_t grain = grain_for(task_work);

  for (int32_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights& w = m.layers[l];
    for (int32_t i = 0; i < n; ++i) rmsnorm(&x[i * D], w.attn_norm, D, c.rms_eps, &xb[i * D]);
    {
      const Matrix* ws[3] = {&w.wq, &w.wk, &w.wv};
      float* ys[3] = {q.data(), kv_k.data(), kv_v.data()};
      matmul_many(ws, ys, 3, xb.data(), n);
    }
    for (int32_t i = 0; i < n; ++i) {
      if (w.bq) {
        for (int64_t j = 0; j < QD; ++j) q[i * QD + j] += w.bq[j];
        for (int64_t j = 0; j < KVD; ++j) kv_k[i * KVD + j] += w.bk[j], kv_v[i * KVD + j] += w.bv[j];
      }
      if (w.q_norm) {  // qwen3: each head's query and key RMS-normed before the rotation
        for (int32_t hh = 0; hh < c.n_heads; ++hh) rmsnorm(&q[i * QD + hh * HD], w.q_norm, HD, c.rms_eps, &q[i * QD + hh * HD]);
        for (int32_t hh = 0; hh < c.n_kv_heads; ++hh)
          rmsnorm(&kv_k[i * KVD + hh * HD], w.k_norm, HD, c.rms_eps, &kv_k[i * KVD + hh * HD]);
      }
      const float* cs = rope_cos.data() + i * half;  // (empty when head_dim is 1: no reference through null)
      const float* sn = rope_sin.data() + i * half;
      for (int32_t hh = 0; hh < c.n_heads; ++hh) rotate(&q[i * QD + hh * HD], cs, sn);
      for (int32_t hh = 0; hh < c.n_kv_heads; ++hh) rotate(&kv_k[i * KVD + hh * HD], cs, sn);
      Sequence& s = *parts[part_of[i]].seq;
      const int32_t slot = s.length_ + (i - first[part_of[i]]);
      for (int32_t hh = 0; hh < c.n_kv_heads; ++hh) {
        const size_t at = (static_cast<size_t>(hh) * s.allocated_ + slot) * HD;
        const float* kr = &kv_k[i * KVD + hh * HD];
        const float* vr = &kv_v[i * KVD + hh * HD];
        if (s.kv_ == KvType::F16) {
          floats_to_halves(kr, &s.f16_.k[l][at], HD);
          floats_to_halves(vr, &s.f16_.v[l][at], HD);
        } else {
          std::memcpy(&s.f32_.k[l][at], kr, HD * sizeof(float));
          std::memcpy(&s.f32_.v[l][at], vr, HD * sizeof(float));
        }
      }
    }
    // Attention: token i, head hh sees its sequence's slots [0, base) and its visible batch slots,
    // in slot order.
    default_pool().parallel_for(tasks.size(), grain, [&](size_t lo, size_t hi) {
      thread_local std::vector<float> score;
      thread_local std::vector<int32_t> extra;
      thread_local std::vector<AttendQuery> qs;
      for (size_t t = lo; t < hi; ++t) {
        const Task& task = tasks[t];
        Sequence& s = *parts[task.part].seq;
        const int32_t base = s.length_, r0 = first[task.part], kh = task.kh;
        size_t n_extra_all = 0, n_score = 0;
        for (int32_t i = task.i0; i < task.i1; ++i)
          n_extra_all += visible[r0 + i].size(), n_score += (base + visible[r0 + i].size()) * group;
        extra.resize(n_extra_all);
        score.resize(n_score);
        qs.clear();
        size_t e0 = 0, s0 = 0;
        for (int32_t i = task.i0; i < task.i1; ++i) {
          const std::vector<int32_t>& vis = visible[r0 + i];
          const int32_t ne = static_cast<int32_t>(vis.size());
          for (int32_t e = 0; e < ne; ++e) extra[e0 + e] = base + vis[e];
          for (int32_t hh = kh * group; hh < (kh + 1) * group; ++hh) {
            const int64_t row = r0 + i;
            qs.push_back({&q[row * QD + hh * HD], base, extra.data() + e0, ne, score.data() + s0, &att[row * QD + hh * HD]});
            s0 += static_cast<size_t>(base) + ne;
          }
          e0 += ne;
        }
        const size_t plane = static_cast<size_t>(kh) * s.allocated_ * HD;
        if (s.kv_ == KvType::F16)
          attend_heads(qs.data(), static_cast<int32_t>(qs.size()), s.f16_.k[l].data() + plane, s.f16_.v[l].data() + plane,
                       static_cast<size_t>(HD), HD, inv_sqrt_hd);
        else
          attend_heads(qs.data(), static_cast<int32_t>(qs.size()), s.f32_.k[l].data() + plane, s.f32_.v[l].data() + plane,
                       static_cast<size_t>(HD), HD, inv_sqrt_hd);
      }
    });
    matmul(w.wo, att.data(), n, tmp.data());
    for (int64_t j = 0; j < n * D; ++j) x[j] += tmp[j];
    for (int32_t i = 0; i < n; ++i) rmsnorm(&x[i * D], w.ffn_norm, D, c.rms_eps, &xb[i * D]);
    {
      const Matrix* ws[2] = {&w.w_gate, &w.w_up};
      float* ys[2] = {g.data(), h.data()};
      matmul_many(ws, ys, 2, xb.data(), n);
    }
    for (int32_t i = 0; i < n; ++i) swiglu(&g[i * F], &h[i * F], F, &h[i * F]);
    matmul(w.w_down, h.data(), n, tmp.data());
    for (int64_t j = 0; j < n * D; ++j) x[j] += tmp[j];
  }
  // The output rows: every token's, or a part's last only (a prefill), in one product.
  int32_t rows = 0;
  for (int32_t k = 0; k < count; ++k)
    for (int32_t i = parts[k].last_only ? parts[k].n - 1 : 0; i < parts[k].n; ++i, ++rows)
      rmsnorm(&x[(first[k] + i) * D], m.output_norm, D, c.rms_eps, &xb[rows * D]);
  const size_t V = c.vocab;
  if (!m.head.empty()) {
    // A restricted head: its rows' logits, the other ids at -infinity.
    const std::vector<int32_t>& ids = c.head_tokens;
    const size_t H = ids.size();
    std::vector<float> out(static_cast<size_t>(rows) * H);
    matmul(m.head, xb.data(), rows, out.data());
    size_t r = 0;
    for (int32_t k = 0; k < count; ++k)
      for (int32_t i = parts[k].last_only ? parts[k].n - 1 : 0; i < parts[k].n; ++i, ++r)
        spread_head_row(ids, &out[r * H], V, parts[k].logits + (parts[k].last_only ? 0 : static_cast<size_t>(i)) * V);
  } else if (count == 1) {
    matmul(m.output, xb.data(), rows, parts[0].logits);
  } else {
    std::vector<float> out(static_cast<size_t>(rows) * V);
    matmul(m.output, xb.data(), rows, out.data());
    size_t r = 0;
    for (int32_t k = 0; k < count; ++k) {
      const size_t kr = parts[k].last_only ? 1 : parts[k].n;
      std::memcpy(parts[k].logits, &out[r * V], kr * V * sizeof(float));
      r += kr;
    }
  }
  for (int32_t k = 0; k < count; ++k) parts[k].seq->length_ += parts[k].n;
}

}  // namespace osd
