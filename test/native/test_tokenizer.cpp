// Tokenizer tests: SentencePiece BPE and byte-level BPE on tiny hand-built vocabularies
// (merge order, byte fallback, special tokens, UTF-8 streaming), the pre-tokenizers, and the
// real vocabularies in ../shared/models (skipped with a message where ../shared is absent).
//
// The expected ids for the real vocabularies come from the npm oracles that test/tokenizer.test.ts
// compares against on every test string: llama-tokenizer-js 1.2.2 (Llama SentencePiece) and
// gpt-3-encoder 1.1.4 (GPT-2); the SmolLM2 ones from node-llama-cpp 3.21.1 (llama.cpp).
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "check.h"
#include "core/error.h"
#include "io/gguf.h"
#include "tokenizer/pretokenize.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"

using osd::Error;
using osd::tok::DecodeOptions;
using osd::tok::EncodeOptions;
using osd::tok::StreamDecoder;
using osd::tok::Tokenizer;
using osd::tok::TokenType;
using osd::tok::VocabData;
using Ids = std::vector<int32_t>;

namespace {

std::string show(const Ids& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) s += (i ? ", " : "") + std::to_string(ids[i]);
  return s + "]";
}

#define CHECK_IDS(actual, ...)                                                                     \
  do {                                                                                             \
    const Ids got_ = (actual);                                                                     \
    const Ids want_ = __VA_ARGS__;                                                                 \
    if (got_ != want_) osd_test::fail(__FILE__, __LINE__, #actual ": " + show(got_) + " vs " + show(want_)); \
  } while (0)

#define CHECK_STR(actual, expected)                                                                    \
  do {                                                                                                 \
    const std::string got_ = (actual), want_ = (expected);                                             \
    if (got_ != want_) osd_test::fail(__FILE__, __LINE__, #actual ": '" + got_ + "' vs '" + want_ + "'"); \
  } while (0)

bool file_exists(const std::string& path) { return std::ifstream(path).good(); }

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The .inp test strings, separated by lines "__ggml_vocab_test__" (llama.cpp's test-tokenizer-0).
std::vector<std::string> read_inp(const std::string& path) {
  const std::string text = read_file(path);
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> out;
  size_t pos = 0;
  for (size_t hit; (hit = text.find(sep, pos)) != std::string::npos; pos = hit + sep.size())
    out.push_back(text.substr(pos, hit - pos));
  return out;
}

const std::string kShared = "../shared/models/";

bool have_shared(const char* what) {
  if (file_exists(kShared + what)) return true;
  std::printf("  skip: %s%s not found (../shared is absent on a fresh clone)\n", kShared.c_str(), what);
  return false;
}

// ---------------------------------------------------------------------------------------------
// Hand-built vocabularies

std::string spm_byte(int b) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "<0x%02X>", b);
  return buf;
}

// <unk> <s> </s>, the 256 byte tokens (ids 3..258), then normal tokens with the given scores.
VocabData spm_vocab(const std::vector<std::pair<std::string, float>>& normal) {
  VocabData v;
  v.model = "llama";
  v.tokens = {"<unk>", "<s>", "</s>"};
  v.token_types = {2, 3, 3};
  for (int b = 0; b < 256; ++b) {
    v.tokens.push_back(spm_byte(b));
    v.token_types.push_back(6);
  }
  v.scores.assign(v.tokens.size(), 0.0f);
  for (const auto& [text, score] : normal) {
    v.tokens.push_back(text);
    v.token_types.push_back(1);
    v.scores.push_back(score);
  }
  v.unk = 0, v.bos = 1, v.eos = 2;
  v.add_bos = true;
  return v;
}

const std::string kSp = "\xE2\x96\x81";  // U+2581

// Normal tokens start at id 259.
VocabData small_spm() {
  return spm_vocab({
      {kSp, -1},           // 259
      {"a", -2},           // 260
      {"b", -3},           // 261
      {"c", -4},           // 262
      {"ab", -10},         // 263
      {"bc", -5},          // 264: preferred over "ab" in "abc"
      {kSp + "a", -6},     // 265
      {"aa", -7},          // 266
      {kSp + kSp, -20},    // 267
      {"\xC3\xA9", -30},   // 268: "é"
      {kSp + "bc", -8},    // 269
  });
}

// A byte-level vocabulary: the 256 byte characters in GPT-2's order, then merges.
VocabData small_bpe(const std::string& pre = "gpt-2") {
  VocabData v;
  v.model = "gpt2";
  v.pre = pre;
  for (int b = 0; b < 256; ++b) v.tokens.push_back(osd::tok::byte_to_unicode(static_cast<uint8_t>(b)));
  v.token_types.assign(256, 1);
  const std::string G = osd::tok::byte_to_unicode(' ');  // "Ġ"
  const std::vector<std::pair<std::string, std::string>> merges = {
      {G, "t"}, {"h", "e"}, {G + "t", "he"}, {"l", "l"}, {"ll", "o"}, {"h", "ello"}, {"e", "llo"},
      {G, "w"}, {"o", "r"}, {G + "w", "or"}, {G + "wor", "ld"}, {"l", "d"}, {"1", "2"}, {"12", "3"},
  };
  for (const auto& [l, r] : merges) {
    v.merges.push_back(l + " " + r);
    if (std::find(v.tokens.begin(), v.tokens.end(), l + r) == v.tokens.end()) {
      v.tokens.push_back(l + r);
      v.token_types.push_back(1);
    }
  }
  v.tokens.push_back("<|endoftext|>");
  v.token_types.push_back(3);
  v.bos = v.eos = static_cast<int32_t>(v.tokens.size()) - 1;
  v.add_space_prefix = false;
  return v;
}

int32_t id_of(const Tokenizer& t, const std::string& text) {
  const int32_t id = t.find_token(text);
  if (id < 0) osd_test::fail(__FILE__, __LINE__, "no token '" + text + "'");
  return id;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// UTF-8 helpers

OSD_TEST(utf8_incomplete_tail) {
  using osd::tok::utf8_incomplete_tail;
  CHECK_EQ(utf8_incomplete_tail(""), 0u);
  CHECK_EQ(utf8_incomplete_tail("abc"), 0u);
  CHECK_EQ(utf8_incomplete_tail("a\xC3"), 1u);              // first byte of é
  CHECK_EQ(utf8_incomplete_tail("a\xC3\xA9"), 0u);          // complete
  CHECK_EQ(utf8_incomplete_tail("\xE2\x82"), 2u);           // 2 of the 3 bytes of €
  CHECK_EQ(utf8_incomplete_tail("\xF0\x9F\x98"), 3u);       // 3 of the 4 bytes of an emoji
  CHECK_EQ(utf8_incomplete_tail("\xF0\x9F\x98\x81"), 0u);
  CHECK_EQ(utf8_incomplete_tail("\xA9"), 0u);               // a stray continuation byte never completes
  CHECK_EQ(utf8_incomplete_tail("\xFF"), 0u);
  CHECK_EQ(utf8_incomplete_tail("\xE0\x80"), 0u);           // overlong start: can never complete
  CHECK_EQ(utf8_incomplete_tail("\xED\xA0"), 0u);           // surrogate start
}

OSD_TEST(utf8_decode_keeps_every_byte) {
  const std::string text = "a\xC3\xA9\xFF\xE2\x82z";
  const auto cps = osd::tok::utf8_decode(text);
  CHECK_EQ(cps.size(), 6u);  // a, é, FF, E2, 82, z
  CHECK_EQ(cps[1].cp, 0xE9u);
  CHECK_EQ(cps[2].cp, osd::tok::kInvalidCodepoint);
  size_t total = 0;
  for (const auto& c : cps) total += c.len;
  CHECK_EQ(total, text.size());
}

OSD_TEST(unicode_classes) {
  using namespace osd::tok;
  CHECK(is_letter('a') && is_letter(0xE9) && is_letter(0x4E2D) && is_letter(0x0416));  // a é 中 Ж
  CHECK(!is_letter('1') && !is_letter(' ') && !is_letter(0x1F600));
  CHECK(is_number('7') && is_number(0x0663) && is_number(0x00BD) && is_number(0x2164));  // ٣ ½ Ⅴ
  CHECK(is_whitespace(' ') && is_whitespace('\n') && is_whitespace(0x3000) && is_whitespace(0x85));
  CHECK(!is_whitespace(0x200B));  // zero-width space is not White_Space
  CHECK_EQ(unicode_to_byte(0x120), static_cast<int>(' '));  // Ġ
  CHECK_STR(byte_to_unicode('\n'), "\xC4\x8A");             // Ċ
  for (int b = 0; b < 256; ++b) {
    const auto cps = utf8_decode(byte_to_unicode(static_cast<uint8_t>(b)));
    CHECK(cps.size() == 1 && unicode_to_byte(cps[0].cp) == b);
  }
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers

namespace {
std::vector<std::string> words(osd::tok::PreTokenizer kind, const std::string& text) {
  std::vector<std::string> out;
  for (const auto& [b, e] : osd::tok::pre_tokenize(kind, text)) out.push_back(text.substr(b, e - b));
  return out;
}
std::string join(const std::vector<std::string>& w) {
  std::string s;
  for (const auto& x : w) s += "|" + x;
  return s + "|";
}
}  // namespace

OSD_TEST(pretokenize_gpt2) {
  using osd::tok::PreTokenizer;
  CHECK_STR(join(words(PreTokenizer::Gpt2, "Hello world")), "|Hello| world|");
  CHECK_STR(join(words(PreTokenizer::Gpt2, "I'm here, they'll see!")), "|I|'m| here|,| they|'ll| see|!|");
  CHECK_STR(join(words(PreTokenizer::Gpt2, "x  y")), "|x| | y|");            // \s+(?!\S) leaves one space
  CHECK_STR(join(words(PreTokenizer::Gpt2, "a \n\n b")), "|a| \n\n| b|");
  CHECK_STR(join(words(PreTokenizer::Gpt2, "end   ")), "|end|   |");         // trailing spaces stay together
  CHECK_STR(join(words(PreTokenizer::Gpt2, "abc123 456")), "|abc|123| 456|");
  CHECK_STR(join(words(PreTokenizer::Gpt2, " ?!.. \t?")), "| ?!..| |\t|?|");
  CHECK_STR(join(words(PreTokenizer::Gpt2, "'S 's")), "|'|S| '|s|");          // case-sensitive; no space before 's
  CHECK_STR(join(words(PreTokenizer::Gpt2, "\xD0\xBD\xD0\xB5 \xE4\xB8\xAD")), "|\xD0\xBD\xD0\xB5| \xE4\xB8\xAD|");
}

OSD_TEST(pretokenize_llama3_qwen2_smollm) {
  using osd::tok::PreTokenizer;
  CHECK_STR(join(words(PreTokenizer::Llama3, "abc 1234567")), "|abc| |123|456|7|");
  CHECK_STR(join(words(PreTokenizer::Llama3, "I'M ok")), "|I|'M| ok|");            // case-insensitive
  CHECK_STR(join(words(PreTokenizer::Llama3, "x\n\n  y")), "|x|\n\n| | y|");
  CHECK_STR(join(words(PreTokenizer::Llama3, "(hello")), "|(hello|");              // [^\r\n\p{L}\p{N}]?\p{L}+
  CHECK_STR(join(words(PreTokenizer::Llama3, "a;;\n\nb")), "|a|;;\n\n|b|");
  CHECK_STR(join(words(PreTokenizer::Qwen2, "x 123")), "|x| |1|2|3|");
  CHECK_STR(join(words(PreTokenizer::Smollm, "a 123b")), "|a| |1|2|3|b|");
  CHECK_STR(join(words(PreTokenizer::Smollm, "  3 x")), "|  |3| x|");  // the digit ends the space run's piece
}

OSD_TEST(pretokenizer_names) {
  using osd::tok::PreTokenizer;
  using osd::tok::pre_tokenizer_from_name;
  CHECK(pre_tokenizer_from_name("") == PreTokenizer::Gpt2);
  CHECK(pre_tokenizer_from_name("default") == PreTokenizer::Gpt2);
  CHECK(pre_tokenizer_from_name("gpt-2") == PreTokenizer::Gpt2);
  CHECK(pre_tokenizer_from_name("llama-bpe") == PreTokenizer::Llama3);
  CHECK(pre_tokenizer_from_name("qwen2") == PreTokenizer::Qwen2);
  CHECK(pre_tokenizer_from_name("smollm") == PreTokenizer::Smollm);
  CHECK_THROWS(Error, pre_tokenizer_from_name("bloom"), "tokenizer.ggml.pre = 'bloom' is not a supported");
  CHECK_THROWS(Error, Tokenizer(small_bpe("chameleon")), "'chameleon'");
}

// ---------------------------------------------------------------------------------------------
// SentencePiece BPE

OSD_TEST(spm_merges_by_score) {
  const Tokenizer t(small_spm());
  const EncodeOptions plain{};
  // "▁abc": bc (-5) beats ▁a (-6) and ab (-10); then ▁a; "▁abc" is not a token: [▁a, bc].
  CHECK_IDS(t.encode("abc", plain), {265, 264});
  // Without the dummy prefix: "abc" -> a, bc (bc scores higher than ab).
  VocabData v = small_spm();
  v.add_space_prefix = false;
  const Tokenizer nt(v);
  CHECK_IDS(nt.encode("abc", plain), {260, 264});
  CHECK_IDS(nt.encode("bc", plain), {264});
  // Equal scores merge leftmost first: "aaa" -> aa, a.
  CHECK_IDS(nt.encode("aaa", plain), {266, 260});
  // Spaces are U+2581; "a  b" -> a, ▁▁, b (▁▁ is a token, ▁b is not).
  CHECK_IDS(nt.encode("a  b", plain), {260, 267, 261});
}

OSD_TEST(spm_byte_fallback_and_unknown) {
  const Tokenizer t(small_spm());
  VocabData v = small_spm();
  v.add_space_prefix = false;
  const Tokenizer nt(v);
  CHECK_IDS(nt.encode("\xC3\xA9", {}), {268});                  // é is a token
  CHECK_IDS(nt.encode("\xC3\xA8", {}), {3 + 0xC3, 3 + 0xA8});   // è is not: its bytes
  CHECK_IDS(nt.encode("\xE2\x82\xAC" "a", {}), {3 + 0xE2, 3 + 0x82, 3 + 0xAC, 260});
  // A vocabulary without byte tokens falls back to <unk> per byte.
  VocabData nb;
  nb.model = "llama";
  nb.tokens = {"<unk>", "<s>", "</s>", kSp, "a"};
  nb.token_types = {2, 3, 3, 1, 1};
  nb.unk = 0, nb.bos = 1, nb.eos = 2;
  const Tokenizer nbt(nb);
  CHECK_IDS(nbt.encode("a\xC3\xA8", {}), {3, 4, 0, 0});
  nb.unk = -1;
  CHECK_THROWS(Error, Tokenizer(nb).encode("\xC3\xA8", {}), "byte 0xC3");
}

OSD_TEST(spm_bos_eos_and_special) {
  const Tokenizer t(small_spm());
  CHECK_IDS(t.encode("a", {true, false, false}), {1, 265});
  CHECK_IDS(t.encode("a", {true, true, false}), {1, 265, 2});
  CHECK_IDS(t.encode("", {true, false, false}), {1});  // like SentencePiece: '' -> [BOS]
  CHECK_IDS(t.encode("", {}), {});
  // special=true: "<s>" is the control token, and the text after it gets the dummy prefix.
  CHECK_IDS(t.encode("a<s>a", {false, false, true}), {265, 1, 265});
  // special=false: it is plain text, here spelled with byte tokens.
  CHECK_IDS(t.encode("<s>", {}), {259, 3 + '<', 3 + 's', 3 + '>'});
  VocabData v = small_spm();
  v.bos = -1;
  CHECK_THROWS(Error, Tokenizer(v).encode("a", {true, false, false}), "no BOS token");
}

OSD_TEST(spm_decode) {
  const Tokenizer t(small_spm());
  CHECK_STR(t.decode({1, 265, 264}), "abc");                      // BOS and the dummy space are dropped
  CHECK_STR(t.decode({1, 265, 264}, {true, true}), "<s> abc");    // special: BOS is the first text
  CHECK_STR(t.decode({265, 264}, {false, false}), " abc");        // a continuation keeps its space
  CHECK_STR(t.decode({259, 3 + '\n'}), "\n");                      // "\n" encodes as ▁ <0x0A>
  CHECK_STR(t.decode({3 + 0xC3, 3 + 0xA9}), "\xC3\xA9");          // bytes reassemble é
  CHECK_STR(t.decode({0}), "");                                    // <unk> is special: empty unless asked
  CHECK_STR(t.decode({0}, {true, true}), "<unk>");
  CHECK_THROWS(Error, t.decode({265, 70000}), "tokens[1] = 70000 is out of range for a vocabulary of 270");
  CHECK_THROWS(Error, t.decode({-1}), "tokens[0] = -1 is out of range");
  CHECK_THROWS(Error, t.token_to_piece(270), "token = 270 is out of range");
  for (const std::string s : {"abc", " abc", "a  b", "\xC3\xA8\xC3\xA9!", "", "\n \n"})
    CHECK_STR(t.decode(t.encode(s, {true, false, false})), s);
}

OSD_TEST(stream_decoder_holds_back_partial_utf8) {
  const Tokenizer t(small_spm());
  StreamDecoder d(t);
  CHECK_STR(d.push(265), " a");           // continuation: the space is real
  CHECK_STR(d.push(3 + 0xE2), "");        // first byte of €
  CHECK_EQ(d.pending_bytes(), 1u);
  CHECK_STR(d.push(3 + 0x82), "");
  const Ids rest = {3 + 0xAC, 264};
  CHECK_STR(d.push(rest.data(), rest.size()), "\xE2\x82\xAC" "bc");
  CHECK_STR(d.push(3 + 0xF0), "");
  CHECK_STR(d.flush(), "\xF0");           // the end of the stream passes the partial bytes on
  CHECK_EQ(d.pending_bytes(), 0u);
  // A bad id leaves the decoder unchanged.
  CHECK_STR(d.push(3 + 0xC3), "");
  const Ids bad = {3 + 0xA9, 99999};
  CHECK_THROWS(Error, d.push(bad.data(), bad.size()), "tokens[1] = 99999");
  CHECK_STR(d.push(3 + 0xA9), "\xC3\xA9");
  // From the start of a text, the dummy space is stripped like decode() does.
  StreamDecoder s(t, {false, true});
  CHECK_STR(s.push(1), "");
  CHECK_STR(s.push(265), "a");
  CHECK_STR(s.push(265), " a");
}

OSD_TEST(vocab_validation) {
  VocabData v = small_spm();
  v.model = "bert";
  CHECK_THROWS(Error, Tokenizer{v}, "tokenizer.ggml.model = 'bert' is not a supported tokenizer");
  v = small_spm();
  v.scores.pop_back();
  CHECK_THROWS(Error, Tokenizer{v}, "tokenizer.ggml.scores has 269 entries for 270 tokens");
  v = small_spm();
  v.eos = 270;
  CHECK_THROWS(Error, Tokenizer{v}, "tokenizer.ggml.eos_token_id = 270 is out of range for a vocabulary of 270");
  v = small_spm();
  v.tokens.clear(), v.scores.clear(), v.token_types.clear();
  CHECK_THROWS(Error, Tokenizer{v}, "tokenizer.ggml.tokens is empty");
  VocabData b = small_bpe();
  b.merges.push_back("nospace");
  CHECK_THROWS(Error, Tokenizer{b}, "tokenizer.ggml.merges[14] = 'nospace'");
  try {
    Tokenizer unused(small_bpe("nope"));
  } catch (const Error& e) {
    CHECK(e.kind == osd::ErrorKind::Range);
  }
}

// ---------------------------------------------------------------------------------------------
// Byte-level BPE

OSD_TEST(bpe_merges_by_rank) {
  const Tokenizer t(small_bpe());
  const std::string G = osd::tok::byte_to_unicode(' ');
  // " the": Ġ t (rank 0), then h e (1), then Ġt he (2).
  CHECK_IDS(t.encode(" the", {}), {id_of(t, G + "the")});
  // "hello": h e (rank 1) fires before l l (3) and ll o (4), so "e llo" and "h ello" never
  // apply: [he, llo].
  CHECK_IDS(t.encode("hello", {}), {id_of(t, "he"), id_of(t, "llo")});
  CHECK_IDS(t.encode(" world", {}), {id_of(t, G + "world")});
  CHECK_IDS(t.encode("1234", {}), {id_of(t, "123"), id_of(t, "4")});
  // Unmerged bytes are their byte characters (in this vocabulary, byte b has id b).
  CHECK_IDS(t.encode("\xC3\xA9", {}), {0xC3, 0xA9});
  CHECK_STR(t.decode(t.encode("hello world 1234 \xC3\xA9\n", {})), "hello world 1234 \xC3\xA9\n");
}

OSD_TEST(bpe_missing_byte_character) {
  // A byte-level vocabulary without the character of byte 0xA9: <unk> if it has one, else an error
  // naming the byte (never a silently dropped byte).
  VocabData v = small_bpe();
  v.tokens[0xA9] = "<unused-a9>";
  v.token_types[0xA9] = 5;
  CHECK_THROWS(Error, Tokenizer(v).encode("\xC3\xA9", {}), "byte 0xA9");
  v.tokens.push_back("<unk>");
  v.token_types.push_back(2);
  v.unk = static_cast<int32_t>(v.tokens.size()) - 1;
  CHECK_IDS(Tokenizer(v).encode("a\xC3\xA9", {}), {'a', 0xC3, v.unk});
}

OSD_TEST(bpe_special_tokens) {
  const Tokenizer t(small_bpe());
  const int32_t eot = t.eos();
  CHECK_IDS(t.encode("<|endoftext|>", {false, false, true}), {eot});
  const Ids plain = t.encode("<|endoftext|>", {});
  CHECK(plain.size() > 1);
  CHECK_STR(t.decode(plain), "<|endoftext|>");
  const Ids mixed = t.encode("the<|endoftext|> the", {false, false, true});
  CHECK_IDS(mixed, {id_of(t, "t"), id_of(t, "he"), eot, id_of(t, osd::tok::byte_to_unicode(' ') + "the")});
  CHECK_STR(t.decode(mixed), "the the");
  CHECK_STR(t.decode(mixed, {true, true}), "the<|endoftext|> the");
  CHECK_STR(t.token_to_piece(eot, false), "");
  CHECK_STR(t.token_to_piece(eot, true), "<|endoftext|>");
}

OSD_TEST(bpe_stream_decoder_split_character) {
  const Tokenizer t(small_bpe());
  // "中" is E4 B8 AD: three byte-level tokens, none complete alone.
  const Ids ids = t.encode("a\xE4\xB8\xAD", {});
  CHECK_EQ(ids.size(), 4u);
  StreamDecoder d(t);
  std::string all;
  std::vector<std::string> parts;
  for (int32_t id : ids) parts.push_back(d.push(id));
  CHECK_STR(parts[0], "a");
  CHECK_STR(parts[1], "");
  CHECK_STR(parts[2], "");
  CHECK_STR(parts[3], "\xE4\xB8\xAD");
  CHECK_STR(d.flush(), "");
}

OSD_TEST(user_defined_tokens_always_match) {
  VocabData v = small_bpe();
  v.tokens.push_back("<tool>");
  v.token_types.push_back(4);  // user-defined
  const Tokenizer t(v);
  const int32_t tool = t.vocab_size() - 1;
  CHECK_IDS(t.encode("<tool>", {}), {tool});  // as llama.cpp and Hugging Face do
  CHECK_STR(t.decode({tool}), "<tool>");
}

OSD_TEST(arbitrary_bytes_round_trip) {
  // Byte fallback (SentencePiece) and byte-level BPE both encode any byte string, valid UTF-8
  // or not, and decode it back exactly; the stream decoder gives the same bytes.
  const Tokenizer spm(small_spm()), bpe(small_bpe());
  uint32_t state = 12345;
  auto next = [&] { return (state = state * 1664525u + 1013904223u) >> 24; };
  static const char kPool[] = "ab c<s>\xC3\xA9\xE2\x82\xAC";
  for (int round = 0; round < 200; ++round) {
    std::string s;
    const int n = static_cast<int>(next() % 24);
    for (int i = 0; i < n; ++i) {
      const uint32_t r = next();
      s += r < 128 ? kPool[r % (sizeof kPool - 1)] : static_cast<char>(next());
    }
    for (const Tokenizer* t : {&spm, &bpe}) {
      const Ids ids = t->encode(s, {false, false, false});
      CHECK_STR(t->decode(ids), s);
      StreamDecoder d(*t, {false, true});
      std::string streamed;
      for (int32_t id : ids) streamed += d.push(id);
      CHECK_STR(streamed + d.flush(), s);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The vocabulary files in ../shared/models/vocab are damaged. On their way here they went through
// a UTF-8 text decoder that replaced every invalid byte sequence with U+FFFD (EF BF BD): each
// number with a byte >= 0x80 grew, and everything after it moved, so no GGUF reader (ours or
// node-llama-cpp's) can parse them. Strings survived, being valid UTF-8. This reader recovers the
// vocabulary for these tests only, and checks every recovered number by damaging it again and
// comparing with the bytes in the file:
//   - keys are found by their length prefix and name, so damaged fields in between do not matter;
//   - a damaged string length (GPT-2 has one 128-byte token and merge) is the one that ends where
//     the next entry's length field starts;
//   - a damaged token id (GPT-2's <|endoftext|> = 50256) is the one control token that damages to
//     the same bytes;
//   - Llama's scores follow SentencePiece's layout: 0 for special and byte tokens, minus the merge
//     rank (id - 259) for normal tokens, and -1e9 for the whitespace runs "▁", "▁▁", ... Each of
//     the 32000 values is checked that way, and the whole array damages to exactly the file's bytes.
// test/tokenizer.test.ts does the same in TypeScript.
namespace damaged {

const std::string kReplacement = "\xEF\xBF\xBD";

// What the files went through: decode as UTF-8, replacing each maximal invalid subsequence with
// U+FFFD (Python's errors="replace", the WHATWG decoder), then encode again.
std::string redamage(std::string_view in) {
  std::string out;
  const auto* s = reinterpret_cast<const unsigned char*>(in.data());
  const size_t n = in.size();
  for (size_t i = 0; i < n;) {
    const unsigned char c = s[i];
    if (c < 0x80) {
      out += static_cast<char>(c);
      ++i;
      continue;
    }
    size_t need = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // range of the second byte
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    if (c >= 0xE0 && c <= 0xEF) need = 2, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    if (c >= 0xF0 && c <= 0xF4) need = 3, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    size_t j = 1;
    while (need > 0 && j <= need && i + j < n && s[i + j] >= (j == 1 ? lo : 0x80) && s[i + j] <= (j == 1 ? hi : 0xBF)) ++j;
    if (need > 0 && j == need + 1) out.append(in.substr(i, j));
    else out += kReplacement;
    i += j;
  }
  return out;
}

std::string le_bytes(uint64_t v, int width) {
  std::string s;
  for (int i = 0; i < width; ++i) s += static_cast<char>((v >> (8 * i)) & 0xFF);
  return s;
}

struct Entry {
  std::string key;
  uint32_t type;
  size_t begin, end;  // the value's bytes
};

class Reader {
 public:
  explicit Reader(std::string bytes) : b_(std::move(bytes)) {}

  // Reads a `width`-byte little-endian integer whose bytes >= 0x80 may each have become U+FFFD.
  // Returns the file bytes it spans; `known` is false when a byte was lost.
  size_t read_int(size_t p, int width, uint64_t& value, bool& known) const {
    value = 0;
    known = true;
    const size_t start = p;
    for (int k = 0; k < width; ++k) {
      if (b_.compare(p, 3, kReplacement) == 0) {
        known = false;
        p += 3;
      } else {
        value |= static_cast<uint64_t>(static_cast<unsigned char>(b_[p])) << (8 * k);
        p += 1;
      }
    }
    return p - start;
  }

  bool key_at(size_t p, const std::string& arch, std::string* key = nullptr, uint32_t* type = nullptr) const {
    if (p + 12 > b_.size()) return false;
    uint64_t len = 0;
    std::memcpy(&len, b_.data() + p, 8);
    if (len < 3 || len > 100 || p + 8 + len + 4 > b_.size()) return false;
    const std::string name = b_.substr(p + 8, len);
    if (name.rfind("general.", 0) != 0 && name.rfind("tokenizer.", 0) != 0 &&
        (arch.empty() || name.rfind(arch + ".", 0) != 0))
      return false;
    for (char c : name)
      if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '.')) return false;
    uint32_t t = 0;
    std::memcpy(&t, b_.data() + p + 8 + len, 4);
    if (t > 12) return false;
    if (key) *key = name;
    if (type) *type = t;
    return true;
  }

  // All key-value entries, each value spanning up to the next key.
  std::vector<Entry> entries() const {
    if (b_.compare(0, 4, "GGUF") != 0) throw std::runtime_error("not a GGUF file");
    uint64_t n_kv = 0;
    std::memcpy(&n_kv, b_.data() + 16, 8);
    std::vector<Entry> out;
    std::string arch;
    for (size_t p = 24; out.size() < n_kv;) {
      Entry e;
      if (!key_at(p, arch, &e.key, &e.type)) throw std::runtime_error("lost track of the keys at byte " + std::to_string(p));
      e.begin = p + 8 + e.key.size() + 4;
      e.end = e.begin;
      if (out.size() + 1 < n_kv) {
        while (e.end < b_.size() && !key_at(e.end, arch)) ++e.end;
      } else {
        e.end = b_.size();
      }
      if (e.key == "general.architecture") arch = b_.substr(e.begin + 8, e.end - e.begin - 8);
      out.push_back(e);
      p = e.end;
    }
    return out;
  }

  std::string string_value(const Entry& e) const {
    uint64_t len;
    bool known;
    const size_t w = read_int(e.begin, 8, len, known);
    return b_.substr(e.begin + w, e.end - e.begin - w);
  }

  std::vector<std::string> string_array(const Entry& e) const {
    std::vector<std::string> out;
    uint64_t count;
    bool count_known;
    size_t p = e.begin + 4;
    p += read_int(p, 8, count, count_known);
    while (p < e.end) {
      uint64_t len;
      bool known;
      const size_t w = read_int(p, 8, len, known);
      if (!known) {
        // Only the low byte can be lost here: the length is 0x80..0xFF. Take the one whose string
        // is valid UTF-8 and ends at the end of the array or on a plausible next length field.
        bool found = false;
        for (uint64_t l = 0x80; l <= 0xFF && !found; ++l) {
          const size_t q = p + w + l;
          if (q > e.end) break;
          if (redamage(b_.substr(p + w, l)) != b_.substr(p + w, l)) continue;
          uint64_t next = 0;
          bool next_known;
          const bool plausible = q == e.end || (q + 8 <= e.end && (read_int(q, 8, next, next_known), next < 4096));
          if (plausible) len = l, found = true;
        }
        if (!found) throw std::runtime_error(e.key + ": cannot recover a string length");
      }
      out.push_back(b_.substr(p + w, len));
      p += w + len;
    }
    if (count_known && count != out.size()) throw std::runtime_error(e.key + ": count mismatch");
    return out;
  }

  // The raw element bytes of a numeric array (after its element type and count).
  std::string array_bytes(const Entry& e) const {
    uint64_t count;
    bool known;
    const size_t p = e.begin + 4 + read_int(e.begin + 4, 8, count, known);
    return b_.substr(p, e.end - p);
  }

  std::string raw(const Entry& e) const { return b_.substr(e.begin, e.end - e.begin); }

 private:
  std::string b_;
};

std::vector<float> recover_scores(const std::string& region, const std::vector<int32_t>& types) {
  size_t first_normal = 0;
  while (first_normal < types.size() && types[first_normal] != 1) ++first_normal;
  std::vector<float> scores;
  std::string packed;
  size_t pos = 0;
  for (size_t i = 0; i < types.size(); ++i) {
    std::vector<float> candidates = {0.0f};
    if (types[i] == 1) candidates = {-static_cast<float>(i - first_normal), -1e9f, 0.0f};
    bool ok = false;
    for (float c : candidates) {
      uint32_t bits;
      std::memcpy(&bits, &c, 4);
      const std::string d = redamage(le_bytes(bits, 4));
      if (region.compare(pos, d.size(), d) == 0) {
        scores.push_back(c);
        packed += le_bytes(bits, 4);
        pos += d.size();
        ok = true;
        break;
      }
    }
    if (!ok) throw std::runtime_error("cannot recover tokenizer.ggml.scores[" + std::to_string(i) + "]");
  }
  if (redamage(packed) != region) throw std::runtime_error("recovered scores do not damage to the file's bytes");
  return scores;
}

// A token id field: the value itself, or the one control token whose bytes damage to the field.
int32_t recover_id(const Reader& r, const Entry& e, const VocabData& v) {
  uint64_t value;
  bool known;
  r.read_int(e.begin, 4, value, known);
  if (known) return static_cast<int32_t>(value);
  const std::string field = r.raw(e);
  int32_t found = -1;
  for (size_t id = 0; id < v.tokens.size(); ++id) {
    if (v.token_types[id] != 3 || redamage(le_bytes(id, 4)) != field) continue;
    if (found >= 0) throw std::runtime_error(e.key + ": ambiguous");
    found = static_cast<int32_t>(id);
  }
  if (found < 0) throw std::runtime_error(e.key + ": cannot recover");
  return found;
}

VocabData recover_vocab(const std::string& path) {
  const Reader r(read_file(path));
  VocabData v;
  const std::vector<Entry> entries = r.entries();
  auto find = [&](const std::string& key) -> const Entry* {
    for (const Entry& e : entries)
      if (e.key == key) return &e;
    return nullptr;
  };
  v.model = r.string_value(*find("tokenizer.ggml.model"));
  if (const Entry* e = find("tokenizer.ggml.pre")) v.pre = r.string_value(*e);
  v.tokens = r.string_array(*find("tokenizer.ggml.tokens"));
  const std::string types = r.array_bytes(*find("tokenizer.ggml.token_type"));
  if (types.size() != 4 * v.tokens.size() || types.find(kReplacement) != std::string::npos)
    throw std::runtime_error("token types are damaged");
  v.token_types.resize(v.tokens.size());
  std::memcpy(v.token_types.data(), types.data(), types.size());
  if (const Entry* e = find("tokenizer.ggml.scores")) v.scores = recover_scores(r.array_bytes(*e), v.token_types);
  if (const Entry* e = find("tokenizer.ggml.merges")) v.merges = r.string_array(*e);
  if (const Entry* e = find("tokenizer.ggml.bos_token_id")) v.bos = recover_id(r, *e, v);
  if (const Entry* e = find("tokenizer.ggml.eos_token_id")) v.eos = recover_id(r, *e, v);
  if (const Entry* e = find("tokenizer.ggml.unknown_token_id")) v.unk = recover_id(r, *e, v);
  const bool spm = v.model == "llama";
  if (const Entry* e = find("tokenizer.ggml.add_bos_token")) v.add_bos = r.raw(*e)[0] != 0;
  else v.add_bos = spm;
  if (const Entry* e = find("tokenizer.ggml.add_eos_token")) v.add_eos = r.raw(*e)[0] != 0;
  v.add_space_prefix = spm;
  return v;
}

// Writes the recovered vocabulary as a proper GGUF (in memory) and loads it the normal way, so
// the tests below also cover vocab_from_gguf.
Tokenizer load_recovered(const std::string& path) {
  const VocabData v = recover_vocab(path);
  osd::gguf::Writer w;
  using osd::gguf::Value;
  w.set("general.architecture", Value::str(v.model == "llama" ? "llama" : "gpt2"));
  w.set("tokenizer.ggml.model", Value::str(v.model));
  w.set("tokenizer.ggml.pre", Value::str(v.pre));
  w.set("tokenizer.ggml.tokens", Value::array(v.tokens));
  if (!v.scores.empty()) w.set("tokenizer.ggml.scores", Value::array(v.scores));
  w.set("tokenizer.ggml.token_type", Value::array(v.token_types));
  if (!v.merges.empty()) w.set("tokenizer.ggml.merges", Value::array(v.merges));
  if (v.bos >= 0) w.set("tokenizer.ggml.bos_token_id", Value::u32(static_cast<uint32_t>(v.bos)));
  if (v.eos >= 0) w.set("tokenizer.ggml.eos_token_id", Value::u32(static_cast<uint32_t>(v.eos)));
  if (v.unk >= 0) w.set("tokenizer.ggml.unknown_token_id", Value::u32(static_cast<uint32_t>(v.unk)));
  w.set("tokenizer.ggml.add_bos_token", Value::boolean(v.add_bos));
  w.set("tokenizer.ggml.add_eos_token", Value::boolean(v.add_eos));
  const auto file = osd::gguf::File::from_memory(w.to_bytes(), path + " (recovered)");
  return Tokenizer(osd::tok::vocab_from_gguf(*file));
}

}  // namespace damaged

OSD_TEST(redamage_matches_utf8_replacement) {
  using damaged::redamage;
  CHECK_STR(redamage("abc\xC3\xA9"), "abc\xC3\xA9");
  CHECK_STR(redamage("\xAC\xC5'7"), "\xEF\xBF\xBD\xEF\xBF\xBD'7");  // 1e-5f, as found in the files
  CHECK_STR(redamage("\xE2\x82" "A"), "\xEF\xBF\xBD" "A");             // one U+FFFD for a truncated sequence
  CHECK_STR(redamage("\xE0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD");         // E0 80 is never valid
}

// ---------------------------------------------------------------------------------------------
// Real vocabularies

OSD_TEST(real_llama_spm) {
  if (!have_shared("vocab/ggml-vocab-llama-spm.gguf")) return;
  const std::string path = kShared + "vocab/ggml-vocab-llama-spm.gguf";
  // The damaged file is rejected with an error, not a crash.
  CHECK_THROWS(Error, osd::tok::load_tokenizer(path), "ggml-vocab-llama-spm.gguf");
  const Tokenizer t = damaged::load_recovered(path);
  CHECK_EQ(t.vocab_size(), 32000);
  CHECK_EQ(t.bos(), 1);
  CHECK_EQ(t.eos(), 2);
  CHECK_EQ(t.unk(), 0);
  CHECK(t.add_bos() && t.is_spm() && t.add_space_prefix());
  const EncodeOptions bos{true, false, false};
  CHECK_IDS(t.encode("Hello world", bos), {1, 15043, 3186});
  CHECK_IDS(t.encode(" Hello world", bos), {1, 29871, 15043, 3186});
  CHECK_IDS(t.encode("\xC3\x84pfel", bos), {1, 11585, 7810, 295});
  CHECK_IDS(t.encode("\t", bos), {1, 29871, 12});
  CHECK_IDS(t.encode("</s>", {true, false, true}), {1, 2});
  const auto inputs = read_inp(kShared + "vocab/ggml-vocab-llama-spm.gguf.inp");
  CHECK_EQ(inputs.size(), 46u);
  for (const std::string& s : inputs) CHECK_STR(t.decode(t.encode(s, bos)), s);
}

OSD_TEST(real_gpt2) {
  if (!have_shared("vocab/ggml-vocab-gpt-2.gguf")) return;
  const std::string path = kShared + "vocab/ggml-vocab-gpt-2.gguf";
  CHECK_THROWS(Error, osd::tok::load_tokenizer(path), "ggml-vocab-gpt-2.gguf");
  const Tokenizer t = damaged::load_recovered(path);
  CHECK_EQ(t.vocab_size(), 50257);
  CHECK_EQ(t.bos(), 50256);
  CHECK_EQ(t.eos(), 50256);
  CHECK(!t.add_bos() && !t.is_spm());
  CHECK_IDS(t.encode("Hello world", {}), {15496, 995});
  CHECK_IDS(t.encode(" Hello World!", {}), {18435, 2159, 0});
  CHECK_IDS(t.encode("I've been 'told he's there", {}), {40, 1053, 587, 705, 44040, 339, 338, 612});
  CHECK_IDS(t.encode("<|endoftext|>", {false, false, true}), {50256});
  const auto inputs = read_inp(kShared + "vocab/ggml-vocab-gpt-2.gguf.inp");
  CHECK_EQ(inputs.size(), 46u);
  for (const std::string& s : inputs) CHECK_STR(t.decode(t.encode(s, {})), s);
  // Streaming in single tokens gives the same text, never splitting a character.
  for (const std::string& s : inputs) {
    StreamDecoder d(t);
    std::string out;
    for (int32_t id : t.encode(s, {})) {
      const std::string part = d.push(id);
      CHECK_EQ(osd::tok::utf8_incomplete_tail(part), 0u);
      out += part;
    }
    CHECK_STR(out + d.flush(), s);
  }
}

OSD_TEST(real_smollm2) {
  if (!have_shared("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")) return;
  const Tokenizer t = osd::tok::load_tokenizer(kShared + "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
  CHECK_EQ(t.vocab_size(), 49152);
  CHECK(t.model() == "gpt2" && t.pre() == "smollm");
  CHECK_EQ(t.bos(), 1);
  CHECK_EQ(t.eos(), 2);
  CHECK(!t.add_bos());
  const std::string chat = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n";
  const Ids ids = t.encode(chat, {false, false, true});
  CHECK_IDS(ids, {1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198});
  CHECK_IDS(t.encode("Hello world 12345", {}), {19556, 905, 216, 33, 34, 35, 36, 37});  // digits one by one
  CHECK_IDS(t.encode("I've 'RE  x\n\n  y  ", {}), {57, 3543, 637, 3256, 216, 1792, 8866, 329, 256});
  CHECK_STR(t.decode(ids, {true, false}), chat);
  CHECK_STR(t.decode(ids), "user\nWhat is 2+2?\n");
}

OSD_TEST_MAIN()
