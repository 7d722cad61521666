#include "train/train_model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "core/error.h"

namespace osd::train {

void validate_batch(const ModelConfig& c, const Batch& b) {
  if (b.batch <= 0) throw_range("batch must be > 0, got " + std::to_string(b.batch));
  if (b.seq_len <= 0 || b.seq_len > c.context)
    throw_range("seqLen must be in [1, " + std::to_string(c.context) + "] (the model's context), got " +
                std::to_string(b.seq_len));
  if (!b.tokens) throw_range("tokens are missing");
  const int64_t n = static_cast<int64_t>(b.batch) * b.seq_len;
  for (int64_t i = 0; i < n; ++i)
    if (b.tokens[i] < 0 || b.tokens[i] >= c.vocab)
      throw_range("tokens[" + std::to_string(i) + "] = " + std::to_string(b.tokens[i]) +
                  " is out of range for vocabSize " + std::to_string(c.vocab));
  // Targets and teachers are checked by head_loss.
}

void Activations::resize(const ModelConfig& c, int32_t B, int32_t T) {
  const ModelConfig& had = config;
  if (B == batch && T == seq_len && had.vocab == c.vocab && had.dim == c.dim && had.n_layers == c.n_layers &&
      had.n_heads == c.n_heads && had.n_kv_heads == c.n_kv_heads && had.head_dim == c.head_dim &&
      had.ffn_dim == c.ffn_dim && had.rope_theta == c.rope_theta && had.rope_freq_scale == c.rope_freq_scale &&
      had.rope_neox == c.rope_neox && had.rope_factors == c.rope_factors && had.arch == c.arch)
    return;
  config = c;
  batch = B;
  seq_len = T;
  const size_t N = static_cast<size_t>(B) * T, D = c.dim, QD = c.q_dim(), KVD = c.kv_dim(), F = c.ffn_dim;
  const bool qk_norm = c.arch == "qwen3";
  layers.assign(c.n_layers, Layer());
  for (Layer& l : layers) {
    l.x.resize(N * D);
    l.xn1.resize(N * D);
    l.rstd1.resize(N);
    l.q.resize(N * QD);
    l.k.resize(N * KVD);
    l.v.resize(N * KVD);
    if (qk_norm) {
      l.q_pre.resize(N * QD);
      l.k_pre.resize(N * KVD);
      l.rstd_q.resize(N * c.n_heads);
      l.rstd_k.resize(N * c.n_kv_heads);
    }
    l.probs.resize(static_cast<size_t>(B) * c.n_heads * T * T);
    l.att.resize(N * QD);
    l.x2.resize(N * D);
    l.xn2.resize(N * D);
    l.rstd2.resize(N);
    l.gate.resize(N * F);
    l.up.resize(N * F);
    l.h.resize(N * F);
  }
  x_final.resize(N * D);
  xn_final.resize(N * D);
  rstd_final.resize(N);
  rope = rope_table(c, T);
  dx.resize(N * D);
  dxn.resize(N * D);
  dq.resize(N * QD);
  dk.resize(N * KVD);
  dv.resize(N * KVD);
  datt.resize(N * QD);
  dgate.resize(N * F);
  dup.resize(N * F);
  dh.resize(N * F);
  dq_pre.resize(qk_norm ? N * QD : 0);
  dk_pre.resize(qk_norm ? N * KVD : 0);
}

namespace {

// Everything up to the final norm: xn_final holds the LM head's input.
void forward_layers(const Params& p, const int32_t* tokens, int32_t B, int32_t T, Activations& a) {
  const ModelConfig& c = p.config();
  const ParamLayout& L = p.layout();
  a.resize(c, B, T);
  const int64_t N = static_cast<int64_t>(B) * T, D = c.dim, QD = c.q_dim(), KVD = c.kv_dim(), F = c.ffn_dim;
  const AttnShape shape{B, T, c.n_heads, c.n_kv_heads, c.head_dim};

  float* x0 = a.layers.empty() ? a.x_final.data() : a.layers[0].x.data();
  for (int64_t n = 0; n < N; ++n) std::memcpy(x0 + n * D, p.at(L.token_embd()) + tokens[n] * D, D * sizeof(float));

  for (int32_t l = 0; l < c.n_layers; ++l) {
    Activations::Layer& A = a.layers[l];
    const LayerOffsets& o = L.layer(l);
    float* x_next = l + 1 < c.n_layers ? a.layers[l + 1].x.data() : a.x_final.data();
    // Attention block.
    rmsnorm_forward(A.x.data(), p.at(o.attn_norm), N, D, c.rms_eps, A.xn1.data(), A.rstd1.data());
    // With qwen3's head norms the projections go to q_pre / k_pre, which the norms read.
    float* qp = L.qk_norm() ? A.q_pre.data() : A.q.data();
    float* kp = L.qk_norm() ? A.k_pre.data() : A.k.data();
    linear_forward(p.at(o.wq), QD, D, A.xn1.data(), N, qp);
    linear_forward(p.at(o.wk), KVD, D, A.xn1.data(), N, kp);
    linear_forward(p.at(o.wv), KVD, D, A.xn1.data(), N, A.v.data());
    if (L.qkv_bias())
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t j = 0; j < QD; ++j) qp[n * QD + j] += p.at(o.bq)[j];
        for (int64_t j = 0; j < KVD; ++j) kp[n * KVD + j] += p.at(o.bk)[j], A.v[n * KVD + j] += p.at(o.bv)[j];
      }
    if (L.qk_norm()) {  // each head's query and key RMS-normed (rows of head_dim)
      rmsnorm_forward(qp, p.at(o.q_norm), N * c.n_heads, c.head_dim, c.rms_eps, A.q.data(), A.rstd_q.data());
      rmsnorm_forward(kp, p.at(o.k_norm), N * c.n_kv_heads, c.head_dim, c.rms_eps, A.k.data(), A.rstd_k.data());
    }
    rope_rows(a.rope, A.q.data(), N, T, c.n_heads, false);
    rope_rows(a.rope, A.k.data(), N, T, c.n_kv_heads, false);
    attention_forward(shape, A.q.data(), A.k.data(), A.v.data(), A.probs.data(), A.att.data());
    linear_forward(p.at(o.wo), D, QD, A.att.data(), N, A.x2.data());
    for (int64_t j = 0; j < N * D; ++j) A.x2[j] = A.x[j] + A.x2[j];
    // Feed-forward block.
    rmsnorm_forward(A.x2.data(), p.at(o.ffn_norm), N, D, c.rms_eps, A.xn2.data(), A.rstd2.data());
    linear_forward(p.at(o.w_gate), F, D, A.xn2.data(), N, A.gate.data());
    linear_forward(p.at(o.w_up), F, D, A.xn2.data(), N, A.up.data());
    swiglu(A.gate.data(), A.up.data(), N * F, A.h.data());
    linear_forward(p.at(o.w_down), D, F, A.h.data(), N, x_next);
    for (int64_t j = 0; j < N * D; ++j) x_next[j] = A.x2[j] + x_next[j];
  }
  rmsnorm_forward(a.x_final.data(), p.at(L.output_norm()), N, D, c.rms_eps, a.xn_final.data(), a.rstd_final.data());
}

void backward_layers(const Params& p, const int32_t* tokens, Activations& a, float* grads) {
  const ModelConfig& c = p.config();
  const ParamLayout& L = p.layout();
  const int32_t B = a.batch, T = a.seq_len;
  const int64_t N = static_cast<int64_t>(B) * T, D = c.dim, QD = c.q_dim(), KVD = c.kv_dim(), F = c.ffn_dim;
  const AttnShape shape{B, T, c.n_heads, c.n_kv_heads, c.head_dim};
  float* g = grads;

  // a.dxn holds d loss / d xn_final; dx becomes d loss / d (residual stream).
  rmsnorm_backward(a.x_final.data(), p.at(L.output_norm()), a.rstd_final.data(), a.dxn.data(), N, D, a.dx.data(),
                   false, g + L.output_norm());
  for (int32_t l = c.n_layers - 1; l >= 0; --l) {
    Activations::Layer& A = a.layers[l];
    const LayerOffsets& o = L.layer(l);
    // x_next = x2 + W_down swiglu(W_gate xn2, W_up xn2), xn2 = rmsnorm(x2)
    linear_backward(p.at(o.w_down), D, F, A.h.data(), a.dx.data(), N, a.dh.data(), false, g + o.w_down);
    swiglu_backward(A.gate.data(), A.up.data(), a.dh.data(), N * F, a.dgate.data(), a.dup.data());
    linear_backward(p.at(o.w_gate), F, D, A.xn2.data(), a.dgate.data(), N, a.dxn.data(), false, g + o.w_gate);
    linear_backward(p.at(o.w_up), F, D, A.xn2.data(), a.dup.data(), N, a.dxn.data(), true, g + o.w_up);
    rmsnorm_backward(A.x2.data(), p.at(o.ffn_norm), A.rstd2.data(), a.dxn.data(), N, D, a.dx.data(), true,
                     g + o.ffn_norm);
    // x2 = x + W_o attention(rope(W_q xn1 + bq), rope(W_k xn1 + bk), W_v xn1 + bv), xn1 = rmsnorm(x)
    // (qwen3: rope(headnorm(W_q xn1)), rope(headnorm(W_k xn1)))
    linear_backward(p.at(o.wo), D, QD, A.att.data(), a.dx.data(), N, a.datt.data(), false, g + o.wo);
    attention_backward(shape, A.q.data(), A.k.data(), A.v.data(), A.probs.data(), a.datt.data(), a.dq.data(),
                       a.dk.data(), a.dv.data());
    rope_rows(a.rope, a.dq.data(), N, T, c.n_heads, true);
    rope_rows(a.rope, a.dk.data(), N, T, c.n_kv_heads, true);
    if (L.qk_norm()) {
      rmsnorm_backward(A.q_pre.data(), p.at(o.q_norm), A.rstd_q.data(), a.dq.data(), N * c.n_heads, c.head_dim,
                       a.dq_pre.data(), false, g + o.q_norm);
      rmsnorm_backward(A.k_pre.data(), p.at(o.k_norm), A.rstd_k.data(), a.dk.data(), N * c.n_kv_heads, c.head_dim,
                       a.dk_pre.data(), false, g + o.k_norm);
      a.dq.swap(a.dq_pre);
      a.dk.swap(a.dk_pre);
    }
    if (L.qkv_bias())
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t j = 0; j < QD; ++j) g[o.bq + j] += a.dq[n * QD + j];
        for (int64_t j = 0; j < KVD; ++j) g[o.bk + j] += a.dk[n * KVD + j], g[o.bv + j] += a.dv[n * KVD + j];
      }
    linear_backward(p.at(o.wq), QD, D, A.xn1.data(), a.dq.data(), N, a.dxn.data(), false, g + o.wq);
    linear_backward(p.at(o.wk), KVD, D, A.xn1.data(), a.dk.data(), N, a.dxn.data(), true, g + o.wk);
    linear_backward(p.at(o.wv), KVD, D, A.xn1.data(), a.dv.data(), N, a.dxn.data(), true, g + o.wv);
    rmsnorm_backward(A.x.data(), p.at(o.attn_norm), A.rstd1.data(), a.dxn.data(), N, D, a.dx.data(), true,
                     g + o.attn_norm);
  }
  // Embedding rows, in token order (tied: adds to the LM head's gradient).
  float* ge = g + L.token_embd();
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < D; ++j) ge[tokens[n] * D + j] += a.dx[n * D + j];
}

}  // namespace

namespace {

// The output matrix's rows of a restricted head's ids, in that order (H x dim).
std::vector<float> head_rows(const Params& p) {
  const ModelConfig& c = p.config();
  const float* w = p.at(p.layout().output());
  std::vector<float> wh(c.head_tokens.size() * static_cast<size_t>(c.dim));
  for (size_t j = 0; j < c.head_tokens.size(); ++j)
    std::memcpy(&wh[j * c.dim], w + static_cast<int64_t>(c.head_tokens[j]) * c.dim, c.dim * sizeof(float));
  return wh;
}

// head_loss through the model's head: the whole output matrix, or a restricted head's rows
// (config().head_tokens). A restricted head scores the teacher renormalised over its ids: a draft
// that can only propose those does best matching p restricted to them (its acceptance is then the
// teacher's mass there). Cross-entropy targets outside the head, and sparse teacher rows with no
// listed id inside it, do not count. The gradient of the gathered rows is added back to dw's rows.
double model_head_loss(const Params& p, const float* x, int64_t n, const LossTargets& t, int64_t chunk, float* dx,
                       float* dw) {
  const ModelConfig& c = p.config();
  const float* w = p.at(p.layout().output());
  const std::vector<int32_t>& ids = c.head_tokens;
  if (ids.empty()) return head_loss(x, n, w, c.vocab, c.dim, t, chunk, dx, dw);
  const int64_t V = c.vocab, D = c.dim, H = static_cast<int64_t>(ids.size());
  // The caller's ids and teacher are checked against the whole vocabulary first.
  validate_loss_targets(t, n, V);
  std::vector<int32_t> at(static_cast<size_t>(V), -1);  // id -> head row
  for (int64_t j = 0; j < H; ++j) at[ids[j]] = static_cast<int32_t>(j);
  const std::vector<float> wh = head_rows(p);
  std::vector<float> dwh(dw ? static_cast<size_t>(H * D) : 0);
  LossTargets m = t;
  std::vector<int32_t> targets, topk_ids, counts;
  std::vector<float> teacher, topk_probs, residual;
  std::vector<uint8_t> mask;
  if (t.targets) {
    targets.resize(static_cast<size_t>(n));
    for (int64_t r = 0; r < n; ++r) targets[r] = t.targets[r] < 0 ? -1 : at[t.targets[r]];
    m.targets = targets.data();
  } else if (t.distill.teacher) {
    teacher.resize(static_cast<size_t>(n * H));
    for (int64_t r = 0; r < n; ++r)
      for (int64_t j = 0; j < H; ++j) teacher[r * H + j] = t.distill.teacher[r * V + ids[j]];
    m.distill.teacher = teacher.data();
  } else {
    const int64_t k = t.distill.k, k2 = std::min(k, H);
    topk_ids.assign(static_cast<size_t>(n * k2), 0);
    topk_probs.assign(static_cast<size_t>(n * k2), 0.0f);
    residual.resize(static_cast<size_t>(n));
    mask.resize(static_cast<size_t>(n));
    counts.resize(static_cast<size_t>(n));
    std::vector<uint8_t> used(static_cast<size_t>(H), 0);
    for (int64_t r = 0; r < n; ++r) {
      if (t.distill.mask && !t.distill.mask[r]) {
        // A row that does not count was not validated: its ids are not read.
        for (int64_t i = 0; i < k2; ++i) topk_ids[r * k2 + i] = static_cast<int32_t>(i);
        mask[r] = 0;
        residual[r] = 1.0f;
        counts[r] = 0;
        continue;
      }
      const int32_t* id = t.distill.topk_ids + r * k;
      const float* pr = t.distill.topk_probs + r * k;
      double kept = 0.0, listed = 0.0;
      int64_t e = 0;
      for (int64_t i = 0; i < k; ++i) {
        listed += pr[i];
        if (at[id[i]] < 0) continue;
        topk_ids[r * k2 + e] = at[id[i]];
        topk_probs[r * k2 + e] = pr[i];
        used[at[id[i]]] = 1;
        kept += pr[i], ++e;
      }
      // The unlisted mass is taken to lie inside the head (it mostly does: the head holds the
      // frequent ids); the head's share is then kept + rest.
      // When every head row is listed, nothing is left for the rest.
      const double rest = e == H ? 0.0 : t.distill.residual ? t.distill.residual[r] : std::max(0.0, 1.0 - listed);
      const double share = kept + rest;
      // A row none of whose listed ids the head holds says nothing about the distribution there.
      mask[r] = e > 0 && share > 1e-6;
      const double inv = share > 0 ? 1.0 / share : 0.0;
      for (int64_t i = 0; i < e; ++i) topk_probs[r * k2 + i] = static_cast<float>(topk_probs[r * k2 + i] * inv);
      // The slots left over hold unused head rows (ids must be distinct). With k2 < H they are not
      // scored (topk_count) and the rest is a bin; with k2 = H they are every unlisted row, and the
      // rest is spread evenly over them.
      for (int64_t j = 0, i = e; i < k2; ++j)
        if (!used[j]) topk_ids[r * k2 + i++] = static_cast<int32_t>(j);
      for (int64_t i = 0; i < e; ++i) used[topk_ids[r * k2 + i]] = 0;
      if (k2 == H) {
        for (int64_t i = e; i < k2; ++i) topk_probs[r * k2 + i] = static_cast<float>(rest * inv / static_cast<double>(H - e));
        residual[r] = 0.0f;
        counts[r] = static_cast<int32_t>(k2);
      } else {
        residual[r] = static_cast<float>(rest * inv);
        counts[r] = static_cast<int32_t>(e);
      }
    }
    m.distill.topk_ids = topk_ids.data();
    m.distill.topk_probs = topk_probs.data();
    m.distill.residual = residual.data();
    m.distill.k = static_cast<int32_t>(k2);
    m.distill.mask = mask.data();
    m.topk_count = counts.data();
  }
  const double loss = head_loss(x, n, wh.data(), H, D, m, chunk, dx, dw ? dwh.data() : nullptr);
  if (dw)
    for (int64_t j = 0; j < H; ++j)
      for (int64_t d = 0; d < D; ++d) dw[ids[j] * D + d] += dwh[j * D + d];
  return loss;
}

}  // namespace

double forward(const Params& p, const Batch& b, Activations& a, const ForwardOptions& o) {
  const ModelConfig& c = p.config();
  validate_batch(c, b);
  forward_layers(p, b.tokens, b.batch, b.seq_len, a);
  const int64_t N = static_cast<int64_t>(b.batch) * b.seq_len;
  return model_head_loss(p, a.xn_final.data(), N, b.loss, o.head_chunk, nullptr, nullptr);
}

double forward_backward(const Params& p, const Batch& b, Activations& a, float* grads, const ForwardOptions& o) {
  const ModelConfig& c = p.config();
  validate_batch(c, b);
  forward_layers(p, b.tokens, b.batch, b.seq_len, a);
  std::fill(grads, grads + p.size(), 0.0f);
  const int64_t N = static_cast<int64_t>(b.batch) * b.seq_len;
  const double loss = model_head_loss(p, a.xn_final.data(), N, b.loss, o.head_chunk, a.dxn.data(), grads + p.layout().output());
  backward_layers(p, b.tokens, a, grads);
  return loss;
}

void forward_logits(const Params& p, const int32_t* tokens, int32_t batch, int32_t seq_len, float* logits) {
  const ModelConfig& c = p.config();
  Batch b;
  b.batch = batch;
  b.seq_len = seq_len;
  b.tokens = tokens;
  validate_batch(c, b);
  Activations a;
  forward_layers(p, tokens, batch, seq_len, a);
  const int64_t N = static_cast<int64_t>(batch) * seq_len;
  const std::vector<int32_t>& ids = c.head_tokens;
  if (ids.empty()) {
    linear_forward(p.at(p.layout().output()), c.vocab, c.dim, a.xn_final.data(), N, logits);
    return;
  }
  // A restricted head: its rows' logits, the other ids at -infinity (as Sequence::evaluate).
  const int64_t H = static_cast<int64_t>(ids.size());
  std::vector<float> out(static_cast<size_t>(N * H));
  linear_forward(head_rows(p).data(), H, c.dim, a.xn_final.data(), N, out.data());
  for (int64_t r = 0; r < N; ++r) spread_head_row(ids, &out[r * H], c.vocab, logits + r * c.vocab);
}

}  // namespace osd::train
