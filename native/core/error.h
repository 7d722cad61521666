// Errors raised by the engine. The N-API layer maps them to TypeError / RangeError / Error,
// so every message names the argument or the file it is about.
#pragma once
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace osd {

enum class ErrorKind { Type, Range, Io, State };

struct Error : std::runtime_error {
  ErrorKind kind;
  Error(ErrorKind k, const std::string& msg) : std::runtime_error(msg), kind(k) {}
};

[[noreturn]] inline void throw_type(const std::string& msg) { throw Error(ErrorKind::Type, msg); }
[[noreturn]] inline void throw_range(const std::string& msg) { throw Error(ErrorKind::Range, msg); }
[[noreturn]] inline void throw_io(const std::string& msg) { throw Error(ErrorKind::Io, msg); }
[[noreturn]] inline void throw_state(const std::string& msg) { throw Error(ErrorKind::State, msg); }

// A number for an error message as JavaScript prints it: the shortest digits that read back as the
// same value, in fixed notation for 1e-7 <= |v| < 1e21 and in exponent form ("1e+21", "1e-7")
// outside it; "NaN", "Infinity". (std::to_string gives "-1.000000" and "nan".)
inline std::string js_digits(const char* e_form) {  // "d.ddde[+-]xx" as JavaScript writes it
  std::string digits;
  const char* p = e_form;
  const bool neg = *p == '-';
  if (neg) ++p;
  for (; *p && *p != 'e'; ++p)
    if (*p != '.') digits += *p;
  const int exp = std::atoi(p + 1);
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out = neg ? "-" : "";
  const int n = static_cast<int>(digits.size());
  if (exp >= 21 || exp <= -7) {
    out += digits.substr(0, 1);
    if (n > 1) out += "." + digits.substr(1);
    out += (exp > 0 ? "e+" : "e-") + std::to_string(exp > 0 ? exp : -exp);
  } else if (exp < 0) {
    out += "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
  } else if (n <= exp + 1) {
    out += digits + std::string(static_cast<size_t>(exp + 1 - n), '0');
  } else {
    out += digits.substr(0, static_cast<size_t>(exp + 1)) + "." + digits.substr(static_cast<size_t>(exp + 1));
  }
  return out;
}

inline std::string num_str(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  if (v == 0) return "0";
  char buf[40];
  for (int digits = 1; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*e", digits - 1, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return js_digits(buf);
}
// The same for a float: its own shortest digits (0.1f prints as 0.1).
inline std::string num_str(float v) {
  if (std::isnan(v) || std::isinf(v) || v == 0) return num_str(static_cast<double>(v));
  char buf[40];
  for (int digits = 1; digits <= 9; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*e", digits - 1, static_cast<double>(v));
    if (std::strtof(buf, nullptr) == v) break;
  }
  return js_digits(buf);
}

}  // namespace osd
