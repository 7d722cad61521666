#include "model/model_io.h"

#include <memory>
#include <vector>

#include "core/error.h"

namespace osd {

void set_model_metadata(gguf::Writer& w, const ModelConfig& c) {
  using gguf::Value;
  w.set("general.architecture", Value::str(c.arch));
  w.set("general.name", Value::str("online-specdec model"));
  const std::string a = c.arch + ".";
  w.set(a + "context_length", Value::u32(c.context));
  w.set(a + "embedding_length", Value::u32(c.dim));
  w.set(a + "block_count", Value::u32(c.n_layers));
  w.set(a + "feed_forward_length", Value::u32(c.ffn_dim));
  w.set(a + "attention.head_count", Value::u32(c.n_heads));
  w.set(a + "attention.head_count_kv", Value::u32(c.n_kv_heads));
  w.set(a + "attention.key_length", Value::u32(c.head_dim));
  w.set(a + "attention.value_length", Value::u32(c.head_dim));
  w.set(a + "rope.dimension_count", Value::u32(c.head_dim));
  w.set(a + "rope.freq_base", Value::f32(c.rope_theta));
  w.set(a + "attention.layer_norm_rms_epsilon", Value::f32(c.rms_eps));
  w.set(a + "vocab_size", Value::u32(c.vocab));
  if (c.rope_freq_scale != 1.0f) {
    w.set(a + "rope.scaling.type", Value::str("linear"));
    w.set(a + "rope.scaling.factor", Value::f32(1.0f / c.rope_freq_scale));
  }
}

void save_gguf(const Model& model, const std::string& path, gguf::TensorType type) {
  using gguf::TensorType;
  using gguf::Value;
  if (type != TensorType::F32 && type != TensorType::F16 && type != TensorType::BF16)
    throw_range("type must be F32, F16 or BF16");
  const ModelConfig& c = model.config();
  gguf::Writer w;
  set_model_metadata(w, c);
  if (const gguf::File* src = model.gguf())
    for (const auto& kv : src->metadata())
      if (kv.key.rfind("tokenizer.", 0) == 0) w.set(kv.key, kv.value);

  // Matrices are dequantised into buffers that live until the file is written.
  std::vector<std::unique_ptr<std::vector<float>>> keep;
  auto add_matrix = [&](const std::string& name, const Matrix& m) {
    const float* data;
    if (m.type == TensorType::F32) {
      data = reinterpret_cast<const float*>(m.data);
    } else {
      auto buf = std::make_unique<std::vector<float>>(static_cast<size_t>(m.rows * m.cols));
      for (int64_t r = 0; r < m.rows; ++r) dequantize_row(m, r, buf->data() + r * m.cols);
      data = buf->data();
      keep.push_back(std::move(buf));
    }
    w.add_tensor(name, type, {static_cast<uint64_t>(m.cols), static_cast<uint64_t>(m.rows)}, data);
  };
  auto add_vector = [&](const std::string& name, const float* v, int64_t n) {
    w.add_tensor(name, TensorType::F32, {static_cast<uint64_t>(n)}, v);
  };
  add_matrix("token_embd.weight", model.token_embd);
  add_vector("output_norm.weight", model.output_norm, c.dim);
  if (!c.tied_output) add_matrix("output.weight", model.output);
  for (int32_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights& lw = model.layers[l];
    const std::string p = "blk." + std::to_string(l) + ".";
    add_vector(p + "attn_norm.weight", lw.attn_norm, c.dim);
    add_matrix(p + "attn_q.weight", lw.wq);
    add_matrix(p + "attn_k.weight", lw.wk);
    add_matrix(p + "attn_v.weight", lw.wv);
    add_matrix(p + "attn_output.weight", lw.wo);
    if (lw.bq) {
      add_vector(p + "attn_q.bias", lw.bq, c.q_dim());
      add_vector(p + "attn_k.bias", lw.bk, c.kv_dim());
      add_vector(p + "attn_v.bias", lw.bv, c.kv_dim());
    }
    add_vector(p + "ffn_norm.weight", lw.ffn_norm, c.dim);
    add_matrix(p + "ffn_gate.weight", lw.w_gate);
    add_matrix(p + "ffn_up.weight", lw.w_up);
    add_matrix(p + "ffn_down.weight", lw.w_down);
  }
  w.write(path);
}

}  // namespace osd
