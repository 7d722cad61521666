#include "model/tensor_ops.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/error.h"
#include "core/fp16.h"
#include "core/thread_pool.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace osd {

using gguf::TensorType;

bool matrix_type_supported(TensorType t) {
  return t == TensorType::F32 || t == TensorType::F16 || t == TensorType::BF16 || t == TensorType::Q8_0;
}

Matrix matrix_from_tensor(const gguf::TensorInfo& t) {
  if (!matrix_type_supported(t.type))
    throw_range("tensor '" + t.name + "' has type " + gguf::type_info(t.type).name +
                ", which has no matrix kernel yet (supported: F32, F16, BF16, Q8_0)");
  if (t.n_dims > 2 && (t.ne[2] != 1 || t.ne[3] != 1))
    throw_range("tensor '" + t.name + "' is not a matrix");
  Matrix m;
  m.type = t.type;
  m.cols = static_cast<int64_t>(t.ne[0]);
  m.rows = static_cast<int64_t>(t.ne[1]);
  m.data = t.data;
  m.row_bytes = t.n_bytes / static_cast<size_t>(m.rows);
  return m;
}

Matrix matrix_f32(const float* data, int64_t rows, int64_t cols) {
  Matrix m;
  m.type = TensorType::F32;
  m.rows = rows;
  m.cols = cols;
  m.data = reinterpret_cast<const uint8_t*>(data);
  m.row_bytes = static_cast<size_t>(cols) * sizeof(float);
  return m;
}

namespace {

struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[32];
};
static_assert(sizeof(BlockQ8_0) == 34, "Q8_0 block is 34 bytes");

// ---- Portable dot products: 8 partial sums, summed pairwise at the end (fixed order). ----

float dot_f32_ref(const float* w, const float* x, int64_t n) {
  float acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int k = 0; k < 8; ++k) acc[k] += w[i + k] * x[i + k];
  for (; i < n; ++i) acc[i & 7] += w[i] * x[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

float dot_f16_ref(const uint16_t* w, const float* x, int64_t n) {
  float acc[8] = {};
  for (int64_t i = 0; i < n; ++i) acc[i & 7] += half_to_float(w[i]) * x[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

float dot_bf16_ref(const uint16_t* w, const float* x, int64_t n) {
  float acc[8] = {};
  for (int64_t i = 0; i < n; ++i) acc[i & 7] += bf16_to_float(w[i]) * x[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

float dot_q8_0_ref(const BlockQ8_0* b, const float* x, int64_t n) {
  float total = 0.0f;
  for (int64_t blk = 0; blk < n / 32; ++blk) {
    float acc[8] = {};
    for (int i = 0; i < 32; ++i) acc[i & 7] += static_cast<float>(b[blk].qs[i]) * x[blk * 32 + i];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    total += half_to_float(b[blk].d) * s;
  }
  return total;
}

#if defined(__x86_64__) && defined(__GNUC__)
// ---- AVX2 + FMA + F16C versions: the same partial-sum layout (8 lanes), hence the same sums as
// the portable versions up to FMA contraction. Chosen once at run time. ----
#define OSD_AVX2 __attribute__((target("avx2,fma,f16c")))

OSD_AVX2 float dot_f32_avx2(const float* w, const float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), acc);
  alignas(32) float a[8];
  _mm256_store_ps(a, acc);
  for (; i < n; ++i) a[i & 7] += w[i] * x[i];
  return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

OSD_AVX2 float dot_f16_avx2(const uint16_t* w, const float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 wv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i)));
    acc = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i), acc);
  }
  alignas(32) float a[8];
  _mm256_store_ps(a, acc);
  for (; i < n; ++i) a[i & 7] += half_to_float(w[i]) * x[i];
  return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

OSD_AVX2 float dot_bf16_avx2(const uint16_t* w, const float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256i wi = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + i))), 16);
    acc = _mm256_fmadd_ps(_mm256_castsi256_ps(wi), _mm256_loadu_ps(x + i), acc);
  }
  alignas(32) float a[8];
  _mm256_store_ps(a, acc);
  for (; i < n; ++i) a[i & 7] += bf16_to_float(w[i]) * x[i];
  return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

OSD_AVX2 float dot_q8_0_avx2(const BlockQ8_0* b, const float* x, int64_t n) {
  float total = 0.0f;
  for (int64_t blk = 0; blk < n / 32; ++blk) {
    __m256 acc = _mm256_setzero_ps();
    const float* xb = x + blk * 32;
    for (int i = 0; i < 32; i += 8) {
      __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b[blk].qs + i));
      __m256 qf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
      acc = _mm256_fmadd_ps(qf, _mm256_loadu_ps(xb + i), acc);
    }
    alignas(32) float a[8];
    _mm256_store_ps(a, acc);
    float s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
    total += half_to_float(b[blk].d) * s;
  }
  return total;
}

bool have_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c") && !std::getenv("OSD_NO_AVX2");
  return yes;
}
#else
bool have_avx2() { return false; }
#endif

using DotFn = float (*)(const uint8_t* row, const float* x, int64_t n);

DotFn pick_dot(TensorType t) {
  const bool v = have_avx2();
  switch (t) {
    case TensorType::F32:
      return v ? [](const uint8_t* r, const float* x, int64_t n) { return dot_f32_avx2(reinterpret_cast<const float*>(r), x, n); }
               : [](const uint8_t* r, const float* x, int64_t n) { return dot_f32_ref(reinterpret_cast<const float*>(r), x, n); };
    case TensorType::F16:
      return v ? [](const uint8_t* r, const float* x, int64_t n) { return dot_f16_avx2(reinterpret_cast<const uint16_t*>(r), x, n); }
               : [](const uint8_t* r, const float* x, int64_t n) { return dot_f16_ref(reinterpret_cast<const uint16_t*>(r), x, n); };
    case TensorType::BF16:
      return v ? [](const uint8_t* r, const float* x, int64_t n) { return dot_bf16_avx2(reinterpret_cast<const uint16_t*>(r), x, n); }
               : [](const uint8_t* r, const float* x, int64_t n) { return dot_bf16_ref(reinterpret_cast<const uint16_t*>(r), x, n); };
    case TensorType::Q8_0:
      return v ? [](const uint8_t* r, const float* x, int64_t n) { return dot_q8_0_avx2(reinterpret_cast<const BlockQ8_0*>(r), x, n); }
               : [](const uint8_t* r, const float* x, int64_t n) { return dot_q8_0_ref(reinterpret_cast<const BlockQ8_0*>(r), x, n); };
    default:
      throw_range(std::string("no matrix kernel for type ") + gguf::type_info(t).name);
  }
}

}  // namespace

void dequantize_row(const Matrix& m, int64_t r, float* out) {
  const uint8_t* row = m.data + static_cast<size_t>(r) * m.row_bytes;
  switch (m.type) {
    case TensorType::F32:
      std::memcpy(out, row, m.cols * sizeof(float));
      return;
    case TensorType::F16:
      for (int64_t i = 0; i < m.cols; ++i) out[i] = half_to_float(reinterpret_cast<const uint16_t*>(row)[i]);
      return;
    case TensorType::BF16:
      for (int64_t i = 0; i < m.cols; ++i) out[i] = bf16_to_float(reinterpret_cast<const uint16_t*>(row)[i]);
      return;
    case TensorType::Q8_0: {
      const auto* b = reinterpret_cast<const BlockQ8_0*>(row);
      for (int64_t blk = 0; blk < m.cols / 32; ++blk) {
        const float d = half_to_float(b[blk].d);
        for (int i = 0; i < 32; ++i) out[blk * 32 + i] = d * b[blk].qs[i];
      }
      return;
    }
    default:
      throw_range(std::string("no dequantiser for type ") + gguf::type_info(m.type).name);
  }
}

void matmul(const Matrix& w, const float* x, int64_t n, float* y) {
  const DotFn dot = pick_dot(w.type);
  const int64_t rows = w.rows, cols = w.cols;
  // Split over output rows; a block of rows is applied to every token while it is hot in cache.
  constexpr int64_t kRowBlock = 16;
  const int64_t nblocks = (rows + kRowBlock - 1) / kRowBlock;
  default_pool().parallel_for(static_cast<size_t>(nblocks), 1, [&](size_t lo, size_t hi) {
    for (size_t b = lo; b < hi; ++b) {
      const int64_t r0 = static_cast<int64_t>(b) * kRowBlock, r1 = std::min(rows, r0 + kRowBlock);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t r = r0; r < r1; ++r)
          y[t * rows + r] = dot(w.data + static_cast<size_t>(r) * w.row_bytes, x + t * cols, cols);
    }
  });
}

void rmsnorm(const float* x, const float* weight, int64_t dim, float eps, float* y) {
  double ss = 0.0;
  for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float scale = static_cast<float>(1.0 / std::sqrt(ss / dim + eps));
  for (int64_t i = 0; i < dim; ++i) y[i] = weight[i] * (scale * x[i]);
}

void rope(float* v, int64_t head_dim, int64_t pos, float theta, float freq_scale, bool neox) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const double freq = std::pow(static_cast<double>(theta), -2.0 * i / head_dim) * freq_scale;
    const double angle = pos * freq;
    const float c = static_cast<float>(std::cos(angle)), s = static_cast<float>(std::sin(angle));
    const int64_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    const float x0 = v[a], x1 = v[b];
    v[a] = x0 * c - x1 * s;
    v[b] = x0 * s + x1 * c;
  }
}

void swiglu(const float* gate, const float* up, int64_t n, float* h) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    h[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

}  // namespace osd
