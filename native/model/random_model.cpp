#include "model/random_model.h"

#include <cmath>
#include <memory>
#include <vector>

#include "core/error.h"
#include "core/philox.h"
#include "core/thread_pool.h"
#include "model/model_io.h"
#include "model/quant.h"

namespace osd {

namespace {

// Standard normal from two Philox words (Box-Muller); counter = element index, keyed by tensor.
void fill_normal(std::vector<float>& v, uint64_t seed, uint64_t tensor_id, float scale) {
  default_pool().parallel_for(v.size() / 2 + 1, 4096, [&](size_t lo, size_t hi) {
    for (size_t i = lo; i < hi; ++i) {
      Philox4 r = philox4x32_10(seed, tensor_id, static_cast<uint32_t>(i), static_cast<uint32_t>(i >> 32));
      double u1 = u53(r.v[0], r.v[1]), u2 = u53(r.v[2], r.v[3]);
      double rad = std::sqrt(-2.0 * std::log(1.0 - u1)), th = 6.283185307179586 * u2;
      if (2 * i < v.size()) v[2 * i] = static_cast<float>(rad * std::cos(th)) * scale;
      if (2 * i + 1 < v.size()) v[2 * i + 1] = static_cast<float>(rad * std::sin(th)) * scale;
    }
  });
}

}  // namespace

void write_random_gguf(const std::string& path, const ModelConfig& cin, uint64_t seed, gguf::TensorType type) {
  using gguf::TensorType;
  using gguf::Value;
  ModelConfig c = cin;
  if (c.vocab <= 0 || c.dim <= 0 || c.n_layers <= 0 || c.n_heads <= 0 || c.ffn_dim <= 0 || c.context <= 0)
    throw_range("config: vocabSize, embeddingLength, layers, heads, feedForwardLength and contextLength must be > 0");
  if (c.n_kv_heads <= 0) c.n_kv_heads = c.n_heads;
  if (c.dim % c.n_heads != 0 || c.n_heads % c.n_kv_heads != 0)
    throw_range("config: embeddingLength must be a multiple of heads, and heads a multiple of kvHeads");
  if (!quant::can_quantize(type)) throw_range(std::string("type must be ") + quant::store_type_names());
  c.head_dim = c.dim / c.n_heads;
  if (c.head_dim % 2 != 0)  // as loading requires: RoPE turns pairs of dimensions
    throw_range("config: embeddingLength / heads must be even (RoPE turns pairs of dimensions), got " +
                std::to_string(c.head_dim));
  gguf::Writer w;
  w.set("general.architecture", Value::str("llama"));
  w.set("general.name", Value::str("online-specdec random model"));
  w.set("llama.context_length", Value::u32(c.context));
  w.set("llama.embedding_length", Value::u32(c.dim));
  w.set("llama.block_count", Value::u32(c.n_layers));
  w.set("llama.feed_forward_length", Value::u32(c.ffn_dim));
  w.set("llama.attention.head_count", Value::u32(c.n_heads));
  w.set("llama.attention.head_count_kv", Value::u32(c.n_kv_heads));
  w.set("llama.rope.freq_base", Value::f32(c.rope_theta));
  w.set("llama.attention.layer_norm_rms_epsilon", Value::f32(c.rms_eps));
  w.set("llama.vocab_size", Value::u32(c.vocab));
  std::vector<std::unique_ptr<std::vector<float>>> keep;
  std::vector<std::unique_ptr<std::vector<uint8_t>>> bytes;
  uint64_t id = 0;
  auto mat = [&](const std::string& name, int64_t rows, int64_t cols) {
    auto buf = std::make_unique<std::vector<float>>(static_cast<size_t>(rows * cols));
    fill_normal(*buf, seed, id++, 1.0f / std::sqrt(static_cast<float>(cols)));
    add_matrix_as(w, name, type, rows, cols, buf->data(), bytes);
    keep.push_back(std::move(buf));
  };
  auto ones = [&](const std::string& name, int64_t n) {
    auto buf = std::make_unique<std::vector<float>>(static_cast<size_t>(n), 1.0f);
    w.add_tensor(name, TensorType::F32, {static_cast<uint64_t>(n)}, buf->data());
    keep.push_back(std::move(buf));
  };
  mat("token_embd.weight", c.vocab, c.dim);
  ones("output_norm.weight", c.dim);
  if (!c.tied_output) mat("output.weight", c.vocab, c.dim);
  const int64_t kv = static_cast<int64_t>(c.n_kv_heads) * c.head_dim;
  for (int32_t l = 0; l < c.n_layers; ++l) {
    const std::string p = "blk." + std::to_string(l) + ".";
    ones(p + "attn_norm.weight", c.dim);
    mat(p + "attn_q.weight", c.dim, c.dim);
    mat(p + "attn_k.weight", kv, c.dim);
    mat(p + "attn_v.weight", kv, c.dim);
    mat(p + "attn_output.weight", c.dim, c.dim);
    ones(p + "ffn_norm.weight", c.dim);
    mat(p + "ffn_gate.weight", c.ffn_dim, c.dim);
    mat(p + "ffn_up.weight", c.ffn_dim, c.dim);
    mat(p + "ffn_down.weight", c.dim, c.ffn_dim);
  }
  w.write(path);
}

}  // namespace osd
