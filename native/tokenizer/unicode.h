// UTF-8 and Unicode helpers for the tokenizers: lenient UTF-8 decoding (every byte of the input
// is kept, so tokenization stays exact on invalid text), the \p{L} / \p{N} / \s classes the
// pre-tokenizers need, and GPT-2's byte <-> printable code point mapping.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace osd::tok {

// One decoded code point and where it sits in the UTF-8 input.
struct Codepoint {
  uint32_t cp;      // the code point, or kInvalidCodepoint for a byte that is not valid UTF-8
  uint32_t offset;  // byte offset in the input
  uint32_t len;     // bytes it occupies (1..4)
};
inline constexpr uint32_t kInvalidCodepoint = 0xFFFFFFFFu;

// Decodes `text`; a byte that does not start a valid sequence becomes one kInvalidCodepoint
// entry of length 1, so the entries always tile the input.
std::vector<Codepoint> utf8_decode(std::string_view text);

// Appends the UTF-8 encoding of `cp` (which must be <= 0x10FFFF).
void utf8_append(std::string& out, uint32_t cp);

// Number of bytes at the end of `bytes` that form the beginning of a valid but unfinished UTF-8
// sequence (0 when the text ends on a character boundary, or ends in bytes that can never
// complete). A streaming decoder holds exactly these back.
size_t utf8_incomplete_tail(std::string_view bytes);

bool is_letter(uint32_t cp);      // \p{L}
bool is_number(uint32_t cp);      // \p{N}
bool is_whitespace(uint32_t cp);  // \s (Unicode White_Space)

// GPT-2's reversible byte -> code point map: printable Latin-1 bytes map to themselves, the rest
// to U+0100 and up. byte_to_unicode(b) is that code point's UTF-8; unicode_to_byte(cp) returns
// -1 for a code point outside the map.
const std::string& byte_to_unicode(uint8_t b);
int unicode_to_byte(uint32_t cp);

}  // namespace osd::tok
