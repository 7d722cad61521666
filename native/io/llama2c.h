// Reader for llama2.c checkpoints (the legacy ".bin" export: seven int32 then float32 weights)
// and llama2.c's tokenizer.bin. The checkpoint is memory-mapped and its size must match the
// header exactly. Problems are osd::Error (Io) with the file name first in the message.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "io/file.h"

namespace osd::llama2c {

struct Config {
  int32_t dim = 0;
  int32_t hidden_dim = 0;
  int32_t n_layers = 0;
  int32_t n_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t vocab_size = 0;          // positive; the file's sign is in shared_classifier
  int32_t seq_len = 0;
  bool shared_classifier = true;   // a positive vocab_size in the file: wcls is the embedding

  int32_t head_size() const { return dim / n_heads; }
  int32_t kv_dim() const { return head_size() * n_kv_heads; }
};

// float32 weights inside the mapped file, row-major with the output dimension first, as
// llama2.c's run.c reads them; per-layer tensors are stacked layer after layer.
struct Weights {
  const float* token_embedding = nullptr;  // [vocab_size][dim]
  const float* rms_att = nullptr;          // [n_layers][dim]
  const float* wq = nullptr;               // [n_layers][dim][dim]
  const float* wk = nullptr;               // [n_layers][kv_dim][dim]
  const float* wv = nullptr;               // [n_layers][kv_dim][dim]
  const float* wo = nullptr;               // [n_layers][dim][dim]
  const float* rms_ffn = nullptr;          // [n_layers][dim]
  const float* w1 = nullptr;               // [n_layers][hidden_dim][dim]
  const float* w2 = nullptr;               // [n_layers][dim][hidden_dim]
  const float* w3 = nullptr;               // [n_layers][hidden_dim][dim]
  const float* rms_final = nullptr;        // [dim]
  const float* wcls = nullptr;             // [vocab_size][dim]; equals token_embedding when shared
};

// Exact file size a config implies (header, weights, the unused RoPE tables, wcls if unshared).
// Throws osd::Error (Range) if it overflows.
uint64_t checkpoint_bytes(const Config& c);

class Checkpoint {
 public:
  static std::unique_ptr<Checkpoint> open(const std::string& path);
  // `name` stands for the file in error messages.
  static std::unique_ptr<Checkpoint> from_memory(std::vector<uint8_t> bytes, std::string name);

  const std::string& name() const { return name_; }
  const Config& config() const { return config_; }
  const Weights& weights() const { return weights_; }  // valid while the Checkpoint lives

 private:
  Checkpoint() = default;
  void parse();

  std::string name_;
  io::FileBytes bytes_;
  Config config_;
  Weights weights_;
};

struct Tokenizer {
  int32_t max_token_length = 0;
  std::vector<std::string> tokens;  // raw bytes of each piece
  std::vector<float> scores;
};

// tokenizer.bin: int32 max_token_length, then per token float score, int32 length, bytes.
// The format does not store the token count: pass the model's vocab_size (the file must hold
// exactly that many tokens), or 0 to read tokens until the end of the file.
Tokenizer read_tokenizer(const std::string& path, int32_t vocab_size);
Tokenizer parse_tokenizer(const uint8_t* data, size_t size, const std::string& name, int32_t vocab_size);

}  // namespace osd::llama2c
