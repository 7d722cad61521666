// A target's sparse teacher for distillation (the online recorder, trainDraft): per logit row, the
// k tokens of largest logit (ties: the lower id first), best first, with their probabilities at
// temperature 1 as the verification kernels define them (the blocked scheme of spec/sampling.h,
// DenseRow::prob), and the mass left outside them.
#pragma once
#include <cstddef>
#include <cstdint>

namespace osd {

// The reference: every row's DenseRow and a full stable sort. ids and probs hold rows x k entries,
// residual rows (max(0, 1 - the sum of the k probabilities in double, in order)). A row with NaN or
// +Infinity, or all -Infinity, is a RangeError naming `what` and the row. k <= vocab.
void teacher_top_k_reference(const float* logits, size_t rows, int32_t vocab, int32_t k, int32_t* ids, float* probs,
                             float* residual, const char* what = "logits");

// The same bits, fast: each row's block statistics (one read, no exp term stored) and one pass that
// keeps a k-entry heap, testing each logit against its worst entry; rows over the thread pool.
void teacher_top_k(const float* logits, size_t rows, int32_t vocab, int32_t k, int32_t* ids, float* probs,
                   float* residual, const char* what = "logits");

}  // namespace osd
