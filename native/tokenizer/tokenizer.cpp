#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <queue>

#include "core/error.h"
#include "tokenizer/unicode.h"

namespace osd::tok {

namespace {

const char kSpaceMarker[] = "\xE2\x96\x81";  // U+2581, SentencePiece's escaped space

bool is_special_type(TokenType t) {
  return t == TokenType::Control || t == TokenType::UserDefined || t == TokenType::Unknown;
}

// "<0xAB>" -> 0xAB, or -1.
int parse_byte_token(const std::string& text) {
  if (text.size() != 6 || text.compare(0, 3, "<0x") != 0 || text[5] != '>') return -1;
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  const int hi = hex(text[3]), lo = hex(text[4]);
  return (hi < 0 || lo < 0) ? -1 : hi * 16 + lo;
}

void replace_all(std::string& s, std::string_view from, std::string_view to) {
  std::string out;
  out.reserve(s.size());
  size_t pos = 0;
  for (size_t hit; (hit = s.find(from, pos)) != std::string::npos; pos = hit + from.size()) {
    out.append(s, pos, hit - pos);
    out.append(to);
  }
  out.append(s, pos, std::string::npos);
  s.swap(out);
}

std::string merge_key(std::string_view left, std::string_view right) {
  std::string key;
  key.reserve(left.size() + 1 + right.size());
  key.append(left);
  key += '\0';
  key.append(right);
  return key;
}

// A symbol of the merge loops: a span of the word being merged, in a linked list.
struct Symbol {
  int prev, next;
  size_t offset, n;
};

// Splits `text` into UTF-8 characters, each byte of an invalid sequence on its own. (llama.cpp
// groups bytes by the lead byte's length alone, so a stray lead byte could swallow the escaped
// space after it; for valid UTF-8 the two agree.)
std::vector<Symbol> split_chars(std::string_view text) {
  const std::vector<Codepoint> cps = utf8_decode(text);
  std::vector<Symbol> syms(cps.size());
  for (size_t i = 0; i < cps.size(); ++i) {
    const int idx = static_cast<int>(i);
    syms[i] = {idx - 1, i + 1 == cps.size() ? -1 : idx + 1, cps[i].offset, cps[i].len};
  }
  return syms;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Construction

Tokenizer::Tokenizer(VocabData vocab) : vocab_(std::move(vocab)) {
  if (vocab_.model == "llama") {
    spm_ = true;
  } else if (vocab_.model == "gpt2") {
    spm_ = false;
    pre_kind_ = pre_tokenizer_from_name(vocab_.pre);
    ignore_merges_ = pre_kind_ == PreTokenizer::Llama3;
  } else {
    throw_range("tokenizer.ggml.model = '" + vocab_.model + "' is not a supported tokenizer (supported: llama, gpt2)");
  }

  const size_t n = vocab_.tokens.size();
  if (n == 0) throw_range("tokenizer.ggml.tokens is empty");
  if (n > static_cast<size_t>(INT32_MAX)) throw_range("tokenizer.ggml.tokens has too many entries");
  if (!vocab_.scores.empty() && vocab_.scores.size() != n)
    throw_range("tokenizer.ggml.scores has " + std::to_string(vocab_.scores.size()) + " entries for " +
                std::to_string(n) + " tokens");
  if (!vocab_.token_types.empty() && vocab_.token_types.size() != n)
    throw_range("tokenizer.ggml.token_type has " + std::to_string(vocab_.token_types.size()) + " entries for " +
                std::to_string(n) + " tokens");
  if (vocab_.scores.empty()) vocab_.scores.assign(n, 0.0f);
  if (vocab_.token_types.empty()) vocab_.token_types.assign(n, static_cast<int32_t>(TokenType::Normal));
  for (int32_t& t : vocab_.token_types)
    if (t < 0 || t > static_cast<int32_t>(TokenType::Byte)) t = static_cast<int32_t>(TokenType::Undefined);

  auto check_special = [&](int32_t id, const char* key) {
    if (id < -1 || id >= static_cast<int32_t>(n))
      throw_range(std::string("tokenizer.ggml.") + key + " = " + std::to_string(id) +
                  " is out of range for a vocabulary of " + std::to_string(n));
  };
  check_special(vocab_.bos, "bos_token_id");
  check_special(vocab_.eos, "eos_token_id");
  check_special(vocab_.unk, "unknown_token_id");
  check_special(vocab_.pad, "padding_token_id");

  // Text -> id. A duplicated text keeps its first id.
  token_to_id_.reserve(n * 2);
  for (size_t i = 0; i < n; ++i) token_to_id_.emplace(vocab_.tokens[i], static_cast<int32_t>(i));

  // Special tokens are matched longest first, so "<|im_start|>" wins over a shorter prefix.
  for (size_t i = 0; i < n; ++i)
    if (is_special_type(static_cast<TokenType>(vocab_.token_types[i])) && !vocab_.tokens[i].empty())
      special_tokens_.push_back(static_cast<int32_t>(i));
  std::stable_sort(special_tokens_.begin(), special_tokens_.end(), [&](int32_t a, int32_t b) {
    return vocab_.tokens[a].size() > vocab_.tokens[b].size();
  });

  if (spm_) {
    // Byte fallback: "<0xAB>", or else the byte itself as a token (llama.cpp's byte_to_token).
    static const char* hex = "0123456789ABCDEF";
    for (int b = 0; b < 256; ++b) {
      const char name[7] = {'<', '0', 'x', hex[b >> 4], hex[b & 15], '>', 0};
      int32_t id = find_token(name);
      if (id < 0) id = find_token(std::string(1, static_cast<char>(b)));
      byte_tokens_[b] = id;
    }
  } else {
    std::fill(std::begin(byte_tokens_), std::end(byte_tokens_), -1);
    merge_rank_.reserve(vocab_.merges.size() * 2);
    for (size_t i = 0; i < vocab_.merges.size(); ++i) {
      const std::string& m = vocab_.merges[i];
      // Split at the first space after the first character, as llama.cpp does.
      const size_t pos = m.find(' ', 1);
      if (pos == std::string::npos)
        throw_range("tokenizer.ggml.merges[" + std::to_string(i) + "] = '" + m + "' is not a 'left right' pair");
      merge_rank_.emplace(merge_key(std::string_view(m).substr(0, pos), std::string_view(m).substr(pos + 1)),
                          static_cast<int32_t>(i));
    }
  }

  // What each token decodes to (llama.cpp's token_to_piece with special = true).
  pieces_.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const std::string& text = vocab_.tokens[i];
    const auto type = static_cast<TokenType>(vocab_.token_types[i]);
    std::string& piece = pieces_[i];
    if (is_special_type(type)) {
      piece = text;
    } else if (type == TokenType::Byte) {
      const int b = parse_byte_token(text);
      if (b >= 0) piece.assign(1, static_cast<char>(b));
      else piece = text;
    } else if (type == TokenType::Normal) {
      if (spm_) {
        piece = text;
        replace_all(piece, kSpaceMarker, " ");
      } else {
        // Byte-level: every code point stands for one byte. A code point outside GPT-2's map
        // (only in malformed vocabularies) is kept as its own UTF-8.
        for (const Codepoint& c : utf8_decode(text)) {
          const int b = c.cp == kInvalidCodepoint ? -1 : unicode_to_byte(c.cp);
          if (b >= 0) piece += static_cast<char>(b);
          else piece.append(text, c.offset, c.len);
        }
      }
    }
    // Unused and undefined tokens decode to nothing, as in llama.cpp.
  }
}

// ---------------------------------------------------------------------------------------------
// Lookups

void Tokenizer::check_id(int32_t id, const std::string& arg) const {
  if (id < 0 || id >= vocab_size())
    throw_range(arg + " = " + std::to_string(id) + " is out of range for a vocabulary of " +
                std::to_string(vocab_size()));
}

const std::string& Tokenizer::token_text(int32_t id) const {
  check_id(id, "token");
  return vocab_.tokens[id];
}

TokenType Tokenizer::token_type(int32_t id) const {
  check_id(id, "token");
  return static_cast<TokenType>(vocab_.token_types[id]);
}

int32_t Tokenizer::find_token(std::string_view text) const {
  auto it = token_to_id_.find(std::string(text));
  return it == token_to_id_.end() ? -1 : it->second;
}

bool Tokenizer::renders_empty(int32_t id, bool special) const {
  const auto type = static_cast<TokenType>(vocab_.token_types[id]);
  return !special && (type == TokenType::Control || type == TokenType::Unknown);
}

const std::string& Tokenizer::token_to_piece(int32_t id, bool special, const char* arg) const {
  static const std::string empty;
  check_id(id, arg);
  return renders_empty(id, special) ? empty : pieces_[id];
}

int32_t Tokenizer::bpe_rank(std::string_view left, std::string_view right) const {
  auto it = merge_rank_.find(merge_key(left, right));
  return it == merge_rank_.end() ? -1 : it->second;
}

int32_t Tokenizer::spm_byte_token(uint8_t byte) const {
  if (byte_tokens_[byte] >= 0) return byte_tokens_[byte];
  if (vocab_.unk >= 0) return vocab_.unk;
  char hex[8];
  std::snprintf(hex, sizeof hex, "0x%02X", byte);
  throw_range(std::string("the text contains byte ") + hex +
              ", which this vocabulary has no byte token or unknown token for");
}

// ---------------------------------------------------------------------------------------------
// Encoding

// llama.cpp's tokenizer_st_partition: split the text around special-token texts, each special
// token in turn (longest first), leftmost occurrences first.
std::vector<Tokenizer::Fragment> Tokenizer::split_special(std::string_view text, bool special) const {
  std::vector<Fragment> frags;
  if (text.empty()) return frags;
  frags.push_back({-1, 0, text.size()});
  for (int32_t id : special_tokens_) {
    const auto type = static_cast<TokenType>(vocab_.token_types[id]);
    if (!special && type != TokenType::UserDefined) continue;
    const std::string& needle = vocab_.tokens[id];
    std::vector<Fragment> next;
    next.reserve(frags.size());
    for (const Fragment& f : frags) {
      if (f.token >= 0) {
        next.push_back(f);
        continue;
      }
      size_t pos = f.offset;
      const size_t end = f.offset + f.length;
      while (pos < end) {
        const size_t hit = text.substr(0, end).find(needle, pos);
        if (hit == std::string_view::npos) break;
        if (hit > pos) next.push_back({-1, pos, hit - pos});
        next.push_back({id, hit, needle.size()});
        pos = hit + needle.size();
      }
      if (pos < end) next.push_back({-1, pos, end - pos});
    }
    frags.swap(next);
  }
  return frags;
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, const EncodeOptions& opts) const {
  std::vector<int32_t> out;
  if (opts.add_bos) {
    if (vocab_.bos < 0) throw_range("addBos is true, but the vocabulary has no BOS token (tokenizer.ggml.bos_token_id)");
    out.push_back(vocab_.bos);
  }
  // SentencePiece's dummy prefix goes in front of the first text fragment and of every
  // fragment that follows a special token (llama.cpp's is_prev_special).
  bool prev_special = true;
  for (const Fragment& f : split_special(text, opts.special)) {
    if (f.token >= 0) {
      out.push_back(f.token);
      prev_special = true;
      continue;
    }
    const std::string_view raw = text.substr(f.offset, f.length);
    if (spm_) {
      std::string escaped;
      if (vocab_.add_space_prefix && prev_special) escaped = " ";
      escaped.append(raw);
      replace_all(escaped, " ", kSpaceMarker);
      encode_spm(escaped, out);
    } else {
      encode_bpe(raw, out);
    }
    prev_special = false;
  }
  if (opts.add_eos) {
    if (vocab_.eos < 0) throw_range("addEos is true, but the vocabulary has no EOS token (tokenizer.ggml.eos_token_id)");
    out.push_back(vocab_.eos);
  }
  return out;
}

// llm_tokenizer_spm: start from UTF-8 characters and repeatedly merge the adjacent pair whose
// concatenation is the vocabulary entry with the highest score (leftmost on ties). Symbols that
// are not tokens in the end fall back to byte tokens.
void Tokenizer::encode_spm(std::string_view text, std::vector<int32_t>& out) const {
  std::vector<Symbol> syms = split_chars(text);
  if (syms.empty()) return;

  struct Bigram {
    int left, right;
    float score;
    size_t size;
  };
  auto lower_priority = [](const Bigram& a, const Bigram& b) {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  };
  std::priority_queue<Bigram, std::vector<Bigram>, decltype(lower_priority)> queue(lower_priority);
  std::string scratch;
  auto try_add = [&](int left, int right) {
    if (left < 0 || right < 0) return;
    scratch.assign(text.data() + syms[left].offset, syms[left].n + syms[right].n);
    auto it = token_to_id_.find(scratch);
    if (it == token_to_id_.end()) return;
    queue.push({left, right, vocab_.scores[it->second], scratch.size()});
  };

  for (int i = 1; i < static_cast<int>(syms.size()); ++i) try_add(i - 1, i);
  while (!queue.empty()) {
    const Bigram b = queue.top();
    queue.pop();
    Symbol& l = syms[b.left];
    Symbol& r = syms[b.right];
    // Stale: one side was merged away or grew since this pair was queued.
    if (l.n == 0 || r.n == 0 || l.n + r.n != b.size) continue;
    l.n += r.n;
    r.n = 0;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = b.left;
    try_add(l.prev, b.left);
    try_add(b.left, l.next);
  }

  for (int i = 0; i != -1; i = syms[i].next) {
    const Symbol& s = syms[i];
    scratch.assign(text.data() + s.offset, s.n);
    auto it = token_to_id_.find(scratch);
    if (it != token_to_id_.end()) {
      out.push_back(it->second);
    } else {
      for (size_t j = 0; j < s.n; ++j) out.push_back(spm_byte_token(static_cast<uint8_t>(text[s.offset + j])));
    }
  }
}

void Tokenizer::encode_bpe(std::string_view text, std::vector<int32_t>& out) const {
  std::string word;
  for (const auto& [b, e] : pre_tokenize(pre_kind_, text)) {
    // Byte-level: each byte of the word becomes one printable code point.
    word.clear();
    for (size_t i = b; i < e; ++i) word += byte_to_unicode(static_cast<uint8_t>(text[i]));
    encode_bpe_word(word, out);
  }
}

// llm_tokenizer_bpe_session: merge the adjacent pair with the lowest merge rank (leftmost on
// ties) until no listed merge applies.
void Tokenizer::encode_bpe_word(std::string_view word, std::vector<int32_t>& out) const {
  if (ignore_merges_) {
    const int32_t id = find_token(word);
    if (id >= 0) {
      out.push_back(id);
      return;
    }
  }
  std::vector<Symbol> syms = split_chars(word);
  if (syms.empty()) return;

  struct Bigram {
    int left, right;
    int32_t rank;
    size_t size;
  };
  auto lower_priority = [](const Bigram& a, const Bigram& b) {
    return a.rank > b.rank || (a.rank == b.rank && a.left > b.left);
  };
  std::priority_queue<Bigram, std::vector<Bigram>, decltype(lower_priority)> queue(lower_priority);
  auto sym_text = [&](int i) { return word.substr(syms[i].offset, syms[i].n); };
  auto try_add = [&](int left, int right) {
    if (left < 0 || right < 0) return;
    const int32_t rank = bpe_rank(sym_text(left), sym_text(right));
    if (rank < 0) return;
    queue.push({left, right, rank, syms[left].n + syms[right].n});
  };

  for (int i = 1; i < static_cast<int>(syms.size()); ++i) try_add(i - 1, i);
  while (!queue.empty()) {
    const Bigram b = queue.top();
    queue.pop();
    Symbol& l = syms[b.left];
    Symbol& r = syms[b.right];
    // Symbols only grow, so an unchanged total size means both sides are unchanged.
    if (l.n == 0 || r.n == 0 || l.n + r.n != b.size) continue;
    l.n += r.n;
    r.n = 0;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = b.left;
    try_add(l.prev, b.left);
    try_add(b.left, l.next);
  }

  for (int i = 0; i != -1; i = syms[i].next) {
    const int32_t id = find_token(sym_text(i));
    if (id >= 0) {
      out.push_back(id);
      continue;
    }
    // Not a token: one token per byte-level character. A byte the vocabulary has no token for
    // (SmolLM2's lacks 21 of the 256) becomes the unknown token when the vocabulary has a real one;
    // where its "unknown" id is a control token (SmolLM2's is <|endoftext|>, which text must never
    // produce) the byte is dropped, as llama.cpp drops it; with no unknown id at all it is an error
    // naming the byte.
    for (const Codepoint& c : utf8_decode(sym_text(i))) {
      const int32_t byte_id = find_token(sym_text(i).substr(c.offset, c.len));
      if (byte_id >= 0) {
        out.push_back(byte_id);
      } else if (vocab_.unk >= 0 && token_type(vocab_.unk) == TokenType::Control) {
        continue;
      } else if (vocab_.unk >= 0) {
        out.push_back(vocab_.unk);
      } else {
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02X", static_cast<unsigned>(unicode_to_byte(c.cp)) & 0xFF);
        throw_range(std::string("the text contains byte ") + hex +
                    ", which this vocabulary has no byte-level token or unknown token for");
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Decoding

std::string Tokenizer::decode(const int32_t* tokens, size_t n, const DecodeOptions& opts) const {
  std::string out;
  bool at_start = opts.strip_space_prefix && add_space_prefix();
  for (size_t i = 0; i < n; ++i) {
    check_id(tokens[i], "tokens[" + std::to_string(i) + "]");
    if (renders_empty(tokens[i], opts.special)) continue;
    const std::string& piece = pieces_[tokens[i]];
    if (at_start && !piece.empty() && piece[0] == ' ') out.append(piece, 1, std::string::npos);
    else out += piece;
    if (!piece.empty()) at_start = false;
  }
  return out;
}

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, DecodeOptions opts)
    : tok_(tokenizer), opts_(opts), at_start_(opts.strip_space_prefix && tokenizer.add_space_prefix()) {}

std::string StreamDecoder::push(const int32_t* tokens, size_t n) {
  // Check every id first so that a bad id leaves the decoder unchanged.
  for (size_t i = 0; i < n; ++i) tok_.check_id(tokens[i], "tokens[" + std::to_string(i) + "]");
  for (size_t i = 0; i < n; ++i) {
    if (tok_.renders_empty(tokens[i], opts_.special)) continue;
    const std::string& piece = tok_.pieces_[tokens[i]];
    if (at_start_ && !piece.empty() && piece[0] == ' ') pending_.append(piece, 1, std::string::npos);
    else pending_ += piece;
    if (!piece.empty()) at_start_ = false;
  }
  const size_t keep = utf8_incomplete_tail(pending_);
  std::string ready = pending_.substr(0, pending_.size() - keep);
  pending_.erase(0, pending_.size() - keep);
  return ready;
}

std::string StreamDecoder::flush() {
  std::string rest;
  rest.swap(pending_);
  return rest;
}

}  // namespace osd::tok
