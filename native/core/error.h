// Errors raised by the engine. The N-API layer maps them to TypeError / RangeError / Error,
// so every message names the argument or the file it is about.
#pragma once
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

}  // namespace osd
