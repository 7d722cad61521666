// The model pass on the GPU: a Model's weights copied to the device, and each sequence's KV cache
// there (see DevicePass in native/model/sequence.h). Plain C++: the addon includes it without nvcc.
//
// Matrices stored as F32, F16, Q8_0, Q4_0 or Q4_1 keep their type on the device. The products of the
// three quantised ones follow the CPU engine's arithmetic exactly (8-bit activations per 32 values,
// integer block sums, float sums in block order, see native/model/quant.h), so they give its bits;
// the float products, norms and attention reduce in another order and agree within rounding. Any
// other type (BF16, Q5_0, Q5_1, the K-quants, IQ4_NL, IQ4_XS) is dequantised to F32 once, at upload:
// exact weights, but 4 bytes each (about 7x a Q4_K file's). BF16 products then agree with the CPU's
// within rounding; the others take float activations where the CPU quantises them to 8 bits, so
// they differ from the CPU's by that rounding.
// test_cuda checks all of this against the CPU engine.
#pragma once
#include <memory>
#include <string>

#include "model/model.h"
#include "model/sequence.h"

namespace osd {

// A pass for `model` on the CUDA device, its weights uploaded; null with the reason in *why when no
// device is usable. Give it to model.set_device_pass() before making the model's sequences.
std::shared_ptr<DevicePass> cuda_model_pass(const Model& model, std::string* why);

namespace cuda {
// Y = W X on the device for a host matrix and host activations (n x cols), as the pass computes it:
// for test_cuda's comparisons with the CPU's matmul.
void model_matmul(const Matrix& w, const float* x, int64_t n, float* y);
// The pass's fused products on host data, for test_cuda: Plain runs ws[0..count) over x in one
// launch when they share a type (y[m] = W_m x + bias[m]); Accumulate adds W_0 x into ys[0];
// Swiglu writes silu(W_0 x) * (W_1 x) to ys[0].
enum class ProductMode { Plain, Accumulate, Swiglu };
void model_products(const Matrix* const* ws, int count, const float* const* biases, const float* x, int64_t n,
                    float* const* ys, ProductMode mode);
// The pass's rmsnorm of rows x dim values; with xhat, also its fused 8-bit activations as d * q.
void model_rmsnorm(const float* x, const float* w, int64_t rows, int64_t dim, float eps, float* y, float* xhat);
// Caps the attention scores one launch keeps (floats; 0 restores the default, 16M), so that tests
// reach the chunked path on small models.
void set_model_pass_score_limit(int64_t floats);
// CUDA graphs for the small passes of passes made afterwards: 1 on, 0 off, -1 as OSD_CUDA_GRAPHS says
// (on unless it is "0"). For tests and benchmarks, which compare both.
void set_model_pass_graphs(int on);
struct GraphStats {
  int64_t captures = 0, replays = 0;
  bool enabled = false;
};
// A CUDA model pass's graphs so far (zeros for another kind of pass).
GraphStats model_pass_graph_stats(DevicePass& pass);
}  // namespace cuda

}  // namespace osd
