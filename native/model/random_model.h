// Random-weight llama models written straight to GGUF: benchmark subjects (a model larger than the
// caches) and small drafts for tests. Weights are N(0, scale^2) with scale 1/sqrt(fan_in).
#pragma once
#include <cstdint>
#include <string>

#include "io/gguf.h"
#include "model/model.h"

namespace osd {

// Writes a llama-architecture GGUF with `config` (arch, vocab, dim, n_layers, n_heads, n_kv_heads,
// ffn_dim, context, rope_theta; head_dim = dim / n_heads) and matrices stored as `type`
// (F32, F16 or BF16). Deterministic for a seed.
void write_random_gguf(const std::string& path, const ModelConfig& config, uint64_t seed, gguf::TensorType type);

}  // namespace osd
