// Model math on the CPU: matrix products over weights in their stored type (F32, F16, BF16, Q8_0),
// RMSNorm, RoPE and SwiGLU. Every output element is one dot product with a fixed reduction order,
// computed by one thread, so a token's result never depends on how many tokens share the call
// (batch invariance) or on the thread count.
#pragma once
#include <cstddef>
#include <cstdint>

#include "io/gguf.h"

namespace osd {

// A weight matrix as stored: `rows` outputs, each a contiguous row of `cols` inputs.
struct Matrix {
  gguf::TensorType type = gguf::TensorType::F32;
  int64_t rows = 0;
  int64_t cols = 0;
  const uint8_t* data = nullptr;
  size_t row_bytes = 0;
  bool empty() const { return data == nullptr; }
  size_t bytes() const { return row_bytes * static_cast<size_t>(rows); }
};

// Builds a Matrix over a GGUF tensor (ne[0] = cols, ne[1] = rows). Throws Range naming the tensor
// for a type without a matrix kernel.
Matrix matrix_from_tensor(const gguf::TensorInfo& t);
Matrix matrix_f32(const float* data, int64_t rows, int64_t cols);
bool matrix_type_supported(gguf::TensorType t);

// out[j] = dequantised element j of row r.
void dequantize_row(const Matrix& m, int64_t r, float* out);

// Y[t][r] = dot(W row r, X[t]) for t < n: X is n x cols, Y is n x rows.
void matmul(const Matrix& w, const float* x, int64_t n, float* y);

// y = x / rms(x) * weight, per token row of size `dim`.
void rmsnorm(const float* x, const float* weight, int64_t dim, float eps, float* y);

// Rotates one head vector at `pos`. Adjacent pairs (llama, llama2.c) or split halves (NeoX, qwen2).
void rope(float* v, int64_t head_dim, int64_t pos, float theta, float freq_scale, bool neox);

// h[i] = silu(gate[i]) * up[i]
void swiglu(const float* gate, const float* up, int64_t n, float* h);

}  // namespace osd
