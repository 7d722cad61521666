#include "model/tensor_ops.h"

#include <algorithm>
#include <array>
#include <utility>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "core/error.h"
#include "core/fp16.h"
#include "core/thread_pool.h"
#include "model/quant.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace osd {

using gguf::TensorType;

bool matrix_type_supported(TensorType t) {
  return t == TensorType::F32 || t == TensorType::F16 || t == TensorType::BF16 || quant::has_int8_kernel(t);
}

const char* supported_matrix_types() { return "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS"; }

Matrix matrix_from_tensor(const gguf::TensorInfo& t) {
  if (!matrix_type_supported(t.type))
    throw_range("tensor '" + t.name + "' has type " + gguf::type_info(t.type).name +
                ", which has no matrix kernel (supported: " + supported_matrix_types() + ")");
  if (t.n_dims > 2 && (t.ne[2] != 1 || t.ne[3] != 1))
    throw_range("tensor '" + t.name + "' is not a matrix");
  Matrix m;
  m.type = t.type;
  m.cols = static_cast<int64_t>(t.ne[0]);
  m.rows = static_cast<int64_t>(t.ne[1]);
  m.data = t.data;
  const uint32_t block = gguf::type_info(t.type).block_size;
  if (m.cols % block != 0)
    throw_range("tensor '" + t.name + "' has rows of " + std::to_string(m.cols) + " values, not a whole number of " +
                gguf::type_info(t.type).name + " blocks of " + std::to_string(block));
  m.row_bytes = quant::bytes_for(t.type, m.cols);
  if (m.row_bytes * static_cast<size_t>(m.rows) != t.n_bytes)
    throw_range("tensor '" + t.name + "' has " + std::to_string(t.n_bytes) + " bytes of data, expected " +
                std::to_string(m.row_bytes * static_cast<size_t>(m.rows)));
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

#if defined(__x86_64__) && defined(__GNUC__)
// ---- AVX2 + FMA + F16C versions: the same partial-sum layout (8 lanes), hence the same sums as
// the portable versions up to FMA contraction. Chosen once at run time. ----
#define OSD_AVX2 __attribute__((target("avx2,fma,f16c")))
#define OSD_AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) inline

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

// ---- Register-blocked AVX2 products: RM weight rows x RN tokens per tile. Each output keeps its
// own 8-lane accumulator and sees exactly the operations of the dot_*_avx2 above (the same FMA
// per 8 columns in column order, the same scalar tail, the same horizontal sum), so the tile
// shape changes nothing but speed: a tile converts each weight vector once for RN tokens, and
// runs RM x RN independent FMA chains where one dot product runs a single latency-bound chain.
// test_quant.cpp checks these against matmul_reference bit for bit. ----

struct F32Avx2 {
  using T = float;
  OSD_AVX2 static __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  static float scalar(float v) { return v; }
};
struct F16Avx2 {
  using T = uint16_t;
  OSD_AVX2 static __m256 load(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static float scalar(uint16_t v) { return half_to_float(v); }
};
struct BF16Avx2 {
  using T = uint16_t;
  OSD_AVX2 static __m256 load(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
  }
  static float scalar(uint16_t v) { return bf16_to_float(v); }
};

// finish_avx2's horizontal sum without a tail, in lane 0: each level adds lane k to its partner
// (the other 128-bit half, then the lane 1 apart, then 2 apart), the same additions as the scalar
// code (a + b and b + a round alike), without the trip through memory.
OSD_AVX2 inline __m256 dot_hsum_avx2(__m256 a) {
  a = _mm256_add_ps(a, _mm256_permute2f128_ps(a, a, 1));             // a_k + a_(k+4)
  a = _mm256_add_ps(a, _mm256_permute_ps(a, _MM_SHUFFLE(2, 3, 0, 1)));  // + the lane 1 apart
  return _mm256_add_ps(a, _mm256_permute_ps(a, _MM_SHUFFLE(1, 0, 3, 2)));  // + the lane 2 apart
}

// The end of one dot_*_avx2: the scalar tail from column i (a multiple of 8) into the lanes, then
// the fixed horizontal sum.
template <class L>
OSD_AVX2 float finish_avx2(__m256 acc, const typename L::T* w, const float* x, int64_t i, int64_t n) {
  alignas(32) float a[8];
  _mm256_store_ps(a, acc);
  for (; i < n; ++i) a[i & 7] += L::scalar(w[i]) * x[i];
  return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}

// y[j * ld + i] = dot(row i, token j) for i < RM, j < RN: w points at RM rows of `row_bytes`,
// x at RN token rows of `cols` floats, y at the first output.
template <class L, int RM, int RN>
OSD_AVX2 void tile_float_avx2(const uint8_t* w0, size_t row_bytes, const float* x0, int64_t cols, float* y, int64_t ld) {
  using T = typename L::T;
  const T* w[RM];
  const float* x[RN];
  for (int i = 0; i < RM; ++i) w[i] = reinterpret_cast<const T*>(w0 + static_cast<size_t>(i) * row_bytes);
  for (int j = 0; j < RN; ++j) x[j] = x0 + j * cols;
  __m256 acc[RM][RN];
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < RN; ++j) acc[i][j] = _mm256_setzero_ps();
  // The tile reads RM rows side by side; the rows after it (usually the next tile) are fetched
  // ahead at the rate this tile consumes its own, so memory sees one sequential stream.
  const char* next = reinterpret_cast<const char*>(w0 + RM * row_bytes);
  constexpr int kStepBytes = 8 * static_cast<int>(sizeof(T)) * RM;
  int64_t c = 0;
  for (; c + 8 <= cols; c += 8) {
    for (int k = 0; k < kStepBytes; k += 64) _mm_prefetch(next + c * static_cast<int64_t>(sizeof(T)) * RM + k, _MM_HINT_T0);
    __m256 wv[RM];
    for (int i = 0; i < RM; ++i) wv[i] = L::load(w[i] + c);
    for (int j = 0; j < RN; ++j) {
      const __m256 xv = _mm256_loadu_ps(x[j] + c);
      for (int i = 0; i < RM; ++i) acc[i][j] = _mm256_fmadd_ps(wv[i], xv, acc[i][j]);
    }
  }
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < RN; ++j)
      y[j * ld + i] = c == cols ? _mm256_cvtss_f32(dot_hsum_avx2(acc[i][j])) : finish_avx2<L>(acc[i][j], w[i], x[j], c, cols);
}

using TileFn = void (*)(const uint8_t*, size_t, const float*, int64_t, float*, int64_t);
// 3 rows x 4 tokens (12 accumulators, 3 weight vectors and one token vector fill the 16 ymm
// registers; 4 x 3 needs 17 and GCC spills an accumulator, which puts a store and a reload on its
// FMA chain). A lone token takes 4 rows: four independent chains for decode.
constexpr int kTileTokens = 4, kTileRowsMany = 3, kTileRowsOne = 4;

template <class L>
struct FloatTiles {
  static constexpr TileFn fns[4][4] = {
      {tile_float_avx2<L, 1, 1>, tile_float_avx2<L, 1, 2>, tile_float_avx2<L, 1, 3>, tile_float_avx2<L, 1, 4>},
      {tile_float_avx2<L, 2, 1>, tile_float_avx2<L, 2, 2>, tile_float_avx2<L, 2, 3>, tile_float_avx2<L, 2, 4>},
      {tile_float_avx2<L, 3, 1>, tile_float_avx2<L, 3, 2>, tile_float_avx2<L, 3, 3>, tile_float_avx2<L, 3, 4>},
      {tile_float_avx2<L, 4, 1>, nullptr, nullptr, nullptr}};
};

// Rows [r0, r1) for every token, in tiles of up to 3 rows x 4 tokens (4 x 1 for a lone token).
template <class L>
void rows_float_avx2(const Matrix& w, const float* x, int64_t n, float* y, int64_t r0, int64_t r1) {
  for (int64_t t = 0; t < n; t += kTileTokens) {
    const int rn = static_cast<int>(std::min<int64_t>(kTileTokens, n - t));
    const int64_t rows_per_tile = rn == 1 ? kTileRowsOne : kTileRowsMany;
    for (int64_t r = r0; r < r1; r += rows_per_tile) {
      const int rm = static_cast<int>(std::min<int64_t>(rows_per_tile, r1 - r));
      FloatTiles<L>::fns[rm - 1][rn - 1](w.data + static_cast<size_t>(r) * w.row_bytes, w.row_bytes, x + t * w.cols,
                                         w.cols, y + t * w.rows + r, w.rows);
    }
  }
}

// ---- The same tiles with AVX-512 registers: a zmm holds the 8-lane accumulators of two outputs
// (rows i and i + 1 for one token), and every lane sees exactly the FMAs of dot_*_avx2, so the bits
// are those of the AVX2 tiles: one instruction does two outputs' work, F16 and BF16 convert 16
// values at once, and the 32 registers hold 3 row pairs x 8 tokens. ----
#define OSD_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma,f16c")))
#define OSD_AVX512_INLINE __attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma,f16c"), always_inline)) inline
// GCC 12's AVX-512 headers fill unused lanes from a self-initialised "undefined" vector, which its
// own -Wuninitialized then flags in every caller (fixed in GCC 13): silenced for these kernels only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

OSD_AVX512 inline __m256i load_halves2(const uint16_t* a, const uint16_t* b) {
  return _mm256_inserti128_si256(_mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a))),
                                 _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)), 1);
}
struct F32Avx512 {
  using Narrow = F32Avx2;
  OSD_AVX512 static __m512 load2(const float* a, const float* b) {
    return _mm512_insertf32x8(_mm512_zextps256_ps512(_mm256_loadu_ps(a)), _mm256_loadu_ps(b), 1);
  }
};
struct F16Avx512 {
  using Narrow = F16Avx2;
  OSD_AVX512 static __m512 load2(const uint16_t* a, const uint16_t* b) { return _mm512_cvtph_ps(load_halves2(a, b)); }
};
struct BF16Avx512 {
  using Narrow = BF16Avx2;
  OSD_AVX512 static __m512 load2(const uint16_t* a, const uint16_t* b) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load_halves2(a, b)), 16));
  }
};

// dot_hsum_avx2 on both 8-lane halves at once, results in lanes 0 and 8 (a swap of 128-bit blocks,
// then of lanes 1 apart, then 2 apart). The scalar sums took a quarter of a 256-column tile's time.
OSD_AVX512 inline __m512 finish2_avx512(__m512 a) {
  a = _mm512_add_ps(a, _mm512_shuffle_f32x4(a, a, _MM_SHUFFLE(2, 3, 0, 1)));  // a_k + a_(k+4)
  a = _mm512_add_ps(a, _mm512_permute_ps(a, _MM_SHUFFLE(2, 3, 0, 1)));       // + the lane 1 apart
  return _mm512_add_ps(a, _mm512_permute_ps(a, _MM_SHUFFLE(1, 0, 3, 2)));    // + the lane 2 apart
}

// y[j * ld + i] = dot(row i, token j) for i < rows (2 RP - 1 or 2 RP: an odd last row is paired
// with itself and its copy not stored), j < RN. Layout as tile_float_avx2.
template <class L, int RP, int RN>
OSD_AVX512 void tile_float_avx512(const uint8_t* w0, size_t row_bytes, int rows, const float* x0, int64_t cols,
                                  float* y, int64_t ld) {
  using T = typename L::Narrow::T;
  const T* w[2 * RP];
  const float* x[RN];
  for (int i = 0; i < 2 * RP; ++i) w[i] = reinterpret_cast<const T*>(w0 + static_cast<size_t>(std::min(i, rows - 1)) * row_bytes);
  for (int j = 0; j < RN; ++j) x[j] = x0 + j * cols;
  __m512 acc[RP][RN];
  for (int p = 0; p < RP; ++p)
    for (int j = 0; j < RN; ++j) acc[p][j] = _mm512_setzero_ps();
  const char* next = reinterpret_cast<const char*>(w0 + static_cast<size_t>(rows) * row_bytes);
  const int64_t step_bytes = 8 * static_cast<int64_t>(sizeof(T)) * rows;
  int64_t c = 0;
  for (; c + 8 <= cols; c += 8) {
    for (int64_t k = 0; k < step_bytes; k += 64) _mm_prefetch(next + c * static_cast<int64_t>(sizeof(T)) * rows + k, _MM_HINT_T0);
    __m512 wv[RP];
    for (int p = 0; p < RP; ++p) wv[p] = L::load2(w[2 * p] + c, w[2 * p + 1] + c);
    for (int j = 0; j < RN; ++j) {
      const __m512 xv = _mm512_broadcast_f32x8(_mm256_loadu_ps(x[j] + c));
      for (int p = 0; p < RP; ++p) acc[p][j] = _mm512_fmadd_ps(wv[p], xv, acc[p][j]);
    }
  }
  if (c == cols) {
    // No scalar tail: both outputs' horizontal sums in the register (finish2_avx512).
    for (int p = 0; p < RP; ++p)
      for (int j = 0; j < RN; ++j) {
        const __m512 s = finish2_avx512(acc[p][j]);
        y[j * ld + 2 * p] = _mm512_cvtss_f32(s);
        if (2 * p + 1 < rows) y[j * ld + 2 * p + 1] = _mm_cvtss_f32(_mm512_extractf32x4_ps(s, 2));
      }
    return;
  }
  for (int p = 0; p < RP; ++p)
    for (int j = 0; j < RN; ++j) {
      y[j * ld + 2 * p] = finish_avx2<typename L::Narrow>(_mm512_castps512_ps256(acc[p][j]), w[2 * p], x[j], c, cols);
      if (2 * p + 1 < rows)
        y[j * ld + 2 * p + 1] =
            finish_avx2<typename L::Narrow>(_mm512_extractf32x8_ps(acc[p][j], 1), w[2 * p + 1], x[j], c, cols);
    }
}

using Tile512Fn = void (*)(const uint8_t*, size_t, int, const float*, int64_t, float*, int64_t);
// 3 row pairs x 8 tokens: 24 accumulators, 3 weight vectors and a token vector of the 32 registers.
constexpr int kTile512Pairs = 3, kTile512Tokens = 8;

template <class L, int RP, int... RN>
constexpr std::array<Tile512Fn, sizeof...(RN)> tiles512_row(std::integer_sequence<int, RN...>) {
  return {tile_float_avx512<L, RP, RN + 1>...};
}
template <class L>
struct FloatTiles512 {
  static constexpr std::array<std::array<Tile512Fn, kTile512Tokens>, kTile512Pairs> fns = {
      tiles512_row<L, 1>(std::make_integer_sequence<int, kTile512Tokens>{}),
      tiles512_row<L, 2>(std::make_integer_sequence<int, kTile512Tokens>{}),
      tiles512_row<L, 3>(std::make_integer_sequence<int, kTile512Tokens>{})};
};

// Rows [r0, r1) for every token, in tiles of up to 6 rows x 8 tokens.
template <class L>
void rows_float_avx512(const Matrix& w, const float* x, int64_t n, float* y, int64_t r0, int64_t r1) {
  for (int64_t t = 0; t < n; t += kTile512Tokens) {
    const int rn = static_cast<int>(std::min<int64_t>(kTile512Tokens, n - t));
    for (int64_t r = r0; r < r1; r += 2 * kTile512Pairs) {
      const int rm = static_cast<int>(std::min<int64_t>(2 * kTile512Pairs, r1 - r));
      FloatTiles512<L>::fns[(rm + 1) / 2 - 1][rn - 1](w.data + static_cast<size_t>(r) * w.row_bytes, w.row_bytes, rm,
                                                      x + t * w.cols, w.cols, y + t * w.rows + r, w.rows);
    }
  }
}

#pragma GCC diagnostic pop

// AVX-512 F, DQ and VL, unless OSD_NO_AVX512 is set (ctest runs test_quant both ways).
bool have_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl") && !std::getenv("OSD_NO_AVX512");
  return yes;
}

using RowsFn = void (*)(const Matrix&, const float*, int64_t, float*, int64_t, int64_t);

// The AVX2 ISA's tiles: in AVX-512 registers where the CPU has them (the same bits).
RowsFn pick_rows_avx2(TensorType t) {
  const bool wide = have_avx512();
  switch (t) {
    case TensorType::F32: return wide ? rows_float_avx512<F32Avx512> : rows_float_avx2<F32Avx2>;
    case TensorType::F16: return wide ? rows_float_avx512<F16Avx512> : rows_float_avx2<F16Avx2>;
    case TensorType::BF16: return wide ? rows_float_avx512<BF16Avx512> : rows_float_avx2<BF16Avx2>;
    default: throw_range(std::string("no matrix kernel for type ") + gguf::type_info(t).name);
  }
}

// exp(x) for 8 floats (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial; within
// 2 ulp of the exact value for x in [-87, 88.7], 0 below, +inf above, NaN kept).
OSD_AVX2 __m256 exp_avx2(__m256 x) {
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.72f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  // 2^n, split in two factors so that n = 128 (x near 88.7) does not overflow the exponent field.
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i h = _mm256_srai_epi32(ni, 1);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, _mm256_set1_epi32(127)), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, h), _mm256_set1_epi32(127)), 23));
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(88.72f), _CMP_GT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

OSD_AVX2 void swiglu_avx2(const float* gate, const float* up, int64_t n, float* h) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g));
    const __m256 sg = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    _mm256_storeu_ps(h + i, _mm256_mul_ps(sg, _mm256_loadu_ps(up + i)));
  }
  if (i < n) {  // the tail through the same vector code, so that a value never depends on its position
    alignas(32) float gt[8] = {}, ut[8] = {}, ht[8];
    for (int64_t j = i; j < n; ++j) gt[j - i] = gate[j], ut[j - i] = up[j];
    const __m256 g = _mm256_load_ps(gt);
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), g));
    _mm256_store_ps(ht, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), _mm256_load_ps(ut)));
    for (int64_t j = i; j < n; ++j) h[j] = ht[j - i];
  }
}

OSD_AVX2 float hsum_avx2(__m256 v) {
  const __m128 t = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 u = _mm_add_ps(t, _mm_movehl_ps(t, t));
  return _mm_cvtss_f32(_mm_add_ss(u, _mm_movehdup_ps(u)));
}

// hsum_avx2 of eight vectors at once: lane j of the result is hsum_avx2(v[j]), bit for bit. The
// adds pair the same lanes in the same order, ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)),
// with shuffles moving eight vectors' lanes side by side instead of one vector's.
OSD_AVX2 __m256 hsum8_avx2(const __m256 v[8]) {
  // t = lo + hi of each vector: v[j] and v[j + 4] share a register (lo and hi 128 bits).
  __m256 t[4];
  for (int j = 0; j < 4; ++j)
    t[j] = _mm256_add_ps(_mm256_permute2f128_ps(v[j], v[j + 4], 0x20), _mm256_permute2f128_ps(v[j], v[j + 4], 0x31));
  // u0 = t0 + t2, u1 = t1 + t3: lo lanes [u0, u1] of v0, v1 (then v2, v3), hi the same of v4..v7.
  const __m256 u01 = _mm256_add_ps(_mm256_shuffle_ps(t[0], t[1], _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(t[0], t[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 u23 = _mm256_add_ps(_mm256_shuffle_ps(t[2], t[3], _MM_SHUFFLE(1, 0, 1, 0)), _mm256_shuffle_ps(t[2], t[3], _MM_SHUFFLE(3, 2, 3, 2)));
  // u0 + u1, in the order v0..v3 (lo) and v4..v7 (hi).
  return _mm256_add_ps(_mm256_shuffle_ps(u01, u23, _MM_SHUFFLE(2, 0, 2, 0)), _mm256_shuffle_ps(u01, u23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// Attention for head sizes that are a multiple of 8 (see attend_head). Slot s of a head's view is
// row s of K and V for s < prefix, else row extra[s - prefix].
struct Slots {
  size_t stride;
  int32_t prefix;
  const int32_t* extra;
  size_t operator()(int32_t s) const { return static_cast<size_t>(s < prefix ? s : extra[s - prefix]) * stride; }
};

// Keys and values as floats: the cache holds float32 or float16 (converted exactly by F16C).
OSD_AVX2_INLINE __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
OSD_AVX2_INLINE __m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// Scores of slots [s0, s1): per slot one 8-lane FMA chain over the head dimension and a fixed
// horizontal sum (hsum_avx2), times scale. Slots go eight at a time: eight chains side by side
// keep both FMA pipes busy (four left them half idle, waiting on each chain's latency), and their
// eight sums come out of one hsum8_avx2. The rest go one by one through the same chain and sum, so
// a slot's score never depends on where it falls.
template <class T>
OSD_AVX2 void scores_avx2(const float* q, const T* K, const Slots& slot, int32_t s0, int32_t s1, int64_t hd, float scale,
                          float* score) {
  const __m256 vscale = _mm256_set1_ps(scale);
  const int32_t n = s1;
  int32_t s = s0;
  for (; s + 8 <= n; s += 8) {
    const T* k[8];
    __m256 a[8];
    for (int j = 0; j < 8; ++j) k[j] = K + slot(s + j), a[j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qv, load8(k[j] + d), a[j]);
    }
    _mm256_storeu_ps(score + s, _mm256_mul_ps(hsum8_avx2(a), vscale));
  }
  for (; s < n; ++s) {
    const T* k = K + slot(s);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t d = 0; d < hd; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), acc);
    score[s] = hsum_avx2(acc) * scale;
  }
}

// The weights, softmax of the scores, in place: the maximum eight lanes at a time (order does not
// change a maximum; a NaN score makes every weight NaN either way); exp is elementwise, so grouping
// the slots by 8 changes no value; the sum takes slot s into lane s % 8 for the whole blocks of 8,
// then hsum_avx2, then the rest in slot order (a sum in slot order alone waited on one add per slot).
OSD_AVX2 void softmax_avx2(float* score, int32_t n) {
  float mx = -INFINITY;
  int32_t s = 0;
  if (n >= 8) {
    __m256 m = _mm256_loadu_ps(score);
    for (s = 8; s + 8 <= n; s += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(score + s));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m);
    for (float l : lanes) mx = std::max(mx, l);
  }
  for (; s < n; ++s) mx = std::max(mx, score[s]);
  const __m256 vmx = _mm256_set1_ps(mx);
  __m256 part = _mm256_setzero_ps();
  for (s = 0; s + 8 <= n; s += 8) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(score + s), vmx));
    _mm256_storeu_ps(score + s, e);
    part = _mm256_add_ps(part, e);
  }
  float sum = hsum_avx2(part);
  for (; s < n; ++s) {
    alignas(32) float t[8] = {score[s] - mx, 0, 0, 0, 0, 0, 0, 0};
    _mm256_store_ps(t, exp_avx2(_mm256_load_ps(t)));
    score[s] = t[0];
    sum += t[0];
  }
  const float inv = 1.0f / sum;
  const __m256 vinv = _mm256_set1_ps(inv);
  for (s = 0; s + 8 <= n; s += 8) _mm256_storeu_ps(score + s, _mm256_mul_ps(_mm256_loadu_ps(score + s), vinv));
  for (; s < n; ++s) score[s] *= inv;
}

// The output: each dimension one FMA chain over the slots in order (which fixes its bits),
// dimensions in chunks of 64 held in registers. Adds slots [s0, s1) to the running sums in out
// (zeros before the first slot): a chain stopped and resumed keeps its bits.
template <class T>
OSD_AVX2 void values_avx2(const float* score, const T* V, const Slots& slot, int32_t s0, int32_t s1, int64_t hd, float* out) {
  for (int64_t d0 = 0; d0 < hd; d0 += 64) {
    const int nv = static_cast<int>(std::min<int64_t>(64, hd - d0) / 8);
    __m256 acc[8];
    for (int j = 0; j < nv; ++j) acc[j] = _mm256_loadu_ps(out + d0 + 8 * j);
    for (int32_t s = s0; s < s1; ++s) {
      const __m256 a = _mm256_set1_ps(score[s]);
      const T* v = V + slot(s) + d0;
      if (nv == 8) {
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(a, load8(v + 8 * j), acc[j]);
      } else {
        for (int j = 0; j < nv; ++j) acc[j] = _mm256_fmadd_ps(a, load8(v + 8 * j), acc[j]);
      }
    }
    for (int j = 0; j < nv; ++j) _mm256_storeu_ps(out + d0 + 8 * j, acc[j]);
  }
}

// The outputs of NQ (2 to 4) query heads that share a key-value head, with AVX-512 (head size a
// multiple of 16): one head's chains alone wait on the FMA latency (one FMA per dimension per
// slot); NQ heads' chains side by side fill the pipes, and each value row is read once for all of
// them. Per dimension the chain is values_avx2's, so the bits are too. With scores_multi_avx512
// below, against pairs and single queries (a kernel harness, one thread, 1024 float16 slots):
// three queries 13.7 -> 9.8 us, fifteen 66.9 -> 46.7 us; SmolLM2 after 1024 tokens, alternating:
// 1-token passes 4.2-4.5 -> 3.9-4.0 ms, 5-token 7.8 -> 6.5-6.7 ms, 17-token 20.2-20.6 -> 16.3-16.9 ms.
// GCC 12's AVX-512 headers take half vectors through a self-initialised "undefined" vector, which
// its -Wmaybe-uninitialized flags wherever they inline: silenced for the AVX-512 attention only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
OSD_AVX512_INLINE __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
OSD_AVX512_INLINE __m512 load16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

template <int NQ, class T>
OSD_AVX512 void values_multi_avx512(const AttendQuery* qs, const T* V, const Slots& slot, int32_t s0, int32_t s1, int64_t hd) {
  for (int64_t d0 = 0; d0 < hd; d0 += 64) {
    const int nv = static_cast<int>(std::min<int64_t>(64, hd - d0) / 16);
    __m512 acc[NQ][4];
    for (int i = 0; i < NQ; ++i)
      for (int j = 0; j < nv; ++j) acc[i][j] = _mm512_loadu_ps(qs[i].out + d0 + 16 * j);
    for (int32_t s = s0; s < s1; ++s) {
      __m512 x[NQ];
      for (int i = 0; i < NQ; ++i) x[i] = _mm512_set1_ps(qs[i].score[s]);
      const T* v = V + slot(s) + d0;
      for (int j = 0; j < nv; ++j) {
        const __m512 vj = load16(v + 16 * j);
        for (int i = 0; i < NQ; ++i) acc[i][j] = _mm512_fmadd_ps(x[i], vj, acc[i][j]);
      }
    }
    for (int i = 0; i < NQ; ++i)
      for (int j = 0; j < nv; ++j) _mm512_storeu_ps(qs[i].out + d0 + 16 * j, acc[i][j]);
  }
}

// Lane l + lane l + 8 of a 16-lane sum.
__attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma,f16c"), always_inline)) inline __m256 fold_halves(__m512 a) {
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}

// scores_avx2 with 16-lane chains (head size a multiple of 16): half the FMAs. A slot's chain
// folds its halves (lane l + lane l + 8), then sums as scores_avx2 does, alone or eight at a time.
template <class T>
OSD_AVX512 void scores_avx512(const float* q, const T* K, const Slots& slot, int32_t s0, int32_t s1, int64_t hd, float scale,
                              float* score) {
  const __m256 vscale = _mm256_set1_ps(scale);
  int32_t s = s0;
  for (; s + 8 <= s1; s += 8) {
    const T* k[8];
    __m512 a[8];
    for (int j = 0; j < 8; ++j) k[j] = K + slot(s + j), a[j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < hd; d += 16) {
      const __m512 qv = _mm512_loadu_ps(q + d);
      for (int j = 0; j < 8; ++j) a[j] = _mm512_fmadd_ps(qv, load16(k[j] + d), a[j]);
    }
    __m256 f[8];
    for (int j = 0; j < 8; ++j) f[j] = fold_halves(a[j]);
    _mm256_storeu_ps(score + s, _mm256_mul_ps(hsum8_avx2(f), vscale));
  }
  for (; s < s1; ++s) {
    const T* k = K + slot(s);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < hd; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(k + d), acc);
    score[s] = hsum_avx2(fold_halves(acc)) * scale;
  }
}

// exp_avx2's operations on 16 lanes: lane by lane the same values.
OSD_AVX512 __m512 exp_avx512(__m512 x) {
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.72f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512i ni = _mm512_cvtps_epi32(n);
  const __m512i h = _mm512_srai_epi32(ni, 1);
  const __m512 s1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(h, _mm512_set1_epi32(127)), 23));
  const __m512 s2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_sub_epi32(ni, h), _mm512_set1_epi32(127)), 23));
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(p, s1), s2);
  y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ), y, _mm512_setzero_ps());
  y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(88.72f), _CMP_GT_OQ), y, _mm512_set1_ps(INFINITY));
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), y, x);
}

// softmax_avx2 with the exps 16 at a time (the softmax took a tenth of attention's time): the
// same maximum, the same exps, and the 8-lane sum takes each 16's low half, then its high half.
// Measured: fifteen queries over 1024 slots 54.0 -> 49.0 us (kernel harness, one thread); SmolLM2
// passes after 1024 tokens within this host's noise to 5% faster.
OSD_AVX512 void softmax_avx512(float* score, int32_t n) {
  if (n < 16) return softmax_avx2(score, n);
  __m512 m = _mm512_loadu_ps(score);
  int32_t s = 16;
  for (; s + 16 <= n; s += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(score + s));
  float mx = _mm512_reduce_max_ps(m);
  for (; s < n; ++s) mx = std::max(mx, score[s]);
  const __m512 vmx = _mm512_set1_ps(mx);
  __m256 part = _mm256_setzero_ps();
  for (s = 0; s + 16 <= n; s += 16) {
    const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_loadu_ps(score + s), vmx));
    _mm512_storeu_ps(score + s, e);
    part = _mm256_add_ps(part, _mm512_castps512_ps256(e));
    part = _mm256_add_ps(part, _mm512_extractf32x8_ps(e, 1));
  }
  if (s + 8 <= n) {
    const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(score + s), _mm512_castps512_ps256(vmx)));
    _mm256_storeu_ps(score + s, e);
    part = _mm256_add_ps(part, e);
    s += 8;
  }
  float sum = hsum_avx2(part);
  for (; s < n; ++s) {
    alignas(32) float t[8] = {score[s] - mx, 0, 0, 0, 0, 0, 0, 0};
    _mm256_store_ps(t, exp_avx2(_mm256_load_ps(t)));
    score[s] = t[0];
    sum += t[0];
  }
  const float inv = 1.0f / sum;
  const __m512 vinv = _mm512_set1_ps(inv);
  for (s = 0; s + 16 <= n; s += 16) _mm512_storeu_ps(score + s, _mm512_mul_ps(_mm512_loadu_ps(score + s), vinv));
  for (; s < n; ++s) score[s] *= inv;
}

// scores_avx512 of NQ (2 or 3) queries over the same slots [s0, s1), each key chunk loaded (and,
// from a float16 cache, converted) once for all of them: per query the same chains and sums.
template <int NQ, class T>
OSD_AVX512 void scores_multi_avx512(const AttendQuery* qs, const T* K, const Slots& slot, int32_t s0, int32_t s1,
                                    int64_t hd, float scale) {
  const __m256 vscale = _mm256_set1_ps(scale);
  int32_t s = s0;
  for (; s + 8 <= s1; s += 8) {
    const T* k[8];
    __m512 a[NQ][8];
    for (int j = 0; j < 8; ++j) k[j] = K + slot(s + j);
    for (int i = 0; i < NQ; ++i)
      for (int j = 0; j < 8; ++j) a[i][j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < hd; d += 16) {
      __m512 qv[NQ];
      for (int i = 0; i < NQ; ++i) qv[i] = _mm512_loadu_ps(qs[i].q + d);
      for (int j = 0; j < 8; ++j) {
        const __m512 kj = load16(k[j] + d);
        for (int i = 0; i < NQ; ++i) a[i][j] = _mm512_fmadd_ps(qv[i], kj, a[i][j]);
      }
    }
    for (int i = 0; i < NQ; ++i) {
      __m256 f[8];
      for (int j = 0; j < 8; ++j) f[j] = fold_halves(a[i][j]);
      _mm256_storeu_ps(qs[i].score + s, _mm256_mul_ps(hsum8_avx2(f), vscale));
    }
  }
  for (int i = 0; i < NQ; ++i) scores_avx512(qs[i].q, K, slot, s, s1, hd, scale, qs[i].score);
}

// attend_heads with the vector kernels (head size a multiple of 8; `wide`: AVX-512 and a multiple
// of 16, for 16-lane scores, the grouped scores and values, and the 16-lane softmax). Each query's slots that are row s at slot s
// (its prefix, then its batch slots while they run in order: a chain's tokens, a tree's first
// branch) go in blocks of 64 slots, every query that has the block taking its scores, then its
// values, from the block's keys and values while they are in L1; the rest of each query's slots
// follow alone. Per query the arithmetic is that of the query alone (attend_head): the same chains
// in the same order, stopped and resumed.
template <class T>
OSD_AVX2 void attend_heads_avx2(const AttendQuery* qs, int32_t count, const T* K, const T* V, size_t stride, int64_t hd,
                                float scale, bool wide) {
  constexpr int32_t kBlock = 64;
  const Slots same{stride, std::numeric_limits<int32_t>::max(), nullptr};
  const auto scores = wide ? scores_avx512<T> : scores_avx2<T>;
  // A float16 cache is read as it is, converted on every load: converting each shared block to
  // floats once for all the queries measured slower (SmolLM2 after 1024 tokens, 5-token passes 7.9-8.1
  // against 7.1-7.6 ms; a kernel harness: 3 queries over 1024 slots 19.4 against 13.4 us).
  thread_local std::vector<int32_t> common;
  common.resize(static_cast<size_t>(count));
  int32_t shared = 0;
  for (int32_t i = 0; i < count; ++i) {
    const AttendQuery& a = qs[i];
    int32_t c = a.prefix;
    while (c - a.prefix < a.n_extra && a.extra[c - a.prefix] == c) ++c;
    common[i] = c;
    shared = std::max(shared, c);
  }
  // The end of block s0 for query i, and the queries from i on (at most `most`) that end it there
  // too: with AVX-512 they take their scores and values together, each key and value row read once.
  auto end_of = [&](int32_t i, int32_t s0) { return std::min(s0 + kBlock, common[i]); };
  auto run_of = [&](int32_t i, int32_t s0, int32_t most) {
    int32_t j = i + 1;
    while (wide && j < count && j - i < most && end_of(j, s0) == end_of(i, s0)) ++j;
    return j;
  };
  for (int32_t s0 = 0; s0 < shared; s0 += kBlock)
    for (int32_t i = 0; i < count;) {
      const int32_t e = end_of(i, s0), j = e > s0 ? run_of(i, s0, 3) : i + 1;
      switch (e > s0 ? j - i : 0) {
        case 0: break;
        case 3: scores_multi_avx512<3>(qs + i, K, same, s0, e, hd, scale); break;
        case 2: scores_multi_avx512<2>(qs + i, K, same, s0, e, hd, scale); break;
        default: scores(qs[i].q, K, same, s0, e, hd, scale, qs[i].score); break;
      }
      i = j;
    }
  for (int32_t i = 0; i < count; ++i) {
    const AttendQuery& a = qs[i];
    const int32_t n = a.prefix + a.n_extra;
    scores(a.q, K, Slots{stride, a.prefix, a.extra}, common[i], n, hd, scale, a.score);
    if (wide) softmax_avx512(a.score, n);
    else softmax_avx2(a.score, n);
    std::fill(a.out, a.out + hd, 0.0f);
  }
  for (int32_t s0 = 0; s0 < shared; s0 += kBlock)
    for (int32_t i = 0; i < count;) {
      const int32_t e = end_of(i, s0), j = e > s0 ? run_of(i, s0, 4) : i + 1;
      switch (e > s0 ? j - i : 0) {
        case 0: break;
        case 4: values_multi_avx512<4>(qs + i, V, same, s0, e, hd); break;
        case 3: values_multi_avx512<3>(qs + i, V, same, s0, e, hd); break;
        case 2: values_multi_avx512<2>(qs + i, V, same, s0, e, hd); break;
        default: values_avx2(qs[i].score, V, same, s0, e, hd, qs[i].out); break;
      }
      i = j;
    }
  for (int32_t i = 0; i < count; ++i) {
    const AttendQuery& a = qs[i];
    values_avx2(a.score, V, Slots{stride, a.prefix, a.extra}, common[i], a.prefix + a.n_extra, hd, a.out);
  }
}
#pragma GCC diagnostic pop

// kv_half eight at a time: the clamp keeps NaN (minps / maxps return their second operand when
// either is NaN), and F16C rounds to nearest even and keeps NaN payloads' top bits with the quiet
// bit set, as float_to_half does.
OSD_AVX2 void floats_to_halves_avx2(const float* x, uint16_t* h, int64_t n) {
  const __m256 hi = _mm256_set1_ps(65504.0f), lo = _mm256_set1_ps(-65504.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_max_ps(lo, _mm256_min_ps(hi, _mm256_loadu_ps(x + i)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; i < n; ++i) h[i] = kv_half(x[i]);
}

bool have_avx2() {
  static const bool yes = quant::isa_available(quant::Isa::Avx2) && !std::getenv("OSD_NO_AVX2");
  return yes;
}
#else
bool have_avx2() { return false; }
#endif

using DotFn = float (*)(const uint8_t* row, const float* x, int64_t n);

DotFn pick_dot(TensorType t, bool v) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (v) switch (t) {
      case TensorType::F32:
        return [](const uint8_t* r, const float* x, int64_t n) { return dot_f32_avx2(reinterpret_cast<const float*>(r), x, n); };
      case TensorType::F16:
        return [](const uint8_t* r, const float* x, int64_t n) { return dot_f16_avx2(reinterpret_cast<const uint16_t*>(r), x, n); };
      case TensorType::BF16:
        return [](const uint8_t* r, const float* x, int64_t n) { return dot_bf16_avx2(reinterpret_cast<const uint16_t*>(r), x, n); };
      default:
        break;
    }
#endif
  switch (t) {
    case TensorType::F32:
      return [](const uint8_t* r, const float* x, int64_t n) { return dot_f32_ref(reinterpret_cast<const float*>(r), x, n); };
    case TensorType::F16:
      return [](const uint8_t* r, const float* x, int64_t n) { return dot_f16_ref(reinterpret_cast<const uint16_t*>(r), x, n); };
    case TensorType::BF16:
      return [](const uint8_t* r, const float* x, int64_t n) { return dot_bf16_ref(reinterpret_cast<const uint16_t*>(r), x, n); };
    default:
      throw_range(std::string("no matrix kernel for type ") + gguf::type_info(t).name);
  }
}

}  // namespace

void dequantize_row(const Matrix& m, int64_t r, float* out) {
  quant::dequantize(m.type, m.data + static_cast<size_t>(r) * m.row_bytes, m.cols, out);
}

bool kernel_isa_available(KernelIsa isa) {
  return isa != KernelIsa::Avx2 || quant::isa_available(quant::Isa::Avx2);
}

namespace {

quant::Isa quant_isa(KernelIsa isa) {
  return isa == KernelIsa::Auto ? quant::best_isa() : isa == KernelIsa::Avx2 ? quant::Isa::Avx2 : quant::Isa::Portable;
}

void check_isa(KernelIsa isa) {
  if (isa == KernelIsa::Avx2 && !kernel_isa_available(isa))
    throw_range("matmul: the AVX2 kernels are not available on this CPU");
}

}  // namespace

void matmul(const Matrix& w, const float* x, int64_t n, float* y, KernelIsa isa) {
  check_isa(isa);
  if (quant::has_int8_kernel(w.type)) {
    quant::matmul(w.type, w.data, w.row_bytes, w.rows, w.cols, x, n, y, quant_isa(isa), w.packed);
    return;
  }
  const bool avx2 = isa == KernelIsa::Auto ? have_avx2() : isa == KernelIsa::Avx2;
  (void)avx2;
  // Split over output rows; a block of rows is applied to every token while it is hot in cache.
  // 12 rows: whole tiles of 3 or 4 rows.
  constexpr int64_t kRowBlock = 12;
  const int64_t rows = w.rows, cols = w.cols;
  const int64_t nblocks = (rows + kRowBlock - 1) / kRowBlock;
  const size_t grain = grain_for(static_cast<double>(kRowBlock) * cols * n);
#if defined(__x86_64__) && defined(__GNUC__)
  if (avx2) {
    const RowsFn fn = pick_rows_avx2(w.type);
    default_pool().parallel_for(static_cast<size_t>(nblocks), grain, [&](size_t lo, size_t hi) {
      for (size_t b = lo; b < hi; ++b) {
        const int64_t r0 = static_cast<int64_t>(b) * kRowBlock;
        fn(w, x, n, y, r0, std::min(rows, r0 + kRowBlock));
      }
    });
    return;
  }
#endif
  // The portable kernels are the reference: one dot product per output.
  const DotFn dot = pick_dot(w.type, false);
  default_pool().parallel_for(static_cast<size_t>(nblocks), grain, [&](size_t lo, size_t hi) {
    for (size_t b = lo; b < hi; ++b) {
      const int64_t r0 = static_cast<int64_t>(b) * kRowBlock, r1 = std::min(rows, r0 + kRowBlock);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t r = r0; r < r1; ++r)
          y[t * rows + r] = dot(w.data + static_cast<size_t>(r) * w.row_bytes, x + t * cols, cols);
    }
  });
}

void matmul_reference(const Matrix& w, const float* x, int64_t n, float* y, KernelIsa isa) {
  check_isa(isa);
  if (quant::has_int8_kernel(w.type)) {
    quant::matmul(w.type, w.data, w.row_bytes, w.rows, w.cols, x, n, y, quant::Isa::Portable);
    return;
  }
  const DotFn dot = pick_dot(w.type, isa == KernelIsa::Auto ? have_avx2() : isa == KernelIsa::Avx2);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t r = 0; r < w.rows; ++r)
      y[t * w.rows + r] = dot(w.data + static_cast<size_t>(r) * w.row_bytes, x + t * w.cols, w.cols);
}

void matmul_many(const Matrix* const* w, float* const* y, int count, const float* x, int64_t n, KernelIsa isa) {
  if (count <= 0) return;
  auto family = [](TensorType t) { return gguf::type_info(t).block_size; };
  bool shared = count > 1 && kernel_isa_available(isa);
  for (int i = 0; i < count && shared; ++i)
    shared = quant::has_int8_kernel(w[i]->type) && family(w[i]->type) == family(w[0]->type) && w[i]->cols == w[0]->cols;
  if (!shared) {
    for (int i = 0; i < count; ++i) matmul(*w[i], x, n, y[i], isa);
    return;
  }
  std::vector<quant::MatmulTarget> targets;
  for (int i = 0; i < count; ++i)
    targets.push_back({w[i]->type, w[i]->data, w[i]->row_bytes, w[i]->rows, y[i], w[i]->packed});
  quant::matmul_many(targets.data(), count, w[0]->cols, x, n, quant_isa(isa));
}

void rmsnorm(const float* x, const float* weight, int64_t dim, float eps, float* y) {
  double ss = 0.0;
  for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(x[i]) * x[i];
  const float scale = static_cast<float>(1.0 / std::sqrt(ss / dim + eps));
  for (int64_t i = 0; i < dim; ++i) y[i] = weight[i] * (scale * x[i]);
}

void rope(float* v, int64_t head_dim, int64_t pos, float theta, float freq_scale, bool neox) {
  const int64_t half = head_dim / 2;
  // Every head of a token rotates by the same angles: they are computed once per (position,
  // parameters) on each thread and reused, with the same values as computing them each time.
  struct Angles {
    int64_t head_dim = -1, pos = -1;
    float theta = 0, freq_scale = 0;
    std::vector<float> cos, sin;
  };
  thread_local Angles cache;
  if (cache.head_dim != head_dim || cache.pos != pos || cache.theta != theta || cache.freq_scale != freq_scale) {
    cache.cos.resize(static_cast<size_t>(half));
    cache.sin.resize(static_cast<size_t>(half));
    for (int64_t i = 0; i < half; ++i) {
      const double freq = std::pow(static_cast<double>(theta), -2.0 * i / head_dim) * freq_scale;
      const double angle = pos * freq;
      cache.cos[i] = static_cast<float>(std::cos(angle));
      cache.sin[i] = static_cast<float>(std::sin(angle));
    }
    cache.head_dim = head_dim, cache.pos = pos, cache.theta = theta, cache.freq_scale = freq_scale;
  }
  for (int64_t i = 0; i < half; ++i) {
    const float c = cache.cos[i], s = cache.sin[i];
    const int64_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
    const float x0 = v[a], x1 = v[b];
    v[a] = x0 * c - x1 * s;
    v[b] = x0 * s + x1 * c;
  }
}

void swiglu(const float* gate, const float* up, int64_t n, float* h) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (have_avx2()) return swiglu_avx2(gate, up, n, h);
#endif
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    h[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

namespace {

inline float kv_float(float v) { return v; }
inline float kv_float(uint16_t h) { return half_to_float(h); }
inline float kv_dot(const float* q, const float* k, int64_t n) { return dot_f32_ref(k, q, n); }
inline float kv_dot(const float* q, const uint16_t* k, int64_t n) { return dot_f16_ref(k, q, n); }

// The portable attention: the reference where there is no AVX2 or the head size is not a multiple of 8.
template <class T>
void attend_head_ref(const float* q, const T* K, const T* V, size_t stride, int32_t prefix, const int32_t* extra, int32_t n_extra,
                     int64_t head_dim, float scale, float* score, float* out) {
  const int32_t n = prefix + n_extra;
  auto slot = [&](int32_t s) -> size_t { return static_cast<size_t>(s < prefix ? s : extra[s - prefix]) * stride; };
  float mx = -INFINITY;
  for (int32_t s = 0; s < n; ++s) {
    score[s] = kv_dot(q, K + slot(s), head_dim) * scale;
    mx = std::max(mx, score[s]);
  }
  float sum = 0.0f;
  for (int32_t s = 0; s < n; ++s) sum += (score[s] = std::exp(score[s] - mx));
  const float inv = 1.0f / sum;
  std::fill(out, out + head_dim, 0.0f);
  for (int32_t s = 0; s < n; ++s) {
    const float a = score[s] *= inv;
    const T* v = V + slot(s);
    for (int64_t d = 0; d < head_dim; ++d) out[d] += a * kv_float(v[d]);
  }
}

template <class T>
void attend_heads_any(const AttendQuery* qs, int32_t count, const T* K, const T* V, size_t stride, int64_t head_dim, float scale) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (have_avx2() && head_dim % 8 == 0)
    return attend_heads_avx2(qs, count, K, V, stride, head_dim, scale, have_avx512() && head_dim % 16 == 0);
#endif
  for (int32_t i = 0; i < count; ++i)
    attend_head_ref(qs[i].q, K, V, stride, qs[i].prefix, qs[i].extra, qs[i].n_extra, head_dim, scale, qs[i].score, qs[i].out);
}

}  // namespace

bool attention_softmax(float* score, int32_t n, int lanes) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (lanes == 16 && have_avx512()) return softmax_avx512(score, n), true;
  if (lanes == 8 && have_avx2()) return softmax_avx2(score, n), true;
#endif
  (void)score, (void)n, (void)lanes;
  return false;
}

void floats_to_halves(const float* x, uint16_t* h, int64_t n) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (have_avx2()) return floats_to_halves_avx2(x, h, n);
#endif
  for (int64_t i = 0; i < n; ++i) h[i] = kv_half(x[i]);
}

void attend_head(const float* q, const float* K, const float* V, size_t stride, int32_t prefix, const int32_t* extra,
                 int32_t n_extra, int64_t head_dim, float scale, float* score, float* out) {
  const AttendQuery a{q, prefix, extra, n_extra, score, out};
  attend_heads_any(&a, 1, K, V, stride, head_dim, scale);
}

void attend_head(const float* q, const uint16_t* K, const uint16_t* V, size_t stride, int32_t prefix, const int32_t* extra,
                 int32_t n_extra, int64_t head_dim, float scale, float* score, float* out) {
  const AttendQuery a{q, prefix, extra, n_extra, score, out};
  attend_heads_any(&a, 1, K, V, stride, head_dim, scale);
}

void attend_heads(const AttendQuery* qs, int32_t count, const float* K, const float* V, size_t stride, int64_t head_dim,
                  float scale) {
  attend_heads_any(qs, count, K, V, stride, head_dim, scale);
}

void attend_heads(const AttendQuery* qs, int32_t count, const uint16_t* K, const uint16_t* V, size_t stride, int64_t head_dim,
                  float scale) {
  attend_heads_any(qs, count, K, V, stride, head_dim, scale);
}

}  // namespace osd
