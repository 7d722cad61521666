// libFuzzer entry point for the GGUF reader: any input must either parse or throw osd::Error.
// Anything else (a crash, a sanitizer report, another exception, a huge allocation) is a bug.
// Build and run: see README.md in this folder.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "io/gguf.h"

namespace {

uint64_t touch(const osd::gguf::Value& v) {
  using osd::gguf::ValueType;
  uint64_t sum = v.describe().size();
  if (!v.is_array()) {
    if (v.type() == ValueType::String) return sum + v.as_string().size();
    if (v.type() == ValueType::Bool) return sum + v.as_bool();
    if (v.is_float()) return sum + static_cast<uint64_t>(v.as_float() != 0);
    return sum + static_cast<uint64_t>(v.as_int() & 1);  // may throw Range for large uint64
  }
  switch (v.elem_type()) {
    case ValueType::String:
      for (const auto& s : v.strings()) sum += s.size();
      break;
    case ValueType::Array:
      for (const auto& item : v.arrays()) sum += touch(item);
      break;
    case ValueType::Float32:
    case ValueType::Float64:
      for (float f : v.to_floats()) sum += f != 0;
      break;
    default:
      for (int64_t i : v.to_ints()) sum += static_cast<uint64_t>(i);  // may throw Range for large uint64
      break;
  }
  return sum;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::unique_ptr<osd::gguf::File> f;
  try {
    f = osd::gguf::File::from_memory(std::vector<uint8_t>(data, data + size), "fuzz.gguf");
  } catch (const osd::Error&) {
    return 0;
  }
  volatile uint64_t sum = 0;
  for (const auto& kv : f->metadata()) {
    try {
      sum += touch(kv.value);
    } catch (const osd::Error&) {
    }
    // The typed getters must answer or throw osd::Error, whatever the stored type.
    try { sum += f->get_int_or(kv.key, 0); } catch (const osd::Error&) {}
    try { sum += f->get_float_or(kv.key, 0) != 0; } catch (const osd::Error&) {}
    try { sum += f->get_string_or(kv.key, "").size(); } catch (const osd::Error&) {}
    try { sum += f->get_bool_or(kv.key, false); } catch (const osd::Error&) {}
    try { sum += f->get_strings(kv.key).size(); } catch (const osd::Error&) {}
    try { sum += f->get_floats(kv.key).size(); } catch (const osd::Error&) {}
    try { sum += f->get_ints(kv.key).size(); } catch (const osd::Error&) {}
  }
  for (const auto& t : f->tensors()) {
    if (f->find_tensor(t.name) != &t) __builtin_trap();
    for (uint64_t i = 0; i < t.n_bytes; ++i) sum += t.data[i];
  }
  (void)sum;  // volatile: the reads above are not optimised away
  return 0;
}
