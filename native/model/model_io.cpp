#include "model/model_io.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "core/error.h"
#include "core/thread_pool.h"
#include "model/quant.h"

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
  if (!c.head_tokens.empty()) w.set("osd.head_tokens", Value::array(c.head_tokens));
  if (c.rope_freq_scale != 1.0f) {
    w.set(a + "rope.scaling.type", Value::str("linear"));
    w.set(a + "rope.scaling.factor", Value::f32(1.0f / c.rope_freq_scale));
  }
}

gguf::TensorType stored_type(gguf::TensorType type, int64_t cols) {
  using gguf::TensorType;
  if (cols % gguf::type_info(type).block_size == 0) return type;
  if ((type == TensorType::Q2_K || type == TensorType::IQ4_XS) && cols % 32 == 0) return TensorType::IQ4_NL;
  return TensorType::F16;
}

void add_matrix_as(gguf::Writer& w, const std::string& name, gguf::TensorType want, int64_t rows, int64_t cols,
                   const float* data, std::vector<std::unique_ptr<std::vector<uint8_t>>>& keep) {
  using gguf::TensorType;
  const std::vector<uint64_t> dims{static_cast<uint64_t>(cols), static_cast<uint64_t>(rows)};
  const TensorType type = stored_type(want, cols);
  if (type == TensorType::F32 || type == TensorType::F16 || type == TensorType::BF16) {
    w.add_tensor(name, type, dims, data);
    return;
  }
  const size_t row_bytes = quant::bytes_for(type, cols);
  auto buf = std::make_unique<std::vector<uint8_t>>(row_bytes * static_cast<size_t>(rows));
  uint8_t* out = buf->data();
  default_pool().parallel_for(static_cast<size_t>(rows), 64, [&](size_t lo, size_t hi) {
    std::vector<float> back(static_cast<size_t>(cols));
    for (size_t r = lo; r < hi; ++r) {
      // A block format has no NaN or infinity (its scale would be, and the integer casts are undefined).
      const float* row = data + r * cols;
      for (int64_t j = 0; j < cols; ++j)
        if (!std::isfinite(row[j]))
          throw_range("tensor '" + name + "' has a non-finite weight (" + num_str(row[j]) + " at row " +
                      std::to_string(r) + ", column " + std::to_string(j) + "), which " +
                      gguf::type_info(type).name + " cannot store");
      quant::quantize(type, row, cols, out + r * row_bytes);
      // Finite weights can still overflow a block's fp16 scale (beyond about 5e5 for Q4_0): the
      // blocks would read back as infinity or NaN.
      quant::dequantize(type, out + r * row_bytes, cols, back.data());
      for (int64_t j = 0; j < cols; ++j)
        if (!std::isfinite(back[j])) {
          const int64_t bs = gguf::type_info(type).block_size, j0 = j / bs * bs;
          float big = 0.0f;
          for (int64_t i = j0; i < j0 + bs; ++i) big = std::max(big, std::fabs(row[i]));
          throw_range("tensor '" + name + "' has weights too large for the fp16 scales of " + gguf::type_info(type).name +
                      " (row " + std::to_string(r) + ", the block at column " + std::to_string(j0) + ": |w| up to " +
                      num_str(big) + "); store it as F32, F16 or BF16");
        }
    }
  });
  w.add_tensor_raw(name, type, dims, buf->data(), buf->size());
  keep.push_back(std::move(buf));
}

namespace {

// The writer for `model` stored as `type`; converted matrices live in floats / bytes until it has written.
struct ModelWriter {
  gguf::Writer w;
  std::vector<std::unique_ptr<std::vector<float>>> floats;
  std::vector<std::unique_ptr<std::vector<uint8_t>>> bytes;
};

void fill_writer(const Model& model, std::optional<gguf::TensorType> want, ModelWriter& mw,
                 const std::vector<int32_t>* head = nullptr) {
  using gguf::TensorType;
  using gguf::Value;
  if (want && !quant::can_quantize(*want)) throw_range(std::string("type must be ") + quant::store_type_names());
  const ModelConfig& c = model.config();
  gguf::Writer& w = mw.w;
  ModelConfig meta = c;
  if (head) meta.head_tokens = *head;
  set_model_metadata(w, meta);
  // The source's tokenizer and its provenance (name, license, authors, ...) travel with the weights.
  // file_type describes the source's storage, and alignment is the writer's own.
  if (const gguf::File* src = model.gguf())
    for (const auto& kv : src->metadata()) {
      const std::string& k = kv.key;
      const bool general = k.rfind("general.", 0) == 0 && k != "general.architecture" &&
                           k != "general.file_type" && k != "general.alignment";
      if (general || k.rfind("tokenizer.", 0) == 0) w.set(k, kv.value);
    }

  auto add_matrix = [&](const std::string& name, const Matrix& m) {
    const TensorType type = want ? stored_type(*want, m.cols) : m.type;
    if (m.type == type) {
      w.add_tensor_raw(name, type, {static_cast<uint64_t>(m.cols), static_cast<uint64_t>(m.rows)}, m.data, m.bytes());
      return;
    }
    const float* data;
    if (m.type == TensorType::F32) {
      data = reinterpret_cast<const float*>(m.data);
    } else {
      auto buf = std::make_unique<std::vector<float>>(static_cast<size_t>(m.rows * m.cols));
      for (int64_t r = 0; r < m.rows; ++r) dequantize_row(m, r, buf->data() + r * m.cols);
      data = buf->data();
      mw.floats.push_back(std::move(buf));
    }
    add_matrix_as(w, name, type, m.rows, m.cols, data, mw.bytes);
  };
  auto add_vector = [&](const std::string& name, const float* v, int64_t n) {
    w.add_tensor(name, TensorType::F32, {static_cast<uint64_t>(n)}, v);
  };
  add_matrix("token_embd.weight", model.token_embd);
  add_vector("output_norm.weight", model.output_norm, c.dim);
  if (!c.tied_output) add_matrix("output.weight", model.output);
  if (!c.rope_factors.empty()) add_vector("rope_freqs.weight", c.rope_factors.data(), c.head_dim / 2);
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
    if (lw.q_norm) {
      add_vector(p + "attn_q_norm.weight", lw.q_norm, c.head_dim);
      add_vector(p + "attn_k_norm.weight", lw.k_norm, c.head_dim);
    }
    add_vector(p + "ffn_norm.weight", lw.ffn_norm, c.dim);
    add_matrix(p + "ffn_gate.weight", lw.w_gate);
    add_matrix(p + "ffn_up.weight", lw.w_up);
    add_matrix(p + "ffn_down.weight", lw.w_down);
  }
}

}  // namespace

std::optional<gguf::TensorType> uniform_matrix_type(const Model& model) {
  std::optional<gguf::TensorType> type;
  bool mixed = false;
  auto see = [&](const Matrix& m) {
    if (m.empty()) return;
    if (type && *type != m.type) mixed = true;
    type = m.type;
  };
  see(model.token_embd);
  if (!model.config().tied_output) see(model.output);
  for (const LayerWeights& lw : model.layers)
    for (const Matrix* m : {&lw.wq, &lw.wk, &lw.wv, &lw.wo, &lw.w_gate, &lw.w_up, &lw.w_down}) see(*m);
  return mixed ? std::nullopt : type;
}

void save_gguf(const Model& model, const std::string& path, std::optional<gguf::TensorType> type) {
  ModelWriter mw;
  fill_writer(model, type, mw);
  mw.w.write(path);
}

std::shared_ptr<Model> convert_model(const Model& model, std::optional<gguf::TensorType> type,
                                     const std::vector<int32_t>* head) {
  ModelWriter mw;
  fill_writer(model, type, mw, head);
  std::vector<uint8_t> bytes = mw.w.to_bytes();
  mw = ModelWriter();  // the converted matrices are in `bytes` now
  const std::string what = type ? std::string(" as ") + gguf::type_info(*type).name : std::string(" (copy)");
  return Model::from_gguf(gguf::File::from_memory(std::move(bytes), model.path() + what));
}


}  // namespace osd
