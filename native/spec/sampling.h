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

// One token from a row of `vocab` logits: the argmax when greedy, otherwise the warped row's
// inverse CDF at the Philox draw (seed, stream, position, kLaneSample). The row is validated first
// (checked_row_max, naming `what` and `row`).
int32_t sample_token(const float* logits, int32_t vocab, const Sampling& s, uint64_t seed, uint64_t stream,
                     uint32_t position, const char* what = "logits", size_t row = 0);

// sample_token for a row that is -Infinity outside `ids` (ascending), as the engine writes a
// restricted head's rows: the same token, bit for bit, reading only those entries (ids at or past
// `vocab` are left out, for rows cut to a shared vocabulary). The weights outside are exactly 0, so
// the running sums over the ids are the dense ones. Top-k / top-p rows, and no ids (a whole head),
// go through sample_token.
int32_t sample_token_sparse(const float* logits, int32_t vocab, const int32_t* ids, int32_t n_ids, const Sampling& s,
                            uint64_t seed, uint64_t stream, uint32_t position, const char* what = "logits",
                            size_t row = 0);

// The dense (temperature-only) case of sample_token: sample_row's token for the row warped with
// inv_t (= 1 / temperature) and the uniform u, computed in one pass.
int32_t sample_temperature_row(const float* logits, int32_t vocab, float row_max, float inv_t, double u);

// ---- The blocked scheme: the fast path for temperature-only rows -------------------------------
// The reference above sums a row in one pass per quantity. The fast paths (verify_chain_blocked and
// forward_kl_row_blocked, which the CPU backend runs) cut every row into blocks of kStatBlock
// entries and reduce each block on its own: a block is read once into L1 and reduced there, blocks
// can be spread over threads, and sampling skips whole blocks. Blocks are always combined in block
// order, so results do not depend on the thread count. Exactly (every operation rounded on its own,
// float unless marked double), for a row l of V logits and it = 1.0f / temperature:
//   block b covers j in [2048 b, min(V, 2048 (b + 1)));
//   bm_b = max of the block's logits (-Infinity if they all are);  max = max_b bm_b;
//   e_j  = exp_approx((l_j - bm_b) * it), the subtraction then the multiply (0 where bm_b = -Inf);
//   S_b  = lane_sum(e over block b);   c_b = exp_approx((bm_b - max) * it)  (0 where bm_b = -Inf);
//   W_b  = S_b * c_b;                   z = sum_b double(W_b), in block order;
//   p_j  = double(e_j * c_b) / z  (the accept test compares u * q_x < p_x in double).
// lane_sum over a block: 32 float accumulators from +0; lane k adds the block's entries j0 + 32 i + k
// in increasing i (a short last block leaves the missing entries out); then the lanes fold pairwise:
// a_k += a_(k+16) for k < 16, then a_k += a_(k+8) for k < 8, then 4, 2, 1 (a warp's xor butterfly).
constexpr int32_t kStatBlock = 2048;
constexpr int32_t kStatLanes = 32;
inline int32_t stat_blocks(int32_t vocab) { return (vocab + kStatBlock - 1) / kStatBlock; }

// One line of every 4 KiB page of x[0..n) into L2, before a run of blocks reads them: the hardware
// prefetchers stop at page boundaries and each page of a cold row needs its own table walk, so the
// walks overlap here instead of stalling block by block (a hint; it never faults).
inline void touch_pages(const float* x, size_t n) {
  for (size_t j = 0; j < n; j += 1024) __builtin_prefetch(x + j, 0, 2);
}

// Max of n logits and whether any is NaN or +Infinity (any n; max is exact in any order).
float block_max(const float* l, int32_t n, bool* bad);
// lane_sum of e_j = exp_approx((l_j - ref) * inv_t) over n <= kStatBlock entries; stores the e_j in
// e when e is not null. Meanwhile it prefetches side[0..min(side_n, n)), logits to be read soon:
// the exps leave the memory idle otherwise (a hint; it never changes a result).
float block_exp_sum(const float* l, int32_t n, float ref, float inv_t, float* e, const float* side = nullptr,
                    int32_t side_n = 0);

// Sorts keys ascending by their bits [from_bit, 64) (a stable radix sort; the bits below ride
// along, and keys equal above from_bit keep their order). Top-k and top-p sort their candidates so.
void radix_sort_u64(uint64_t* keys, size_t n, int from_bit);

// Validation outcome of a row, as checked_row_max defines it.
enum class RowCheck : uint8_t { Unchecked = 0, Ok = 1, NotFinite = 2, AllNegInf = 3 };
// Throws the RangeError that checked_row_max throws for this outcome (nothing for Ok).
void throw_row_check(RowCheck c, const char* what, size_t row);
// Validates `count` rows of V logits (RowCheck and max of each), all (row, block) pairs over the
// thread pool when called outside it.
void check_rows(const float* rows, size_t count, int32_t vocab, RowCheck* check, float* max);

// A temperature-only row in the blocked scheme, with every e_j kept: the literal statement of the
// scheme that tests compare the fast paths with (BlockedRow below keeps no exp term).
struct DenseRow {
  const float* logits = nullptr;
  int32_t vocab = 0;
  float inv_t = 1.0f;
  RowCheck check = RowCheck::Unchecked;
  float max = 0.0f;
  double z = 0.0;
  std::vector<float> e;                        // V
  std::vector<float> bmax, bsum, scale, mass;  // per block: bm_b, S_b, c_b, W_b
  std::vector<uint8_t> bad;                    // per block: NaN or +Infinity seen

  double prob(int32_t token) const;
};
// Computes the rows' DenseRow (n = 1 or 2 rows; all their blocks over the thread pool when called
// outside it). A row whose check is not Ok has no meaningful statistics.
void dense_rows(const float* const* logits, int32_t n, int32_t vocab, float inv_t, DenseRow* const* out);

// Inverse-CDF sample over blocked weights: entry j of block b weighs w_j * wscale_b (wscale null
// means 1; the float product), and bmass_b is block b's mass. With total = sum_b double(bmass_b) in
// block order and cum = 0 (double): blocks of mass <= 0 are skipped; a block with cum + bmass_b <=
// u * total is passed whole (cum += bmass_b); otherwise it is scanned in index order, cum +=
// double(weight) over its positive weights, returning the first j with cum > u * total (if rounding
// leaves the block without one, later blocks continue the same way; past the end, the last entry
// with weight). Returns -1 when total <= 0.
int32_t sample_blocks(const float* w, const float* wscale, const float* bmass, int32_t vocab, double u);
// The scan inside a block, without its chain of dependent adds: the first j with
// cum0 + w_0 + ... + w_j > target, each add in double in index order, for n <= kStatBlock
// non-negative weights. Returns -1 when its error bound cannot prove that entry (a crossing by a
// weight below about 1e-13 of the running sum: of order 1e-9 of draws at n = 2048; or when the sum
// never passes target): the caller then adds them one by one.
int32_t find_crossing(const float* w, int32_t n, double cum0, double target);
// Sample from a dense row: weights e_j * c_b, masses W_b.
int32_t sample_dense(const DenseRow& row, double u);
// Sample from norm(max(0, p - q)) of two dense rows: with a_b = float(c_b / z) for each row,
// r_j = max(0, e^p_j * a^p_b - e^q_j * a^q_b) (float), block masses R_b = lane_sum(r). When the
// residual has no mass (p == q up to rounding) it samples p. r and rmass are scratch (V, blocks).
int32_t sample_residual_dense(const DenseRow& p, const DenseRow& q, double u, std::vector<float>& r,
                              std::vector<float>& rmass);

// ---- The blocked scheme from block statistics (the CPU backend's chain walk) ------------------
// A row is read once for its block statistics. Its exp terms are stored only where a residual may
// need all of them (a target / draft pair the walk tests); elsewhere the few terms needed again
// (the accepted token, the chosen block of a sample) are recomputed from the logit, with the same
// bits.

// Statistics of one block: bm_b, NaN / +Infinity seen, and S_b when the sum was asked for (0 for a
// block that is bad or all -Infinity).
struct BlockStat {
  float max = 0.0f;
  float sum = 0.0f;
  uint8_t bad = 0;
};
// One block of n <= kStatBlock logits; S_b only when `sum` is set, and then its exp terms go to e
// when e is not null (zeros where bm_b is -Infinity; unspecified in a bad block).
void block_stats(const float* l, int32_t n, float inv_t, bool sum, BlockStat& out, float* e = nullptr,
                 const float* side = nullptr, int32_t side_n = 0);
// The sum half of block_stats, for a block whose max and bad flag block_stats already set: S_b (and
// the exp terms) with the same bits, without reading the block for its max again.
void block_sum(const float* l, int32_t n, float inv_t, BlockStat& out, float* e = nullptr,
               const float* side = nullptr, int32_t side_n = 0);

// A temperature-only row from its block statistics. finish_row_check sets check and max from the
// blocks; finish_row also, for a row that is Ok and whose blocks were summed, c_b (scale), W_b
// (mass) and z, as dense_rows does.
struct BlockedRow {
  const float* logits = nullptr;
  int32_t vocab = 0;
  float inv_t = 1.0f;
  const BlockStat* blocks = nullptr;  // stat_blocks(vocab)
  const float* e = nullptr;           // the stored exp terms (V), or null: recomputed when needed
  float* scale = nullptr;             // stat_blocks(vocab), written by finish_row
  float* mass = nullptr;              // stat_blocks(vocab), written by finish_row
  RowCheck check = RowCheck::Unchecked;
  float max = 0.0f;
  double z = 0.0;

  double prob(int32_t token) const;  // DenseRow::prob
};
void finish_row_check(BlockedRow& row);
void finish_row(BlockedRow& row);
// sample_dense of the same row (only the chosen block's weights are formed).
int32_t sample_blocked(const BlockedRow& row, double u);
// sample_residual_dense of the same rows: the block masses R_b go to rmass (stat_blocks(V)
// floats), over the thread pool when called outside it and the row is long; then only the chosen
// block is formed again.
int32_t sample_residual_blocked(const BlockedRow& p, const BlockedRow& q, double u, float* rmass);

}  // namespace osd
