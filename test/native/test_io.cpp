// Tests for native/io (GGUF read/write, llama2.c checkpoints) and native/core/fp16.h.
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/file.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "core/error.h"
#include "core/fp16.h"
#include "io/file.h"
#include "io/gguf.h"
#include "io/llama2c.h"

namespace fs = std::filesystem;
using osd::Error;
using osd::ErrorKind;
using osd::gguf::File;
using osd::gguf::TensorType;
using osd::gguf::Value;
using osd::gguf::ValueType;
using osd::gguf::Writer;

namespace {

const std::string kModels = "../shared/models";

bool have(const std::string& path) {
  if (fs::exists(path)) return true;
  std::printf("  skip: %s not found\n", path.c_str());
  return false;
}

std::vector<uint8_t> read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

void write_all(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

struct TempDir {
  fs::path path;
  TempDir() {
    char tmpl[] = "/tmp/osd_test_io.XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    fs::permissions(path, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(path, ec);
  }
  std::string operator/(const std::string& name) const { return (path / name).string(); }
  std::vector<std::string> entries() const {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(path)) out.push_back(e.path().filename().string());
    return out;
  }
};

// Runs fn; returns the message of the osd::Error (kind Io) it throws, or a marker string.
template <class F>
std::string io_error(F&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    if (e.kind != ErrorKind::Io) return std::string("<wrong kind> ") + e.what();
    return e.what();
  } catch (const std::exception& e) {
    return std::string("<not osd::Error> ") + e.what();
  }
  return "<no error>";
}

#define CHECK_IO_ERROR(expr, substr)                                                                 \
  do {                                                                                               \
    std::string msg_ = io_error([&] { expr; });                                                      \
    if (msg_[0] == '<' || msg_.find(substr) == std::string::npos)                                    \
      osd_test::fail(__FILE__, __LINE__, std::string("expected Io error with '") + (substr) + "': " + msg_); \
  } while (0)

std::unique_ptr<File> parse(const std::vector<uint8_t>& bytes, const std::string& name = "test.gguf") {
  return File::from_memory(bytes, name);
}

// Reads every value and every tensor byte, so sanitizers see any out-of-bounds pointer.
uint64_t touch_everything(const File& f) {
  uint64_t sum = 0;
  for (const auto& kv : f.metadata()) {
    sum += kv.key.size() + kv.value.describe().size();
    const Value& v = kv.value;
    if (v.is_array()) {
      if (v.elem_type() == ValueType::String) {
        for (const auto& s : v.strings()) sum += s.size();
      } else if (v.elem_type() == ValueType::Array) {
        sum += v.arrays().size();
      } else {
        for (uint8_t b : v.packed()) sum += b;
      }
    } else if (v.type() == ValueType::String) {
      sum += v.as_string().size();
    }
  }
  for (const auto& t : f.tensors())
    for (uint64_t i = 0; i < t.n_bytes; ++i) sum += t.data[i];
  return sum;
}

// Hand-assembled GGUF bytes, for layouts the writer refuses to produce.
struct Raw {
  std::vector<uint8_t> b;
  template <class T>
  Raw& put(T v) {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(&v);
    b.insert(b.end(), p, p + sizeof v);
    return *this;
  }
  Raw& u32(uint32_t v) { return put(v); }
  Raw& u64(uint64_t v) { return put(v); }
  Raw& str(const std::string& s) {
    u64(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  Raw& header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
    b.insert(b.end(), {'G', 'G', 'U', 'F'});
    return u32(version).u64(n_tensors).u64(n_kv);
  }
  Raw& kv_u32(const std::string& key, uint32_t v) { return str(key).u32(4).u32(v); }
  Raw& tensor(const std::string& name, std::vector<uint64_t> dims, uint32_t type, uint64_t offset) {
    str(name).u32(static_cast<uint32_t>(dims.size()));
    for (uint64_t d : dims) u64(d);
    return u32(type).u64(offset);
  }
  Raw& pad(size_t align = 32) {
    while (b.size() % align) b.push_back(0);
    return *this;
  }
  Raw& zeros(size_t n) {
    b.insert(b.end(), n, 0);
    return *this;
  }
};

// A writer with one value of every type and tensors of every float type. The tensor data is
// borrowed by the writer, so it lives here next to it.
struct Sample {
  std::vector<float> f32_data, f16_data, bf16_data;
  std::vector<uint8_t> q8_data, q4k_data;
  Writer w;

  Sample() {
    w.set("general.architecture", Value::str("llama"));
    w.set("t.u8", Value::u8(255));
    w.set("t.i8", Value::i8(-128));
    w.set("t.u16", Value::u16(65535));
    w.set("t.i16", Value::i16(-32768));
    w.set("t.u32", Value::u32(0xffffffffu));
    w.set("t.i32", Value::i32(std::numeric_limits<int32_t>::min()));
    w.set("t.f32", Value::f32(3.14159274f));
    w.set("t.bool_true", Value::boolean(true));
    w.set("t.bool_false", Value::boolean(false));
    w.set("t.string", Value::str(std::string("h\xc3\xa9llo\0world", 12)));
    w.set("t.empty_string", Value::str(""));
    w.set("t.u64", Value::u64(std::numeric_limits<uint64_t>::max()));
    w.set("t.i64", Value::i64(std::numeric_limits<int64_t>::min()));
    w.set("t.f64", Value::f64(2.718281828459045));
    w.set("a.u8", Value::array(std::vector<uint8_t>{0, 1, 255}));
    w.set("a.i8", Value::array(std::vector<int8_t>{-128, 0, 127}));
    w.set("a.u16", Value::array(std::vector<uint16_t>{0, 65535}));
    w.set("a.i16", Value::array(std::vector<int16_t>{-32768, 32767}));
    w.set("a.u32", Value::array(std::vector<uint32_t>{0, 0xffffffffu}));
    w.set("a.i32", Value::array(std::vector<int32_t>{-1, 1, 6}));
    w.set("a.f32", Value::array(std::vector<float>{-0.5f, 1e-30f, 1e30f}));
    w.set("a.bool", Value::bool_array({true, false, true}));
    w.set("a.u64", Value::array(std::vector<uint64_t>{0, 1ull << 40}));
    w.set("a.i64", Value::array(std::vector<int64_t>{-(1ll << 40), 7}));
    w.set("a.f64", Value::array(std::vector<double>{1e-300, -2.5}));
    w.set("a.string", Value::array(std::vector<std::string>{"<unk>", "", "\xe2\x96\x81the"}));
    w.set("a.empty", Value::empty_array(ValueType::Int32));
    w.set("a.nested", Value::array_of_arrays({Value::array(std::vector<int32_t>{1, 2}),
                                              Value::array(std::vector<std::string>{"x"}),
                                              Value::array_of_arrays({Value::array(std::vector<float>{0.25f})})}));

    for (int i = 0; i < 12; ++i) f32_data.push_back(0.1f * i - 0.3f);
    for (int i = 0; i < 8; ++i) f16_data.push_back(std::ldexp(1.0f + i / 7.0f, i - 4));
    for (int i = 0; i < 16; ++i) bf16_data.push_back(-1.0f / (i + 1));
    for (int i = 0; i < 2 * 2 * 34; ++i) q8_data.push_back(static_cast<uint8_t>(i * 7));
    for (int i = 0; i < 144; ++i) q4k_data.push_back(static_cast<uint8_t>(255 - i));
    w.add_tensor("f32", TensorType::F32, {4, 3}, f32_data.data());
    w.add_tensor("f16", TensorType::F16, {8}, f16_data.data());
    w.add_tensor("bf16", TensorType::BF16, {2, 2, 2, 2}, bf16_data.data());
    w.add_tensor_raw("q8", TensorType::Q8_0, {64, 2}, q8_data.data(), q8_data.size());
    w.add_tensor_raw("q4k", TensorType::Q4_K, {256}, q4k_data.data(), q4k_data.size());
  }
};

void check_sample(const File& f, const Sample& s) {
  CHECK_EQ(f.metadata().size(), size_t{29});
  CHECK(f.get_string("general.architecture") == "llama");
  CHECK(f.get("t.u8").type() == ValueType::UInt8);
  CHECK_EQ(f.get_int("t.u8"), 255);
  CHECK(f.get("t.i8").type() == ValueType::Int8);
  CHECK_EQ(f.get_int("t.i8"), -128);
  CHECK_EQ(f.get_int("t.u16"), 65535);
  CHECK_EQ(f.get_int("t.i16"), -32768);
  CHECK_EQ(f.get_int("t.u32"), 0xffffffffll);
  CHECK_EQ(f.get_int("t.i32"), std::numeric_limits<int32_t>::min());
  CHECK(f.get("t.f32").type() == ValueType::Float32);
  CHECK_EQ(f.get_float("t.f32"), static_cast<double>(3.14159274f));
  CHECK(f.get_bool("t.bool_true"));
  CHECK(!f.get_bool("t.bool_false"));
  CHECK(f.get_string("t.string") == std::string("h\xc3\xa9llo\0world", 12));
  CHECK(f.get_string("t.empty_string").empty());
  CHECK(f.get("t.u64").type() == ValueType::UInt64);
  CHECK_EQ(f.get("t.u64").as_uint(), std::numeric_limits<uint64_t>::max());
  CHECK_EQ(f.get_int("t.i64"), std::numeric_limits<int64_t>::min());
  CHECK(f.get("t.f64").type() == ValueType::Float64);
  CHECK_EQ(f.get_float("t.f64"), 2.718281828459045);

  CHECK(f.get_ints("a.u8") == (std::vector<int64_t>{0, 1, 255}));
  CHECK(f.get_ints("a.i8") == (std::vector<int64_t>{-128, 0, 127}));
  CHECK(f.get_ints("a.u16") == (std::vector<int64_t>{0, 65535}));
  CHECK(f.get_ints("a.i16") == (std::vector<int64_t>{-32768, 32767}));
  CHECK(f.get_ints("a.u32") == (std::vector<int64_t>{0, 0xffffffffll}));
  CHECK(f.get_ints("a.i32") == (std::vector<int64_t>{-1, 1, 6}));
  CHECK(f.get_floats("a.f32") == (std::vector<float>{-0.5f, 1e-30f, 1e30f}));
  CHECK(f.get("a.bool").elem_type() == ValueType::Bool);
  CHECK(f.get("a.bool").to_ints() == (std::vector<int64_t>{1, 0, 1}));
  CHECK(f.get_ints("a.u64") == (std::vector<int64_t>{0, 1ll << 40}));
  CHECK(f.get_ints("a.i64") == (std::vector<int64_t>{-(1ll << 40), 7}));
  CHECK(f.get("a.f64").elem_type() == ValueType::Float64);
  CHECK(f.get_floats("a.f64") == (std::vector<float>{static_cast<float>(1e-300), -2.5f}));
  CHECK(f.get_strings("a.string") == (std::vector<std::string>{"<unk>", "", "\xe2\x96\x81the"}));
  CHECK_EQ(f.get("a.empty").size(), uint64_t{0});
  CHECK(f.get("a.empty").elem_type() == ValueType::Int32);
  const Value& nested = f.get("a.nested");
  CHECK(nested.elem_type() == ValueType::Array);
  CHECK_EQ(nested.arrays().size(), size_t{3});
  if (nested.arrays().size() == 3) {
    CHECK(nested.arrays()[0].to_ints() == (std::vector<int64_t>{1, 2}));
    CHECK(nested.arrays()[1].strings() == (std::vector<std::string>{"x"}));
    CHECK(nested.arrays()[2].arrays()[0].to_floats() == (std::vector<float>{0.25f}));
  }
  // Metadata keeps file order.
  CHECK(f.metadata().front().key == "general.architecture");
  CHECK(f.metadata().back().key == "a.nested");

  CHECK_EQ(f.tensors().size(), size_t{5});
  CHECK_EQ(f.alignment(), uint64_t{32});
  CHECK_EQ(f.data_offset() % 32, uint64_t{0});
  for (const auto& t : f.tensors()) {
    CHECK_EQ(t.offset % 32, uint64_t{0});
    CHECK(t.data == f.bytes() + f.data_offset() + t.offset);
  }
  const auto& t32 = f.tensor("f32");
  CHECK(t32.type == TensorType::F32);
  CHECK_EQ(t32.n_dims, 2u);
  CHECK_EQ(t32.ne[0], uint64_t{4});
  CHECK_EQ(t32.ne[1], uint64_t{3});
  CHECK_EQ(t32.ne[2], uint64_t{1});
  CHECK_EQ(t32.n_elements, uint64_t{12});
  CHECK_EQ(t32.n_bytes, uint64_t{48});
  CHECK(std::memcmp(t32.data, s.f32_data.data(), 48) == 0);

  const auto& t16 = f.tensor("f16");
  CHECK(t16.type == TensorType::F16);
  CHECK_EQ(t16.n_bytes, uint64_t{16});
  for (size_t i = 0; i < s.f16_data.size(); ++i) {
    uint16_t h;
    std::memcpy(&h, t16.data + 2 * i, 2);
    CHECK_EQ(h, osd::float_to_half(s.f16_data[i]));
  }
  const auto& tb = f.tensor("bf16");
  CHECK(tb.type == TensorType::BF16);
  CHECK_EQ(tb.n_dims, 4u);
  CHECK_EQ(tb.n_bytes, uint64_t{32});
  for (size_t i = 0; i < s.bf16_data.size(); ++i) {
    uint16_t h;
    std::memcpy(&h, tb.data + 2 * i, 2);
    CHECK_EQ(h, osd::float_to_bf16(s.bf16_data[i]));
  }
  const auto& tq = f.tensor("q8");
  CHECK(tq.type == TensorType::Q8_0);
  CHECK_EQ(tq.n_bytes, uint64_t{136});
  CHECK(std::memcmp(tq.data, s.q8_data.data(), 136) == 0);
  const auto& tk = f.tensor("q4k");
  CHECK(tk.type == TensorType::Q4_K);
  CHECK(std::memcmp(tk.data, s.q4k_data.data(), 144) == 0);
  CHECK(f.find_tensor("missing") == nullptr);
}

// The smallest interesting file: two metadata entries and two tensors, the last one ending
// exactly at the end of the file.
std::vector<uint8_t> tiny_file() {
  static const std::vector<float> a = {1, 2, 3, 4, 5, 6, 7, 8}, b(16, 0.5f);
  Writer w;
  w.set("general.architecture", Value::str("llama"));
  w.set("tokenizer.ggml.tokens", Value::array(std::vector<std::string>{"a", "bc"}));
  w.add_tensor("a", TensorType::F32, {8}, a.data());
  w.add_tensor("b", TensorType::F16, {16}, b.data());  // 32 bytes: ends the file, no padding after it
  return w.to_bytes();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// fp16 / bf16

OSD_TEST(fp16_all_half_patterns_round_trip) {
  int bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = osd::half_to_float(static_cast<uint16_t>(h));
    const uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    const bool neg = h & 0x8000;
    if (exp == 31 && man != 0) {
      // NaN: stays NaN with its sign; comes back quiet with the payload kept.
      uint32_t bits;
      std::memcpy(&bits, &f, 4);
      const bool is_nan = (bits & 0x7fffffffu) > 0x7f800000u;  // not std::isnan: robust to -ffast-math
      if (!is_nan || std::signbit(f) != neg || osd::float_to_half(f) != (h | 0x200)) ++bad;
      continue;
    }
    double want = exp == 31 ? INFINITY : exp == 0 ? std::ldexp(man, -24) : std::ldexp(1024 + man, int(exp) - 25);
    if (neg) want = -want;
    if (static_cast<double>(f) != want || std::signbit(f) != neg) ++bad;
    if (osd::float_to_half(f) != h) ++bad;
  }
  CHECK_EQ(bad, 0);
}

OSD_TEST(fp16_rounding_cases) {
  using osd::float_to_half;
  CHECK_EQ(float_to_half(1.0f), 0x3c00);
  CHECK_EQ(float_to_half(-2.0f), 0xc000);
  CHECK_EQ(float_to_half(0.0f), 0x0000);
  CHECK_EQ(float_to_half(-0.0f), 0x8000);
  CHECK_EQ(float_to_half(65504.0f), 0x7bff);
  CHECK_EQ(float_to_half(65519.99f), 0x7bff);    // just under the halfway point to 65536
  CHECK_EQ(float_to_half(65520.0f), 0x7c00);     // tie, rounds to even: overflow to inf
  CHECK_EQ(float_to_half(1e10f), 0x7c00);
  CHECK_EQ(float_to_half(-INFINITY), 0xfc00);
  CHECK_EQ(float_to_half(1.0f + std::ldexp(1.0f, -11)), 0x3c00);       // tie -> even (down)
  CHECK_EQ(float_to_half(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);   // tie -> even (up)
  CHECK_EQ(float_to_half(1.0f + std::ldexp(1.0f, -11) + std::ldexp(1.0f, -20)), 0x3c01);  // above tie
  CHECK_EQ(float_to_half(std::ldexp(1.0f, -24)), 0x0001);               // smallest subnormal
  CHECK_EQ(float_to_half(std::ldexp(1.0f, -25)), 0x0000);               // tie -> even 0
  CHECK_EQ(float_to_half(std::ldexp(1.0f, -25) * 1.0000001f), 0x0001);  // above tie
  CHECK_EQ(float_to_half(3 * std::ldexp(1.0f, -25)), 0x0002);           // 1.5 ulp tie -> even 2
  CHECK_EQ(float_to_half(std::ldexp(1023.5f, -24)), 0x0400);            // subnormal rounds up to normal
  CHECK_EQ(float_to_half(std::ldexp(1.0f, -14)), 0x0400);               // smallest normal
  CHECK_EQ(float_to_half(1e-40f), 0x0000);                              // float subnormal
  CHECK_EQ(float_to_half(-1e-40f), 0x8000);
  const uint16_t nan = float_to_half(NAN);
  CHECK((nan & 0x7c00) == 0x7c00 && (nan & 0x3ff) != 0);
}

OSD_TEST(fp16_random_floats_round_to_nearest_even) {
  // Reference: exact arithmetic in double, rounding with nearbyint (ties to even).
  auto reference = [](float f) -> double {
    const double a = std::fabs(static_cast<double>(f));
    double r;
    if (a >= 65520.0) {
      r = INFINITY;
    } else {
      int e;
      std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1)
      const int ulp_exp = std::max(e - 1, -14) - 10;
      r = std::nearbyint(std::ldexp(a, -ulp_exp)) * std::ldexp(1.0, ulp_exp);
    }
    return std::signbit(f) ? -r : r;
  };
  std::mt19937 rng(1234);
  int bad = 0, bad_hw = 0;
  for (int i = 0; i < 2000000; ++i) {
    uint32_t bits = rng();
    if (i % 2) bits = (bits & 0x807fffffu) | ((96 + rng() % 48) << 23);  // half the samples near half's range
    float f;
    std::memcpy(&f, &bits, 4);
    if (std::isnan(f)) continue;
    const uint16_t h = osd::float_to_half(f);
    if (static_cast<double>(osd::half_to_float(h)) != reference(f)) ++bad;
#ifdef __FLT16_MAX__
    _Float16 hw = static_cast<_Float16>(f);  // the compiler's own conversion, when it has one
    uint16_t hw_bits;
    std::memcpy(&hw_bits, &hw, 2);
    if (hw_bits != h) ++bad_hw;
#endif
  }
  CHECK_EQ(bad, 0);
  CHECK_EQ(bad_hw, 0);
}

OSD_TEST(bf16_conversions) {
  using osd::bf16_to_float;
  using osd::float_to_bf16;
  int bad = 0;
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = bf16_to_float(static_cast<uint16_t>(b));
    if (std::isnan(f)) {
      if (float_to_bf16(f) != (b | 0x40)) ++bad;
    } else if (float_to_bf16(f) != b) {
      ++bad;
    }
  }
  CHECK_EQ(bad, 0);
  CHECK_EQ(float_to_bf16(1.0f), 0x3f80);
  CHECK_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);      // tie -> even (down)
  CHECK_EQ(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);  // tie -> even (up)
  CHECK_EQ(float_to_bf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)), 0x3f81);
  CHECK_EQ(float_to_bf16(std::numeric_limits<float>::max()), 0x7f80);  // rounds up to inf
  CHECK_EQ(float_to_bf16(-INFINITY), 0xff80);
  CHECK_EQ(float_to_bf16(std::ldexp(1.0f, -130)), 0x0008);  // float subnormal
  float tie;
  const uint32_t tie_bits = 0x00018000;  // halfway between bf16 0x0001 and 0x0002 -> even
  std::memcpy(&tie, &tie_bits, 4);
  CHECK_EQ(float_to_bf16(tie), 0x0002);
  CHECK(std::isnan(bf16_to_float(float_to_bf16(NAN))));
}

// ---------------------------------------------------------------------------------------------
// GGUF

OSD_TEST(gguf_type_table) {
  using osd::gguf::find_type_info;
  struct Row {
    uint32_t id, block, bytes;
  };
  const Row rows[] = {{0, 1, 4},     {1, 1, 2},     {2, 32, 18},   {3, 32, 20},   {6, 32, 22},
                      {7, 32, 24},   {8, 32, 34},   {9, 32, 36},   {10, 256, 84}, {11, 256, 110},
                      {12, 256, 144}, {13, 256, 176}, {14, 256, 210}, {15, 256, 292}, {30, 1, 2}};
  for (const auto& r : rows) {
    const auto* info = find_type_info(r.id);
    CHECK(info != nullptr);
    if (!info) continue;
    CHECK_EQ(info->block_size, r.block);
    CHECK_EQ(info->block_bytes, r.bytes);
  }
  CHECK(find_type_info(4) == nullptr);
  CHECK(find_type_info(1000) == nullptr);
  CHECK(std::string(osd::gguf::type_info(TensorType::Q4_1).name) == "Q4_1");
}

OSD_TEST(gguf_round_trip_every_type_v3_and_v2) {
  Sample s;
  std::vector<uint8_t> bytes = s.w.to_bytes();
  auto f = parse(bytes);
  CHECK_EQ(f->version(), 3u);
  check_sample(*f, s);

  // v2 shares the layout for all of this; only the version field differs.
  std::vector<uint8_t> v2 = bytes;
  v2[4] = 2;
  auto f2 = parse(v2);
  CHECK_EQ(f2->version(), 2u);
  check_sample(*f2, s);

  // Through the filesystem: written atomically, read back memory-mapped.
  TempDir dir;
  s.w.write(dir / "sample.gguf");
  CHECK(read_all(dir / "sample.gguf") == bytes);
  auto fm = File::open(dir / "sample.gguf");
  check_sample(*fm, s);
  CHECK_EQ(reinterpret_cast<uintptr_t>(fm->tensor("q8").data) % 32, uintptr_t{0});
  CHECK(dir.entries() == std::vector<std::string>{"sample.gguf"});
}

OSD_TEST(gguf_custom_alignment) {
  std::vector<float> a(3, 1.0f), b(5, 2.0f);
  Writer w;
  w.set("general.alignment", Value::u32(256));
  w.add_tensor("a", TensorType::F32, {3}, a.data());
  w.add_tensor("b", TensorType::F32, {5}, b.data());
  auto f = parse(w.to_bytes());
  CHECK_EQ(f->alignment(), uint64_t{256});
  CHECK_EQ(f->data_offset() % 256, uint64_t{0});
  CHECK_EQ(f->tensor("b").offset, uint64_t{256});
  CHECK_EQ(f->size() % 256, size_t{0});
}

OSD_TEST(gguf_getters_report_key_and_file) {
  Sample s;
  auto f = File::from_memory(s.w.to_bytes(), "model.gguf");
  CHECK_IO_ERROR(f->get_int("general.architecture"), "model.gguf: metadata key 'general.architecture' is string");
  CHECK_IO_ERROR(f->get_string("t.u32"), "'t.u32' is uint32, expected a string");
  CHECK_IO_ERROR(f->get_bool("t.u8"), "expected a bool");
  CHECK_IO_ERROR(f->get_float("t.string"), "expected a number");
  CHECK_IO_ERROR(f->get_strings("a.i32"), "'a.i32' is array[int32], expected array[string]");
  CHECK_IO_ERROR(f->get_floats("a.string"), "expected a numeric array");
  CHECK_IO_ERROR(f->get_ints("a.f32"), "expected an integer array");
  CHECK_IO_ERROR(f->get_int("t.u64"), "does not fit in int64");
  CHECK_IO_ERROR(f->get_int("nope"), "model.gguf: missing metadata key 'nope'");
  CHECK_IO_ERROR(f->tensor("nope"), "model.gguf: missing tensor 'nope'");
  CHECK_IO_ERROR(f->get_int_or("t.string", 3), "expected an integer");
  CHECK_EQ(f->get_int_or("nope", 7), 7);
  CHECK(f->get_string_or("nope", "x") == "x");
  CHECK_EQ(f->get_float_or("nope", 0.5), 0.5);
  CHECK(f->get_bool_or("nope", true));
  CHECK_EQ(f->get_float("t.u16"), 65535.0);  // integers read as floats
  CHECK_EQ(f->get_floats("a.i32")[2], 6.0f);
  CHECK_THROWS(Error, f->get("t.string").as_int(), "not an integer");
  CHECK_THROWS(Error, f->get("t.i32").strings(), "not array[string]");
}

OSD_TEST(gguf_truncation_at_every_byte) {
  const std::vector<uint8_t> bytes = tiny_file();
  auto full = parse(bytes);
  uint64_t needed = 0;
  for (const auto& t : full->tensors()) needed = std::max(needed, full->data_offset() + t.offset + t.n_bytes);
  CHECK_EQ(needed, uint64_t{bytes.size()});
  int bad = 0;
  for (size_t n = 0; n < bytes.size(); ++n) {
    std::string msg = io_error([&] { parse(std::vector<uint8_t>(bytes.begin(), bytes.begin() + n), "tiny.gguf"); });
    if (msg.rfind("tiny.gguf: ", 0) != 0 || msg.find("truncated") == std::string::npos) {
      if (++bad < 5) std::printf("  prefix %zu: %s\n", n, msg.c_str());
    }
  }
  CHECK_EQ(bad, 0);
  // The same for a file with every value type (cut at each of its bytes up to the data).
  Sample s;
  const std::vector<uint8_t> big = s.w.to_bytes();
  auto big_file = parse(big);
  needed = 0;
  for (const auto& t : big_file->tensors()) needed = std::max(needed, big_file->data_offset() + t.offset + t.n_bytes);
  for (size_t n = 0; n < needed; ++n) {
    std::string msg = io_error([&] { parse(std::vector<uint8_t>(big.begin(), big.begin() + n), "big.gguf"); });
    if (msg.rfind("big.gguf: ", 0) != 0) {
      if (++bad < 5) std::printf("  prefix %zu: %s\n", n, msg.c_str());
    }
  }
  CHECK_EQ(bad, 0);
}

OSD_TEST(gguf_random_byte_flips_never_crash) {
  Sample s;
  const std::vector<uint8_t> bytes = s.w.to_bytes();
  const size_t header_end = static_cast<size_t>(parse(bytes)->data_offset());
  std::mt19937 rng(42);
  int parsed = 0, rejected = 0, other = 0;
  for (int iter = 0; iter < 4000; ++iter) {
    std::vector<uint8_t> b = bytes;
    const int flips = 1 + static_cast<int>(rng() % 4);
    for (int k = 0; k < flips; ++k) {
      // Mostly in the header and tensor infos, where the structure is.
      const size_t limit = (rng() % 8) ? header_end : b.size();
      const size_t pos = rng() % limit;
      switch (rng() % 3) {
        case 0: b[pos] ^= static_cast<uint8_t>(1u << (rng() % 8)); break;
        case 1: b[pos] = static_cast<uint8_t>(rng()); break;
        default: b[pos] = (rng() % 2) ? 0xff : 0x00; break;
      }
    }
    try {
      auto f = parse(b, "flip.gguf");
      touch_everything(*f);
      ++parsed;
    } catch (const Error& e) {
      if (e.kind != ErrorKind::Io || std::strncmp(e.what(), "flip.gguf: ", 11) != 0) ++other;
      ++rejected;
    } catch (...) {
      ++other;
    }
  }
  std::printf("  %d parsed, %d rejected\n", parsed, rejected);
  CHECK_EQ(other, 0);
  CHECK(rejected > 0);
  CHECK(parsed > 0);
}

OSD_TEST(gguf_corrupt_structures_give_clear_errors) {
  // Valid baseline built by hand: one key, one F32 tensor of 8 elements.
  auto base = [](std::vector<uint64_t> dims = {8}, uint32_t type = 0, uint64_t offset = 0) {
    Raw r;
    r.header(1, 1).kv_u32("k", 1).tensor("w", dims, type, offset).pad().zeros(32);
    return r.b;
  };
  CHECK(parse(base())->tensor("w").n_bytes == 32);

  CHECK_IO_ERROR(parse({}, "m.gguf"), "m.gguf: truncated header");
  CHECK_IO_ERROR(parse({'G', 'G', 'M', 'L', 0, 0, 0, 0}, "m.gguf"), "m.gguf: not a GGUF file");
  {
    auto b = base();
    b[4] = 1;
    CHECK_IO_ERROR(parse(b), "unsupported GGUF version 1");
    b[4] = 0;
    b[7] = 3;
    CHECK_IO_ERROR(parse(b), "big-endian");
  }
  // Absurd counts are rejected before anything is allocated.
  CHECK_IO_ERROR(parse(Raw().header(0, 1ull << 60).b), "metadata count 1152921504606846976 does not fit");
  CHECK_IO_ERROR(parse(Raw().header(1ull << 60, 0).b), "tensor count 1152921504606846976 does not fit");
  CHECK_IO_ERROR(parse(Raw().header(0, 1).u64(1ull << 60).zeros(16).b), "truncated key of metadata entry 0");
  CHECK_IO_ERROR(parse(Raw().header(0, 1).str("k").u32(9).u32(0).u64(1ull << 60).zeros(16).b),
                 "truncated array data of metadata key 'k'");
  CHECK_IO_ERROR(parse(Raw().header(0, 1).str("k").u32(9).u32(8).u64(1ull << 60).zeros(16).b),
                 "truncated string array of metadata key 'k'");
  CHECK_IO_ERROR(parse(Raw().header(0, 1).str("k").u32(8).u64(1ull << 62).zeros(16).b),
                 "truncated string value of metadata key 'k'");
  CHECK_IO_ERROR(parse(Raw().header(0, 1).str("k").u32(13).u32(0).b), "unknown value type id 13 for metadata key 'k'");
  CHECK_IO_ERROR(parse(Raw().header(0, 1).str("k").u32(9).u32(77).u64(0).b), "unknown array element type id 77");
  CHECK_IO_ERROR(parse(Raw().header(0, 1).str("k").u32(7).put<uint8_t>(2).b), "bad bool 2");
  CHECK_IO_ERROR(parse(Raw().header(0, 1).str("k").u32(9).u32(7).u64(2).put<uint16_t>(0x0300).b), "bad bool 3");
  CHECK_IO_ERROR(parse(Raw().header(0, 2).kv_u32("k", 1).kv_u32("k", 2).b), "duplicate metadata key 'k'");
  {
    Raw r;
    r.header(0, 1).str("deep");
    r.u32(9);  // an array whose single item is an array whose single item is ...
    for (int i = 0; i < 20; ++i) r.u32(9).u64(1);
    CHECK_IO_ERROR(parse(r.b), "nested deeper than 8");
  }
  CHECK_IO_ERROR(parse(Raw().header(0, 1).str("general.alignment").u32(4).u32(48).b),
                 "general.alignment 48 is not a power of two");
  CHECK_IO_ERROR(parse(Raw().header(0, 1).str("general.alignment").u32(8).str("32").b),
                 "general.alignment is string");

  CHECK_IO_ERROR(parse(base({8, 1, 1, 1, 1})), "tensor 'w' has 5 dimensions (at most 4)");
  CHECK_IO_ERROR(parse(base({8, 0})), "tensor 'w' has a zero dimension (ne[1] = 0)");
  CHECK_IO_ERROR(parse(base({1ull << 40, 1ull << 40})), "tensor 'w' has too many elements");
  CHECK_IO_ERROR(parse(base({8}, 99)), "tensor 'w' has unknown ggml type id 99");
  CHECK_IO_ERROR(parse(base({8}, 4)), "unknown ggml type id 4");
  CHECK_IO_ERROR(parse(base({8}, 2)), "row length 8 is not a multiple of the Q4_0 block size 32");
  CHECK_IO_ERROR(parse(base({8}, 0, 16)), "data offset 16 is not a multiple of the alignment 32");
  CHECK_IO_ERROR(parse(base({9})), "test.gguf: truncated tensor data for 'w' (needs 36 bytes at offset");
  CHECK_IO_ERROR(parse(base({8}, 0, 1ull << 63)), "truncated tensor data for 'w'");
  CHECK_IO_ERROR(parse(base({8}, 0, ~uint64_t{31})), "truncated tensor data for 'w'");
  {
    Raw r;
    r.header(2, 0).tensor("a", {8}, 0, 0).tensor("b", {8}, 0, 0).pad().zeros(64);
    CHECK_IO_ERROR(parse(r.b), "overlaps");
    Raw d;
    d.header(2, 0).tensor("a", {8}, 0, 0).tensor("a", {8}, 0, 32).pad().zeros(64);
    CHECK_IO_ERROR(parse(d.b), "duplicate tensor name 'a'");
    Raw q;  // 64 elements of Q8_0 need 68 bytes; the next tensor at 64 overlaps them
    q.header(2, 0).tensor("a", {64}, 8, 0).tensor("b", {8}, 0, 64).pad().zeros(128);
    CHECK_IO_ERROR(parse(q.b), "tensor data of 'a' (offset 0, 68 bytes) overlaps 'b'");
  }
  // Zero-dimension tensors are scalars (llama.cpp accepts n_dims == 0).
  {
    Raw r;
    r.header(1, 0).tensor("s", {}, 0, 0).pad().zeros(32);
    CHECK_EQ(parse(r.b)->tensor("s").n_elements, uint64_t{1});
  }
  // A tensor-less file may end before its (empty) data section.
  CHECK_EQ(parse(Raw().header(0, 1).kv_u32("k", 5).b)->get_int("k"), 5);
}

OSD_TEST(gguf_mangled_text_file_is_explained) {
  Sample s;
  std::vector<uint8_t> b = s.w.to_bytes();
  // What a UTF-8 decode/encode does to a binary file: invalid bytes become EF BF BD.
  std::vector<uint8_t> mangled;
  for (uint8_t c : b) {
    if (c < 0x80) {
      mangled.push_back(c);
    } else {
      mangled.insert(mangled.end(), {0xef, 0xbf, 0xbd});
    }
  }
  CHECK_IO_ERROR(parse(mangled, "m.gguf"), "mangled by a UTF-8 text conversion");
  // A sound file holds a few U+FFFD (a vocabulary's replacement-character token): damage elsewhere
  // (here its version field) must not be blamed on a text conversion.
  Sample t;
  t.w.set("tokenizer.ggml.tokens", Value::array(std::vector<std::string>{"\xef\xbf\xbd", "a\xef\xbf\xbd", "\xef\xbf\xbd\xef\xbf\xbd"}));
  std::vector<uint8_t> damaged = t.w.to_bytes();
  damaged[4] = 9;  // version 9
  const std::string msg = io_error([&] { parse(damaged, "d.gguf"); });
  CHECK(msg.find("version") != std::string::npos);
  CHECK(msg.find("mangled") == std::string::npos);
}

OSD_TEST(gguf_writer_rejects_bad_arguments) {
  std::vector<float> a(64, 1.0f);
  std::vector<uint8_t> q(68);
  Writer w;
  w.add_tensor("a", TensorType::F32, {64}, a.data());
  CHECK_THROWS(Error, w.add_tensor("a", TensorType::F32, {64}, a.data()), "added twice");
  CHECK_THROWS(Error, w.add_tensor("b", TensorType::F32, {}, a.data()), "1 to 4 dimensions");
  CHECK_THROWS(Error, w.add_tensor("b", TensorType::F32, {1, 1, 1, 1, 1}, a.data()), "1 to 4 dimensions");
  CHECK_THROWS(Error, w.add_tensor("b", TensorType::F32, {4, 0}, a.data()), "zero dimension");
  CHECK_THROWS(Error, w.add_tensor("b", TensorType::Q8_0, {64}, a.data()), "only to F32, F16 or BF16");
  CHECK_THROWS(Error, w.add_tensor("b", TensorType::F16, {64}, nullptr), "null data");
  CHECK_THROWS(Error, w.add_tensor(std::string(64, 'x'), TensorType::F32, {64}, a.data()), "1 to 63 bytes");
  CHECK_THROWS(Error, w.add_tensor_raw("b", TensorType::Q8_0, {64}, q.data(), 67), "67 bytes given");
  CHECK_THROWS(Error, w.add_tensor_raw("b", TensorType::Q8_0, {48}, q.data(), 51), "not a multiple");
  CHECK_THROWS(Error, w.add_tensor_raw("b", static_cast<TensorType>(5), {48}, q.data(), 51), "unknown ggml type id 5");
  CHECK_THROWS(Error, w.set("general.alignment", Value::u64(64)), "must be uint32");
  CHECK_THROWS(Error, w.set("general.alignment", Value::u32(24)), "not a power of two");
  CHECK_THROWS(Error, Value::array_of_arrays({Value::i32(1)}), "not an array");
  w.add_tensor_raw("b", TensorType::Q8_0, {64}, q.data(), 68);
  // set() replaces in place.
  w.set("k", Value::u32(1));
  w.set("k", Value::str("two"));
  auto f = parse(w.to_bytes());
  CHECK_EQ(f->metadata().size(), size_t{1});
  CHECK(f->get_string("k") == "two");
  CHECK_EQ(f->tensors().size(), size_t{2});
}

OSD_TEST(gguf_atomic_write_keeps_old_file_on_failure) {
  TempDir dir;
  const std::string target = dir / "model.gguf";
  std::vector<float> small(8, 1.0f), large(1 << 16, 2.0f);
  Writer old_w;
  old_w.set("v", Value::u32(1));
  old_w.add_tensor("t", TensorType::F32, {8}, small.data());
  old_w.write(target);
  const std::vector<uint8_t> old_bytes = read_all(target);
  CHECK(!old_bytes.empty());

  Writer new_w;
  new_w.set("v", Value::u32(2));
  new_w.add_tensor("t", TensorType::F32, {1 << 16}, large.data());

  // 1. The directory does not exist: nothing can be created.
  CHECK_IO_ERROR(new_w.write(dir / "missing/model.gguf"), "missing/model.gguf: cannot create temporary file");

  // 2. The write itself fails half-way (file size limit): old file intact, temp file removed.
  {
    struct rlimit old_limit;
    ::getrlimit(RLIMIT_FSIZE, &old_limit);
    struct rlimit limit = old_limit;
    limit.rlim_cur = 4096;
    auto old_handler = ::signal(SIGXFSZ, SIG_IGN);  // get EFBIG instead of being killed
    ::setrlimit(RLIMIT_FSIZE, &limit);
    std::string msg = io_error([&] { new_w.write(target); });
    ::setrlimit(RLIMIT_FSIZE, &old_limit);
    ::signal(SIGXFSZ, old_handler);
    CHECK(msg.find(target + ": write failed") != std::string::npos);
    if (msg.find("write failed") == std::string::npos) std::printf("  got: %s\n", msg.c_str());
  }
  CHECK(read_all(target) == old_bytes);
  CHECK(dir.entries() == std::vector<std::string>{"model.gguf"});

  // 3. The target is a directory: refused before anything is written.
  fs::create_directory(dir / "blocker");
  write_all(dir / "blocker/x", {1});
  CHECK_IO_ERROR(new_w.write(dir / "blocker"), "blocker: not a regular file; refusing to replace it");
  CHECK_EQ(dir.entries().size(), size_t{2});

  // 4. Success replaces the file, and keeps its permission bits (a private file stays private).
  fs::permissions(target, fs::perms::owner_read | fs::perms::owner_write);
  new_w.write(target);
  auto f = File::open(target);
  CHECK_EQ(f->get_int("v"), 2);
  CHECK_EQ(f->tensor("t").n_elements, uint64_t{1 << 16});
  CHECK_EQ(dir.entries().size(), size_t{2});
  CHECK((fs::status(target).permissions() & fs::perms::all) == (fs::perms::owner_read | fs::perms::owner_write));

  // 5. A symbolic link is written through: its target changes, the link stays a link.
  fs::create_symlink(target, dir / "alias.gguf");
  old_w.write(dir / "alias.gguf");
  CHECK(fs::is_symlink(dir / "alias.gguf"));
  CHECK(read_all(target) == old_bytes);

  // 6. Not a regular file (a FIFO): refused, nothing replaced.
  CHECK_EQ(::mkfifo((dir / "fifo").c_str(), 0644), 0);
  CHECK_IO_ERROR(new_w.write(dir / "fifo"), "fifo: not a regular file; refusing to replace it");
  CHECK(fs::is_fifo(dir / "fifo"));
}

OSD_TEST(atomic_write_removes_stale_temp_files_of_dead_writers) {
  // A writer killed before its rename leaves "<path>.tmp-<pid>-<16 hex>" (as large as the file);
  // the next write of that path removes those of dead processes untouched for a minute.
  TempDir dir;
  const std::string target = dir / "draft.gguf";
  auto touch = [&](const std::string& name, time_t age) {
    write_all(dir / name, std::vector<uint8_t>(100, 7));
    struct timespec t[2];
    t[0].tv_sec = t[1].tv_sec = std::time(nullptr) - age;
    t[0].tv_nsec = t[1].tv_nsec = 0;
    ::utimensat(AT_FDCWD, (dir / name).c_str(), t, 0);
  };
  const std::string dead = "draft.gguf.tmp-99999999-0123456789abcdef";  // above any pid_max
  const std::string own = "draft.gguf.tmp-" + std::to_string(::getpid()) + "-0123456789abcdef";
  const std::string fresh = "draft.gguf.tmp-99999998-fedcba9876543210";
  const std::string other = "other.gguf.tmp-99999999-0123456789abcdef";
  const std::string odd = "draft.gguf.tmp-99999999-notahexsuffix!!";
  const std::string locked = "draft.gguf.tmp-99999997-00000000deadbeef";  // a live writer elsewhere
  touch(dead, 3600);
  touch(locked, 3600);
  const int lock_fd = ::open((dir / locked).c_str(), O_RDONLY);
  CHECK(lock_fd >= 0 && ::flock(lock_fd, LOCK_EX) == 0);
  touch(own, 3600);
  touch(fresh, 0);
  touch(other, 3600);
  touch(odd, 3600);
  osd::io::write_atomic(target, [](osd::io::Output& out) { out.write("x", 1); });
  CHECK(!std::filesystem::exists(dir / dead));
  for (const std::string& kept : {own, fresh, other, odd, locked}) CHECK(std::filesystem::exists(dir / kept));
  ::close(lock_fd);
}

OSD_TEST(gguf_open_errors_name_the_path) {
  CHECK_IO_ERROR(File::open("/nonexistent/dir/x.gguf"), "/nonexistent/dir/x.gguf: cannot open");
  CHECK_IO_ERROR(File::open("/tmp"), "/tmp: not a regular file");
  TempDir dir;
  write_all(dir / "empty.gguf", {});
  CHECK_IO_ERROR(File::open(dir / "empty.gguf"), "empty.gguf: truncated header");
}

// ---------------------------------------------------------------------------------------------
// Real files from ../shared/models

namespace {

// llama.cpp's vocab files as copied to ../shared may have been through a UTF-8 text
// conversion; such a copy must be rejected with an explanation, never misread.
bool check_vocab_file(const std::string& path, const std::string& model, size_t n_tokens) {
  if (!have(path)) return false;
  std::unique_ptr<File> f;
  std::string msg = io_error([&] { f = File::open(path); });
  if (!f) {
    CHECK(msg.find("mangled by a UTF-8 text conversion") != std::string::npos);
    CHECK(msg.rfind(path + ": ", 0) == 0);
    std::printf("  note: %s is corrupt, rejected as expected: %s\n", path.c_str(), msg.c_str());
    return false;
  }
  CHECK(f->get_string("tokenizer.ggml.model") == model);
  CHECK_EQ(f->get_strings("tokenizer.ggml.tokens").size(), n_tokens);
  CHECK_EQ(f->tensors().size(), size_t{0});
  return true;
}

}  // namespace

OSD_TEST(gguf_real_vocab_llama_spm) {
  const std::string path = kModels + "/vocab/ggml-vocab-llama-spm.gguf";
  if (check_vocab_file(path, "llama", 32000)) {
    auto f = File::open(path);
    CHECK_EQ(f->get_floats("tokenizer.ggml.scores").size(), size_t{32000});
    CHECK_EQ(f->get_ints("tokenizer.ggml.token_type").size(), size_t{32000});
  }
}

OSD_TEST(gguf_real_vocab_gpt2) {
  const std::string path = kModels + "/vocab/ggml-vocab-gpt-2.gguf";
  if (check_vocab_file(path, "gpt2", 50257)) {
    auto f = File::open(path);
    CHECK_EQ(f->get_strings("tokenizer.ggml.merges").size(), size_t{50000});
  }
}

OSD_TEST(gguf_real_smollm2) {
  const std::string path = kModels + "/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (!have(path)) return;
  auto f = File::open(path);
  CHECK_EQ(f->version(), 3u);
  CHECK(f->get_string("general.architecture") == "llama");
  CHECK_EQ(f->get_int("llama.block_count"), 30);
  CHECK_EQ(f->get_int("llama.embedding_length"), 576);
  CHECK_EQ(f->get_int("llama.feed_forward_length"), 1536);
  CHECK_EQ(f->get_int("llama.attention.head_count"), 9);
  CHECK_EQ(f->get_int("llama.attention.head_count_kv"), 3);
  CHECK_EQ(f->get_float("llama.rope.freq_base"), 100000.0);
  CHECK(f->get_string("tokenizer.ggml.model") == "gpt2");
  CHECK(f->get_string("tokenizer.ggml.pre") == "smollm");
  CHECK_EQ(f->get_strings("tokenizer.ggml.tokens").size(), size_t{49152});
  CHECK_EQ(f->get_ints("tokenizer.ggml.token_type").size(), size_t{49152});
  CHECK(!f->get_strings("tokenizer.ggml.merges").empty());

  CHECK_EQ(f->tensors().size(), size_t{2 + 30 * 9});
  CHECK(f->find_tensor("output.weight") == nullptr);  // tied LM head
  const auto& emb = f->tensor("token_embd.weight");
  CHECK(emb.type == TensorType::Q8_0);
  CHECK_EQ(emb.ne[0], uint64_t{576});
  CHECK_EQ(emb.ne[1], uint64_t{49152});
  CHECK(f->tensor("output_norm.weight").type == TensorType::F32);
  int q4_1 = 0, f32 = 0;
  for (const auto& t : f->tensors()) {
    CHECK(t.data >= f->bytes() + f->data_offset());
    CHECK(t.data + t.n_bytes <= f->bytes() + f->size());
    CHECK_EQ(reinterpret_cast<uintptr_t>(t.data) % 32, uintptr_t{0});
    const bool is_norm = t.name.find("norm") != std::string::npos;
    if (is_norm) {
      CHECK(t.type == TensorType::F32);
      CHECK_EQ(t.n_dims, 1u);
      ++f32;
    } else if (t.name != "token_embd.weight") {
      CHECK(t.type == TensorType::Q4_1);
      ++q4_1;
    }
  }
  CHECK_EQ(q4_1, 30 * 7);
  CHECK_EQ(f32, 30 * 2 + 1);
  const auto& q = f->tensor("blk.0.attn_k.weight");
  CHECK_EQ(q.ne[0], uint64_t{576});
  CHECK_EQ(q.ne[1], uint64_t{192});  // 3 KV heads of 64
  const auto& norm = f->tensor("blk.0.attn_norm.weight");
  bool finite = true;
  for (uint64_t i = 0; i < norm.n_elements; ++i) {
    float v;
    std::memcpy(&v, norm.data + 4 * i, 4);
    finite = finite && std::isfinite(v);
  }
  CHECK(finite);
}

// Writing llama.cpp's file back through Writer must reproduce it byte for byte: the strongest
// check that what we write is what llama.cpp expects (and that the reader missed nothing).
OSD_TEST(gguf_rewrite_smollm2_is_byte_identical) {
  const std::string path = kModels + "/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (!have(path)) return;
  auto f = File::open(path);
  Writer w;
  for (const auto& kv : f->metadata()) w.set(kv.key, kv.value);
  for (const auto& t : f->tensors())
    w.add_tensor_raw(t.name, t.type, std::vector<uint64_t>(t.ne, t.ne + t.n_dims), t.data, t.n_bytes);

  // Compares as it goes instead of building a second 98 MB copy.
  struct CompareOutput : osd::io::Output {
    const uint8_t* want;
    size_t size, pos = 0, first_diff = SIZE_MAX;
    void write(const void* data, size_t n) override {
      for (size_t i = 0; i < n && first_diff == SIZE_MAX; ++i)
        if (pos + i >= size || static_cast<const uint8_t*>(data)[i] != want[pos + i]) first_diff = pos + i;
      pos += n;
    }
  } out;
  out.want = f->bytes();
  out.size = f->size();
  w.write_to(out);
  CHECK_EQ(out.pos, f->size());
  CHECK_EQ(out.first_diff, SIZE_MAX);
}

// ---------------------------------------------------------------------------------------------
// llama2.c

namespace {

std::vector<uint8_t> make_checkpoint(int32_t dim, int32_t hidden, int32_t layers, int32_t heads, int32_t kv_heads,
                                     int32_t vocab, int32_t seq_len) {
  Raw r;
  for (int32_t v : {dim, hidden, layers, heads, kv_heads, vocab, seq_len}) r.put(v);
  osd::llama2c::Config c;
  c.dim = dim;
  c.hidden_dim = hidden;
  c.n_layers = layers;
  c.n_heads = heads;
  c.n_kv_heads = kv_heads;
  c.vocab_size = vocab < 0 ? -vocab : vocab;
  c.seq_len = seq_len;
  c.shared_classifier = vocab > 0;
  const uint64_t floats = (osd::llama2c::checkpoint_bytes(c) - 28) / 4;
  for (uint64_t i = 0; i < floats; ++i) r.put(static_cast<float>(i));  // each float holds its index
  return r.b;
}

}  // namespace

OSD_TEST(llama2c_stories260k) {
  const std::string path = kModels + "/stories260K.bin";
  if (!have(path)) return;
  auto ck = osd::llama2c::Checkpoint::open(path);
  const auto& c = ck->config();
  CHECK_EQ(c.dim, 64);
  CHECK_EQ(c.hidden_dim, 172);
  CHECK_EQ(c.n_layers, 5);
  CHECK_EQ(c.n_heads, 8);
  CHECK_EQ(c.n_kv_heads, 4);
  CHECK_EQ(c.vocab_size, 512);
  CHECK_EQ(c.seq_len, 512);
  CHECK(c.shared_classifier);
  CHECK_EQ(c.head_size(), 8);
  CHECK_EQ(c.kv_dim(), 32);
  CHECK_EQ(osd::llama2c::checkpoint_bytes(c), uint64_t{1056540});
  const auto& w = ck->weights();
  CHECK(w.wcls == w.token_embedding);
  CHECK(w.wk - w.wq == 5 * 64 * 64);
  CHECK(w.w1 - w.rms_ffn == 5 * 64);
  CHECK(w.rms_final - w.w3 == 5 * 172 * 64);
  bool finite = true;
  for (int i = 0; i < 64; ++i) finite = finite && std::isfinite(w.rms_final[i]) && w.rms_final[i] != 0.0f;
  CHECK(finite);

  // A truncated copy and an over-long copy fail with the file named.
  TempDir dir;
  std::vector<uint8_t> bytes = read_all(path);
  write_all(dir / "short.bin", std::vector<uint8_t>(bytes.begin(), bytes.end() - 4));
  CHECK_IO_ERROR(osd::llama2c::Checkpoint::open(dir / "short.bin"),
                 dir / "short.bin" + ": truncated llama2.c checkpoint");
  CHECK_IO_ERROR(osd::llama2c::Checkpoint::open(dir / "short.bin"), "needs 1056540 bytes, file has 1056536");
  bytes.push_back(0);
  write_all(dir / "long.bin", bytes);
  CHECK_IO_ERROR(osd::llama2c::Checkpoint::open(dir / "long.bin"), "long.bin: llama2.c checkpoint has 1 unexpected");
}

OSD_TEST(llama2c_layout_shared_and_unshared) {
  using osd::llama2c::Checkpoint;
  // dim 8, hidden 12, 2 layers, 4 heads (head 2), 2 kv heads (kv_dim 4), vocab 10, seq 6.
  for (int32_t vocab : {10, -10}) {
    auto ck = Checkpoint::from_memory(make_checkpoint(8, 12, 2, 4, 2, vocab, 6), "x.bin");
    const auto& w = ck->weights();
    CHECK_EQ(ck->config().vocab_size, 10);
    CHECK_EQ(ck->config().shared_classifier, vocab > 0);
    CHECK_EQ(w.token_embedding[0], 0.0f);
    CHECK_EQ(w.rms_att[0], 80.0f);
    CHECK_EQ(w.wq[0], 80.0f + 16);
    CHECK_EQ(w.wk[0], 96.0f + 128);
    CHECK_EQ(w.wv[0], 224.0f + 64);
    CHECK_EQ(w.wo[0], 288.0f + 64);
    CHECK_EQ(w.rms_ffn[0], 352.0f + 128);
    CHECK_EQ(w.w1[0], 480.0f + 16);
    CHECK_EQ(w.w2[0], 496.0f + 192);
    CHECK_EQ(w.w3[0], 688.0f + 192);
    CHECK_EQ(w.rms_final[0], 880.0f + 192);
    // freq_cis: 2 * 6 * 2 / 2 = 12 floats after rms_final (8)
    if (vocab > 0) {
      CHECK(w.wcls == w.token_embedding);
    } else {
      CHECK_EQ(w.wcls[0], 1072.0f + 8 + 12);
    }
  }
}

OSD_TEST(llama2c_bad_headers) {
  using osd::llama2c::Checkpoint;
  auto header_only = [](std::vector<int32_t> h) {
    Raw r;
    for (int32_t v : h) r.put(v);
    return r.b;
  };
  CHECK_IO_ERROR(Checkpoint::from_memory({1, 2, 3}, "h.bin"), "h.bin: truncated llama2.c header");
  CHECK_IO_ERROR(Checkpoint::from_memory(header_only({0, 1, 1, 1, 1, 1, 1}), "h.bin"), "every field must be positive");
  CHECK_IO_ERROR(Checkpoint::from_memory(header_only({8, 1, 1, 3, 1, 1, 1}), "h.bin"),
                 "dim is not a multiple of n_heads");
  CHECK_IO_ERROR(Checkpoint::from_memory(header_only({8, 1, 1, 4, 3, 1, 1}), "h.bin"), "multiple of n_kv_heads");
  CHECK_IO_ERROR(Checkpoint::from_memory(header_only({8, 1, 1, 2, 4, 1, 1}), "h.bin"), "multiple of n_kv_heads");
  CHECK_IO_ERROR(Checkpoint::from_memory(header_only({8, 1, 1, 2, 2, std::numeric_limits<int32_t>::min(), 1}), "h.bin"),
                 "every field must be positive");
  const int32_t big = std::numeric_limits<int32_t>::max();
  CHECK_IO_ERROR(Checkpoint::from_memory(header_only({big, big, big, 1, 1, big, big}), "h.bin"), "h.bin: ");
  CHECK_IO_ERROR(Checkpoint::from_memory(header_only({0x616b3432, 2, 0, 0, 0, 0, 0}), "h.bin"),
                 "export version 2 is not supported");
  // Truncation at every byte of a small checkpoint.
  const std::vector<uint8_t> good = make_checkpoint(8, 12, 2, 4, 2, -10, 6);
  int bad = 0;
  for (size_t n = 0; n < good.size(); ++n) {
    std::string msg =
        io_error([&] { Checkpoint::from_memory(std::vector<uint8_t>(good.begin(), good.begin() + n), "c.bin"); });
    if (msg.rfind("c.bin: truncated", 0) != 0) ++bad;
  }
  CHECK_EQ(bad, 0);
}

OSD_TEST(llama2c_tokenizer) {
  using osd::llama2c::parse_tokenizer;
  using osd::llama2c::read_tokenizer;
  Raw r;
  r.put<int32_t>(5);
  const std::vector<std::pair<float, std::string>> toks = {{0.0f, "<unk>"}, {-1.5f, "a"}, {-2.0f, " bc"}, {0.0f, ""}};
  for (const auto& [score, s] : toks) {
    r.put(score).put<int32_t>(static_cast<int32_t>(s.size()));
    r.b.insert(r.b.end(), s.begin(), s.end());
  }
  TempDir dir;
  write_all(dir / "tokenizer.bin", r.b);
  auto t = read_tokenizer(dir / "tokenizer.bin", 4);
  CHECK_EQ(t.max_token_length, 5);
  CHECK_EQ(t.tokens.size(), size_t{4});
  CHECK(t.tokens[2] == " bc");
  CHECK(t.tokens[3].empty());
  CHECK_EQ(t.scores[1], -1.5f);
  CHECK_EQ(read_tokenizer(dir / "tokenizer.bin", 0).tokens.size(), size_t{4});  // 0: until the end
  CHECK_IO_ERROR(read_tokenizer(dir / "tokenizer.bin", 5), "tokenizer.bin: truncated token 4");
  CHECK_IO_ERROR(read_tokenizer(dir / "tokenizer.bin", 3), "tokenizer.bin: 8 unexpected trailing bytes after 3 tokens");
  CHECK_IO_ERROR(read_tokenizer(dir / "tokenizer.bin", 1 << 30), "truncated tokenizer");
  CHECK_IO_ERROR(read_tokenizer(dir / "none.bin", 4), "none.bin: cannot open");
  std::vector<uint8_t> bad_len = r.b;
  bad_len[8] = 6;  // token 0 claims 6 bytes, more than max_token_length
  CHECK_IO_ERROR(parse_tokenizer(bad_len.data(), bad_len.size(), "t.bin", 4), "t.bin: token 0 has length 6");
  int bad = 0;
  for (size_t n = 0; n < r.b.size(); ++n)
    if (io_error([&] { parse_tokenizer(r.b.data(), n, "t.bin", 4); }).rfind("t.bin: truncated", 0) != 0) ++bad;
  CHECK_EQ(bad, 0);
}

OSD_TEST_MAIN()
