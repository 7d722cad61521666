// Writing models as GGUF (llama architecture, llama.cpp's tensor names), for checkpoints and for
// the project's own models. Files are replaced atomically.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "io/gguf.h"
#include "model/model.h"

namespace osd {

// The type a matrix of `cols` columns is stored in when `type` is asked for: `type` itself when its
// rows are a whole number of its blocks; otherwise, as llama.cpp's quantiser falls back, IQ4_NL for
// the 256-value Q2_K and IQ4_XS when they are a whole number of 32-value blocks, else F16.
gguf::TensorType stored_type(gguf::TensorType type, int64_t cols);

// Adds a [rows x cols] float matrix to `w` stored as stored_type(type, cols). Quantised bytes are
// kept in `keep` until the file is written.
void add_matrix_as(gguf::Writer& w, const std::string& name, gguf::TensorType type, int64_t rows, int64_t cols,
                   const float* data, std::vector<std::unique_ptr<std::vector<uint8_t>>>& keep);

// Writes `model` with every matrix stored as `type` (any type quant::can_quantize accepts; norms and
// biases stay F32), or, with no type, every matrix in the type it has now (lossless for any type). A
// matrix already stored as `type` is copied as it is, so a quantised model saved in its own type
// loses nothing. Tokenizer metadata (tokenizer.*) of a GGUF source is carried over.
void save_gguf(const Model& model, const std::string& path, std::optional<gguf::TensorType> type);

// The type every matrix is stored in (F32 for a trainer's snapshot), or nothing when they differ
// (llama.cpp files often keep the token embeddings in another type than the layers).
std::optional<gguf::TensorType> uniform_matrix_type(const Model& model);

// The same model with its matrices stored as save_gguf(type) writes them, held in memory; with
// `head`, its head restricted to those ids (ascending; empty: the whole vocabulary).
std::shared_ptr<Model> convert_model(const Model& model, std::optional<gguf::TensorType> type,
                                     const std::vector<int32_t>* head = nullptr);

// The general.* and <arch>.* keys llama.cpp's loader reads, from a configuration.
void set_model_metadata(gguf::Writer& w, const ModelConfig& c);

}  // namespace osd
