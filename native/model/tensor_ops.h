// Model math on the CPU: matrix products over weights in their stored type (F32, F16, BF16, and the
// quantised Q4_0 .. Q8_0, IQ4_NL, Q2_K .. Q6_K, IQ4_XS read block by block, see quant.h),
// RMSNorm, RoPE and SwiGLU. Every output element is one dot product with a fixed reduction order,
// computed by one thread, so a token's result never depends on how many tokens share the call
// (batch invariance), on the thread count, or on the tile shape a kernel uses.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/fp16.h"
#include "io/gguf.h"

namespace osd {

// A weight matrix as stored: `rows` outputs, each a contiguous row of `cols` inputs.
struct Matrix {
  gguf::TensorType type = gguf::TensorType::F32;
  int64_t rows = 0;
  int64_t cols = 0;
  const uint8_t* data = nullptr;
  size_t row_bytes = 0;
  const uint8_t* packed = nullptr;  // data in quant's 16-row layout (set by Model at load), or null
  bool empty() const { return data == nullptr; }
  size_t bytes() const { return row_bytes * static_cast<size_t>(rows); }
};

// Builds a Matrix over a GGUF tensor (ne[0] = cols, ne[1] = rows). Throws Range naming the tensor
// for a type without a matrix kernel, or a row length that is not a whole number of blocks.
Matrix matrix_from_tensor(const gguf::TensorInfo& t);
Matrix matrix_f32(const float* data, int64_t rows, int64_t cols);
bool matrix_type_supported(gguf::TensorType t);
// "F32, F16, BF16, Q4_0, ..." for error messages.
const char* supported_matrix_types();

// out[j] = dequantised element j of row r.
void dequantize_row(const Matrix& m, int64_t r, float* out);

// Which kernels matmul uses: Auto picks the best the CPU has: AVX2 for float weights, and for
// quantised weights AVX-512 VNNI, then AVX2 (OSD_NO_AVX512 / OSD_NO_AVX2 step down); every path
// gives the same bits. Portable and Avx2 force one (tests compare them; Avx2 throws Range where the
// CPU lacks it).
enum class KernelIsa { Auto, Portable, Avx2 };
bool kernel_isa_available(KernelIsa isa);

// Y[t][r] = dot(W row r, X[t]) for t < n: X is n x cols, Y is n x rows. Quantised weights are
// multiplied with activations quantised to 8 bits per token row (quant.h). F32, F16 and BF16 run
// register-blocked tiles (3 rows x 4 tokens, 4 rows for a lone token) with AVX2; each output is still its own dot product
// in a fixed order. The AVX2 float kernels use FMA, so their results differ from the portable
// ones in the last bits (the quantised kernels are identical on both).
void matmul(const Matrix& w, const float* x, int64_t n, float* y, KernelIsa isa = KernelIsa::Auto);

// What matmul must equal bit for bit: one output at a time through the plain dot product of the
// instruction set (F32, F16, BF16), or the portable integer kernels (quantised types). Single
// threaded and slow; for tests.
void matmul_reference(const Matrix& w, const float* x, int64_t n, float* y, KernelIsa isa = KernelIsa::Auto);

// Several products of the same input (Q, K and V; gate and up): y[i] = W[i] x, each bit for bit
// what matmul(*w[i], x, n, y[i]) gives, with one activation quantisation and one parallel pass
// where the weight types allow it (all quantised, all 32-value blocks or all K-quants).
void matmul_many(const Matrix* const* w, float* const* y, int count, const float* x, int64_t n,
                 KernelIsa isa = KernelIsa::Auto);

// y = x / rms(x) * weight, per token row of size `dim`.
void rmsnorm(const float* x, const float* weight, int64_t dim, float eps, float* y);

// Rotates one head vector at `pos`. Adjacent pairs (llama, llama2.c) or split halves (NeoX, qwen2).
void rope(float* v, int64_t head_dim, int64_t pos, float theta, float freq_scale, bool neox);

// h[i] = silu(gate[i]) * up[i] (elementwise: the same value for an element wherever it sits).
void swiglu(const float* gate, const float* up, int64_t n, float* h);

// Attention of one query head: out = sum over slots s of softmax_s(scale * q . k_s) * v_s, where the
// slots are [0, prefix) followed by extra[0 .. n_extra), in that order, and k_s = K + slot * stride,
// v_s = V + slot * stride (K and V already offset to the head). `score` (prefix + n_extra floats)
// receives the attention weights, softmax_s, in slot order (what a backward pass needs). Each result depends only on q and the sequence of (k, v) it attends to,
// not on where that sequence is split between prefix and extra: a token decoded alone and the same
// token inside a chain or tree batch (whose ancestors hold the same keys and values) get
// bit-identical outputs.
void attend_head(const float* q, const float* K, const float* V, size_t stride, int32_t prefix, const int32_t* extra,
                 int32_t n_extra, int64_t head_dim, float scale, float* score, float* out);
// The same over keys and values stored as IEEE half (a float16 KV cache), read exactly as floats.
void attend_head(const float* q, const uint16_t* K, const uint16_t* V, size_t stride, int32_t prefix, const int32_t* extra,
                 int32_t n_extra, int64_t head_dim, float scale, float* score, float* out);

// A key or value as the float16 cache stores it: float_to_half with the range clamped to +-65504, so
// that a large activation (a draft wrecked by a bad update, say) stays finite as it would in
// float32, instead of becoming infinity and every logit NaN. NaN stays NaN.
inline uint16_t kv_half(float v) {
  return float_to_half(v > 65504.0f ? 65504.0f : v < -65504.0f ? -65504.0f : v);
}
// h[i] = kv_half(x[i]), with F16C where the CPU has it (the same bits).
void floats_to_halves(const float* x, uint16_t* h, int64_t n);

// One query of attend_heads: its vector, its slots as attend_head takes them, and where its
// weights (prefix + n_extra floats) and output (head_dim floats) go.
struct AttendQuery {
  const float* q;
  int32_t prefix;
  const int32_t* extra;
  int32_t n_extra;
  float* score;
  float* out;
};

// attend_head for several queries over the same K and V (the query heads that share a key-value
// head, of one token or of several), each result bit for bit attend_head's. Keys and values that
// the queries see at the same slot are read once for all of them: a decoded token's heads, and a
// chain's or a batch's tokens over the cache and each other.
void attend_heads(const AttendQuery* qs, int32_t count, const float* K, const float* V, size_t stride, int64_t head_dim,
                  float scale);
void attend_heads(const AttendQuery* qs, int32_t count, const uint16_t* K, const uint16_t* V, size_t stride, int64_t head_dim,
                  float scale);

// The softmax attend_heads runs, in place, with 8 lanes (AVX2) or 16 (AVX-512): for tests, which
// check that both give the same bits. Returns false where the CPU lacks that instruction set.
bool attention_softmax(float* score, int32_t n, int lanes);

}  // namespace osd
