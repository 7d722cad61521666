// tokenizer.ggml.* -> VocabData, with the defaults llama.cpp's llama_vocab::load applies.
#include <limits>
#include <memory>

#include "core/error.h"
#include "io/gguf.h"
#include "tokenizer/tokenizer.h"

namespace osd::tok {

namespace {

int32_t token_id_or(const gguf::File& f, const std::string& key, int32_t fallback) {
  const int64_t v = f.get_int_or(key, fallback);
  if (v < -1 || v > std::numeric_limits<int32_t>::max())
    throw_io(f.name() + ": " + key + " = " + std::to_string(v) + " is not a token id");
  return static_cast<int32_t>(v);
}

}  // namespace

VocabData vocab_from_gguf(const gguf::File& f) {
  VocabData v;
  v.model = f.get_string("tokenizer.ggml.model");
  v.pre = f.get_string_or("tokenizer.ggml.pre", "");
  v.tokens = f.get_strings("tokenizer.ggml.tokens");
  const size_t n = v.tokens.size();

  // Extra trailing scores or types are ignored, as llama.cpp does; too few is an error.
  if (f.find("tokenizer.ggml.scores")) {
    v.scores = f.get_floats("tokenizer.ggml.scores");
    if (v.scores.size() < n)
      throw_io(f.name() + ": tokenizer.ggml.scores has " + std::to_string(v.scores.size()) + " entries for " +
               std::to_string(n) + " tokens");
    v.scores.resize(n);
  }
  if (f.find("tokenizer.ggml.token_type")) {
    const std::vector<int64_t> types = f.get_ints("tokenizer.ggml.token_type");
    if (types.size() < n)
      throw_io(f.name() + ": tokenizer.ggml.token_type has " + std::to_string(types.size()) + " entries for " +
               std::to_string(n) + " tokens");
    v.token_types.resize(n);
    for (size_t i = 0; i < n; ++i)
      v.token_types[i] = (types[i] >= 0 && types[i] <= 6) ? static_cast<int32_t>(types[i]) : 0;  // 0 = undefined
  }

  const bool spm = v.model == "llama";
  if (v.model == "gpt2") {
    if (!f.find("tokenizer.ggml.merges"))
      throw_io(f.name() + ": tokenizer.ggml.merges is missing (required for a gpt2 tokenizer)");
    v.merges = f.get_strings("tokenizer.ggml.merges");
  }

  // SentencePiece files without ids use Llama's <unk>=0, <s>=1, </s>=2.
  v.bos = token_id_or(f, "tokenizer.ggml.bos_token_id", spm ? 1 : -1);
  v.eos = token_id_or(f, "tokenizer.ggml.eos_token_id", spm ? 2 : -1);
  v.unk = token_id_or(f, "tokenizer.ggml.unknown_token_id", spm ? 0 : -1);
  v.pad = token_id_or(f, "tokenizer.ggml.padding_token_id", -1);

  // llama.cpp adds BOS by default for SentencePiece and for the llama3 pre-tokenizer family.
  const bool llama3 = !spm && (v.pre == "llama3" || v.pre == "llama-v3" || v.pre == "llama-bpe" ||
                               v.pre == "falcon3" || v.pre == "pixtral");
  v.add_bos = f.get_bool_or("tokenizer.ggml.add_bos_token", spm || llama3);
  v.add_eos = f.get_bool_or("tokenizer.ggml.add_eos_token", false);
  v.add_space_prefix = f.get_bool_or("tokenizer.ggml.add_space_prefix", spm);
  return v;
}

Tokenizer load_tokenizer(const std::string& path) {
  std::unique_ptr<gguf::File> file = gguf::File::open(path);
  try {
    return Tokenizer(vocab_from_gguf(*file));
  } catch (const Error& e) {
    // Vocabulary errors name the key; say which file it came from too.
    const std::string msg = e.what();
    if (msg.rfind(file->name(), 0) == 0) throw;
    throw Error(e.kind, file->name() + ": " + msg);
  }
}

}  // namespace osd::tok
