// Warping (temperature, top-k, top-p) and sampling from one row of logits. Target and draft rows
// go through exactly the same code, so p and q are always compared under the same warping.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace osd {

struct Sampling {
  float temperature = 1.0f;  // 0 means greedy (argmax, ties to the lowest id)
  int32_t top_k = 0;         // 0 means off
  float top_p = 1.0f;        // 1 means off; must be in (0, 1]
  bool greedy() const { return temperature == 0.0f; }
  bool dense() const { return top_k == 0 && top_p >= 1.0f; }
};

// Throws RangeError naming `what` (e.g. "sampling") for temperature < 0 or not finite,
// top_k < 0, or top_p outside (0, 1].
void validate_sampling(const Sampling& s, const std::string& what = "sampling");

// Checks a row for NaN or +Infinity (RangeError naming `what` and the row); -Infinity is allowed
// and means probability 0, but a row must have at least one finite entry. Returns the row max.
float checked_row_max(const float* logits, int32_t vocab, const char* what, size_t row);

// A warped distribution over one row. Temperature-only rows stay implicit:
// p_j = exp((l_j - max) / T) / z. Top-k / top-p rows keep an explicit support sorted by id.
struct WarpedRow {
  const float* logits = nullptr;
  int32_t vocab = 0;
  bool dense = true;
  float max = 0.0f;
  float inv_t = 1.0f;
  double z = 1.0;
  std::vector<int32_t> ids;  // sparse support, ascending
  std::vector<float> probs;  // normalised over the support

  double prob(int32_t token) const;
  // Writes all V probabilities (zeros outside a sparse support).
  void to_dense(float* out) const;
};

// Warps a row (which must already be validated by checked_row_max, whose result is `row_max`).
void warp_row(const float* logits, int32_t vocab, float row_max, const Sampling& s, WarpedRow& out);

// Index of the largest logit, ties to the lowest index.
int32_t argmax_row(const float* logits, int32_t vocab);

// Inverse-CDF sample from non-negative weights w (not necessarily normalised; `total` is their
// sum in double, accumulated in index order) with a uniform u in [0, 1).
int32_t sample_weights(const float* w, int32_t n, double total, double u);

// Samples from a warped row with uniform u (index order, like sample_weights).
int32_t sample_row(const WarpedRow& row, double u);

}  // namespace osd
