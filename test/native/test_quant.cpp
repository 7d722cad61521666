// Native tests of the quantised formats and their matrix kernels:
//  - dequantisation of every format against ../shared/models/quant-vectors, bit for bit;
//  - quantisation F32 -> F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 against the vectors, byte for byte;
//  - the AVX2 and AVX-512 (VNNI) matrix kernels against the portable reference: tolerance 0
//    (bit-identical), because all run the same float operations in the same order on the same
//    exact integer sums. Each comparison prints "skip" where the CPU lacks the instruction set;
//  - the 16-row packed layout those kernels read, byte for byte;
//  - batch invariance (a token alone or inside batches of 3, 8, 13, 70 tokens) and thread-count
//    invariance, bit for bit, for every instruction set the CPU has;
//  - accuracy: each output against the exact (double) dot product of the dequantised weights with
//    the quantised-then-dequantised activations, within the float rounding bound of the
//    accumulation (see kernel_accuracy);
//  - errors: unsupported types and partial blocks are named;
//  - the register-blocked F32 / F16 / BF16 kernels against matmul_reference, bit for bit, on odd
//    shapes, thread counts and batch sizes.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include "check.h"
#include "core/error.h"
#include "core/fp16.h"
#include "core/thread_pool.h"
#include "io/gguf.h"
#include "model/quant.h"
#include "model/quant_formats.h"
#include "model/tensor_ops.h"

using namespace osd;
using gguf::TensorType;

namespace {

const std::string kVectors = "../shared/models/quant-vectors/";

bool read_file(const std::string& path, std::vector<uint8_t>& out) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return false;
  out.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
  return true;
}

struct Entry {
  std::string kind, type, input, expected;
  int64_t count = 0;  // blocks (dequantize) or values (quantize)
};

std::string json_string(const std::string& obj, const std::string& key) {
  const size_t k = obj.find("\"" + key + "\"");
  if (k == std::string::npos) return "";
  const size_t a = obj.find('"', obj.find(':', k) + 1);
  const size_t b = obj.find('"', a + 1);
  return obj.substr(a + 1, b - a - 1);
}

int64_t json_int(const std::string& obj, const std::string& key) {
  const size_t k = obj.find("\"" + key + "\"");
  if (k == std::string::npos) return -1;
  return std::stoll(obj.substr(obj.find(':', k) + 1));
}

// vectors.json: {"generator": ..., "entries": [{...}, ...]} with flat entries.
std::vector<Entry> read_entries() {
  std::vector<uint8_t> bytes;
  std::vector<Entry> out;
  if (!read_file(kVectors + "vectors.json", bytes)) return out;
  const std::string s(bytes.begin(), bytes.end());
  size_t p = s.find("\"entries\"");
  while ((p = s.find('{', p)) != std::string::npos) {
    const size_t e = s.find('}', p);
    const std::string obj = s.substr(p, e - p + 1);
    Entry en;
    en.kind = json_string(obj, "kind");
    en.type = json_string(obj, "type");
    en.input = json_string(obj, "input");
    en.expected = en.kind == "dequantize" ? json_string(obj, "expected_f32") : json_string(obj, "expected_bytes");
    en.count = en.kind == "dequantize" ? json_int(obj, "blocks") : json_int(obj, "values");
    out.push_back(en);
    p = e;
  }
  return out;
}

TensorType type_named(const std::string& name) {
  for (uint32_t id = 0; id < 64; ++id)
    if (const gguf::TypeInfo* ti = gguf::find_type_info(id))
      if (name == ti->name) return static_cast<TensorType>(id);
  throw std::runtime_error("unknown type " + name);
}

bool have_vectors() {
  std::vector<uint8_t> b;
  if (read_file(kVectors + "vectors.json", b)) return true;
  std::printf("skip: %svectors.json not found (../shared is absent)\n", kVectors.c_str());
  return false;
}

const TensorType kInt8Types[] = {TensorType::Q4_0, TensorType::Q4_1, TensorType::Q5_0, TensorType::Q5_1,
                                 TensorType::Q8_0, TensorType::IQ4_NL, TensorType::Q2_K, TensorType::Q3_K,
                                 TensorType::Q4_K, TensorType::Q5_K, TensorType::Q6_K, TensorType::IQ4_XS};

bool is_k(TensorType t) { return gguf::type_info(t).block_size == 256; }

// Random weights of type t: rows x cols. Half the rows are quantised from Gaussian floats (where a
// quantiser exists), the others are random bytes with finite, moderate fp16 scales.
std::vector<uint8_t> random_weights(TensorType t, int64_t rows, int64_t cols, std::mt19937& rng) {
  const size_t rb = quant::bytes_for(t, cols);
  std::vector<uint8_t> w(rb * rows);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> scale(0.002f, 0.05f);
  const gguf::TypeInfo& ti = gguf::type_info(t);
  for (int64_t r = 0; r < rows; ++r) {
    uint8_t* row = w.data() + r * rb;
    if (quant::can_quantize(t) && r % 2 == 0) {
      std::vector<float> x(cols);
      for (auto& v : x) v = g(rng) * 0.1f;
      quant::quantize(t, x.data(), cols, row);
      continue;
    }
    for (size_t i = 0; i < rb; ++i) row[i] = static_cast<uint8_t>(byte(rng));
    // Overwrite the fp16 scales with sane values.
    for (int64_t b = 0; b < cols / ti.block_size; ++b) {
      uint8_t* blk = row + b * ti.block_bytes;
      auto put = [&](size_t off, float v) {
        const uint16_t h = float_to_half(v);
        std::memcpy(blk + off, &h, 2);
      };
      const float sgn = byte(rng) & 1 ? 1.0f : -1.0f;
      switch (t) {
        case TensorType::Q4_0: case TensorType::Q5_0: case TensorType::Q8_0: put(0, sgn * scale(rng)); break;
        case TensorType::Q4_1: case TensorType::Q5_1: put(0, scale(rng)); put(2, -8 * scale(rng)); break;
        case TensorType::Q3_K: put(108, sgn * scale(rng) * 0.1f); break;
        case TensorType::Q2_K: put(80, scale(rng) * 0.1f); put(82, scale(rng) * 0.1f); break;
        case TensorType::IQ4_NL: put(0, sgn * scale(rng) * 0.1f); break;
        case TensorType::IQ4_XS: put(0, sgn * scale(rng) * 0.01f); break;
        case TensorType::Q4_K: case TensorType::Q5_K: put(0, scale(rng) * 0.1f); put(2, scale(rng) * 0.1f); break;
        case TensorType::Q6_K: put(208, sgn * scale(rng) * 0.01f); break;
        default: break;
      }
    }
  }
  return w;
}

std::vector<float> random_acts(int64_t n, int64_t cols, std::mt19937& rng) {
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> x(n * cols);
  for (auto& v : x) v = g(rng);
  // Outliers (as real activations have), and an all-zero block.
  for (int64_t i = 0; i < n; ++i) x[i * cols + (i * 7) % cols] *= 30.0f;
  if (cols >= 64) for (int j = 32; j < 64; ++j) x[j] = 0.0f;
  return x;
}

Matrix make_matrix(TensorType t, const std::vector<uint8_t>& w, int64_t rows, int64_t cols) {
  Matrix m;
  m.type = t;
  m.rows = rows;
  m.cols = cols;
  m.data = w.data();
  m.row_bytes = quant::bytes_for(t, cols);
  return m;
}

std::vector<float> run(const Matrix& m, const std::vector<float>& x, int64_t n, KernelIsa isa) {
  std::vector<float> y(n * m.rows);
  matmul(m, x.data(), n, y.data(), isa);
  return y;
}

bool bits_equal(const float* a, const float* b, size_t n, size_t* where = nullptr) {
  for (size_t i = 0; i < n; ++i)
    if (std::memcmp(a + i, b + i, sizeof(float)) != 0) {
      if (where) *where = i;
      return false;
    }
  return true;
}

// The quantised kernels of one instruction set, called directly: KernelIsa has no AVX-512 member
// (Auto picks it where the CPU has it), so the AVX-512 path is tested through quant::matmul.
std::vector<float> run_q(const Matrix& m, const std::vector<float>& x, int64_t n, quant::Isa isa) {
  std::vector<float> y(n * m.rows);
  quant::matmul(m.type, m.data, m.row_bytes, m.rows, m.cols, x.data(), n, y.data(), isa);
  return y;
}

// The AVX2 and AVX-512 products (where the CPU has them) against the portable reference, bit for
// bit; prints the first difference of each.
bool vector_kernels_match(const Matrix& m, const std::vector<float>& x, int64_t n, const char* what) {
  const auto ref = run_q(m, x, n, quant::Isa::Portable);
  bool all = true;
  for (quant::Isa isa : {quant::Isa::Avx2, quant::Isa::Avx512}) {
    if (!quant::isa_available(isa)) continue;
    const auto y = run_q(m, x, n, isa);
    size_t where = 0;
    if (!bits_equal(ref.data(), y.data(), ref.size(), &where)) {
      std::printf("  %s (%s): output %zu is %.9g vs %.9g\n", what, quant::isa_name(isa), where, y[where], ref[where]);
      all = false;
    }
  }
  return all;
}

// The vector kernels on weights packed once (as Model does) against the portable reference on the
// file's rows, bit for bit, at each token count.
bool packed_kernels_match(TensorType t, const std::vector<uint8_t>& w, int64_t rows, int64_t cols, const uint8_t* packed,
                          std::initializer_list<int64_t> ns, std::mt19937& rng) {
  const Matrix m = make_matrix(t, w, rows, cols);
  bool all = true;
  for (int64_t n : ns) {
    const auto x = random_acts(n, cols, rng);
    const auto ref = run_q(m, x, n, quant::Isa::Portable);
    for (quant::Isa isa : {quant::Isa::Avx2, quant::Isa::Avx512}) {
      if (!quant::isa_available(isa)) continue;
      std::vector<float> y(n * rows);
      quant::matmul(t, w.data(), m.row_bytes, rows, cols, x.data(), n, y.data(), isa, packed);
      all &= bits_equal(ref.data(), y.data(), ref.size());
    }
  }
  return all;
}

bool have_avx512() {
  static const bool yes = [] {
    const bool a = quant::isa_available(quant::Isa::Avx512);
    std::printf("note: AVX-512 (F, BW, VL, VNNI) %s; best_isa() = %s\n", a ? "present" : "absent",
                quant::isa_name(quant::best_isa()));
    return a;
  }();
  return yes;
}

std::vector<KernelIsa> isas() {
  std::vector<KernelIsa> v = {KernelIsa::Portable};
  if (kernel_isa_available(KernelIsa::Avx2)) v.push_back(KernelIsa::Avx2);
  else std::printf("note: no AVX2 on this CPU; only the portable kernels are tested\n");
  return v;
}

}  // namespace

OSD_TEST(dequantize_matches_vectors) {
  if (!have_vectors()) return;
  int checked = 0;
  for (const Entry& e : read_entries()) {
    if (e.kind != "dequantize") continue;
    const TensorType t = type_named(e.type);
    std::vector<uint8_t> in, expected;
    CHECK(read_file(kVectors + e.input, in));
    CHECK(read_file(kVectors + e.expected, expected));
    const int64_t n = e.count * gguf::type_info(t).block_size;
    CHECK_EQ(in.size(), quant::bytes_for(t, n));
    CHECK_EQ(expected.size(), static_cast<size_t>(n) * 4);
    std::vector<float> out(n);
    quant::dequantize(t, in.data(), n, out.data());
    size_t where = 0;
    const bool same = bits_equal(out.data(), reinterpret_cast<const float*>(expected.data()), n, &where);
    if (!same) {
      float want;
      std::memcpy(&want, expected.data() + where * 4, 4);
      std::printf("  %s: value %zu is %.9g, expected %.9g\n", e.type.c_str(), where, out[where], want);
    }
    CHECK(same);
    ++checked;
  }
  CHECK_EQ(checked, 11);
}

OSD_TEST(quantize_matches_vectors) {
  if (!have_vectors()) return;
  int checked = 0;
  for (const Entry& e : read_entries()) {
    if (e.kind != "quantize") continue;
    const TensorType t = type_named(e.type);
    std::vector<uint8_t> src, expected;
    CHECK(read_file(kVectors + e.input, src));
    CHECK(read_file(kVectors + e.expected, expected));
    CHECK_EQ(src.size(), static_cast<size_t>(e.count) * 4);
    std::vector<uint8_t> out(quant::bytes_for(t, e.count));
    CHECK_EQ(out.size(), expected.size());
    quant::quantize(t, reinterpret_cast<const float*>(src.data()), e.count, out.data());
    size_t diff = 0, first = out.size();
    for (size_t i = 0; i < out.size(); ++i)
      if (out[i] != expected[i]) {
        ++diff;
        if (first == out.size()) first = i;
      }
    if (diff) std::printf("  %s: %zu bytes differ, first at %zu\n", e.type.c_str(), diff, first);
    CHECK_EQ(diff, 0u);
    ++checked;
  }
  CHECK_EQ(checked, 7);
}

OSD_TEST(quantize_round_trip_error_is_within_half_a_step) {
  std::mt19937 rng(7);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> x(32 * 64);
  for (auto& v : x) v = g(rng);
  for (TensorType t : {TensorType::Q4_0, TensorType::Q4_1, TensorType::Q5_0, TensorType::Q5_1, TensorType::Q8_0}) {
    std::vector<uint8_t> q(quant::bytes_for(t, x.size()));
    quant::quantize(t, x.data(), x.size(), q.data());
    std::vector<float> back(x.size());
    quant::dequantize(t, q.data(), x.size(), back.data());
    const int levels = t == TensorType::Q4_0 ? 16 : t == TensorType::Q4_1 ? 15 : t == TensorType::Q5_0 ? 32
                       : t == TensorType::Q5_1 ? 31 : 254;
    for (size_t b = 0; b < x.size() / 32; ++b) {
      float lo = x[b * 32], hi = x[b * 32];
      for (int j = 0; j < 32; ++j) lo = std::min(lo, x[b * 32 + j]), hi = std::max(hi, x[b * 32 + j]);
      const float range = std::max(hi - lo, 2 * std::max(std::fabs(lo), std::fabs(hi)));
      // One quantisation step (the fp16 scale adds a relative 2^-11) bounds the error.
      for (int j = 0; j < 32; ++j) CHECK(std::fabs(back[b * 32 + j] - x[b * 32 + j]) <= range / levels * 1.01f);
    }
  }
}

// Q2_K, IQ4_NL and IQ4_XS have no vectors from gguf-py in ../shared: their dequantisers are checked
// against ggml's loops (dequantize_row_q2_K, _iq4_nl, _iq4_xs) transcribed here as they are written
// there, on random bytes with finite scales; and quantising then dequantising lands within a step.
OSD_TEST(q2_k_and_iq4_dequantise_as_ggml_does) {
  static const int8_t kv[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
  std::mt19937 rng(12);
  for (TensorType t : {TensorType::Q2_K, TensorType::IQ4_NL, TensorType::IQ4_XS}) {
    const int64_t n = 1024;
    const std::vector<uint8_t> w = random_weights(t, 2, n, rng);  // row 1: random bytes (row 0 is quantised)
    const uint8_t* row = w.data() + quant::bytes_for(t, n);
    std::vector<float> got(n), want(n);
    quant::dequantize(t, row, n, got.data());
    float* y = want.data();
    auto h2f = [](const uint8_t* p) {
      uint16_t h;
      std::memcpy(&h, p, 2);
      return half_to_float(h);
    };
    if (t == TensorType::Q2_K) {
      for (int64_t i = 0; i < n / 256; ++i) {
        const uint8_t* x = row + i * 84;
        const float d = h2f(x + 80), min = h2f(x + 82);
        const uint8_t* q = x + 16;
        int is = 0;
        for (int k = 0; k < 256; k += 128) {
          int shift = 0;
          for (int j = 0; j < 4; ++j) {
            uint8_t sc = x[is++];
            float dl = d * (sc & 0xF), ml = min * (sc >> 4);
            for (int l = 0; l < 16; ++l) *y++ = dl * ((int8_t)((q[l] >> shift) & 3)) - ml;
            sc = x[is++];
            dl = d * (sc & 0xF), ml = min * (sc >> 4);
            for (int l = 0; l < 16; ++l) *y++ = dl * ((int8_t)((q[l + 16] >> shift) & 3)) - ml;
            shift += 2;
          }
          q += 32;
        }
      }
    } else if (t == TensorType::IQ4_NL) {
      for (int64_t i = 0; i < n / 32; ++i) {
        const uint8_t* x = row + i * 18;
        const float d = h2f(x);
        for (int j = 0; j < 16; ++j) {
          y[j] = d * kv[x[2 + j] & 0xf];
          y[j + 16] = d * kv[x[2 + j] >> 4];
        }
        y += 32;
      }
    } else {
      for (int64_t i = 0; i < n / 256; ++i) {
        const uint8_t* x = row + i * 136;
        const float d = h2f(x);
        uint16_t scales_h;
        std::memcpy(&scales_h, x + 2, 2);
        const uint8_t* qs = x + 8;
        for (int ib = 0; ib < 8; ++ib) {
          const int ls = ((x[4 + ib / 2] >> 4 * (ib % 2)) & 0xf) | (((scales_h >> 2 * ib) & 3) << 4);
          const float dl = d * (ls - 32);
          for (int j = 0; j < 16; ++j) {
            y[j + 0] = dl * kv[qs[j] & 0xf];
            y[j + 16] = dl * kv[qs[j] >> 4];
          }
          y += 32;
          qs += 16;
        }
      }
    }
    size_t where = 0;
    const bool same = bits_equal(got.data(), want.data(), n, &where);
    if (!same) std::printf("  %s: value %zu is %.9g, ggml's loop gives %.9g\n", gguf::type_info(t).name, where, got[where], want[where]);
    CHECK(same);
    // Round trip of Gaussian values: every value goes to the nearest point of its block's grid (the
    // scales as stored), and the rms error is that of a 2- or 4-bit format.
    std::normal_distribution<float> g(0.0f, 1.0f);
    std::vector<float> x(n), back(n);
    for (auto& v : x) v = g(rng);
    x[5] = 9.0f;  // an outlier sets its super-block's scale
    std::vector<uint8_t> q(quant::bytes_for(t, n));
    quant::quantize(t, x.data(), n, q.data());
    quant::dequantize(t, q.data(), n, back.data());
    double se = 0, sx = 0;
    for (int64_t j = 0; j < n; ++j) se += double(back[j] - x[j]) * (back[j] - x[j]), sx += double(x[j]) * x[j];
    const double rel = std::sqrt(se / sx);
    std::printf("  %s: rms round-trip error %.3f of the rms value\n", gguf::type_info(t).name, rel);
    CHECK(rel < (t == TensorType::Q2_K ? 0.45 : 0.12));
    int worse = 0;
    for (int64_t j = 0; j < n; ++j) {
      // The grid of value j: dequantise its block with every code in its slot.
      const size_t bb = gguf::type_info(t).block_bytes, bs = gguf::type_info(t).block_size;
      std::vector<uint8_t> blk(q.begin() + (j / bs) * bb, q.begin() + (j / bs + 1) * bb);
      const int64_t i = j % bs;
      uint8_t* byte;
      int shift, bits;
      if (t == TensorType::Q2_K) byte = &blk[16 + 32 * (i / 128) + i % 32], shift = 2 * ((i % 128) / 32), bits = 2;
      else if (t == TensorType::IQ4_NL) byte = &blk[2 + i % 16], shift = i % 32 < 16 ? 0 : 4, bits = 4;
      else byte = &blk[8 + 16 * (i / 32) + i % 16], shift = i % 32 < 16 ? 0 : 4, bits = 4;
      std::vector<float> vals(bs);
      for (int code = 0; code < (1 << bits); ++code) {
        *byte = static_cast<uint8_t>((*byte & ~(((1 << bits) - 1) << shift)) | (code << shift));
        quant::dequantize(t, blk.data(), bs, vals.data());
        if (std::fabs(vals[i] - x[j]) < std::fabs(back[j] - x[j])) ++worse;
      }
    }
    CHECK_EQ(worse, 0);
  }
}

OSD_TEST(avx2_kernels_equal_the_portable_reference_bit_for_bit) {
  if (!kernel_isa_available(KernelIsa::Avx2)) {
    std::printf("skip: no AVX2 on this CPU\n");
    return;
  }
  std::mt19937 rng(1);
  for (TensorType t : kInt8Types) {
    for (int64_t cols : {is_k(t) ? int64_t(256) : int64_t(32), is_k(t) ? int64_t(768) : int64_t(576)}) {
      for (int64_t rows : {1, 5, 15, 16, 17, 37}) {  // 16-row groups, in halves of 8: short ones too
        const auto w = random_weights(t, rows, cols, rng);
        const Matrix m = make_matrix(t, w, rows, cols);
        for (int64_t n : {1, 2, 3, 4, 5, 8, 13, 70}) {  // up to 4 tokens per kernel call
          const auto x = random_acts(n, cols, rng);
          const auto a = run(m, x, n, KernelIsa::Portable), b = run(m, x, n, KernelIsa::Avx2);
          size_t where = 0;
          const bool same = bits_equal(a.data(), b.data(), a.size(), &where);
          if (!same)
            std::printf("  %s rows %lld cols %lld n %lld: output %zu is %.9g (portable) vs %.9g (avx2)\n",
                        gguf::type_info(t).name, (long long)rows, (long long)cols, (long long)n, where, a[where], b[where]);
          CHECK(same);
        }
      }
    }
  }
}

OSD_TEST(avx512_kernels_equal_the_portable_reference_bit_for_bit) {
  if (!have_avx512()) {
    std::printf("skip: no AVX-512 (F, BW, VL, VNNI) on this CPU; the AVX-512 kernels are not compared\n");
    std::vector<float> x(32, 1.0f), y(1);
    std::vector<uint8_t> w(quant::bytes_for(TensorType::Q8_0, 32));
    CHECK_THROWS(Error, quant::matmul(TensorType::Q8_0, w.data(), w.size(), 1, 32, x.data(), 1, y.data(), quant::Isa::Avx512),
                 "instruction set avx512 is not available on this CPU");
    return;
  }
  std::mt19937 rng(1);
  int checked = 0;
  for (TensorType t : kInt8Types) {
    for (int64_t cols : {is_k(t) ? int64_t(256) : int64_t(32), is_k(t) ? int64_t(768) : int64_t(576)}) {
      for (int64_t rows : {1, 5, 15, 16, 17, 37, 64}) {  // 16-row groups: all but 16 and 64 end in a short one
        const auto w = random_weights(t, rows, cols, rng);
        const Matrix m = make_matrix(t, w, rows, cols);
        // Up to eight tokens per kernel call: 13 is 8 + 5; 68 and 70 are two chunks of matmul_many (64 + 4, 64 + 6).
        for (int64_t n : {1, 2, 3, 4, 8, 13, 68, 70}) {
          const auto x = random_acts(n, cols, rng);
          const auto a = run_q(m, x, n, quant::Isa::Portable), b = run_q(m, x, n, quant::Isa::Avx512);
          size_t where = 0;
          const bool same = bits_equal(a.data(), b.data(), a.size(), &where);
          if (!same)
            std::printf("  %s rows %lld cols %lld n %lld: output %zu is %.9g (portable) vs %.9g (avx512)\n",
                        gguf::type_info(t).name, (long long)rows, (long long)cols, (long long)n, where, a[where], b[where]);
          CHECK(same);
          ++checked;
        }
      }
    }
  }
  CHECK_EQ(checked, static_cast<int>(std::size(kInt8Types)) * 2 * 7 * 8);
  // One activation quantisation shared by several matrices gives each product's bits: Q4_1 first
  // or after a signed format (whose kernels also read the activations' offset sums).
  const int64_t cols = 576;
  const TensorType orders[2][3] = {{TensorType::Q4_1, TensorType::Q8_0, TensorType::Q5_0},
                                   {TensorType::Q4_0, TensorType::Q5_1, TensorType::Q4_1}};
  const int64_t rows[] = {40, 7, 33};
  for (const auto& types : orders)
    for (int64_t n : {2, 3, 5}) {
      const auto x = random_acts(n, cols, rng);
      std::vector<std::vector<uint8_t>> ws;
      std::vector<std::vector<float>> ys;
      std::vector<quant::MatmulTarget> targets;
      for (int i = 0; i < 3; ++i) ws.push_back(random_weights(types[i], rows[i], cols, rng)), ys.emplace_back(n * rows[i]);
      for (int i = 0; i < 3; ++i)
        targets.push_back({types[i], ws[i].data(), quant::bytes_for(types[i], cols), rows[i], ys[i].data()});
      quant::matmul_many(targets.data(), 3, cols, x.data(), n, quant::Isa::Avx512);
      for (int i = 0; i < 3; ++i) {
        const auto ref = run_q(make_matrix(types[i], ws[i], rows[i], cols), x, n, quant::Isa::Portable);
        CHECK(bits_equal(ref.data(), ys[i].data(), ref.size()));
      }
    }
  // Auto (matmul's default) runs the AVX-512 kernels unless OSD_NO_AVX512 / OSD_NO_AVX2 is set.
  if (!std::getenv("OSD_NO_AVX512") && !std::getenv("OSD_NO_AVX2")) CHECK(quant::best_isa() == quant::Isa::Avx512);
}

OSD_TEST(batch_and_thread_invariance) {
  std::mt19937 rng(2);
  const int threads_before = default_threads();
  for (TensorType t : kInt8Types) {
    const int64_t cols = is_k(t) ? 512 : 576, rows = 67, n = 70;
    const auto w = random_weights(t, rows, cols, rng);
    const Matrix m = make_matrix(t, w, rows, cols);
    const auto x = random_acts(n, cols, rng);
    auto check = [&](auto run_isa) {
      set_default_threads(2);
      const auto all = run_isa(x, n);
      // Each token alone (decode) and inside batches of other sizes.
      for (int64_t i = 0; i < n; ++i) {
        std::vector<float> xi(x.begin() + i * cols, x.begin() + (i + 1) * cols);
        const auto one = run_isa(xi, 1);
        CHECK(bits_equal(one.data(), all.data() + i * rows, rows));
      }
      for (int64_t chunk : {3, 8, 13}) {
        for (int64_t s = 0; s + chunk <= n; s += chunk) {
          std::vector<float> xs(x.begin() + s * cols, x.begin() + (s + chunk) * cols);
          const auto part = run_isa(xs, chunk);
          CHECK(bits_equal(part.data(), all.data() + s * rows, chunk * rows));
        }
      }
      for (int threads : {1, 3}) {
        set_default_threads(threads);
        const auto again = run_isa(x, n);
        CHECK(bits_equal(again.data(), all.data(), all.size()));
      }
    };
    for (KernelIsa isa : isas()) check([&](const std::vector<float>& xv, int64_t nv) { return run(m, xv, nv, isa); });
    if (have_avx512())
      check([&](const std::vector<float>& xv, int64_t nv) { return run_q(m, xv, nv, quant::Isa::Avx512); });
    else if (t == kInt8Types[0])
      std::printf("skip: no AVX-512 on this CPU; batch invariance of the AVX-512 kernels not checked\n");
  }
  set_default_threads(threads_before);
}

// |y - sum_j w_j xh_j| <= 2^-21 (blocks + 16) sum_j (|w_j| + 2 |o_j|) |xh_j| + (Q4_1, Q5_1) 2^-10 sum_b |m_b s_b|,
// with w the dequantised weights, xh the activations as the kernel sees them (quantised and
// dequantised), o_j the offset part of w_j (the block min of Q4_1 / Q5_1, dmin * min of Q4_K / Q5_K):
// the kernel's integer sums are exact, and each output takes at most (blocks + 16) float
// roundings of relative size 2^-24 on terms bounded by |scale * q * xh| <= (|w| + |o|) |xh| and
// |o xh|. Q4_1 / Q5_1 use the block sum s = d * sum q, one more rounding (2^-24 |s|, well inside
// the 2^-10 allowed for it, which would also cover llama.cpp's fp16 s).
OSD_TEST(kernel_accuracy_against_exact_dot_products) {
  std::mt19937 rng(3);
  for (TensorType t : kInt8Types) {
    const int64_t cols = is_k(t) ? 1024 : 1536, rows = 24, n = 3;
    const auto w = random_weights(t, rows, cols, rng);
    const Matrix m = make_matrix(t, w, rows, cols);
    const auto x = random_acts(n, cols, rng);
    const int64_t bs = gguf::type_info(t).block_size, nb = cols / bs;
    for (KernelIsa isa : isas()) {
      const auto y = run(m, x, n, isa);
      std::vector<float> wr(cols);
      for (int64_t r = 0; r < rows; ++r) {
        dequantize_row(m, r, wr.data());
        // Offsets per value.
        std::vector<double> off(cols, 0.0);
        const uint8_t* row = m.data + r * m.row_bytes;
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* blk = row + b * gguf::type_info(t).block_bytes;
          uint16_t h;
          if (t == TensorType::Q4_1 || t == TensorType::Q5_1) {
            std::memcpy(&h, blk + 2, 2);
            for (int j = 0; j < 32; ++j) off[b * 32 + j] = half_to_float(h);
          } else if (t == TensorType::Q2_K) {
            std::memcpy(&h, blk + 82, 2);
            for (int g = 0; g < 16; ++g)
              for (int j = 0; j < 16; ++j) off[b * 256 + g * 16 + j] = double(half_to_float(h)) * (blk[g] >> 4);
          } else if (t == TensorType::Q4_K || t == TensorType::Q5_K) {
            std::memcpy(&h, blk + 2, 2);
            for (int g = 0; g < 8; ++g) {
              uint8_t sc, mn;
              quant::detail::scale_min_k4(g, blk + 4, &sc, &mn);
              for (int j = 0; j < 32; ++j) off[b * 256 + g * 32 + j] = double(half_to_float(h)) * mn;
            }
          }
        }
        for (int64_t i = 0; i < n; ++i) {
          const auto xh = quant::activation_roundtrip(t, x.data() + i * cols, cols);
          double exact = 0, mag = 0, smag = 0;
          for (int64_t j = 0; j < cols; ++j) {
            exact += double(wr[j]) * xh[j];
            mag += (std::fabs(double(wr[j])) + 2 * std::fabs(off[j])) * std::fabs(xh[j]);
          }
          if (t == TensorType::Q4_1 || t == TensorType::Q5_1)
            for (int64_t b = 0; b < nb; ++b) {
              double s = 0;
              for (int j = 0; j < 32; ++j) s += xh[b * 32 + j];
              smag += std::fabs(off[b * 32] * s);
            }
          const double tol = std::ldexp(1.0, -21) * double(nb + 16) * mag + std::ldexp(1.0, -10) * smag;
          const double err = std::fabs(double(y[i * rows + r]) - exact);
          if (!(err <= tol))
            std::printf("  %s row %lld token %lld: %.9g vs exact %.9g, tol %.3g\n", gguf::type_info(t).name,
                        (long long)r, (long long)i, y[i * rows + r], exact, tol);
          CHECK(err <= tol);
        }
      }
    }
  }
}

OSD_TEST(activation_quantisation_rounding) {
  // Q8_0/Q8_1 style: d = amax / 127 (f32); q = round-to-nearest-even(x * 127 / amax).
  std::vector<float> x(32);
  for (int j = 0; j < 32; ++j) x[j] = (j - 16) * 0.25f;  // amax 4: q = x * 31.75
  const auto xh = quant::activation_roundtrip(TensorType::Q4_1, x.data(), 32);
  const float d = 4.0f / 127.0f;
  for (int j = 0; j < 32; ++j) {
    const float q = std::nearbyint(x[j] * (127.0f / 4.0f));
    CHECK_EQ(xh[j], d * q);
  }
  // Exact ties (amax 127, so x * id = x): both instruction sets round half to even.
  std::vector<float> t(64);
  for (int j = 0; j < 64; ++j) t[j] = j % 32 == 0 ? 127.0f : (j % 2 ? -1.0f : 1.0f) * (j * 0.5f + 0.5f);
  for (quant::Isa isa : {quant::Isa::Portable, quant::Isa::Avx2, quant::Isa::Avx512}) {
    if (!quant::isa_available(isa)) continue;
    const auto th = quant::activation_roundtrip(TensorType::Q8_0, t.data(), 64, isa);
    for (int j = 1; j < 64; ++j) if (j != 32) CHECK_EQ(th[j], std::nearbyint(t[j]));
  }
  // All zero: no NaN.
  std::vector<float> z(256, 0.0f);
  for (float v : quant::activation_roundtrip(TensorType::Q6_K, z.data(), 256)) CHECK_EQ(v, 0.0f);
  for (float v : quant::activation_roundtrip(TensorType::Q8_0, z.data(), 32)) CHECK_EQ(v, 0.0f);
  // A block so small that 127 / amax overflows (amax < 127 / FLT_MAX) quantises to zeros on every
  // instruction set (converting x * inf to int was undefined).
  std::vector<float> tiny(32);
  for (int j = 0; j < 32; ++j) tiny[j] = (j - 15) * 1e-39f;
  for (quant::Isa isa : {quant::Isa::Portable, quant::Isa::Avx2, quant::Isa::Avx512}) {
    if (!quant::isa_available(isa)) continue;
    for (float v : quant::activation_roundtrip(TensorType::Q8_0, tiny.data(), 32, isa)) CHECK_EQ(v, 0.0f);
    std::vector<float> tiny_k(256);
    // Q8_K: -127 / max overflows alike. Its values came out zero before too (d = 1 / -inf = -0), so
    // only UndefinedBehaviorSanitizer (float-cast-overflow) told the old code apart here.
    for (int j = 0; j < 256; ++j) tiny_k[j] = (j - 100) * 1e-39f;
    for (float v : quant::activation_roundtrip(TensorType::Q4_K, tiny_k.data(), 256, isa)) CHECK_EQ(v, 0.0f);
  }
  // Q8_K (the 256-value formats): the vector quantiser gives the portable one's values, bit for bit,
  // with two entries of largest magnitude and opposite signs (the first sets the scale's sign;
  // either choice gives the same values and products, both signs flipping), on exact halves, and
  // on all-zero and non-finite blocks.
  std::mt19937 rng(21);
  std::normal_distribution<float> g(0.0f, 1.0f);
  std::vector<float> k(256 * 6);
  for (auto& v : k) v = g(rng);
  k[3] = 5.0f, k[200] = -5.0f;          // block 0: +5 first
  k[256 + 7] = -5.0f, k[256 + 9] = 5.0f;  // block 1: -5 first
  for (int j = 0; j < 256; ++j) k[512 + j] = (j % 2 ? -1.0f : 1.0f) * (j % 128) * 0.5f;  // halves, amax 63.5
  for (int j = 0; j < 256; ++j) k[768 + j] = 0.0f;
  k[1024 + 17] = NAN;
  k[1280 + 30] = -INFINITY;
  const auto ref = quant::activation_roundtrip(TensorType::Q4_K, k.data(), static_cast<int64_t>(k.size()));
  CHECK(ref[3] == 5.0f && ref[200] == -5.0f && ref[263] == -5.0f && ref[265] == 5.0f);
  for (quant::Isa isa : {quant::Isa::Avx2, quant::Isa::Avx512}) {
    if (!quant::isa_available(isa)) continue;
    const auto got = quant::activation_roundtrip(TensorType::Q4_K, k.data(), static_cast<int64_t>(k.size()), isa);
    size_t where = 0;
    const bool same = bits_equal(ref.data(), got.data(), ref.size(), &where);
    if (!same) std::printf("  Q8_K %s: value %zu is %.9g, portable %.9g\n", quant::isa_name(isa), where, got[where], ref[where]);
    CHECK(same);
  }
}

OSD_TEST(non_finite_activations_give_nan_not_garbage) {
  std::mt19937 rng(4);
  for (TensorType t : kInt8Types) {
    const int64_t cols = is_k(t) ? 256 : 64;
    const auto w = random_weights(t, 3, cols, rng);
    const Matrix m = make_matrix(t, w, 3, cols);
    std::vector<float> x(cols, 0.5f);
    x[5] = INFINITY;
    for (KernelIsa isa : isas())
      for (float v : run(m, x, 1, isa)) CHECK(std::isnan(v));
    if (have_avx512())
      for (float v : run_q(m, x, 1, quant::Isa::Avx512)) CHECK(std::isnan(v));
  }
  // Inside a batch (16 rows: two eight-row groups, at 3 and 6 tokens): only the
  // token with the Infinity gives NaN; the others keep the bits they have alone.
  for (TensorType t : kInt8Types) {
    const int64_t cols = is_k(t) ? 256 : 64, rows = 16;
    const auto w = random_weights(t, rows, cols, rng);
    const Matrix m = make_matrix(t, w, rows, cols);
    for (int64_t n : {3, 6}) {
      auto x = random_acts(n, cols, rng);
      x[cols + 5] = INFINITY;  // token 1
      std::vector<quant::Isa> q_isas = {quant::Isa::Portable};
      if (have_avx512()) q_isas.push_back(quant::Isa::Avx512);
      for (quant::Isa isa : q_isas) {
        const auto all = run_q(m, x, n, isa);
        for (int64_t i = 0; i < n; ++i) {
          const std::vector<float> xi(x.begin() + i * cols, x.begin() + (i + 1) * cols);
          const auto one = run_q(m, xi, 1, isa);
          for (int64_t r = 0; r < rows; ++r) {
            if (i == 1) CHECK(std::isnan(all[i * rows + r]));
            else CHECK(bits_equal(&all[i * rows + r], &one[r], 1));
          }
        }
      }
    }
  }
}

OSD_TEST(errors_name_the_type_and_tensor) {
  std::vector<float> x(48, 1.0f), y(48);
  std::vector<uint8_t> q(64);
  CHECK_THROWS(Error, quant::quantize(TensorType::Q4_K, x.data(), 256, q.data()), "no quantiser for type Q4_K");
  CHECK_THROWS(Error, quant::quantize(TensorType::Q4_0, x.data(), 48, q.data()), "not a whole number of 32-value blocks");
  CHECK_THROWS(Error, quant::dequantize(TensorType::IQ2_XXS, q.data(), 256, y.data()), "no dequantiser for type IQ2_XXS");
  CHECK_THROWS(Error, quant::dequantize(TensorType::Q8_0, q.data(), 40, y.data()), "not a whole number");
  gguf::TensorInfo ti;
  ti.name = "blk.0.ffn_up.weight";
  ti.type = TensorType::IQ2_XXS;
  ti.n_dims = 2;
  ti.ne[0] = 256;
  ti.ne[1] = 2;
  ti.n_bytes = 2 * 66;
  ti.data = q.data();
  CHECK_THROWS(Error, matrix_from_tensor(ti), "tensor 'blk.0.ffn_up.weight' has type IQ2_XXS, which has no matrix kernel");
  ti.type = TensorType::Q4_K;
  ti.ne[0] = 576;
  CHECK_THROWS(Error, matrix_from_tensor(ti), "not a whole number of Q4_K blocks of 256");
  ti.type = TensorType::Q4_1;
  ti.ne[0] = 64;
  ti.n_bytes = 79;
  CHECK_THROWS(Error, matrix_from_tensor(ti), "has 79 bytes of data, expected 80");
}

// The 16-row packed layout as quant_matmul.cpp describes it, byte for byte, and the vector kernels
// on weights packed once (as Model does) equal the portable reference on the file's layout.
OSD_TEST(packed_layout_is_as_documented_and_kernels_read_it) {
  std::mt19937 rng(12);
  const int64_t cols = 64, nb = 2;
  for (TensorType t : {TensorType::Q4_0, TensorType::Q4_1, TensorType::Q5_0, TensorType::Q5_1, TensorType::Q8_0, TensorType::IQ4_NL}) {
    const bool min = t == TensorType::Q4_1 || t == TensorType::Q5_1, high = t == TensorType::Q5_0 || t == TensorType::Q5_1;
    const int chunks = t == TensorType::Q8_0 ? 8 : 4;
    const size_t bb = gguf::type_info(t).block_bytes, gb = 16 * bb;
    const size_t qs_at = t == TensorType::Q8_0 ? 2 : 2 + (min ? 2 : 0) + (high ? 4 : 0);  // in a GGUF block
    const size_t q_off = 32 + (min ? 32 : 0) + (high ? 64 : 0);                             // in a group-block
    for (int64_t rows : {1, 16, 33}) {
      const auto w = random_weights(t, rows, cols, rng);
      const size_t rb = quant::bytes_for(t, cols);
      std::vector<uint8_t> p(quant::packed_bytes(t, rows, cols));
      CHECK_EQ(p.size(), rb * static_cast<size_t>((rows + 15) / 16 * 16));
      quant::pack_rows(t, w.data(), rb, rows, cols, p.data());
      bool ok = true;
      for (int64_t r = 0; r < (rows + 15) / 16 * 16; ++r) {
        const int64_t g = r / 16, i = r % 16, src = std::min(r, rows - 1);  // the last group repeats its last row
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* blk = w.data() + src * rb + b * bb;
          const uint8_t* o = p.data() + (g * nb + b) * gb;
          ok &= std::memcmp(o + 2 * i, blk, 2) == 0;
          if (min) ok &= std::memcmp(o + 32 + 2 * i, blk + 2, 2) == 0;
          for (int c = 0; c < chunks; ++c) ok &= std::memcmp(o + q_off + 64 * c + 4 * i, blk + qs_at + 4 * c, 4) == 0;
          if (high) {
            uint32_t qh;
            std::memcpy(&qh, blk + (min ? 4 : 2), 4);
            for (int c = 0; c < 4; ++c) {
              uint64_t lo, hi;
              std::memcpy(&lo, o + 32 + (min ? 32 : 0) + 8 * c, 8);
              std::memcpy(&hi, o + 32 + (min ? 32 : 0) + 32 + 8 * c, 8);
              for (int j = 0; j < 4; ++j) {
                ok &= ((lo >> (4 * i + j)) & 1) == ((qh >> (4 * c + j)) & 1);
                ok &= ((hi >> (4 * i + j)) & 1) == ((qh >> (16 + 4 * c + j)) & 1);
              }
            }
          }
        }
      }
      CHECK(ok);
      CHECK(packed_kernels_match(t, w, rows, cols, p.data(), {1, 6, 11}, rng));
    }
  }
  // The 256-value formats, two super-blocks per row: `check` compares block `blk` of a row with its
  // place `o` in its group (row i of 16) for each format's layout.
  auto k_layout = [&](TensorType t, std::initializer_list<int64_t> row_counts, size_t gb,
                      const std::function<bool(const uint8_t*, const uint8_t*, int)>& check, std::initializer_list<int64_t> ns) {
    const int64_t cols = 512, nbk = 2;
    const size_t bb = gguf::type_info(t).block_bytes;
    for (int64_t rows : row_counts) {
      const auto wk = random_weights(t, rows, cols, rng);
      const size_t rb = quant::bytes_for(t, cols);
      std::vector<uint8_t> pk(quant::packed_bytes(t, rows, cols));
      CHECK_EQ(pk.size(), gb * nbk * static_cast<size_t>((rows + 15) / 16));
      quant::pack_rows(t, wk.data(), rb, rows, cols, pk.data());
      bool ok = true;
      for (int64_t r = 0; r < (rows + 15) / 16 * 16; ++r) {
        const int64_t g = r / 16, src = std::min(r, rows - 1);  // the last group repeats its last row
        for (int64_t b = 0; b < nbk; ++b)
          ok &= check(wk.data() + src * rb + b * bb, pk.data() + (g * nbk + b) * gb, static_cast<int>(r % 16));
      }
      if (!ok) std::printf("  %s: the packed layout differs (%lld rows)\n", gguf::type_info(t).name, (long long)rows);
      CHECK(ok);
      CHECK(packed_kernels_match(t, wk, rows, cols, pk.data(), ns, rng));
    }
  };
  // Q4_K and Q5_K: d, dmin, the scales and mins unpacked to bytes (sub-block j of row i at 16j + i),
  // the quants in 4-byte chunks, then Q5_K's qh the same way.
  for (TensorType t : {TensorType::Q4_K, TensorType::Q5_K}) {
    const bool q5 = t == TensorType::Q5_K;
    k_layout(t, {3, 16, 21}, q5 ? 2880 : 2368, [&](const uint8_t* blk, const uint8_t* o, int i) {
      bool ok = std::memcmp(o + 2 * i, blk, 2) == 0 && std::memcmp(o + 32 + 2 * i, blk + 2, 2) == 0;
      for (int j = 0; j < 8; ++j) {
        uint8_t sc, mn;
        quant::detail::scale_min_k4(j, blk + 4, &sc, &mn);
        ok &= o[64 + 16 * j + i] == sc && o[192 + 16 * j + i] == mn;
      }
      const uint8_t* qs = blk + (q5 ? 48 : 16);  // Q5_K: d, dmin, scales[12], qh[32], qs[128]
      for (int k = 0; k < 32; ++k) ok &= std::memcmp(o + 320 + 64 * k + 4 * i, qs + 4 * k, 4) == 0;
      if (q5)
        for (int k = 0; k < 8; ++k) ok &= std::memcmp(o + 2368 + 64 * k + 4 * i, blk + 16 + 4 * k, 4) == 0;
      return ok;
    }, {1, 3, 6, 9});
  }
  // Q6_K: d, the int8 scales (group g of row i at 32 + 16g + i), ql and qh in 4-byte chunks.
  k_layout(TensorType::Q6_K, {5, 16, 19}, 3360, [&](const uint8_t* blk, const uint8_t* o, int i) {
    bool ok = std::memcmp(o + 2 * i, blk + 208, 2) == 0;
    for (int j = 0; j < 16; ++j) ok &= o[32 + 16 * j + i] == blk[192 + j];
    for (int k = 0; k < 32; ++k) ok &= std::memcmp(o + 288 + 64 * k + 4 * i, blk + 4 * k, 4) == 0;
    for (int k = 0; k < 16; ++k) ok &= std::memcmp(o + 2336 + 64 * k + 4 * i, blk + 128 + 4 * k, 4) == 0;
    return ok;
  }, {1, 4, 7, 9});
  // Q2_K and Q3_K: d (and Q2_K's dmin), the scale bytes (Q2_K's as they are, Q3_K's unpacked to
  // int8; group j of row i at 16j + i), the two-bit quants in 4-byte chunks, Q3_K's hmask likewise.
  for (TensorType t : {TensorType::Q2_K, TensorType::Q3_K}) {
    const bool q2 = t == TensorType::Q2_K;
    k_layout(t, {3, 16, 18}, q2 ? 1344 : 1824, [&](const uint8_t* blk, const uint8_t* o, int i) {
      bool ok = std::memcmp(o + 2 * i, blk + (q2 ? 80 : 108), 2) == 0;
      if (q2) ok &= std::memcmp(o + 32 + 2 * i, blk + 82, 2) == 0;
      int8_t sc[16];
      if (!q2) quant::detail::scales_q3_k(blk + 96, sc);
      for (int j = 0; j < 16; ++j) ok &= q2 ? o[64 + 16 * j + i] == blk[j] : static_cast<int8_t>(o[32 + 16 * j + i]) == sc[j];
      const size_t qoff = q2 ? 320 : 288;
      for (int k = 0; k < 16; ++k) ok &= std::memcmp(o + qoff + 64 * k + 4 * i, blk + (q2 ? 16 : 32) + 4 * k, 4) == 0;
      if (!q2)
        for (int k = 0; k < 8; ++k) ok &= std::memcmp(o + qoff + 1024 + 64 * k + 4 * i, blk + 4 * k, 4) == 0;
      return ok;
    }, {1, 2, 3, 5});
  }
  // IQ4_XS: d, the sub-block scales as int8 (ls - 32; sub-block s of row i at 16s + i), the quants
  // in 4-byte chunks.
  k_layout(TensorType::IQ4_XS, {1, 16, 33}, 2208, [&](const uint8_t* blk, const uint8_t* o, int i) {
    bool ok = std::memcmp(o + 2 * i, blk, 2) == 0;
    uint16_t sh;
    std::memcpy(&sh, blk + 2, 2);
    for (int sb = 0; sb < 8; ++sb)
      ok &= static_cast<int8_t>(o[32 + 16 * sb + i]) == (((blk[4 + sb / 2] >> (4 * (sb % 2))) & 0xF) | (((sh >> (2 * sb)) & 3) << 4)) - 32;
    for (int k = 0; k < 32; ++k) ok &= std::memcmp(o + 160 + 64 * k + 4 * i, blk + 8 + 4 * k, 4) == 0;
    return ok;
  }, {1, 2, 3, 4, 7, 9});
  for (TensorType t : kInt8Types)
    CHECK(quant::kernel_reads_packed(t, quant::Isa::Avx2) && quant::kernel_reads_packed(t, quant::Isa::Avx512) &&
          !quant::kernel_reads_packed(t, quant::Isa::Portable));
  CHECK(!quant::has_packed_layout(TensorType::F16) && !quant::kernel_reads_packed(TensorType::F16, quant::Isa::Avx2));
  std::vector<uint8_t> w(quant::bytes_for(TensorType::Q4_1, 64)), p(4096);
  CHECK_THROWS(Error, quant::packed_bytes(TensorType::F16, 1, 256), "no packed layout for type F16");
  CHECK_THROWS(Error, quant::packed_bytes(TensorType::Q4_1, 0, 64), "rows must be > 0");
  CHECK_THROWS(Error, quant::pack_rows(TensorType::Q4_1, w.data(), w.size() + 1, 1, 64, p.data()),
               "row_bytes does not match the row length");
}

// The integer sums at their extremes: every weight at the top or bottom of its range (nibbles 15
// with all fifth bits, or 0; Q8_0 bytes -128 or 127; IQ4_NL's table ends 113 and -127) against
// activations of +-127, so a vector kernel whose 16-bit pair sums overflowed or saturated would
// differ from the reference.
OSD_TEST(integer_sums_at_their_extremes_equal_the_reference) {
  const int64_t cols = 64, rows = 17;
  for (TensorType t : {TensorType::Q4_0, TensorType::Q4_1, TensorType::Q5_0, TensorType::Q5_1, TensorType::Q8_0, TensorType::IQ4_NL}) {
    const size_t rb = quant::bytes_for(t, cols), bb = gguf::type_info(t).block_bytes;
    for (uint8_t fill : {uint8_t(0xFF), uint8_t(0x00), uint8_t(0x80), uint8_t(0x7F)}) {
      std::vector<uint8_t> w(rb * rows, fill);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t b = 0; b < cols / 32; ++b) {
          uint8_t* blk = w.data() + r * rb + b * bb;
          const uint16_t one = float_to_half(r % 2 ? 1.0f : -0.5f);
          std::memcpy(blk, &one, 2);
          if (t == TensorType::Q4_1 || t == TensorType::Q5_1) std::memcpy(blk + 2, &one, 2);
        }
      const Matrix m = make_matrix(t, w, rows, cols);
      for (float a : {1.0f, -1.0f}) {
        const int64_t n = 6;
        std::vector<float> x(n * cols, a);
        for (int64_t j = 0; j < cols; j += 3) x[j] = -a;  // mixed signs in some tokens' blocks
        std::fill(x.begin(), x.begin() + 2 * cols, a);    // and all alike in others
        char what[64];
        std::snprintf(what, sizeof what, "%s fill 0x%02x x %g", gguf::type_info(t).name, fill, a);
        CHECK(vector_kernels_match(m, x, n, what));
      }
    }
  }
}

// The same for the packed K-quants (Q4_K, Q5_K, Q6_K): every byte 0xFF (all values and scales at
// their top: 4-bit 15 with six-bit scales and mins 63, Q5_K's fifth bits set, Q6_K's 6-bit 31 with
// scales -1) or 0x00, against activations of +-127. Also Q2_K, Q3_K (values 3 or -4 with scales 31
// or -32) and IQ4_XS (the table's ends, 113 and -127, with scales 31 or -32).
OSD_TEST(k_quant_integer_sums_at_their_extremes_equal_the_reference) {
  const int64_t cols = 512, rows = 17;
  for (TensorType t : {TensorType::Q4_K, TensorType::Q5_K, TensorType::Q6_K, TensorType::Q2_K, TensorType::Q3_K, TensorType::IQ4_XS}) {
    const size_t rb = quant::bytes_for(t, cols), bb = gguf::type_info(t).block_bytes;
    for (uint8_t fill : {uint8_t(0xFF), uint8_t(0x00), uint8_t(0xAA)}) {
      std::vector<uint8_t> w(rb * rows, fill);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t b = 0; b < cols / 256; ++b) {
          uint8_t* blk = w.data() + r * rb + b * bb;
          const uint16_t h = float_to_half(r % 2 ? 1e-3f : -2e-3f);
          if (t == TensorType::Q6_K) {
            std::memcpy(blk + 208, &h, 2);
          } else if (t == TensorType::Q2_K) {
            std::memcpy(blk + 80, &h, 2);
            std::memcpy(blk + 82, &h, 2);
          } else if (t == TensorType::Q3_K) {
            std::memcpy(blk + 108, &h, 2);
          } else if (t == TensorType::IQ4_XS) {
            std::memcpy(blk, &h, 2);
          } else {
            std::memcpy(blk, &h, 2);
            std::memcpy(blk + 2, &h, 2);
          }
        }
      const Matrix m = make_matrix(t, w, rows, cols);
      for (float a : {1.0f, -1.0f}) {
        const int64_t n = 5;
        std::vector<float> x(n * cols, a);
        for (int64_t j = 2 * cols; j < n * cols; j += 3) x[j] = -a;  // mixed signs in the later tokens
        char what[64];
        std::snprintf(what, sizeof what, "%s fill 0x%02x x %g", gguf::type_info(t).name, fill, a);
        CHECK(vector_kernels_match(m, x, n, what));
      }
    }
  }
}

OSD_TEST(matmul_many_equals_separate_products) {
  std::mt19937 rng(8);
  const int64_t cols = 576, n = 5;
  const auto x = random_acts(n, cols, rng);
  const TensorType types[] = {TensorType::Q4_1, TensorType::Q8_0, TensorType::Q5_0};
  const int64_t rows[] = {40, 7, 33};
  std::vector<std::vector<uint8_t>> ws;
  std::vector<Matrix> ms;
  for (int i = 0; i < 3; ++i) ws.push_back(random_weights(types[i], rows[i], cols, rng));
  for (int i = 0; i < 3; ++i) ms.push_back(make_matrix(types[i], ws[i], rows[i], cols));
  // A float matrix too (not shareable: falls back to separate products).
  std::vector<float> wf(9 * cols);
  for (auto& v : wf) v = float(rng() % 1000) / 1000.0f - 0.5f;
  ms.push_back(matrix_f32(wf.data(), 9, cols));
  for (KernelIsa isa : isas()) {
    for (int count : {3, 4}) {
      std::vector<std::vector<float>> ys(count);
      std::vector<const Matrix*> wp;
      std::vector<float*> yp;
      for (int i = 0; i < count; ++i) {
        ys[i].assign(n * ms[i].rows, 0.0f);
        wp.push_back(&ms[i]);
        yp.push_back(ys[i].data());
      }
      matmul_many(wp.data(), yp.data(), count, x.data(), n, isa);
      for (int i = 0; i < count; ++i) {
        const auto ref = run(ms[i], x, n, isa);
        CHECK(bits_equal(ref.data(), ys[i].data(), ref.size()));
      }
    }
  }
}

// The register-blocked F32 / F16 / BF16 kernels (tiles of up to 3 rows x 4 tokens, 4 x 1) against
// matmul_reference, one plain dot product per output, for each instruction set: tolerance 0.
// Odd shapes put every tile size and a scalar column tail (cols not a multiple of 8) in play;
// thread counts 1..3 and every token alone must give the same bits too.
OSD_TEST(float_kernels_equal_the_reference_bit_for_bit) {
  std::mt19937 rng(9);
  std::normal_distribution<float> g(0.0f, 1.0f);
  const int threads_before = default_threads();
  int checked = 0;
  for (TensorType t : {TensorType::F32, TensorType::F16, TensorType::BF16}) {
    for (int64_t cols : {1, 7, 8, 13, 64, 172, 203}) {
      for (int64_t rows : {1, 2, 3, 5, 6, 37}) {
        std::vector<float> wf(rows * cols);
        for (auto& v : wf) v = g(rng) * 0.1f;
        wf[(rows * cols) / 2] = 3.0e4f;  // a large weight: cancellation shows any change of order
        std::vector<uint8_t> w(quant::bytes_for(t, cols) * rows);
        quant::quantize(t, wf.data(), rows * cols, w.data());
        const Matrix m = make_matrix(t, w, rows, cols);
        for (int64_t n : {1, 2, 3, 4, 5, 7, 13}) {
          const auto x = random_acts(n, cols, rng);
          for (KernelIsa isa : isas()) {
            std::vector<float> ref(n * rows);
            matmul_reference(m, x.data(), n, ref.data(), isa);
            for (int threads : {1, 2, 3}) {
              set_default_threads(threads);
              const auto y = run(m, x, n, isa);
              size_t where = 0;
              const bool same = bits_equal(ref.data(), y.data(), ref.size(), &where);
              if (!same)
                std::printf("  %s rows %lld cols %lld n %lld threads %d: output %zu is %.9g, reference %.9g\n",
                            gguf::type_info(t).name, (long long)rows, (long long)cols, (long long)n, threads, where,
                            y[where], ref[where]);
              CHECK(same);
            }
            for (int64_t i = 0; i < n; ++i) {
              std::vector<float> xi(x.begin() + i * cols, x.begin() + (i + 1) * cols);
              const auto one = run(m, xi, 1, isa);
              CHECK(bits_equal(one.data(), ref.data() + i * rows, rows));
            }
            ++checked;
          }
        }
      }
    }
  }
  set_default_threads(threads_before);
  CHECK(checked >= 3 * 7 * 6 * 7);
}

// ---- Float helpers used by the forward pass (tensor_ops) ----

OSD_TEST(swiglu_matches_the_formula) {
  std::mt19937 rng(5);
  std::normal_distribution<float> g(0.0f, 4.0f);
  const int n = 1003;
  std::vector<float> gate(n), up(n), h(n);
  for (int i = 0; i < n; ++i) gate[i] = g(rng), up[i] = g(rng);
  gate[0] = -100.0f, gate[1] = 100.0f, gate[2] = -87.5f, gate[3] = 0.0f, gate[4] = 88.0f;
  swiglu(gate.data(), up.data(), n, h.data());
  // Elementwise: the same value for an element whatever the call's length and offset.
  for (int off : {0, 3, 5, 168}) {
    std::vector<float> part(13);
    swiglu(gate.data() + off, up.data() + off, 13, part.data());
    CHECK(bits_equal(part.data(), h.data() + off, 13));
  }
  for (int i = 0; i < n; ++i) {
    const double want = double(gate[i]) / (1.0 + std::exp(-double(gate[i]))) * up[i];
    // The vectorised exp is within 2 ulp; with the division and product, 1e-6 relative.
    CHECK(std::fabs(h[i] - want) <= 1e-6 * std::fabs(want) + 1e-30);
  }
}

OSD_TEST(attend_head_is_split_invariant_and_accurate) {
  std::mt19937 rng(6);
  std::normal_distribution<float> g(0.0f, 1.0f);
  const int64_t hd = 64, stride = 3 * hd;  // a KV row holds 3 heads; this is the second
  const int32_t n = 77;
  std::vector<float> K(stride * 2 * n), V(stride * 2 * n), q(hd);
  for (auto& v : K) v = g(rng);
  for (auto& v : V) v = g(rng);
  for (auto& v : q) v = g(rng) * 2.0f;
  const float* Kh = K.data() + hd;
  const float* Vh = V.data() + hd;
  std::vector<float> score(2 * n), a(hd), b(hd), c(hd);
  attend_head(q.data(), Kh, Vh, stride, n, nullptr, 0, hd, 0.125f, score.data(), a.data());
  const std::vector<float> weights(score.begin(), score.begin() + n);
  // The same sequence split as a prefix of 50 and 27 batch slots listed explicitly.
  std::vector<int32_t> extra;
  for (int32_t s = 50; s < n; ++s) extra.push_back(s);
  attend_head(q.data(), Kh, Vh, stride, 50, extra.data(), int32_t(extra.size()), hd, 0.125f, score.data(), b.data());
  CHECK(bits_equal(a.data(), b.data(), hd));
  // Tree-like storage: the last 27 keys/values copied to other slots (n + 2 j) and listed there.
  for (size_t j = 0; j < extra.size(); ++j) {
    const int32_t dst = n + 2 * int32_t(j);
    std::memcpy(&K[dst * stride], &K[extra[j] * stride], stride * sizeof(float));
    std::memcpy(&V[dst * stride], &V[extra[j] * stride], stride * sizeof(float));
    extra[j] = dst;
  }
  attend_head(q.data(), Kh, Vh, stride, 50, extra.data(), int32_t(extra.size()), hd, 0.125f, score.data(), c.data());
  CHECK(bits_equal(a.data(), c.data(), hd));
  // Against a double-precision softmax.
  std::vector<double> sc(n);
  double mx = -1e300, sum = 0;
  for (int32_t s = 0; s < n; ++s) {
    double d = 0;
    for (int64_t j = 0; j < hd; ++j) d += double(q[j]) * Kh[s * stride + j];
    sc[s] = d * 0.125;
    mx = std::max(mx, sc[s]);
  }
  for (auto& v : sc) sum += (v = std::exp(v - mx));
  for (int32_t s = 0; s < n; ++s) CHECK(std::fabs(weights[s] - sc[s] / sum) <= 1e-6 * (sc[s] / sum) + 1e-30);
  for (int64_t j = 0; j < hd; ++j) {
    double want = 0, mag = 0;
    for (int32_t s = 0; s < n; ++s) want += sc[s] / sum * Vh[s * stride + j], mag += sc[s] / sum * std::fabs(Vh[s * stride + j]);
    CHECK(std::fabs(a[j] - want) <= 1e-5 * mag);
  }
}

// The vector kernel scores slots eight at a time and the rest one by one: a key must score the same
// bits wherever it falls. Every key here is stored twice, once in a block of eight and once among
// the last n % 8 slots (or in another block), so equal keys must get equal weights, bit for bit.
OSD_TEST(attend_head_scores_a_key_alike_in_a_block_of_eight_and_in_the_tail) {
  std::mt19937 rng(7);
  std::normal_distribution<float> g(0.0f, 1.0f);
  int checked = 0;
  for (const int64_t hd : {8, 16, 64, 72, 128})
    for (int32_t n = 9; n <= 47; ++n) {
      const int64_t stride = 2 * hd;
      std::vector<float> K(stride * n), V(stride * n, 0.5f), q(hd), score(n), out(hd);
      for (auto& v : q) v = g(rng);
      // Slot s holds key s % m: the last n % 8 slots (the one-by-one path) repeat keys of the blocks.
      const int32_t m = 8;
      std::vector<float> keys(m * hd);
      for (auto& v : keys) v = g(rng) * 3.0f;
      for (int32_t s = 0; s < n; ++s) std::memcpy(&K[s * stride], &keys[(s % m) * hd], hd * sizeof(float));
      attend_head(q.data(), K.data(), V.data(), stride, n, nullptr, 0, hd, 0.125f, score.data(), out.data());
      for (int32_t s = m; s < n; ++s) {
        CHECK(bits_equal(&score[s], &score[s % m], 1));
        ++checked;
      }
    }
  CHECK(checked > 1000);
}

// Queries attended together over one key-value head (attend_heads) get attend_head's bits each:
// a token's heads, a chain's tokens (batch slots in order, shared with each other), a tree's
// branches (batch slots elsewhere), mixed in one call, across the 64-slot blocks they share; over a
// float32 cache and a float16 one (which equals float32 keys and values holding the same values).
OSD_TEST(attend_heads_equal_attend_head_per_query) {
  std::mt19937 rng(8);
  std::normal_distribution<float> g(0.0f, 1.0f);
  int cases = 0;
  for (const int64_t hd : {8, 16, 48, 64, 72, 128})
    for (const int32_t prefix : {0, 1, 7, 63, 64, 77, 130})
      for (const int32_t count : {1, 2, 3, 7}) {
        const int64_t stride = 2 * hd;
        const int32_t batch = 6, rows = prefix + 2 * batch;
        std::vector<float> K(stride * rows), V(stride * rows), q(count * hd);
        for (auto& v : K) v = g(rng);
        for (auto& v : V) v = g(rng);
        for (auto& v : q) v = g(rng) * 2.0f;
        // Query i sees the prefix and then: (i % 3 == 0) batch slots prefix .. prefix + i % batch in
        // order, like a chain; (1) those slots and one more out of order; (2) a tree branch stored
        // past the batch (slots prefix + batch + j).
        std::vector<std::vector<int32_t>> extras(count);
        for (int32_t i = 0; i < count; ++i) {
          const int32_t len = 1 + i % batch;
          for (int32_t e = 0; e < len; ++e) extras[i].push_back(i % 3 == 2 ? prefix + batch + e : prefix + e);
          if (i % 3 == 1) extras[i].push_back(prefix + batch + 1);
        }
        std::vector<std::vector<float>> sa(count), sb(count), oa(count, std::vector<float>(hd)), ob(count, std::vector<float>(hd, 7.0f));
        std::vector<AttendQuery> qs;
        for (int32_t i = 0; i < count; ++i) {
          const int32_t ne = int32_t(extras[i].size()), n = prefix + ne;
          sa[i].resize(n), sb[i].resize(n);
          attend_head(q.data() + i * hd, K.data() + hd, V.data() + hd, stride, prefix, extras[i].data(), ne, hd, 0.125f,
                      sa[i].data(), oa[i].data());
          qs.push_back({q.data() + i * hd, prefix, extras[i].data(), ne, sb[i].data(), ob[i].data()});
        }
        attend_heads(qs.data(), count, K.data() + hd, V.data() + hd, stride, hd, 0.125f);
        for (int32_t i = 0; i < count; ++i) {
          CHECK(bits_equal(oa[i].data(), ob[i].data(), hd));
          CHECK(bits_equal(sa[i].data(), sb[i].data(), sa[i].size()));
        }
        // A float16 cache: the same as float32 keys and values that hold the halves' values.
        std::vector<uint16_t> Kh(K.size()), Vh(V.size());
        for (size_t j = 0; j < K.size(); ++j) Kh[j] = float_to_half(K[j]), K[j] = half_to_float(Kh[j]);
        for (size_t j = 0; j < V.size(); ++j) Vh[j] = float_to_half(V[j]), V[j] = half_to_float(Vh[j]);
        attend_heads(qs.data(), count, Kh.data() + hd, Vh.data() + hd, stride, hd, 0.125f);
        for (int32_t i = 0; i < count; ++i) {
          attend_head(q.data() + i * hd, K.data() + hd, V.data() + hd, stride, prefix, extras[i].data(), int32_t(extras[i].size()), hd,
                      0.125f, sa[i].data(), oa[i].data());
          CHECK(bits_equal(oa[i].data(), ob[i].data(), hd));
          CHECK(bits_equal(sa[i].data(), sb[i].data(), sa[i].size()));
          std::vector<float> sc(sa[i].size()), oc(hd);
          attend_head(q.data() + i * hd, Kh.data() + hd, Vh.data() + hd, stride, prefix, extras[i].data(), int32_t(extras[i].size()),
                      hd, 0.125f, sc.data(), oc.data());
          CHECK(bits_equal(oa[i].data(), oc.data(), hd));
        }
        ++cases;
      }
  CHECK(cases == 6 * 7 * 4);
}

// The attention's softmax with 16 lanes (AVX-512) equals the 8-lane one bit for bit: the same
// exps lane by lane and the same 8-lane sum, on rows of every length up to 70 (whole 16s, an 8 and
// a tail), with scores spread wide enough that some exps underflow, and a NaN row.
OSD_TEST(attention_softmax_is_the_same_on_16_lanes) {
  std::vector<float> probe(4, 0.0f);
  if (!attention_softmax(probe.data(), 4, 16) || !attention_softmax(probe.data(), 4, 8)) {
    std::printf("skip: no AVX-512 on this CPU; the 16-lane softmax is not compared\n");
    return;
  }
  std::mt19937 rng(21);
  for (int32_t n = 1; n <= 70; ++n)
    for (float spread : {0.5f, 8.0f, 60.0f}) {
      std::normal_distribution<float> g(0.0f, spread);
      std::vector<float> a(n), b;
      for (auto& v : a) v = g(rng);
      b = a;
      attention_softmax(a.data(), n, 8);
      attention_softmax(b.data(), n, 16);
      CHECK(bits_equal(a.data(), b.data(), n));
    }
  std::vector<float> a(40, 1.0f), b;
  a[17] = NAN;
  b = a;
  attention_softmax(a.data(), 40, 8);
  attention_softmax(b.data(), 40, 16);
  for (int i = 0; i < 40; ++i) CHECK(std::isnan(a[i]) && std::isnan(b[i]));
}

// The KV cache's float16 writes (floats_to_halves, F16C where present) equal kv_half bit for bit:
// random values over the whole range, ties, subnormals, overflow, infinities and NaNs; kv_half is
// float_to_half clamped to +-65504 (finite stays finite, NaN stays NaN).
OSD_TEST(floats_to_halves_equals_kv_half) {
  std::mt19937 rng(9);
  std::vector<float> x;
  for (int i = 0; i < 200000; ++i) {
    uint32_t u = rng();
    float f;
    std::memcpy(&f, &u, 4);
    x.push_back(f);  // every exponent, NaNs included
  }
  std::normal_distribution<float> g(0.0f, 1.0f);
  for (int i = 0; i < 20000; ++i) x.push_back(g(rng) * 1e-5f), x.push_back(g(rng) * 3e4f);
  for (uint32_t h = 0; h < 0x10000; ++h) {  // every half, and the midpoints next to it (ties)
    const float f = half_to_float(static_cast<uint16_t>(h));
    x.push_back(f);
    x.push_back(std::nextafter(f, INFINITY));
    x.push_back(std::nextafter(f, -INFINITY));
  }
  for (float f : {65504.0f, 65519.99f, 65520.0f, 1e30f, -1e30f, INFINITY, -INFINITY, 5.96e-8f, 2.98e-8f, 2.99e-8f, 0.0f, -0.0f}) x.push_back(f);
  x.push_back(3.0f);  // a tail past the last whole vector of 8
  std::vector<uint16_t> h(x.size());
  floats_to_halves(x.data(), h.data(), static_cast<int64_t>(x.size()));
  size_t bad = 0;
  for (size_t i = 0; i < x.size(); ++i) bad += h[i] != kv_half(x[i]);
  CHECK_EQ(bad, size_t(0));
  CHECK_EQ(kv_half(1e30f), float_to_half(65504.0f));
  CHECK_EQ(kv_half(-INFINITY), float_to_half(-65504.0f));
  CHECK(std::isnan(half_to_float(kv_half(NAN))));
  CHECK_EQ(kv_half(0.5f), float_to_half(0.5f));
}

OSD_TEST_MAIN()
