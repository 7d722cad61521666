#include "train/params.h"

#include "model/model_io.h"

#include <cmath>
#include <cstring>

#include "core/error.h"
#include "core/philox.h"

namespace osd::train {

ParamLayout::ParamLayout(const ModelConfig& c, bool qkv_bias) : cfg_(c), qkv_bias_(qkv_bias) {
  auto positive = [](int64_t v, const char* name) {
    if (v <= 0) throw_range(std::string(name) + " must be > 0, got " + std::to_string(v));
  };
  positive(c.vocab, "vocab");
  positive(c.dim, "dim");
  positive(c.n_layers, "nLayers");
  positive(c.n_heads, "nHeads");
  positive(c.n_kv_heads, "nKvHeads");
  positive(c.head_dim, "headDim");
  positive(c.ffn_dim, "ffnDim");
  positive(c.context, "context");
  if (c.n_heads % c.n_kv_heads != 0)
    throw_range("nHeads (" + std::to_string(c.n_heads) + ") must be a multiple of nKvHeads (" +
                std::to_string(c.n_kv_heads) + ")");
  if (c.head_dim % 2 != 0) throw_range("headDim must be even (RoPE rotates pairs), got " + std::to_string(c.head_dim));
  if (c.arch != "llama" && c.arch != "qwen2" && c.arch != "qwen3")
    throw_range("arch must be 'llama', 'qwen2' or 'qwen3', got '" + c.arch + "'");
  if (!c.rope_factors.empty() && static_cast<int64_t>(c.rope_factors.size()) != c.head_dim / 2)
    throw_range("ropeFactors must have headDim / 2 entries");

  const int64_t D = c.dim, QD = c.q_dim(), KVD = c.kv_dim(), F = c.ffn_dim, V = c.vocab;
  auto add = [&](const std::string& name, int64_t rows, int64_t cols, bool matrix) {
    ParamTensor t;
    t.name = name;
    t.offset = size_;
    t.rows = rows;
    t.cols = cols;
    t.matrix = matrix;
    size_ += t.size();
    tensors_.push_back(t);
    return t.offset;
  };
  layers_.resize(c.n_layers);
  // Matrices first (weight decay), then norms and biases.
  token_embd_ = add("token_embd.weight", V, D, true);
  output_ = c.tied_output ? token_embd_ : add("output.weight", V, D, true);
  for (int32_t l = 0; l < c.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    LayerOffsets& o = layers_[l];
    o.wq = add(p + "attn_q.weight", QD, D, true);
    o.wk = add(p + "attn_k.weight", KVD, D, true);
    o.wv = add(p + "attn_v.weight", KVD, D, true);
    o.wo = add(p + "attn_output.weight", D, QD, true);
    o.w_gate = add(p + "ffn_gate.weight", F, D, true);
    o.w_up = add(p + "ffn_up.weight", F, D, true);
    o.w_down = add(p + "ffn_down.weight", D, F, true);
  }
  decay_end_ = size_;
  output_norm_ = add("output_norm.weight", 1, D, false);
  for (int32_t l = 0; l < c.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    LayerOffsets& o = layers_[l];
    o.attn_norm = add(p + "attn_norm.weight", 1, D, false);
    o.ffn_norm = add(p + "ffn_norm.weight", 1, D, false);
    o.bq = o.bk = o.bv = o.q_norm = o.k_norm = 0;
    if (qkv_bias) {
      o.bq = add(p + "attn_q.bias", 1, QD, false);
      o.bk = add(p + "attn_k.bias", 1, KVD, false);
      o.bv = add(p + "attn_v.bias", 1, KVD, false);
    }
    if (qk_norm()) {
      o.q_norm = add(p + "attn_q_norm.weight", 1, c.head_dim, false);
      o.k_norm = add(p + "attn_k_norm.weight", 1, c.head_dim, false);
    }
  }
}

const ParamTensor* ParamLayout::find(const std::string& name) const {
  for (const auto& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

Params::Params(const ParamLayout& layout) : layout_(layout), data_(layout.size(), 0.0f) {}

Params Params::random(const ModelConfig& c, uint64_t seed, float std) {
  if (!(std > 0.0f) || !std::isfinite(std)) throw_range("initStd must be a finite number > 0");
  Params p(ParamLayout(c, c.arch == "qwen2"));
  const auto& tensors = p.layout_.tensors();
  const float resid_std = std / std::sqrt(2.0f * static_cast<float>(c.n_layers));
  for (size_t ti = 0; ti < tensors.size(); ++ti) {
    const ParamTensor& t = tensors[ti];
    float* dst = p.at(t.offset);
    const bool is_norm = t.name.find("norm") != std::string::npos;
    if (!t.matrix) {
      std::fill(dst, dst + t.size(), is_norm ? 1.0f : 0.0f);
      continue;
    }
    const bool resid = t.name.find("attn_output") != std::string::npos || t.name.find("ffn_down") != std::string::npos;
    const float s = resid ? resid_std : std;
    // Box-Muller on Philox draws keyed by (seed, tensor index), two normals per counter.
    for (size_t i = 0; i < t.size(); i += 2) {
      const Philox4 r = philox4x32_10(seed, ti, static_cast<uint32_t>(i / 2), 0);
      const double u1 = 1.0 - u53(r.v[0], r.v[1]), u2 = u53(r.v[2], r.v[3]);  // u1 in (0, 1]
      const double radius = std::sqrt(-2.0 * std::log(u1)), angle = 6.283185307179586 * u2;
      dst[i] = static_cast<float>(s * radius * std::cos(angle));
      if (i + 1 < t.size()) dst[i + 1] = static_cast<float>(s * radius * std::sin(angle));
    }
  }
  return p;
}

Params Params::from_model(const Model& m) {
  const ModelConfig& c = m.config();
  const bool bias = !m.layers.empty() && m.layers[0].bq != nullptr;
  Params p(ParamLayout(c, bias));
  const ParamLayout& L = p.layout_;
  auto copy_matrix = [&](const Matrix& w, size_t off) {
    for (int64_t r = 0; r < w.rows; ++r) dequantize_row(w, r, p.at(off) + r * w.cols);
  };
  auto copy_vector = [&](const float* v, int64_t n, size_t off) { std::memcpy(p.at(off), v, n * sizeof(float)); };
  copy_matrix(m.token_embd, L.token_embd());
  if (!c.tied_output) copy_matrix(m.output, L.output());
  copy_vector(m.output_norm, c.dim, L.output_norm());
  for (int32_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights& w = m.layers[l];
    const LayerOffsets& o = L.layer(l);
    copy_vector(w.attn_norm, c.dim, o.attn_norm);
    copy_matrix(w.wq, o.wq);
    copy_matrix(w.wk, o.wk);
    copy_matrix(w.wv, o.wv);
    copy_matrix(w.wo, o.wo);
    if (bias) {
      copy_vector(w.bq, c.q_dim(), o.bq);
      copy_vector(w.bk, c.kv_dim(), o.bk);
      copy_vector(w.bv, c.kv_dim(), o.bv);
    }
    if (L.qk_norm()) {
      copy_vector(w.q_norm, c.head_dim, o.q_norm);
      copy_vector(w.k_norm, c.head_dim, o.k_norm);
    }
    copy_vector(w.ffn_norm, c.dim, o.ffn_norm);
    copy_matrix(w.w_gate, o.w_gate);
    copy_matrix(w.w_up, o.w_up);
    copy_matrix(w.w_down, o.w_down);
  }
  if (const gguf::File* src = m.gguf())
    for (const auto& kv : src->metadata())
      if (kv.key.rfind("tokenizer.", 0) == 0) p.metadata.push_back(kv);
  return p;
}

gguf::Writer Params::writer(gguf::TensorType type) const {
  using gguf::TensorType;
  if (type != TensorType::F32 && type != TensorType::F16 && type != TensorType::BF16)
    throw_range("type must be F32, F16 or BF16");
  const ModelConfig& c = config();
  gguf::Writer w;
  set_model_metadata(w, c);
  const std::string arch_prefix = c.arch + ".";
  for (const auto& kv : metadata)
    if (kv.key.rfind("general.", 0) != 0 && kv.key.rfind(arch_prefix, 0) != 0) w.set(kv.key, kv.value);
  // llama.cpp's order: embeddings, output norm, output, then the blocks.
  auto add = [&](const std::string& name) {
    const ParamTensor* t = layout_.find(name);
    if (t->matrix)
      w.add_tensor(name, type, {static_cast<uint64_t>(t->cols), static_cast<uint64_t>(t->rows)}, at(t->offset));
    else
      w.add_tensor(name, TensorType::F32, {static_cast<uint64_t>(t->cols)}, at(t->offset));
  };
  add("token_embd.weight");
  add("output_norm.weight");
  if (!c.tied_output) add("output.weight");
  if (!c.rope_factors.empty())
    w.add_tensor("rope_freqs.weight", TensorType::F32, {static_cast<uint64_t>(c.rope_factors.size())}, c.rope_factors.data());
  for (int32_t l = 0; l < c.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    for (const char* n : {"attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight",
                          "attn_output.weight"})
      add(p + n);
    if (layout_.qkv_bias())
      for (const char* n : {"attn_q.bias", "attn_k.bias", "attn_v.bias"}) add(p + n);
    if (layout_.qk_norm())
      for (const char* n : {"attn_q_norm.weight", "attn_k_norm.weight"}) add(p + n);
    for (const char* n : {"ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"}) add(p + n);
  }
  return w;
}

void Params::save_gguf(const std::string& path, gguf::TensorType type) const { writer(type).write(path); }

std::shared_ptr<Model> Params::to_model(const std::string& name) const {
  return Model::from_gguf(gguf::File::from_memory(writer(gguf::TensorType::F32).to_bytes(), name));
}

}  // namespace osd::train
