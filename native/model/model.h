// A llama-family decoder (llama: Llama 2/3, Mistral, SmolLM; qwen2 with QKV bias; qwen3 with
// per-head RMS norms of queries and keys) loaded from
// GGUF or a llama2.c checkpoint, with weights left in their stored format inside the mapped file.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "io/file.h"
#include "io/gguf.h"
#include "io/llama2c.h"
#include "model/tensor_ops.h"

namespace osd {

class DevicePass;  // model/sequence.h

struct ModelConfig {
  std::string arch = "llama";  // "llama" | "qwen2" | "qwen3"
  int32_t vocab = 0;
  int32_t dim = 0;
  int32_t n_layers = 0;
  int32_t n_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t ffn_dim = 0;
  int32_t context = 0;
  float rope_theta = 10000.0f;
  float rope_freq_scale = 1.0f;  // linear RoPE scaling: positions are multiplied by this
  bool rope_neox = false;        // split-halves rotation (qwen2, qwen3) instead of adjacent pairs
  // Divisors of the RoPE frequencies, one per rotated pair (rope_freqs.weight: Llama 3.1 and later
  // scale long wavelengths this way); empty for none.
  std::vector<float> rope_factors;
  float rms_eps = 1e-5f;
  bool tied_output = true;
  // A restricted head (GGUF key osd.head_tokens): the output rows of these ids only, ascending; the
  // other logits are -infinity, so the model never proposes them. A draft's LM head is most of its
  // cost on a large vocabulary. Empty: every id.
  std::vector<int32_t> head_tokens;
  int32_t kv_dim() const { return n_kv_heads * head_dim; }
  int32_t q_dim() const { return n_heads * head_dim; }
};

struct LayerWeights {
  const float* attn_norm = nullptr;
  Matrix wq, wk, wv, wo;
  const float* bq = nullptr;  // qwen2 biases
  const float* bk = nullptr;
  const float* bv = nullptr;
  const float* q_norm = nullptr;  // qwen3: RMS norm gains of each query and key head (head_dim)
  const float* k_norm = nullptr;
  const float* ffn_norm = nullptr;
  Matrix w_gate, w_up, w_down;
};

// A restricted head's logits (one per id of `ids`) spread over a row of `vocab` logits, the other
// ids at -infinity: the rows every pass gives for such a head.
void spread_head_row(const std::vector<int32_t>& ids, const float* head_logits, int64_t vocab, float* row);

class Model {
 public:
  // Reads a GGUF file or a llama2.c checkpoint, told apart by the magic. Errors name the file.
  static std::shared_ptr<Model> load(const std::string& path);
  static std::shared_ptr<Model> from_gguf(std::unique_ptr<gguf::File> file);
  static std::shared_ptr<Model> from_llama2c(std::unique_ptr<llama2c::Checkpoint> ckpt);

  const ModelConfig& config() const { return cfg_; }
  const std::string& path() const { return path_; }
  const gguf::File* gguf() const { return gguf_.get(); }  // null for llama2.c checkpoints

  // Weights (views into the mapped file, or into owned buffers after set_weights).
  Matrix token_embd;
  const float* output_norm = nullptr;
  Matrix output;  // equals token_embd when tied
  Matrix head;    // with config().head_tokens: those rows of output, in that order (else empty)
  std::vector<LayerWeights> layers;

  // Bytes of weights read per decoded token (every matrix once; embeddings one row).
  size_t weight_bytes_per_token() const;

  // Where this model's passes run: null for the CPU engine, else a device's pass (the CUDA
  // backend's, cuda/model_pass.h; or model/mirror_pass.h's CPU stand-in for tests) holding a copy of
  // the weights there. Set on a model before it is shared: sequences made afterwards keep their
  // cache on that device, and any made before stay on the CPU.
  const std::shared_ptr<DevicePass>& device_pass() const { return device_pass_; }
  void set_device_pass(std::shared_ptr<DevicePass> pass) { device_pass_ = std::move(pass); }

 private:
  Model() = default;
  // Reads osd.head_tokens (checked against the vocabulary) and copies those rows of output to head.
  void build_head(const gguf::File& f);
  // Gives each matrix the quantised kernels read in quant's 16-row layout a packed copy (when the
  // CPU has those kernels), and lets the file's pages of those matrices go.
  void pack_weights(const gguf::File* file);

  ModelConfig cfg_;
  std::shared_ptr<DevicePass> device_pass_;
  io::HugeBuffer packed_;  // the packed copies, each 64-byte aligned
  std::vector<uint8_t> head_rows_;  // head's rows
  std::string path_;
  std::unique_ptr<gguf::File> gguf_;
  std::unique_ptr<llama2c::Checkpoint> l2c_;
};

}  // namespace osd
