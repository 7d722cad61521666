// GGML block formats: exact dequantisation (F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL, Q2_K,
// Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS), quantisation from F32 (F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
// IQ4_NL, IQ4_XS, Q2_K), and matrix products that read the quantised blocks directly.
//
// Dequantisation and quantisation match gguf-py (llama.cpp's Python package) bit for bit, which is
// what ../shared/models/quant-vectors holds: dequantised floats are computed with the same float
// operations in the same order (no FMA contraction), and the quantisers reproduce its rounding.
// (The vectors cover neither Q2_K nor the IQ4 formats: test_quant checks those dequantisers against
// ggml's loops, and gguf-py has no quantiser for them, so theirs are this package's own.)
//
// Matrix products quantise each activation row to 8 bits the way llama.cpp does (Q8_0 / Q8_1 for
// the 32-element formats: round to nearest even, but with f32 rather than fp16 scales; Q8_K for the
// K-quants: one f32 scale per 256 values and 16-value sums) and take integer dot products per block. Per output element
// (row, token) the arithmetic is one fixed sequence of operations: integer sums per block (exact),
// then float products and sums in block order. That sequence does
// not depend on how many tokens or rows a call holds, on the tile shape a kernel uses, on the
// thread count, or on the instruction set: the portable and AVX2 kernels give bit-identical
// results (test/native/test_quant.cpp checks all of this).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "io/gguf.h"

namespace osd::quant {

using gguf::TensorType;

// Types with an exact dequantiser (F32 included).
bool can_dequantize(TensorType t);
// Types quantize() can write: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (as gguf-py does), and
// IQ4_NL, IQ4_XS and Q2_K (this package's own round-to-nearest quantiser).
bool can_quantize(TensorType t);
// Those types' names as a list for messages ("F32, F16, ... or Q2_K").
const char* store_type_names();
// Types whose matrix product runs on 8-bit activations (Q4_0 .. Q8_0, IQ4_NL, Q2_K .. Q6_K, IQ4_XS).
bool has_int8_kernel(TensorType t);

// Bytes that n values of type t take. Throws Range when n is not a multiple of the block size.
size_t bytes_for(TensorType t, int64_t n);

// dst[0..n) = the values of the blocks at src (n a multiple of the block size; throws Range otherwise).
void dequantize(TensorType t, const void* src, int64_t n, float* dst);
// Writes bytes_for(t, n) bytes of blocks at dst (n a multiple of the block size).
void quantize(TensorType t, const float* src, int64_t n, void* dst);

// Instruction sets of the matrix kernels. Portable is plain C++ (the reference); Avx2 needs
// AVX2 + FMA + F16C at run time; Avx512 needs those plus AVX512F, BW, VL and VNNI. All three give
// the same bits. best_isa() picks the widest present: OSD_NO_AVX512 stops at Avx2, OSD_NO_AVX2
// at Portable.
enum class Isa { Portable, Avx2, Avx512 };
bool isa_available(Isa isa);
Isa best_isa();
const char* isa_name(Isa isa);

// The 16-row packed layout that the AVX2 and AVX-512 kernels read: rows interleaved in groups of 16
// so that one vector load gives the same bytes of 16 rows (described in quant_matmul.cpp). Every
// int8-kernel type has one. packed_bytes() is the rows' own size, padded to a multiple of 16 rows
// (Q3_K 4%, Q4_K and Q5_K 2-3%, IQ4_XS 1.5% more: their scales unpacked to bytes). A matrix
// used more than once is packed once (Model does it at load). kernel_reads_packed: whether the
// kernels of `isa` read it (the portable ones read the file's layout).
bool has_packed_layout(TensorType t);
bool kernel_reads_packed(TensorType t, Isa isa);
size_t packed_bytes(TensorType t, int64_t rows, int64_t cols);
void pack_rows(TensorType t, const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols, uint8_t* dst);

// y[t * rows + r] = dot(row r of the weights, x[t]) for t < n, r < rows. `w` holds `rows` rows of
// `row_bytes` bytes each, of type t (has_int8_kernel(t)); x is n x cols floats. Runs on the
// default thread pool, split over rows. `packed`: w in the packed layout, or null (the vector
// kernels then pack w for this call, which costs a copy of it).
void matmul(TensorType t, const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols, const float* x, int64_t n,
            float* y, Isa isa, const uint8_t* packed = nullptr);

// Several matrices applied to the same input x (n x cols), e.g. the Q, K and V projections: one
// activation quantisation and one parallel pass over all their rows. Each y equals what matmul()
// gives for that matrix alone (bit for bit). The types must all be 32-value formats or all K-quants.
struct MatmulTarget {
  TensorType type;
  const uint8_t* w;
  size_t row_bytes;
  int64_t rows;
  float* y;                          // n x rows
  const uint8_t* packed = nullptr;   // as matmul's
};
void matmul_many(const MatmulTarget* targets, int count, int64_t cols, const float* x, int64_t n, Isa isa);

// The activations as the int8 kernels for weight type t see them (quantised, then dequantised
// exactly): x-hat with x-hat[j] = d_block * q[j]. For tests and error bounds.
std::vector<float> activation_roundtrip(TensorType t, const float* x, int64_t cols, Isa isa = Isa::Portable);

}  // namespace osd::quant
