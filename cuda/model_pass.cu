// The model pass on the GPU (see model_pass.h): the CPU engine's Sequence::evaluate_parts on the
// device. Simple kernels (a warp per output row, a block per token and attention head), fused where
// that saves a launch without changing a value: a norm writes the 8-bit activations of the products
// it feeds, Q, K and V are one launch with their biases, gate and up one with SwiGLU, the output
// projections add into the residual, and RoPE writes the cache. A layer is 8 launches with float
// weights, 10 with int8 ones. test_cuda checks them against the CPU engine; bench_model_pass times
// them.
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "core/error.h"
#include "cuda_backend.h"
#include "model_pass.h"
#include "tree_kv.cuh"
#include "workspace.cuh"

namespace osd {

using cuda::DeviceBuffer;
using cuda::PinnedBuffer;
using gguf::TensorType;

namespace {

// ---- Weights ----

// A matrix on the device: F32, F16, Q8_0, Q4_0 or Q4_1, rows of row_bytes bytes.
struct DevMatrix {
  TensorType type = TensorType::F32;
  int64_t rows = 0, cols = 0;
  size_t row_bytes = 0;
  const uint8_t* data = nullptr;
};

bool kept_as_stored(TensorType t) {
  return t == TensorType::F32 || t == TensorType::F16 || t == TensorType::Q8_0 || t == TensorType::Q4_0 ||
         t == TensorType::Q4_1;
}
bool int8_type(TensorType t) { return t == TensorType::Q8_0 || t == TensorType::Q4_0 || t == TensorType::Q4_1; }

// A host matrix on the device: its bytes as they are for the types kept as stored, else its values
// dequantised once, exactly, as F32. put(host, bytes) copies bytes to the device and says where.
template <class Put>
DevMatrix device_matrix(const Matrix& w, Put&& put) {
  DevMatrix d;
  d.rows = w.rows, d.cols = w.cols;
  if (kept_as_stored(w.type)) {
    d.type = w.type, d.row_bytes = w.row_bytes;
    d.data = static_cast<const uint8_t*>(put(w.data, w.bytes()));
  } else {
    std::vector<float> f(static_cast<size_t>(w.rows * w.cols));
    for (int64_t r = 0; r < w.rows; ++r) dequantize_row(w, r, &f[r * w.cols]);
    d.type = TensorType::F32, d.row_bytes = w.cols * sizeof(float);
    d.data = static_cast<const uint8_t*>(put(f.data(), f.size() * sizeof(float)));
  }
  return d;
}

__device__ __forceinline__ float half_bits(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ uint16_t load_u16(const uint8_t* p) { return *reinterpret_cast<const uint16_t*>(p); }

// Element j of row r, dequantised as the CPU does (quant.h: gguf-py's operations, no contraction).
__device__ float element(const DevMatrix& m, int64_t r, int64_t j) {
  const uint8_t* row = m.data + r * m.row_bytes;
  switch (m.type) {
    case TensorType::F16: return half_bits(load_u16(row + 2 * j));
    case TensorType::Q8_0: {
      const uint8_t* b = row + (j / 32) * 34;
      return __fmul_rn(half_bits(load_u16(b)), static_cast<float>(static_cast<int8_t>(b[2 + j % 32])));
    }
    case TensorType::Q4_0: {
      const uint8_t* b = row + (j / 32) * 18;
      const int k = j % 32;
      const int nib = k < 16 ? (b[2 + k] & 15) : (b[2 + k - 16] >> 4);
      return __fmul_rn(static_cast<float>(nib - 8), half_bits(load_u16(b)));
    }
    case TensorType::Q4_1: {
      const uint8_t* b = row + (j / 32) * 20;
      const int k = j % 32;
      const int nib = k < 16 ? (b[4 + k] & 15) : (b[4 + k - 16] >> 4);
      return __fadd_rn(__fmul_rn(half_bits(load_u16(b)), static_cast<float>(nib)), half_bits(load_u16(b + 2)));
    }
    default: return reinterpret_cast<const float*>(row)[j];
  }
}

// ---- Small kernels ----

__global__ void embed_kernel(DevMatrix m, const int32_t* tokens, float* x) {
  const int64_t i = blockIdx.x;
  for (int64_t j = threadIdx.x; j < m.cols; j += blockDim.x) x[i * m.cols + j] = element(m, tokens[i], j);
}

// A restricted head's logits (rows x H) spread over rows x V, the other ids at -infinity. One
// block per row: it fills the row, then writes the head's entries.
__global__ void head_scatter_kernel(const float* head, const int32_t* ids, int64_t H, int64_t V, float* logits) {
  const int64_t r = blockIdx.x;
  float* row = logits + r * V;
  for (int64_t j = threadIdx.x; j < V; j += blockDim.x) row[j] = -INFINITY;
  __syncthreads();
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) row[ids[j]] = head[r * H + j];
}

// silu(g) * u, as the CPU's swiglu: g / (1 + exp(-g)) * u.
__device__ __forceinline__ float swiglu_value(float g, float u) { return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u); }

__global__ void swiglu_kernel(const float* g, float* h, int64_t total) {
  const int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (k < total) h[k] = swiglu_value(g[k], h[k]);
}

// ---- Matrix products ----

constexpr int kRowsPerBlock = 4;  // a warp per output row
constexpr int kTokenTile = 4;     // tokens per warp pass over a row

// One 32-value block of activations as the CPU's quantize_acts_q8, lane j holding value j: d =
// amax / 127, q = round-even(x * 127 / amax), s = d * sum q; a non-finite block gives q = 0 and
// d = s = NaN. The whole warp calls it.
__device__ __forceinline__ void quantize_block(float v, int lane, int8_t* q, float* d, float* s) {
  const float a = fabsf(v);
  float amax = a;
  for (int o = 16; o > 0; o /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (!__all_sync(0xffffffffu, a <= 3.4028234663852886e38f)) {
    q[lane] = 0;
    if (lane == 0) *d = *s = NAN;
    return;
  }
  float id = amax != 0.0f ? __fdiv_rn(127.0f, amax) : 0.0f;
  if (!(id <= 3.4028234663852886e38f)) id = 0.0f;  // as the CPU's inverse_scale: a block of tiny values gives zeros
  const float df = __fdiv_rn(amax, 127.0f);
  const int qi = static_cast<int>(rintf(__fmul_rn(v, id)));
  q[lane] = static_cast<int8_t>(qi);
  int sum = qi;
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) *d = df, *s = __fmul_rn(df, static_cast<float>(sum));
}

// x (rows of `cols` values, cols a multiple of 32) as 8-bit activations: a warp per block.
__global__ void quantize_q8_kernel(const float* x, int64_t blocks, int8_t* q, float* d, float* s) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (b >= blocks) return;
  quantize_block(x[b * 32 + lane], lane, q + b * 32, d + b, s + b);
}

// rmsnorm (tensor_ops.cpp) of row src[i] (or i) of x into row i of y, sum of squares in double; with
// q, also row i's 8-bit activations (the input of an int8 product), saving a launch.
__global__ void rmsnorm_kernel(const float* x, const int32_t* src, const float* w, int64_t dim, float eps, float* y,
                               int8_t* q = nullptr, float* qd = nullptr, float* qs = nullptr) {
  __shared__ double part[256];
  const int64_t i = blockIdx.x, from = src ? src[i] : i;
  const float* xr = x + from * dim;
  double ss = 0;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) ss += static_cast<double>(xr[j]) * xr[j];
  part[threadIdx.x] = ss;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
    __syncthreads();
  }
  const float scale = static_cast<float>(1.0 / sqrt(part[0] / dim + eps));
  float* yr = y + i * dim;
  for (int64_t j = threadIdx.x; j < dim; j += blockDim.x) yr[j] = __fmul_rn(w[j], __fmul_rn(scale, xr[j]));
  if (!q) return;
  __syncthreads();  // the row written above is read back by other warps of this block
  const int lane = threadIdx.x % 32, nb = static_cast<int>(dim / 32);
  for (int b = threadIdx.x / 32; b < nb; b += blockDim.x / 32)
    quantize_block(yr[b * 32 + lane], lane, q + i * dim + b * 32, qd + i * nb + b, qs + i * nb + b);
}

// A 32-value block's integer weights as eight words of four int8s (element order), its scale and
// (Q4_1) its min.
template <TensorType T>
__device__ __forceinline__ void load_block(const uint8_t* row, int64_t b, int32_t (&wq)[8], float& dw, float& mw) {
  if constexpr (T == TensorType::Q8_0) {
    const uint8_t* p = row + b * 34;
    dw = half_bits(load_u16(p));
    mw = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) wq[k] = int32_t(uint32_t(load_u16(p + 2 + 4 * k)) | (uint32_t(load_u16(p + 4 + 4 * k)) << 16));
  } else {
    const bool q41 = T == TensorType::Q4_1;
    const uint8_t* p = row + b * (q41 ? 20 : 18);
    dw = half_bits(load_u16(p));
    mw = q41 ? half_bits(load_u16(p + 2)) : 0.0f;
    const uint8_t* qs = p + (q41 ? 4 : 2);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const uint32_t w = uint32_t(load_u16(qs + 4 * k)) | (uint32_t(load_u16(qs + 4 * k + 2)) << 16);
      uint32_t lo = w & 0x0F0F0F0Fu, hi = (w >> 4) & 0x0F0F0F0Fu;
      if (!q41) lo = __vsub4(lo, 0x08080808u), hi = __vsub4(hi, 0x08080808u);  // nibble - 8, per byte
      wq[k] = int32_t(lo);
      wq[k + 4] = int32_t(hi);
    }
  }
}

// The 8-bit activations of a product's input (null for float weights).
struct QActs {
  const int8_t* q = nullptr;
  const float *d = nullptr, *s = nullptr;
};

// Row r of a 32-value-format matrix times tokens t0 .. t0 + nt - 1, with the CPU's operations per
// output (quant_matmul.cpp): the block terms (d_w * d_x) * isum (+ m_w * s_x) added to 0 in block
// order. Lane l forms the terms of blocks l, l + 32, ...; the sums then run in order through
// shuffles. Every lane ends with the sums.
template <TensorType T>
__device__ __forceinline__ void dot_q32(const DevMatrix& w, int64_t r, const QActs& x, int64_t t0, int nt, int lane,
                                        float (&acc)[kTokenTile]) {
  const int64_t nb = w.cols / 32;
  const uint8_t* row = w.data + r * w.row_bytes;
#pragma unroll
  for (int t = 0; t < kTokenTile; ++t) acc[t] = 0.0f;
  for (int64_t b0 = 0; b0 < nb; b0 += 32) {
    const int64_t b = b0 + lane;
    float term[kTokenTile];
#pragma unroll
    for (int t = 0; t < kTokenTile; ++t) term[t] = 0.0f;
    if (b < nb) {
      int32_t wq[8];
      float dw, mw;
      load_block<T>(row, b, wq, dw, mw);
#pragma unroll
      for (int t = 0; t < kTokenTile; ++t) {
        if (t >= nt) break;
        const int64_t tok = t0 + t;
        const int32_t* xi = reinterpret_cast<const int32_t*>(x.q + tok * w.cols + b * 32);
        int isum = 0;
#pragma unroll
        for (int k = 0; k < 8; ++k) isum = __dp4a(wq[k], xi[k], isum);
        float v = __fmul_rn(__fmul_rn(dw, x.d[tok * nb + b]), static_cast<float>(isum));
        if constexpr (T == TensorType::Q4_1) v = __fadd_rn(v, __fmul_rn(mw, x.s[tok * nb + b]));
        term[t] = v;
      }
    }
    const int m = static_cast<int>(min(int64_t(32), nb - b0));
#pragma unroll
    for (int t = 0; t < kTokenTile; ++t) {
      if (t >= nt) break;  // warp-uniform
      for (int j = 0; j < m; ++j) acc[t] = __fadd_rn(acc[t], __shfl_sync(0xffffffffu, term[t], j));
    }
  }
}

// Row r of an F32 or F16 matrix times tokens t0 .. t0 + nt - 1: lane l takes the 4-value groups l,
// l + 32, ... (a tail of cols % 4 values one by one), then a tree of shuffles sums. The order
// depends on neither nt nor t0, so a token's result is the same in any batch. Every lane ends with
// the sums.
template <TensorType T>
__device__ __forceinline__ void dot_float(const DevMatrix& w, int64_t r, const float* x, int64_t t0, int nt, int lane,
                                          float (&acc)[kTokenTile]) {
  const uint8_t* row = w.data + r * w.row_bytes;
#pragma unroll
  for (int t = 0; t < kTokenTile; ++t) acc[t] = 0.0f;
  // 4-value loads need 8- (F16) or 16-byte (F32) aligned rows: cols % 4 == 0 (allocations are 256-aligned).
  const int64_t groups = w.cols % 4 == 0 ? w.cols / 4 : 0;
  for (int64_t gi = lane; gi < groups; gi += 32) {
    float wv[4];
    if constexpr (T == TensorType::F16) {
      const uint2 u = reinterpret_cast<const uint2*>(row)[gi];
      wv[0] = half_bits(uint16_t(u.x & 0xffffu)), wv[1] = half_bits(uint16_t(u.x >> 16));
      wv[2] = half_bits(uint16_t(u.y & 0xffffu)), wv[3] = half_bits(uint16_t(u.y >> 16));
    } else {
      const float4 f = reinterpret_cast<const float4*>(row)[gi];
      wv[0] = f.x, wv[1] = f.y, wv[2] = f.z, wv[3] = f.w;
    }
#pragma unroll
    for (int t = 0; t < kTokenTile; ++t) {
      if (t >= nt) break;
      const float4 xv = reinterpret_cast<const float4*>(x + (t0 + t) * w.cols)[gi];
      acc[t] = fmaf(wv[0], xv.x, fmaf(wv[1], xv.y, fmaf(wv[2], xv.z, fmaf(wv[3], xv.w, acc[t]))));
    }
  }
  for (int64_t j = groups * 4 + lane; j < w.cols; j += 32) {
    const float wv = T == TensorType::F16 ? half_bits(load_u16(row + 2 * j)) : reinterpret_cast<const float*>(row)[j];
#pragma unroll
    for (int t = 0; t < kTokenTile; ++t)
      if (t < nt) acc[t] = fmaf(wv, x[(t0 + t) * w.cols + j], acc[t]);
  }
#pragma unroll
  for (int t = 0; t < kTokenTile; ++t)
    for (int o = 16; o > 0; o /= 2) acc[t] += __shfl_xor_sync(0xffffffffu, acc[t], o);
}

// One launch of products over the same input: up to three matrices of the same type and width
// (Q, K and V), their rows numbered one after another; or SwiGLU (gate and up, row r of each, giving
// silu(gate) * up as the CPU's swiglu does); each output optionally plus a bias, or added into y
// (the residual: x += W h).
struct Job {
  DevMatrix w[3];
  float* y[3] = {nullptr, nullptr, nullptr};
  const float* bias[3] = {nullptr, nullptr, nullptr};
  int64_t first[4] = {0, 0, 0, 0};  // first[m]: the first row of matrix m; first[count]: all rows
  int count = 1;
  bool accumulate = false;  // y += W x
  bool swiglu = false;      // y[0] = silu(w[0] x) * (w[1] x); count 1, rows of w[0]
};

template <TensorType T>
__global__ void matmul_kernel(Job job, const float* x, QActs qa, int64_t n) {
  const int64_t R = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (R >= job.first[job.count]) return;  // the whole warp
  int m = 0;
  while (m + 1 < job.count && R >= job.first[m + 1]) ++m;
  const int64_t r = R - job.first[m];
  const int64_t t0 = blockIdx.y * int64_t(kTokenTile);
  const int nt = static_cast<int>(min(int64_t(kTokenTile), n - t0));
  const DevMatrix& w = job.w[m];
  float acc[kTokenTile], up[kTokenTile];
  constexpr bool kInt8 = T == TensorType::Q8_0 || T == TensorType::Q4_0 || T == TensorType::Q4_1;
  if constexpr (kInt8) dot_q32<T>(w, r, qa, t0, nt, lane, acc);
  else dot_float<T>(w, r, x, t0, nt, lane, acc);
  if (job.swiglu) {
    if constexpr (kInt8) dot_q32<T>(job.w[1], r, qa, t0, nt, lane, up);
    else dot_float<T>(job.w[1], r, x, t0, nt, lane, up);
  }
  if (lane != 0) return;
  const int64_t rows = w.rows;
  float* y = job.y[m];
  for (int t = 0; t < nt; ++t) {
    float v = acc[t];
    const int64_t at = (t0 + t) * rows + r;
    if (job.swiglu) v = swiglu_value(v, up[t]);
    if (job.bias[m]) v = __fadd_rn(v, job.bias[m][r]);
    if (job.accumulate) v = __fadd_rn(y[at], v);
    y[at] = v;
  }
}

// Scratch of the int8 activations, reserved before a pass (reserve_acts): taking pointers from it
// never allocates, which a pass captured as a CUDA graph relies on.
struct Acts {
  DeviceBuffer q, d, s;
  QActs take(int64_t rows, int64_t cols) {
    const int64_t blocks = rows * (cols / 32);
    if (q.bytes() < size_t(rows * cols) || d.bytes() < size_t(blocks) * 4 || s.bytes() < size_t(blocks) * 4)
      throw_state("model pass: activation scratch too small (not reserved for this pass)");
    return {static_cast<const int8_t*>(q.get()), static_cast<const float*>(d.get()), static_cast<const float*>(s.get())};
  }
};

// x's 8-bit activations in `acts` (reserved by the caller for n x cols), for int8 weights.
QActs quantize(const float* x, int64_t n, int64_t cols, Acts& acts, cudaStream_t stream) {
  const int64_t blocks = n * (cols / 32);
  const QActs a = acts.take(n, cols);
  quantize_q8_kernel<<<static_cast<unsigned>((blocks + 7) / 8), 256, 0, stream>>>(x, blocks, const_cast<int8_t*>(a.q),
                                                                                  const_cast<float*>(a.d), const_cast<float*>(a.s));
  OSD_CUDA_CHECK_LAUNCH();
  return a;
}

// Runs a job over n tokens of x (and qa, its activations, for int8 weights).
void launch(const Job& job, const float* x, const QActs& qa, int64_t n, cudaStream_t stream) {
  const int threads = 32 * kRowsPerBlock;
  const int64_t max_tokens = int64_t(65535) * kTokenTile;  // grid.y's limit
  const int64_t cols = job.w[0].cols, nb = cols / 32;
  for (int64_t t0 = 0; t0 < n; t0 += max_tokens) {
    const int64_t nt = std::min(max_tokens, n - t0);
    Job j = job;
    for (int m = 0; m < 3; ++m)
      if (j.y[m]) j.y[m] += t0 * j.w[m].rows;
    const QActs qt = qa.q ? QActs{qa.q + t0 * cols, qa.d + t0 * nb, qa.s + t0 * nb} : QActs{};
    const float* xt = x ? x + t0 * cols : nullptr;
    const dim3 grid(static_cast<unsigned>((job.first[job.count] + kRowsPerBlock - 1) / kRowsPerBlock),
                    static_cast<unsigned>((nt + kTokenTile - 1) / kTokenTile));
    switch (job.w[0].type) {
      case TensorType::Q8_0: matmul_kernel<TensorType::Q8_0><<<grid, threads, 0, stream>>>(j, xt, qt, nt); break;
      case TensorType::Q4_0: matmul_kernel<TensorType::Q4_0><<<grid, threads, 0, stream>>>(j, xt, qt, nt); break;
      case TensorType::Q4_1: matmul_kernel<TensorType::Q4_1><<<grid, threads, 0, stream>>>(j, xt, qt, nt); break;
      case TensorType::F16: matmul_kernel<TensorType::F16><<<grid, threads, 0, stream>>>(j, xt, qt, nt); break;
      default: matmul_kernel<TensorType::F32><<<grid, threads, 0, stream>>>(j, xt, qt, nt); break;
    }
    OSD_CUDA_CHECK_LAUNCH();
  }
}

// Y = W X (+ bias) for one matrix; `qa` when the caller has quantised X already.
void matmul(const DevMatrix& w, const float* x, int64_t n, float* y, Acts& acts, cudaStream_t stream,
            const float* bias = nullptr, bool accumulate = false, const QActs* qa = nullptr) {
  Job job;
  job.w[0] = w, job.y[0] = y, job.bias[0] = bias, job.first[1] = w.rows, job.accumulate = accumulate;
  const QActs a = int8_type(w.type) ? (qa ? *qa : quantize(x, n, w.cols, acts, stream)) : QActs{};
  launch(job, x, a, n, stream);
}

// Several products of the same input: one launch when the matrices share a type (Q, K and V), else
// one each; the activations are quantised once either way.
void matmul_many(const DevMatrix* const* ws, float* const* ys, const float* const* biases, int count, const float* x,
                 int64_t n, Acts& acts, cudaStream_t stream, const QActs* given = nullptr) {
  bool same = true;
  for (int m = 1; m < count; ++m) same = same && ws[m]->type == ws[0]->type;
  bool any_int8 = false;
  for (int m = 0; m < count; ++m) any_int8 = any_int8 || int8_type(ws[m]->type);
  const QActs qa = any_int8 ? (given ? *given : quantize(x, n, ws[0]->cols, acts, stream)) : QActs{};
  if (!same) {
    for (int m = 0; m < count; ++m) matmul(*ws[m], x, n, ys[m], acts, stream, biases[m], false, &qa);
    return;
  }
  Job job;
  job.count = count;
  for (int m = 0; m < count; ++m) {
    job.w[m] = *ws[m], job.y[m] = ys[m], job.bias[m] = biases[m];
    job.first[m + 1] = job.first[m] + ws[m]->rows;
  }
  launch(job, x, qa, n, stream);
}

// h = silu(W_gate x) * (W_up x): one launch when both share a type (else two products into scratch
// and h, then swiglu_kernel).
void matmul_swiglu(const DevMatrix& gate, const DevMatrix& up, const float* x, int64_t n, float* h, float* scratch,
                   Acts& acts, cudaStream_t stream, const QActs* given) {
  const bool i8 = int8_type(gate.type) || int8_type(up.type);
  const QActs qa = i8 ? (given ? *given : quantize(x, n, gate.cols, acts, stream)) : QActs{};
  if (gate.type != up.type) {
    matmul(gate, x, n, scratch, acts, stream, nullptr, false, &qa);
    matmul(up, x, n, h, acts, stream, nullptr, false, &qa);
    const int64_t total = n * gate.rows;
    swiglu_kernel<<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(scratch, h, total);
    OSD_CUDA_CHECK_LAUNCH();
    return;
  }
  Job job;
  job.w[0] = gate, job.w[1] = up, job.y[0] = h, job.first[1] = gate.rows, job.swiglu = true;
  launch(job, x, qa, n, stream);
}

// Scratch for the int8 activations of n rows of up to `cols` values, reserved before a pass so that
// no buffer is reallocated while queued kernels read it.
void reserve_acts(Acts& a, int64_t n, int64_t cols) {
  a.q.as<int8_t>(n * cols);
  a.d.as<float>(n * (cols / 32 + 1));
  a.s.as<float>(n * (cols / 32 + 1));
}

// Largest number of attention scores (floats) one launch keeps; test_cuda lowers it to cover the
// chunked path.
std::atomic<int64_t> g_score_limit{int64_t(16) << 20};

// CUDA graphs for small passes: on unless OSD_CUDA_GRAPHS=0 (or set_model_pass_graphs(false) for
// passes made afterwards).
std::atomic<int> g_graphs{-1};  // -1: from the environment
bool graphs_enabled() {
  const int g = g_graphs.load();
  if (g >= 0) return g != 0;
  const char* e = std::getenv("OSD_CUDA_GRAPHS");
  return !(e && std::strcmp(e, "0") == 0);
}

// ---- The KV cache and attention ----

// A sequence's cache: one allocation of [layer][K, V][kv head][slot][head_dim], F16 or F32.
struct CudaCache final : DevicePass::Cache {
  CudaCache(int32_t capacity, KvType kv) : capacity(capacity), kv(kv) {}
  ~CudaCache() override {
    if (data) cudaFree(data);
  }
  int32_t capacity;
  KvType kv;
  int32_t alloc = 0;
  uint8_t* data = nullptr;
};

// Row i's slots: [0, prefix) of its sequence's cache, then vis[vis_off .. vis_off + vis_n) (a tree
// node's ancestors and itself). A chain's token sees a contiguous prefix that includes itself.
struct RowInfo {
  int32_t part, slot, prefix, vis_n;
  int64_t vis_off;
};
struct PartInfo {
  uint8_t* cache;
  int32_t alloc;
  int32_t f16;  // the cache holds IEEE halves (else floats)
};

__device__ __forceinline__ float kv_at(const uint8_t* plane, bool f16, size_t k) {
  return f16 ? half_bits(reinterpret_cast<const uint16_t*>(plane)[k]) : reinterpret_cast<const float*>(plane)[k];
}
// Start of one (layer, K or V, kv head) plane of a part's cache.
__device__ __forceinline__ const uint8_t* plane_of(const PartInfo& p, int layer, int which, int kv_heads, int kh,
                                                   int head_dim) {
  const size_t e = p.f16 ? 2 : 4;
  return p.cache + ((size_t(layer) * 2 + which) * kv_heads + kh) * size_t(p.alloc) * head_dim * e;
}

__device__ __forceinline__ void kv_put(uint8_t* plane, bool f16, size_t at, float val) {
  if (f16) {  // as the CPU's kv_half: clamped to +-65504, NaN stays NaN
    const float c = val > 65504.0f ? 65504.0f : val < -65504.0f ? -65504.0f : val;
    reinterpret_cast<uint16_t*>(plane)[at] = __half_as_ushort(__float2half_rn(c));
  } else {
    reinterpret_cast<float*>(plane)[at] = val;
  }
}

// Token i's RoPE and cache store, as the CPU's rotate() and store: its query heads rotated in place,
// its key heads rotated and stored at its slot, its value heads stored.
__global__ void rope_store_kernel(float* q, const float* k, const float* v, const RowInfo* rows, const PartInfo* parts,
                                  int layer, int heads, int kv_heads, int head_dim, const float* cs, const float* sn,
                                  bool neox) {
  const int64_t i = blockIdx.x;
  const int half = head_dim / 2, kvd = kv_heads * head_dim;
  const float* c = cs + i * half;
  const float* sg = sn + i * half;
  auto pair = [&](int p, int& a, int& b) { a = neox ? p : 2 * p, b = neox ? p + half : 2 * p + 1; };
  for (int e = threadIdx.x; e < heads * half; e += blockDim.x) {
    const int p = e % half;
    int a, b;
    pair(p, a, b);
    float* h = q + (i * heads + e / half) * head_dim;
    const float x0 = h[a], x1 = h[b];
    h[a] = __fsub_rn(__fmul_rn(x0, c[p]), __fmul_rn(x1, sg[p]));
    h[b] = __fadd_rn(__fmul_rn(x0, sg[p]), __fmul_rn(x1, c[p]));
  }
  const RowInfo ri = rows[i];
  const PartInfo pi = parts[ri.part];
  const size_t slot = size_t(ri.slot) * head_dim;
  for (int e = threadIdx.x; e < kv_heads * half; e += blockDim.x) {
    const int hh = e / half, p = e % half;
    int a, b;
    pair(p, a, b);
    const float* h = k + i * kvd + hh * head_dim;
    const float x0 = h[a], x1 = h[b];
    uint8_t* plane = const_cast<uint8_t*>(plane_of(pi, layer, 0, kv_heads, hh, head_dim));
    kv_put(plane, pi.f16, slot + a, __fsub_rn(__fmul_rn(x0, c[p]), __fmul_rn(x1, sg[p])));
    kv_put(plane, pi.f16, slot + b, __fadd_rn(__fmul_rn(x0, sg[p]), __fmul_rn(x1, c[p])));
  }
  if (head_dim % 2)  // the last value of an odd head is not rotated
    for (int hh = threadIdx.x; hh < kv_heads; hh += blockDim.x)
      kv_put(const_cast<uint8_t*>(plane_of(pi, layer, 0, kv_heads, hh, head_dim)), pi.f16, slot + head_dim - 1,
             k[i * kvd + hh * head_dim + head_dim - 1]);
  for (int e = threadIdx.x; e < kvd; e += blockDim.x)
    kv_put(const_cast<uint8_t*>(plane_of(pi, layer, 1, kv_heads, e / head_dim, head_dim)), pi.f16, slot + e % head_dim,
           v[i * kvd + e]);
}

constexpr int kAttnThreads = 256;

// Query head blockIdx.y of row row0 + blockIdx.x over its slots. Scores go to `scores` (max_slots
// per query of this launch), then their softmax weights.
__global__ void attention_kernel(const float* q, const RowInfo* rows, const PartInfo* parts, const int32_t* vis, int layer,
                                 int heads, int kv_heads, int head_dim, float scale, int64_t row0, float* scores,
                                 int64_t max_slots, float* out) {
  __shared__ float qs[kAttnThreads];
  __shared__ float red[kAttnThreads];
  __shared__ float part_out[kAttnThreads];
  const int64_t i = row0 + blockIdx.x;
  const int hh = blockIdx.y, kh = hh / (heads / kv_heads), tid = threadIdx.x;
  const RowInfo ri = rows[i];
  const PartInfo pi = parts[ri.part];
  const bool f16 = pi.f16;
  const uint8_t* K = plane_of(pi, layer, 0, kv_heads, kh, head_dim);
  const uint8_t* V = plane_of(pi, layer, 1, kv_heads, kh, head_dim);
  const int64_t qd = int64_t(heads) * head_dim;
  for (int d = tid; d < head_dim; d += blockDim.x) qs[d] = q[i * qd + int64_t(hh) * head_dim + d];
  __syncthreads();
  const int32_t n = ri.prefix + ri.vis_n;
  float* sc = scores + (int64_t(blockIdx.x) * heads + hh) * max_slots;
  auto slot_of = [&](int32_t s) { return s < ri.prefix ? s : vis[ri.vis_off + (s - ri.prefix)]; };
  float mx = -INFINITY;
  for (int32_t s = tid; s < n; s += blockDim.x) {
    const size_t k0 = size_t(slot_of(s)) * head_dim;
    float dot = 0.0f;
    for (int d = 0; d < head_dim; ++d) dot = fmaf(qs[d], kv_at(K, f16, k0 + d), dot);
    const float v = dot * scale;
    sc[s] = v;
    mx = fmaxf(mx, v);
  }
  red[tid] = mx;
  __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o /= 2) {
    if (tid < o) red[tid] = fmaxf(red[tid], red[tid + o]);
    __syncthreads();
  }
  mx = red[0];
  __syncthreads();
  float sum = 0.0f;
  for (int32_t s = tid; s < n; s += blockDim.x) {
    const float e = expf(sc[s] - mx);
    sc[s] = e;
    sum += e;
  }
  red[tid] = sum;
  __syncthreads();
  for (int o = blockDim.x / 2; o > 0; o /= 2) {
    if (tid < o) red[tid] += red[tid + o];
    __syncthreads();
  }
  const float inv = 1.0f / red[0];
  // Groups of head_dim threads each take every groups-th slot; the groups' sums then add up.
  const int groups = blockDim.x / head_dim, g = tid / head_dim, d = tid % head_dim;
  if (g < groups) {
    float acc = 0.0f;
    for (int32_t s = g; s < n; s += groups) acc = fmaf(sc[s], kv_at(V, f16, size_t(slot_of(s)) * head_dim + d), acc);
    part_out[tid] = acc;
  }
  __syncthreads();
  if (g == 0) {
    float acc = 0.0f;
    for (int k = 0; k < groups; ++k) acc += part_out[k * head_dim + d];
    out[i * qd + int64_t(hh) * head_dim + d] = acc * inv;
  }
}

// ---- The pass ----

struct DevLayer {
  const float *attn_norm = nullptr, *ffn_norm = nullptr, *bq = nullptr, *bk = nullptr, *bv = nullptr, *q_norm = nullptr,
              *k_norm = nullptr;
  DevMatrix wq, wk, wv, wo, w_gate, w_up, w_down;
};

class CudaPass final : public DevicePass {
 public:
  explicit CudaPass(const Model& m, std::string device) : cfg_(m.config()), device_(std::move(device)) {
    OSD_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    try {
      upload_all(m);
    } catch (...) {
      release();
      throw;
    }
  }
  ~CudaPass() override { release(); }

  std::string name() const override { return "cuda: " + device_; }
  std::shared_ptr<DevicePass> for_model(const Model& other) const override {
    std::string why;
    auto p = cuda_model_pass(other, &why);
    if (!p) throw_state("device 'cuda': " + why);
    return p;
  }

  std::unique_ptr<Cache> new_cache(int32_t capacity, KvType kv) override { return std::make_unique<CudaCache>(capacity, kv); }

  void evaluate(const EvalPart* parts, Cache* const* caches, const int32_t* lengths, int32_t count) override;
  void keep_path(Cache& cache, int32_t base, const int32_t* path, int32_t k) override;
  std::unique_ptr<Cache> fork(const Cache& cache, int32_t length) override;

 private:
  template <class T>
  const T* upload(const T* host, size_t count) {
    void* d = nullptr;
    OSD_CUDA_CHECK(cudaMalloc(&d, std::max<size_t>(count * sizeof(T), 1)));
    owned_.push_back(d);
    OSD_CUDA_CHECK(cudaMemcpy(d, host, count * sizeof(T), cudaMemcpyHostToDevice));
    return static_cast<const T*>(d);
  }
  DevMatrix upload_matrix(const Matrix& w) {
    for (const auto& [host, dev] : uploaded_)
      if (host == w.data) return dev;  // tied output: the embeddings' copy
    const DevMatrix d = device_matrix(w, [&](const void* p, size_t bytes) {
      return static_cast<const void*>(upload(static_cast<const uint8_t*>(p), bytes));
    });
    uploaded_.push_back({w.data, d});
    return d;
  }
  const float* upload_vec(const float* v, size_t n) { return v ? upload(v, n) : nullptr; }

  void upload_all(const Model& m) {
    const ModelConfig& c = cfg_;
    embd_ = upload_matrix(m.token_embd);
    // A restricted head's products read only its rows (Model::head).
    output_ = upload_matrix(m.head.empty() ? m.output : m.head);
    if (!c.head_tokens.empty()) head_ids_ = upload(c.head_tokens.data(), c.head_tokens.size());
    output_norm_ = upload_vec(m.output_norm, c.dim);
    for (const LayerWeights& w : m.layers) {
      DevLayer l;
      l.attn_norm = upload_vec(w.attn_norm, c.dim);
      l.ffn_norm = upload_vec(w.ffn_norm, c.dim);
      l.bq = upload_vec(w.bq, c.q_dim());
      l.bk = upload_vec(w.bk, c.kv_dim());
      l.bv = upload_vec(w.bv, c.kv_dim());
      l.q_norm = upload_vec(w.q_norm, c.head_dim);
      l.k_norm = upload_vec(w.k_norm, c.head_dim);
      l.wq = upload_matrix(w.wq), l.wk = upload_matrix(w.wk), l.wv = upload_matrix(w.wv), l.wo = upload_matrix(w.wo);
      l.w_gate = upload_matrix(w.w_gate), l.w_up = upload_matrix(w.w_up), l.w_down = upload_matrix(w.w_down);
      layers_.push_back(l);
    }
    any_int8_ = int8_type(output_.type);
    for (const DevLayer& l : layers_)
      for (const DevMatrix* w : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) any_int8_ = any_int8_ || int8_type(w->type);
    // The copies above came from pageable memory; the pass's own stream does not wait for them.
    OSD_CUDA_CHECK(cudaDeviceSynchronize());
  }
  void release() {
    for (auto& g : graphs_) cudaGraphExecDestroy(g.second);
    graphs_.clear();
    for (void* p : owned_) cudaFree(p);
    owned_.clear();
    if (stream_) cudaStreamDestroy(stream_);
    stream_ = nullptr;
  }
  size_t elem(KvType kv) const { return kv == KvType::F16 ? 2 : 4; }
  // Planes of a cache: layers x {K, V} x kv heads, each alloc x head_dim elements.
  size_t planes() const { return size_t(cfg_.n_layers) * 2 * cfg_.n_kv_heads; }
  void grow(CudaCache& c, int32_t length, int32_t slots);

  ModelConfig cfg_;
  std::string device_;
  cudaStream_t stream_ = nullptr;
  std::mutex mu_;  // one pass at a time: the scratch below is shared
  std::vector<void*> owned_;
  std::vector<std::pair<const uint8_t*, DevMatrix>> uploaded_;
  DevMatrix embd_, output_;
  const int32_t* head_ids_ = nullptr;  // a restricted head's ids (else null)
  const float* output_norm_ = nullptr;
  std::vector<DevLayer> layers_;
  bool any_int8_ = false;  // some product takes 8-bit activations (their scratch is reserved per pass)
  // CUDA graphs of small passes, keyed by their launch parameters (newest last).
  static constexpr int64_t kGraphMaxTokens = 16;
  static constexpr size_t kGraphsKept = 16;
  bool use_graphs_ = graphs_enabled();
  std::vector<std::pair<std::vector<int64_t>, cudaGraphExec_t>> graphs_;
  std::vector<std::vector<int64_t>> seen_;  // shapes run once, not captured yet
  int64_t graph_captures_ = 0, graph_replays_ = 0;

 public:
  // For tests and benches: graphs captured and replayed so far, and whether they are in use.
  void graph_stats(int64_t* captures, int64_t* replays, bool* enabled) {
    std::lock_guard<std::mutex> lock(mu_);
    *captures = graph_captures_, *replays = graph_replays_, *enabled = use_graphs_;
  }

 private:
  template <class F>
  void launch_graph(const std::vector<int64_t>& key, F&& launch_all);
  DeviceBuffer kv_jobs_, kv_path_;  // keep_path's jobs and path
  DeviceBuffer inputs_, x_, xb_, q_, k_, v_, att_, g_, h_, scores_, logits_, head_logits_;
  PinnedBuffer staging_;  // the inputs on the host; rewritten only after the previous pass synchronised
  Acts acts_;
};

template <class F>
void CudaPass::launch_graph(const std::vector<int64_t>& key, F&& launch_all) {
  for (size_t i = 0; i < graphs_.size(); ++i)
    if (graphs_[i].first == key) {
      std::rotate(graphs_.begin() + i, graphs_.begin() + i + 1, graphs_.end());  // now the newest
      OSD_CUDA_CHECK(cudaGraphLaunch(graphs_.back().second, stream_));
      ++graph_replays_;
      return;
    }
  // A shape is captured the second time it comes: one-off shapes never pay for a capture, and the
  // first run has loaded every kernel (lazy loading during a capture fails on older drivers).
  const auto seen = std::find(seen_.begin(), seen_.end(), key);
  if (seen == seen_.end()) {
    if (seen_.size() == 2 * kGraphsKept) seen_.erase(seen_.begin());
    seen_.push_back(key);
    launch_all();
    return;
  }
  seen_.erase(seen);
  // Captured on this thread only: another thread's CUDA calls (the backend's) are not affected.
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  bool captured = cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal) == cudaSuccess;
  if (captured) {
    try {
      launch_all();
    } catch (...) {
      captured = false;
    }
    captured = cudaStreamEndCapture(stream_, &graph) == cudaSuccess && captured;
    captured = captured && cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
    if (graph) cudaGraphDestroy(graph);
  }
  if (!captured) {
    // Graphs do not work here: clear the error they left, and launch kernel by kernel from now on
    // (a real launch error then surfaces there).
    (void)cudaGetLastError();
    if (exec) cudaGraphExecDestroy(exec);
    use_graphs_ = false;
    launch_all();
    return;
  }
  if (graphs_.size() == kGraphsKept) {
    cudaGraphExecDestroy(graphs_.front().second);
    graphs_.erase(graphs_.begin());
  }
  graphs_.push_back({key, exec});
  OSD_CUDA_CHECK(cudaGraphLaunch(exec, stream_));
  ++graph_captures_;
}

void CudaPass::grow(CudaCache& c, int32_t length, int32_t slots) {
  if (slots <= c.alloc) return;
  int32_t want = std::max<int32_t>(64, c.alloc);
  while (want < slots) want *= 2;
  want = std::min(want, c.capacity);
  const size_t hd = cfg_.head_dim, e = elem(c.kv);
  uint8_t* next = nullptr;
  OSD_CUDA_CHECK(cudaMalloc(&next, planes() * want * hd * e));
  if (c.data && length > 0)
    OSD_CUDA_CHECK(cudaMemcpy2DAsync(next, want * hd * e, c.data, c.alloc * hd * e, length * hd * e, planes(),
                                     cudaMemcpyDeviceToDevice, stream_));
  OSD_CUDA_CHECK(cudaStreamSynchronize(stream_));
  if (c.data) cudaFree(c.data);
  c.data = next;
  c.alloc = want;
}

void CudaPass::evaluate(const EvalPart* parts, Cache* const* caches, const int32_t* lengths, int32_t count) {
  std::lock_guard<std::mutex> lock(mu_);
  const ModelConfig& c = cfg_;
  const cudaStream_t s = stream_;
  // Rows: the parts' tokens one after another, as on the CPU.
  std::vector<int32_t> first(count + 1, 0);
  for (int32_t k = 0; k < count; ++k) first[k + 1] = first[k] + parts[k].n;
  const int32_t n = first[count];
  std::vector<int32_t> tokens(n), vis, pos(n), sel;
  std::vector<RowInfo> rows(n);
  std::vector<PartInfo> pinfo(count);
  int64_t max_slots = 1;
  for (int32_t k = 0; k < count; ++k) {
    auto& cache = static_cast<CudaCache&>(*caches[k]);
    grow(cache, lengths[k], lengths[k] + parts[k].n);
    pinfo[k] = {cache.data, cache.alloc, cache.kv == KvType::F16};
    const int32_t base = lengths[k], r0 = first[k];
    std::vector<std::vector<int32_t>> visible(parts[k].parents ? parts[k].n : 0);
    for (int32_t i = 0; i < parts[k].n; ++i) {
      const int32_t p = parts[k].parents ? parts[k].parents[i] : i - 1;
      pos[r0 + i] = base + (p < 0 ? 0 : pos[r0 + p] - base + 1);
      if (parts[k].parents) {
        if (p >= 0) visible[i] = visible[p];
        visible[i].push_back(i);
      }
      tokens[r0 + i] = parts[k].tokens[i];
      const int32_t seen = parts[k].parents ? static_cast<int32_t>(visible[i].size()) : i + 1;
      if (parts[k].parents) {
        rows[r0 + i] = {k, base + i, base, seen, static_cast<int64_t>(vis.size())};
        for (int32_t v : visible[i]) vis.push_back(base + v);
      } else {  // a chain: the slots up to its own are contiguous
        rows[r0 + i] = {k, base + i, base + seen, 0, 0};
      }
      max_slots = std::max<int64_t>(max_slots, base + static_cast<int64_t>(seen));
    }
    for (int32_t i = parts[k].last_only ? parts[k].n - 1 : 0; i < parts[k].n; ++i) sel.push_back(r0 + i);
  }

  const int64_t D = c.dim, QD = c.q_dim(), KVD = c.kv_dim(), F = c.ffn_dim, HD = c.head_dim, half = HD / 2;
  std::vector<float> cs(std::max<int64_t>(n * half, 1)), sn(std::max<int64_t>(n * half, 1));
  rope_angles(c, pos.data(), n, cs.data(), sn.data());
  // The pass's small inputs go to the device in one copy from pinned memory (one pageable copy each
  // cost a synchronous staging per decode step). The tree slots go last, so that the others' places
  // depend only on the pass's shape (a replayed graph reads them there).
  struct Piece {
    const void* src;
    size_t bytes, at;
  };
  std::vector<Piece> pieces;
  size_t total = 0;
  auto place = [&](const auto& v) {
    const size_t at = total, bytes = v.size() * sizeof(v[0]);
    pieces.push_back({v.data(), bytes, at});
    total = (at + bytes + 255) / 256 * 256;
    return at;
  };
  const size_t at_tokens = place(tokens), at_cs = place(cs), at_sn = place(sn), at_rows = place(rows), at_parts = place(pinfo),
               at_sel = place(sel), at_vis = place(vis);
  uint8_t* host = staging_.as<uint8_t>(total);
  for (const Piece& p : pieces)
    if (p.bytes) std::memcpy(host + p.at, p.src, p.bytes);
  uint8_t* dev = static_cast<uint8_t*>(inputs_.reserve(total));
  OSD_CUDA_CHECK(cudaMemcpyAsync(dev, host, total, cudaMemcpyHostToDevice, s));
  const int32_t* d_tokens = reinterpret_cast<const int32_t*>(dev + at_tokens);
  const float* d_cs = reinterpret_cast<const float*>(dev + at_cs);
  const float* d_sn = reinterpret_cast<const float*>(dev + at_sn);
  const RowInfo* d_rows = reinterpret_cast<const RowInfo*>(dev + at_rows);
  const PartInfo* d_parts = reinterpret_cast<const PartInfo*>(dev + at_parts);
  const int32_t* d_sel = reinterpret_cast<const int32_t*>(dev + at_sel);
  const int32_t* d_vis = reinterpret_cast<const int32_t*>(dev + at_vis);
  float *x = x_.as<float>(n * D), *xb = xb_.as<float>(n * D), *q = q_.as<float>(n * QD), *kk = k_.as<float>(n * KVD),
        *vv = v_.as<float>(n * KVD), *att = att_.as<float>(n * QD), *h = h_.as<float>(n * F);
  float* g = nullptr;  // gate products, only when gate and up differ in type
  for (const DevLayer& w : layers_)
    if (w.w_gate.type != w.w_up.type) g = g_.as<float>(n * F);
  // The scores' stride, rounded up to a power of two (at least 256) so that successive decode steps
  // launch with the same parameters (and replay one CUDA graph); each row reads only its own slots.
  {
    int64_t b = 256;
    while (b < max_slots) b *= 2;
    max_slots = b;
  }
  // Attention runs over chunks of rows whose scores fit in 64 MiB (a long prefill's would not).
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(n, g_score_limit.load() / (int64_t(c.n_heads) * max_slots)));
  if (any_int8_) reserve_acts(acts_, n, std::max({D, QD, F}));
  const int64_t V = c.vocab;
  const int64_t out_rows = static_cast<int64_t>(sel.size());
  float* logits = logits_.as<float>(out_rows * V);  // sized before any launch: growing it would wait for them
  const int64_t H = static_cast<int64_t>(c.head_tokens.size());
  float* head_logits = H ? head_logits_.as<float>(out_rows * H) : nullptr;
  float* scores = scores_.as<float>(static_cast<size_t>(chunk) * c.n_heads * max_slots);
  const float scale = 1.0f / std::sqrt(static_cast<float>(HD));
  constexpr int T = 256;

  auto launch_all = [&] {
    embed_kernel<<<n, T, 0, s>>>(embd_, d_tokens, x);
    OSD_CUDA_CHECK_LAUNCH();
    // A norm whose output feeds int8 products also writes its 8-bit activations (no extra launch).
    auto norm = [&](const float* in, const int32_t* src, const float* weight, int64_t rows, bool int8, float* out) {
      const QActs qa = int8 ? acts_.take(rows, D) : QActs{};
      rmsnorm_kernel<<<static_cast<unsigned>(rows), T, 0, s>>>(in, src, weight, D, c.rms_eps, out, const_cast<int8_t*>(qa.q),
                                                               const_cast<float*>(qa.d), const_cast<float*>(qa.s));
      OSD_CUDA_CHECK_LAUNCH();
      return qa;
    };
    for (int32_t l = 0; l < c.n_layers; ++l) {
      const DevLayer& w = layers_[l];
      // x += Wo attention(rope(Wq xn + bq), rope(Wk xn + bk), Wv xn + bv), xn = rmsnorm(x)
      const bool qkv8 = int8_type(w.wq.type) || int8_type(w.wk.type) || int8_type(w.wv.type);
      const QActs qa = norm(x, nullptr, w.attn_norm, n, qkv8, xb);
      {
        const DevMatrix* ws[3] = {&w.wq, &w.wk, &w.wv};
        float* ys[3] = {q, kk, vv};
        const float* bs[3] = {w.bq, w.bk, w.bv};
        matmul_many(ws, ys, bs, 3, xb, n, acts_, s, qkv8 ? &qa : nullptr);
      }
      if (w.q_norm) {  // qwen3: each head's query and key RMS-normed before the rotation
        rmsnorm_kernel<<<n * c.n_heads, T, 0, s>>>(q, nullptr, w.q_norm, HD, c.rms_eps, q);
        rmsnorm_kernel<<<n * c.n_kv_heads, T, 0, s>>>(kk, nullptr, w.k_norm, HD, c.rms_eps, kk);
        OSD_CUDA_CHECK_LAUNCH();
      }
      rope_store_kernel<<<n, T, 0, s>>>(q, kk, vv, d_rows, d_parts, l, c.n_heads, c.n_kv_heads, int(HD), d_cs, d_sn,
                                        c.rope_neox);
      OSD_CUDA_CHECK_LAUNCH();
      for (int64_t r0 = 0; r0 < n; r0 += chunk) {
        const dim3 agrid(static_cast<unsigned>(std::min(chunk, n - r0)), c.n_heads);
        attention_kernel<<<agrid, kAttnThreads, 0, s>>>(q, d_rows, d_parts, d_vis, l, c.n_heads, c.n_kv_heads, int(HD), scale,
                                                        r0, scores, max_slots, att);
        OSD_CUDA_CHECK_LAUNCH();
      }
      matmul(w.wo, att, n, x, acts_, s, nullptr, /*accumulate=*/true);
      // x += W_down swiglu(W_gate xn, W_up xn), xn = rmsnorm(x)
      const bool ffn8 = int8_type(w.w_gate.type) || int8_type(w.w_up.type);
      const QActs fa = norm(x, nullptr, w.ffn_norm, n, ffn8, xb);
      matmul_swiglu(w.w_gate, w.w_up, xb, n, h, g, acts_, s, ffn8 ? &fa : nullptr);
      matmul(w.w_down, h, n, x, acts_, s, nullptr, /*accumulate=*/true);
    }
    const QActs oa = norm(x, d_sel, output_norm_, out_rows, int8_type(output_.type), xb);
    matmul(output_, xb, out_rows, H ? head_logits : logits, acts_, s, nullptr, false, int8_type(output_.type) ? &oa : nullptr);
    if (H) {
      head_scatter_kernel<<<static_cast<unsigned>(out_rows), T, 0, s>>>(head_logits, head_ids_, H, V, logits);
      OSD_CUDA_CHECK_LAUNCH();
    }
  };
  // Small passes (decode steps, verification) replay a CUDA graph of these launches when their
  // parameters are those of an earlier pass: the launches then cost the GPU, not the host.
  std::vector<int64_t> key;
  if (use_graphs_ && n <= kGraphMaxTokens) {
    for (const void* p : {(const void*)d_tokens, (const void*)d_cs, (const void*)d_sn, (const void*)d_rows, (const void*)d_parts,
                          (const void*)d_vis, (const void*)d_sel, (const void*)x, (const void*)xb, (const void*)q,
                          (const void*)kk, (const void*)vv, (const void*)att, (const void*)h, (const void*)g,
                          (const void*)logits, (const void*)head_logits, (const void*)scores, (const void*)acts_.q.get(), (const void*)acts_.d.get(),
                          (const void*)acts_.s.get()})
      key.push_back(reinterpret_cast<int64_t>(p));
    for (int64_t v : {int64_t(n), out_rows, max_slots, chunk}) key.push_back(v);
  }
  if (!key.empty()) {
    launch_graph(key, launch_all);
  } else {
    launch_all();
  }
  int64_t r = 0;
  for (int32_t k = 0; k < count; ++k) {
    const int64_t kr = parts[k].last_only ? 1 : parts[k].n;
    OSD_CUDA_CHECK(cudaMemcpyAsync(parts[k].logits, logits + r * V, kr * V * sizeof(float), cudaMemcpyDeviceToHost, s));
    r += kr;
  }
  OSD_CUDA_CHECK(cudaStreamSynchronize(s));
}

void CudaPass::keep_path(Cache& cache, int32_t base, const int32_t* path, int32_t k) {
  std::lock_guard<std::mutex> lock(mu_);
  auto& c = static_cast<CudaCache&>(cache);
  if (k <= 0 || !c.data) return;
  // One launch for every (layer, key-value head) plane: tree_kv's compaction, in path order as on the CPU.
  const int64_t hd = cfg_.head_dim, units = hd * int64_t(elem(c.kv) / 2), plane = int64_t(c.alloc) * units;
  std::vector<cuda::KvPathJob> jobs;
  for (int32_t l = 0; l < cfg_.n_layers; ++l)
    for (int32_t h = 0; h < cfg_.n_kv_heads; ++h) {
      cuda::KvPathJob j;
      uint16_t* d = reinterpret_cast<uint16_t*>(c.data);
      j.k = d + ((int64_t(l) * 2 + 0) * cfg_.n_kv_heads + h) * plane;
      j.v = d + ((int64_t(l) * 2 + 1) * cfg_.n_kv_heads + h) * plane;
      j.row_stride = units, j.kv_dim = static_cast<int32_t>(units), j.base = base, j.path_offset = 0, j.len = k;
      jobs.push_back(j);
    }
  cuda::KvPathJob* djobs = kv_jobs_.as<cuda::KvPathJob>(jobs.size());
  int32_t* dpath = kv_path_.as<int32_t>(k);
  OSD_CUDA_CHECK(cudaMemcpyAsync(djobs, jobs.data(), jobs.size() * sizeof(jobs[0]), cudaMemcpyHostToDevice, stream_));
  OSD_CUDA_CHECK(cudaMemcpyAsync(dpath, path, k * sizeof(int32_t), cudaMemcpyHostToDevice, stream_));
  cuda::kv_keep_path_launch(djobs, static_cast<int32_t>(jobs.size()), dpath, static_cast<int32_t>(units), stream_);
  OSD_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

std::unique_ptr<DevicePass::Cache> CudaPass::fork(const Cache& cache, int32_t length) {
  std::lock_guard<std::mutex> lock(mu_);
  const auto& c = static_cast<const CudaCache&>(cache);
  auto out = std::make_unique<CudaCache>(c.capacity, c.kv);
  if (length > 0) {
    grow(*out, 0, length);
    const size_t hd = cfg_.head_dim, e = elem(c.kv);
    OSD_CUDA_CHECK(cudaMemcpy2DAsync(out->data, out->alloc * hd * e, c.data, c.alloc * hd * e, length * hd * e, planes(),
                                     cudaMemcpyDeviceToDevice, stream_));
    OSD_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }
  return out;
}

}  // namespace

std::shared_ptr<DevicePass> cuda_model_pass(const Model& model, std::string* why) {
  std::string reason;
  Backend* b = cuda_backend_or_null(&reason);
  if (!b) {
    if (why) *why = reason;
    return nullptr;
  }
  const ModelConfig& c = model.config();
  if (c.head_dim > kAttnThreads) {
    if (why) *why = "head_dim " + std::to_string(c.head_dim) + " is above the CUDA pass's limit of " + std::to_string(kAttnThreads);
    return nullptr;
  }
  try {
    return std::make_shared<CudaPass>(model, static_cast<CudaBackend*>(b)->device_name());
  } catch (const std::exception& e) {  // out of device memory, say
    if (why) *why = std::string("uploading the weights failed: ") + e.what();
    return nullptr;
  }
}

namespace cuda {

void set_model_pass_score_limit(int64_t floats) { g_score_limit = floats > 0 ? floats : int64_t(16) << 20; }
void set_model_pass_graphs(int on) { g_graphs = on; }

GraphStats model_pass_graph_stats(DevicePass& pass) {
  GraphStats g;
  if (auto* p = dynamic_cast<CudaPass*>(&pass)) p->graph_stats(&g.captures, &g.replays, &g.enabled);
  return g;
}

namespace {

// Device copies for the test entry points below (synchronous; freed with the object).
struct TestArena {
  std::vector<std::unique_ptr<DeviceBuffer>> bufs;
  Acts acts;
  cudaStream_t s = nullptr;
  TestArena() { OSD_CUDA_CHECK(cudaStreamCreate(&s)); }
  ~TestArena() {
    if (s) cudaStreamDestroy(s);
  }
  template <class T>
  T* put(const T* host, size_t count) {
    bufs.push_back(std::make_unique<DeviceBuffer>());
    T* d = bufs.back()->as<T>(std::max<size_t>(count, 1));
    if (host && count) OSD_CUDA_CHECK(cudaMemcpy(d, host, count * sizeof(T), cudaMemcpyHostToDevice));
    return d;
  }
  DevMatrix matrix(const Matrix& w) {
    return device_matrix(w, [&](const void* p, size_t bytes) {
      return static_cast<const void*>(put(static_cast<const uint8_t*>(p), bytes));
    });
  }
  template <class T>
  void get(T* host, const T* dev, size_t count) {
    OSD_CUDA_CHECK(cudaStreamSynchronize(s));
    if (count) OSD_CUDA_CHECK(cudaMemcpy(host, dev, count * sizeof(T), cudaMemcpyDeviceToHost));
  }
};

}  // namespace

void model_matmul(const Matrix& w, const float* x, int64_t n, float* y) {
  if (n <= 0) return;
  TestArena t;
  const DevMatrix d = t.matrix(w);
  float* dx = t.put(x, n * w.cols);
  float* dy = t.put<float>(nullptr, n * w.rows);
  reserve_acts(t.acts, n, w.cols);
  matmul(d, dx, n, dy, t.acts, t.s);
  t.get(y, dy, n * w.rows);
}

void model_products(const Matrix* const* ws, int count, const float* const* biases, const float* x, int64_t n,
                    float* const* ys, ProductMode mode) {
  if (n <= 0 || count <= 0) return;
  TestArena t;
  const int64_t cols = ws[0]->cols;
  std::vector<DevMatrix> d;
  std::vector<const DevMatrix*> dp;
  std::vector<float*> dy;
  std::vector<const float*> db;
  for (int m = 0; m < count; ++m) d.push_back(t.matrix(*ws[m]));
  for (int m = 0; m < count; ++m) {
    dp.push_back(&d[m]);
    db.push_back(biases && biases[m] ? t.put(biases[m], ws[m]->rows) : nullptr);
    // Accumulate adds into y as given.
    dy.push_back(t.put(mode == ProductMode::Accumulate ? ys[m] : nullptr, n * ws[m]->rows));
  }
  float* dx = t.put(x, n * cols);
  reserve_acts(t.acts, n, cols);
  switch (mode) {
    case ProductMode::Plain: matmul_many(dp.data(), dy.data(), db.data(), count, dx, n, t.acts, t.s); break;
    case ProductMode::Accumulate: matmul(d[0], dx, n, dy[0], t.acts, t.s, nullptr, true); break;
    case ProductMode::Swiglu: {
      float* scratch = t.put<float>(nullptr, n * ws[0]->rows);
      matmul_swiglu(d[0], d[1], dx, n, dy[0], scratch, t.acts, t.s, nullptr);
      break;
    }
  }
  const int outputs = mode == ProductMode::Plain ? count : 1;
  for (int m = 0; m < outputs; ++m) t.get(ys[m], dy[m], n * ws[m]->rows);
}

void model_rmsnorm(const float* x, const float* w, int64_t rows, int64_t dim, float eps, float* y, float* xhat) {
  if (rows <= 0) return;
  TestArena t;
  float* dx = t.put(x, rows * dim);
  const float* dw = t.put(w, dim);
  float* dy = t.put<float>(nullptr, rows * dim);
  int8_t* q = nullptr;
  float *d = nullptr, *sm = nullptr;
  if (xhat) {
    q = t.put<int8_t>(nullptr, rows * dim);
    d = t.put<float>(nullptr, rows * (dim / 32));
    sm = t.put<float>(nullptr, rows * (dim / 32));
  }
  rmsnorm_kernel<<<static_cast<unsigned>(rows), 256, 0, t.s>>>(dx, nullptr, dw, dim, eps, dy, q, d, sm);
  OSD_CUDA_CHECK_LAUNCH();
  t.get(y, dy, rows * dim);
  if (!xhat) return;
  std::vector<int8_t> hq(rows * dim);
  std::vector<float> hd(rows * (dim / 32));
  t.get(hq.data(), q, hq.size());
  t.get(hd.data(), d, hd.size());
  for (int64_t k = 0; k < rows * dim; ++k) xhat[k] = hd[k / 32] * static_cast<float>(hq[k]);
}

}  // namespace cuda

}  // namespace osd
