// Writing models as GGUF (llama architecture, llama.cpp's tensor names), for checkpoints and for
// the project's own models. Files are replaced atomically.
#pragma once
#include <string>

#include "io/gguf.h"
#include "model/model.h"

namespace osd {

// Writes `model` with every matrix stored as `type` (F32, F16 or BF16; norms stay F32).
// Tokenizer metadata (tokenizer.*) of a GGUF source is carried over.
void save_gguf(const Model& model, const std::string& path, gguf::TensorType type);

// The general.* and <arch>.* keys llama.cpp's loader reads, from a configuration.
void set_model_metadata(gguf::Writer& w, const ModelConfig& c);

}  // namespace osd
