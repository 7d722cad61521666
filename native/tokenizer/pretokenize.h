// Pre-tokenizers for byte-level BPE: split text into words before merging, by hand-written
// matchers equivalent to the Hugging Face regular expressions (no std::regex: it lacks \p{L} and
// \p{N}). The matchers follow llama.cpp's unicode.cpp, including its handling of piece ends.
#pragma once
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace osd::tok {

enum class PreTokenizer {
  // 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  Gpt2,
  // (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
  // \s*[\r\n]+|\s+(?!\S)|\s+
  Llama3,
  // as Llama3, with \p{N} (single digits) instead of \p{N}{1,3}
  Qwen2,
  // every digit on its own (\p{N}), then Gpt2 within each piece
  Smollm,
};

// Maps tokenizer.ggml.pre to a pre-tokenizer; an empty name means "default". Throws a Range
// osd::Error naming the value and the supported names when it is not supported.
PreTokenizer pre_tokenizer_from_name(const std::string& name);

// Splits UTF-8 text into words, returned as [begin, end) byte ranges that tile the text.
std::vector<std::pair<size_t, size_t>> pre_tokenize(PreTokenizer kind, std::string_view text);

}  // namespace osd::tok
