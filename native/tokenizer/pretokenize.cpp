#include "tokenizer/pretokenize.h"

#include "core/error.h"
#include "tokenizer/unicode.h"

namespace osd::tok {

namespace {

// The character classes of one code point; a position past the piece reads as `end`, which
// belongs to no class (it plays the role of llama.cpp's SENTINEL / OUT_OF_RANGE).
struct Class {
  bool letter = false, number = false, space = false, end = false;
};

// Matches one pre-tokenizer over the code points [ini, fin) of `cps` and appends the
// [begin, end) code point ranges of the words it finds.
class Splitter {
 public:
  Splitter(const std::vector<Codepoint>& cps, size_t ini, size_t fin, std::vector<std::pair<size_t, size_t>>& out)
      : cps_(cps), ini_(ini), fin_(fin), prev_end_(ini), out_(out) {}

  // GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
  void gpt2() {
    for (size_t pos = ini_; pos < fin_;) {
      const uint32_t c = cp(pos);
      if (size_t n = contraction(pos, /*ignore_case=*/false)) {
        pos = emit(pos + n);
        continue;
      }
      // An optional single space, then a run of one class.
      const size_t start = (c == ' ') ? pos + 1 : pos;
      const Class k = cls(start);
      if (k.letter || k.number || (!k.space && !k.end)) {
        size_t p = start;
        if (k.letter) {
          while (cls(p).letter) ++p;
        } else if (k.number) {
          while (cls(p).number) ++p;
        } else {
          while (is_other(cls(p))) ++p;
        }
        pos = emit(p);
        continue;
      }
      pos = whitespace(pos);
    }
  }

  // Llama 3 (max_digits = 3) and Qwen2 (max_digits = 1).
  void llama3(size_t max_digits) {
    for (size_t pos = ini_; pos < fin_;) {
      const uint32_t c = cp(pos);
      const Class k = cls(pos);
      if (size_t n = contraction(pos, /*ignore_case=*/true)) {
        pos = emit(pos + n);
        continue;
      }
      // [^\r\n\p{L}\p{N}]?\p{L}+
      if (!(c == '\r' || c == '\n' || k.number) && (k.letter || cls(pos + 1).letter)) {
        size_t p = pos + 1;
        while (cls(p).letter) ++p;
        pos = emit(p);
        continue;
      }
      // \p{N}{1,max_digits}
      if (k.number) {
        size_t p = pos;
        while (cls(p).number && p - pos < max_digits) ++p;
        pos = emit(p);
        continue;
      }
      // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
      const size_t start = (c == ' ') ? pos + 1 : pos;
      if (is_other(cls(start))) {
        size_t p = start;
        while (is_other(cls(p))) ++p;
        while (p < fin_ && (cp(p) == '\r' || cp(p) == '\n')) ++p;
        pos = emit(p);
        continue;
      }
      // \s*[\r\n]+ : a whitespace run that contains a line break ends after its last break.
      size_t p = pos, last_break = 0;
      while (cls(p).space) {
        if (cp(p) == '\r' || cp(p) == '\n') last_break = p + 1;
        ++p;
      }
      if (last_break > 0) {
        pos = emit(last_break);
        continue;
      }
      pos = whitespace(pos);
    }
  }

  // \p{N}: each number code point is a piece; the text between them is a piece too.
  void digits() {
    for (size_t pos = ini_; pos < fin_; ++pos) {
      if (cls(pos).number) {
        emit(pos);
        emit(pos + 1);
      }
    }
    emit(fin_);
  }

 private:
  uint32_t cp(size_t pos) const { return cps_[pos].cp; }

  Class cls(size_t pos) const {
    Class k;
    if (pos < ini_ || pos >= fin_) {
      k.end = true;
      return k;
    }
    const uint32_t c = cps_[pos].cp;
    if (c == kInvalidCodepoint) return k;  // a stray byte counts as punctuation
    k.letter = is_letter(c);
    k.number = !k.letter && is_number(c);
    k.space = !k.letter && !k.number && is_whitespace(c);
    return k;
  }

  static bool is_other(const Class& k) { return !k.letter && !k.number && !k.space && !k.end; }

  static uint32_t lower_ascii(uint32_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

  // Length of the contraction ('s 't 'm 'd 're 've 'll) at pos, or 0.
  size_t contraction(size_t pos, bool ignore_case) const {
    if (cp(pos) != '\'' || pos + 1 >= fin_) return 0;
    auto low = [&](size_t p) { return ignore_case ? lower_ascii(cp(p)) : cp(p); };
    const uint32_t a = low(pos + 1);
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return 2;
    if (pos + 2 >= fin_) return 0;
    const uint32_t b = low(pos + 2);
    if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return 3;
    return 0;
  }

  // \s+(?!\S)|\s+ at pos; anything else becomes a one-code-point piece.
  size_t whitespace(size_t pos) {
    size_t n = 0;
    while (cls(pos + n).space) ++n;
    // Followed by a non-space: leave the last space to prefix the next word.
    if (n > 1 && pos + n < fin_) return emit(pos + n - 1);
    if (n > 0) return emit(pos + n);
    return emit(pos + 1);
  }

  size_t emit(size_t end) {
    if (end > prev_end_) out_.emplace_back(prev_end_, end);
    prev_end_ = end;
    return end;
  }

  const std::vector<Codepoint>& cps_;
  size_t ini_, fin_, prev_end_;
  std::vector<std::pair<size_t, size_t>>& out_;
};

}  // namespace

PreTokenizer pre_tokenizer_from_name(const std::string& name) {
  // Aliases as llama.cpp groups them (llama-vocab.cpp), limited to the regexes implemented here.
  // "default" (and a missing name) use the GPT-2 pattern, as the Hugging Face ByteLevel
  // pre-tokenizer does; llama.cpp's own "default" list is a legacy fallback it warns about.
  if (name.empty() || name == "default" || name == "gpt-2" || name == "gpt2" || name == "phi-2" || name == "mpt" ||
      name == "olmo")
    return PreTokenizer::Gpt2;
  if (name == "llama3" || name == "llama-v3" || name == "llama-bpe" || name == "falcon3" || name == "pixtral")
    return PreTokenizer::Llama3;
  if (name == "qwen2" || name == "deepseek-r1-qwen" || name == "stablelm2" || name == "megrez")
    return PreTokenizer::Qwen2;
  if (name == "smollm" || name == "starcoder" || name == "refact" || name == "command-r" || name == "codeshell" ||
      name == "exaone" || name == "minerva-7b")
    return PreTokenizer::Smollm;
  throw_range("tokenizer.ggml.pre = '" + name +
              "' is not a supported pre-tokenizer (supported: default, gpt-2, phi-2, mpt, olmo, llama3, llama-v3, "
              "llama-bpe, falcon3, pixtral, qwen2, deepseek-r1-qwen, stablelm2, megrez, smollm, starcoder, refact, "
              "command-r, codeshell, exaone, minerva-7b)");
}

std::vector<std::pair<size_t, size_t>> pre_tokenize(PreTokenizer kind, std::string_view text) {
  const std::vector<Codepoint> cps = utf8_decode(text);
  std::vector<std::pair<size_t, size_t>> words;  // code point ranges first
  switch (kind) {
    case PreTokenizer::Gpt2:
      Splitter(cps, 0, cps.size(), words).gpt2();
      break;
    case PreTokenizer::Llama3:
      Splitter(cps, 0, cps.size(), words).llama3(3);
      break;
    case PreTokenizer::Qwen2:
      Splitter(cps, 0, cps.size(), words).llama3(1);
      break;
    case PreTokenizer::Smollm: {
      // Two passes, as llama.cpp applies a list of regexes: the second only splits further
      // inside the pieces of the first, so no word crosses a digit boundary.
      std::vector<std::pair<size_t, size_t>> pieces;
      Splitter(cps, 0, cps.size(), pieces).digits();
      for (const auto& [b, e] : pieces) Splitter(cps, b, e, words).gpt2();
      break;
    }
  }
  // Code point ranges -> byte ranges.
  std::vector<std::pair<size_t, size_t>> out;
  out.reserve(words.size());
  for (const auto& [b, e] : words) out.emplace_back(cps[b].offset, cps[e - 1].offset + cps[e - 1].len);
  return out;
}

}  // namespace osd::tok
