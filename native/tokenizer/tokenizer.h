// Tokenizers driven by GGUF tokenizer metadata, with llama.cpp's semantics:
//   - "llama": SentencePiece BPE (llm_tokenizer_spm): score-driven bigram merging, spaces as
//     U+2581, an optional dummy space prefix, <0xXX> byte fallback, then the unknown token;
//   - "gpt2":  byte-level BPE (llm_tokenizer_bpe): a pre-tokenizer regex, GPT-2's byte-to-unicode
//     mapping, merges applied by rank.
// Both split out control / user-defined tokens first, and decode exactly on UTF-8 boundaries.
// The tokenizer is built from a plain VocabData so it does not depend on the file format.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tokenizer/pretokenize.h"

namespace osd::gguf {
class File;
}

namespace osd::tok {

// tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
enum class TokenType : int32_t {
  Undefined = 0,
  Normal = 1,
  Unknown = 2,
  Control = 3,
  UserDefined = 4,
  Unused = 5,
  Byte = 6,
};

// Everything a tokenizer needs, as stored under tokenizer.ggml.* in a GGUF file.
struct VocabData {
  std::string model;                 // "llama" (SentencePiece BPE) or "gpt2" (byte-level BPE)
  std::string pre;                   // pre-tokenizer name for "gpt2" ("" means default)
  std::vector<std::string> tokens;   // token texts; the index is the id
  std::vector<float> scores;         // per token; empty means all 0 (SentencePiece merge priority)
  std::vector<int32_t> token_types;  // per token TokenType values; empty means all Normal
  std::vector<std::string> merges;   // "left right" pairs in rank order ("gpt2" only)
  int32_t bos = -1, eos = -1, unk = -1, pad = -1;  // -1 = none
  bool add_bos = false, add_eos = false;           // what encode() adds by default
  bool add_space_prefix = true;                    // "llama": prefix a space to the text
};

// Reads tokenizer.ggml.* from a GGUF file, with llama.cpp's defaults for missing keys. Missing
// or mistyped required keys throw osd::Error (Io) naming the file and the key.
VocabData vocab_from_gguf(const gguf::File& file);

struct EncodeOptions {
  bool add_bos = false;  // prepend the BOS token (an error when the vocabulary has none)
  bool add_eos = false;  // append the EOS token (likewise)
  // Match control and unknown-type token texts (like "<|im_start|>") in the text and emit them
  // as single tokens. User-defined tokens are always matched, as in llama.cpp and Hugging Face.
  bool special = false;
};

struct DecodeOptions {
  // Render control and unknown-type tokens as their text; otherwise they decode to nothing.
  bool special = false;
  // "llama" vocabularies with add_space_prefix: drop the dummy space that encode() put in front
  // of the text, from the first token that yields text. Off for continuations (generated text).
  bool strip_space_prefix = true;
};

class Tokenizer {
 public:
  // Validates the vocabulary; throws osd::Error naming the offending field.
  explicit Tokenizer(VocabData vocab);

  std::vector<int32_t> encode(std::string_view text, const EncodeOptions& opts = {}) const;

  // Token ids are checked: an id out of range throws a Range osd::Error naming tokens[i].
  std::string decode(const int32_t* tokens, size_t n, const DecodeOptions& opts = {}) const;
  std::string decode(const std::vector<int32_t>& tokens, const DecodeOptions& opts = {}) const {
    return decode(tokens.data(), tokens.size(), opts);
  }

  // The bytes a token decodes to (possibly part of a UTF-8 character). Control and unknown-type
  // tokens give their text when `special` and nothing otherwise. Throws Range for a bad id,
  // naming `arg` in the message.
  const std::string& token_to_piece(int32_t id, bool special = true, const char* arg = "token") const;

  // Throws a Range osd::Error "<arg> = <id> is out of range for a vocabulary of <n>".
  void check_id(int32_t id, const std::string& arg) const;

  int32_t vocab_size() const { return static_cast<int32_t>(vocab_.tokens.size()); }
  const std::string& token_text(int32_t id) const;  // the raw vocabulary entry
  TokenType token_type(int32_t id) const;
  int32_t find_token(std::string_view text) const;  // id of an exact vocabulary entry, or -1

  int32_t bos() const { return vocab_.bos; }
  int32_t eos() const { return vocab_.eos; }
  int32_t unk() const { return vocab_.unk; }
  int32_t pad() const { return vocab_.pad; }
  bool add_bos() const { return vocab_.add_bos; }
  bool add_eos() const { return vocab_.add_eos; }
  bool add_space_prefix() const { return spm_ && vocab_.add_space_prefix; }
  const std::string& model() const { return vocab_.model; }
  const std::string& pre() const { return vocab_.pre; }
  bool is_spm() const { return spm_; }

 private:
  friend class StreamDecoder;

  struct Fragment {
    int32_t token;  // >= 0: an already matched special token; -1: raw text
    size_t offset, length;
  };
  std::vector<Fragment> split_special(std::string_view text, bool special) const;
  void encode_spm(std::string_view text, std::vector<int32_t>& out) const;
  void encode_bpe(std::string_view text, std::vector<int32_t>& out) const;
  void encode_bpe_word(std::string_view word, std::vector<int32_t>& out) const;
  int32_t spm_byte_token(uint8_t byte) const;
  int32_t bpe_rank(std::string_view left, std::string_view right) const;
  bool renders_empty(int32_t id, bool special) const;

  VocabData vocab_;
  bool spm_ = false;
  PreTokenizer pre_kind_ = PreTokenizer::Gpt2;
  bool ignore_merges_ = false;  // llama3: a word that is itself a token is not merged
  std::unordered_map<std::string, int32_t> token_to_id_;
  std::unordered_map<std::string, int32_t> merge_rank_;  // "left\0right" -> rank
  std::vector<int32_t> special_tokens_;  // control / user-defined / unknown, longest text first
  std::vector<std::string> pieces_;      // decoded bytes of each token (special tokens as text)
  int32_t byte_tokens_[256];             // SPM: token of each byte, or -1
};

// Opens a GGUF file (a model or a vocabulary-only file) and builds its tokenizer. Errors name
// the file.
Tokenizer load_tokenizer(const std::string& path);

// Incremental decoding for streamed tokens: push() returns the text that is complete so far and
// holds back a trailing, unfinished UTF-8 sequence (byte tokens can split a character) until
// the tokens that finish it arrive. The concatenation of all push() results and flush() equals
// decode() of all tokens. The tokenizer must outlive the decoder.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, DecodeOptions opts = {false, false});

  std::string push(const int32_t* tokens, size_t n);
  std::string push(int32_t token) { return push(&token, 1); }
  // Returns whatever is held back; an incomplete sequence at the very end comes out as its bytes.
  std::string flush();
  size_t pending_bytes() const { return pending_.size(); }

 private:
  const Tokenizer& tok_;
  DecodeOptions opts_;
  bool at_start_;
  std::string pending_;
};

}  // namespace osd::tok
