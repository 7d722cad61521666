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
// same value ("-1", "0.1", "NaN", "Infinity"), where std::to_string gives "-1.000000" and "nan".
inline std::string num_str(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  char buf[40];
  for (int digits = 1; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*g", digits, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}
// The same for a float: its own shortest digits (0.1f prints as 0.1).
inline std::string num_str(float v) {
  if (std::isnan(v) || std::isinf(v)) return num_str(static_cast<double>(v));
  char buf[40];
  for (int digits = 1; digits <= 9; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*g", digits, static_cast<double>(v));
    if (std::strtof(buf, nullptr) == v) break;
  }
  return buf;
}

}  // namespace osd
