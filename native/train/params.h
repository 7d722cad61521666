// The trainable parameters of a llama-family decoder: one flat, owned f32 buffer whose layout is
// shared by the gradients and the optimizer moments. Tensors carry llama.cpp's GGUF names, so a
// parameter set exports as a GGUF model (or an osd::Model) without renaming anything.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "io/gguf.h"
#include "model/model.h"

namespace osd::train {

struct ParamTensor {
  std::string name;  // "token_embd.weight", "blk.3.attn_q.weight", ...
  size_t offset = 0;  // floats from the start of the buffer
  int64_t rows = 1;   // matrices: out x in (GGUF dims {cols, rows}); vectors: 1 x n
  int64_t cols = 0;
  bool matrix = false;  // matrices take weight decay; norms and biases do not
  size_t size() const { return static_cast<size_t>(rows * cols); }
};

// Offsets (in floats) of one layer's tensors; bias offsets are meaningful only with qkv_bias, the
// query and key norms' only with qk_norm.
struct LayerOffsets {
  size_t attn_norm, wq, wk, wv, wo, bq, bk, bv, q_norm, k_norm, ffn_norm, w_gate, w_up, w_down;
};

// Matrices come first, so [0, decay_end()) is exactly the weight-decayed part.
class ParamLayout {
 public:
  ParamLayout() = default;
  // Throws Range on inconsistent dimensions (naming the field).
  ParamLayout(const ModelConfig& c, bool qkv_bias);

  const ModelConfig& config() const { return cfg_; }
  bool qkv_bias() const { return qkv_bias_; }
  bool qk_norm() const { return cfg_.arch == "qwen3"; }  // per-head RMS norms of queries and keys
  size_t size() const { return size_; }
  size_t decay_end() const { return decay_end_; }
  const std::vector<ParamTensor>& tensors() const { return tensors_; }
  const ParamTensor* find(const std::string& name) const;

  size_t token_embd() const { return token_embd_; }
  size_t output() const { return output_; }  // == token_embd() when tied
  size_t output_norm() const { return output_norm_; }
  const LayerOffsets& layer(int32_t l) const { return layers_[l]; }

 private:
  ModelConfig cfg_;
  bool qkv_bias_ = false;
  size_t size_ = 0, decay_end_ = 0;
  size_t token_embd_ = 0, output_ = 0, output_norm_ = 0;
  std::vector<LayerOffsets> layers_;
  std::vector<ParamTensor> tensors_;
};

// An owned parameter set plus the GGUF metadata its exports carry over (tokenizer.*).
class Params {
 public:
  Params() = default;
  explicit Params(const ParamLayout& layout);  // zero-filled

  // Scaled normal initialisation from Philox (seeded, identical on every machine): matrices
  // N(0, std^2), the residual projections wo and w_down N(0, (std / sqrt(2 n_layers))^2), norms 1,
  // biases 0. `qkv_bias` defaults to the architecture's (qwen2 has them).
  static Params random(const ModelConfig& c, uint64_t seed, float std = 0.02f);
  // Copies (dequantising any stored type) the weights of a loaded model, its configuration and
  // its tokenizer metadata.
  static Params from_model(const Model& m);

  const ParamLayout& layout() const { return layout_; }
  const ModelConfig& config() const { return layout_.config(); }
  float* data() { return data_.data(); }
  const float* data() const { return data_.data(); }
  size_t size() const { return data_.size(); }
  float* at(size_t offset) { return data_.data() + offset; }
  const float* at(size_t offset) const { return data_.data() + offset; }

  // Metadata copied into every export (tokenizer.* of the source model); keys under
  // general.* and <arch>.* are written from the configuration and ignored here.
  std::vector<gguf::KeyValue> metadata;

  // A GGUF writer for these weights (matrices as `type`: F32, F16 or BF16; vectors F32) with the
  // llama.cpp metadata the loader reads. It borrows this buffer: keep *this alive and unchanged
  // until the writer is done.
  gguf::Writer writer(gguf::TensorType type = gguf::TensorType::F32) const;
  // Writes the model atomically.
  void save_gguf(const std::string& path, gguf::TensorType type = gguf::TensorType::F32) const;
  // A standalone F32 copy as an inference model (an in-memory GGUF, loaded by Model::from_gguf).
  std::shared_ptr<Model> to_model(const std::string& name = "trained model") const;

 private:
  ParamLayout layout_;
  std::vector<float> data_;
};


}  // namespace osd::train
