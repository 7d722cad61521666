// The optimizer loop: one step = forward + backward over a batch, gradient clipping by global
// norm, a learning rate from the schedule, and AdamW (distill/adamw via the CPU backend; norms
// and biases without weight decay). Checkpoints hold parameters, moments, step and settings.
#pragma once
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "distill/adamw.h"
#include "train/params.h"
#include "train/train_model.h"

namespace osd::train {

enum class LrDecay : int32_t { Constant = 0, Linear = 1, Cosine = 2 };

// Parses "constant" | "linear" | "cosine" (RangeError naming `what` otherwise).
LrDecay parse_lr_decay(const std::string& name, const std::string& what = "schedule");

// lr(step), step = 1, 2, ...: linear warm-up from lr / warmup to lr over the first `warmup`
// steps, then constant, or a linear or cosine decay from lr to min_lr reached at total_steps
// (held there afterwards).
struct LrSchedule {
  float lr = 1e-4f;
  int64_t warmup = 0;
  LrDecay decay = LrDecay::Constant;
  int64_t total_steps = 0;  // needed by linear and cosine
  float min_lr = 0.0f;
  float at(int64_t step) const;
};

struct TrainerConfig {
  LrSchedule schedule;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;  // applied to matrices only
  float clip_norm = 1.0f;     // 0 = no clipping
  int64_t head_chunk = 64;
};

// Checks every field (RangeError naming it).
void validate_trainer_config(const TrainerConfig& c);

struct StepResult {
  double loss = 0.0;       // mean over the batch's counted positions, before the update
  double grad_norm = 0.0;  // global L2 norm of the gradient, before clipping
  float lr = 0.0f;
  int64_t step = 0;        // steps applied so far (after this one)
  bool applied = false;    // false when the loss or the gradient was not finite: nothing changed
};

class Trainer {
 public:
  Trainer(Params params, const TrainerConfig& config);

  // One optimizer step on the batch.
  StepResult step(const Batch& batch);
  // The mean loss on a batch without touching the weights.
  double eval_loss(const Batch& batch);

  const Params& params() const { return params_; }
  Params& params() { return params_; }
  const std::vector<float>& grads() const { return grads_; }
  const TrainerConfig& config() const { return config_; }
  void set_config(const TrainerConfig& c);
  int64_t steps() const { return step_; }

  // A standalone F32 copy of the current weights as an inference model.
  std::shared_ptr<Model> snapshot(const std::string& name = "trained model") const { return params_.to_model(name); }

  // Writes a GGUF holding the model (loadable by Model::load as is), the AdamW moments as extra
  // tensors "osd.adam_m.<name>" / "osd.adam_v.<name>", the step and the settings (osd.train.*).
  // Atomic (temp file, fsync, rename).
  void save_checkpoint(const std::string& path) const;
  // Restores everything save_checkpoint wrote; the next step continues exactly where it stopped.
  static std::unique_ptr<Trainer> load_checkpoint(const std::string& path);

 private:
  Params params_;
  TrainerConfig config_;
  std::vector<float> grads_, m_, v_;
  std::atomic<int64_t> step_{0};  // read by steps() while a step runs
  Activations acts_;
};

}  // namespace osd::train
