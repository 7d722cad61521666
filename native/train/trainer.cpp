#include "train/trainer.h"

#include <cmath>
#include <cstring>

#include "backend/backend.h"
#include "core/error.h"
#include "io/file.h"

namespace osd::train {

LrDecay parse_lr_decay(const std::string& name, const std::string& what) {
  if (name == "constant") return LrDecay::Constant;
  if (name == "linear") return LrDecay::Linear;
  if (name == "cosine") return LrDecay::Cosine;
  throw_range(what + " must be one of 'constant', 'linear', 'cosine', got '" + name + "'");
}

namespace {
const char* lr_decay_name(LrDecay d) {
  switch (d) {
    case LrDecay::Linear: return "linear";
    case LrDecay::Cosine: return "cosine";
    default: return "constant";
  }
}
}  // namespace

float LrSchedule::at(int64_t step) const {
  if (warmup > 0 && step <= warmup) return lr * static_cast<float>(step) / static_cast<float>(warmup);
  if (decay == LrDecay::Constant) return lr;
  const double span = static_cast<double>(total_steps - warmup);
  const double progress = span <= 0 ? 1.0 : std::min(1.0, std::max(0.0, (step - warmup) / span));
  if (decay == LrDecay::Linear) return static_cast<float>(lr + (min_lr - lr) * progress);
  return static_cast<float>(min_lr + (lr - min_lr) * 0.5 * (1.0 + std::cos(3.141592653589793 * progress)));
}

void validate_trainer_config(const TrainerConfig& c) {
  const LrSchedule& s = c.schedule;
  if (!std::isfinite(s.lr) || s.lr < 0.0f) throw_range("lr must be a finite number >= 0, got " + num_str(s.lr));
  if (s.warmup < 0) throw_range("warmupSteps must be >= 0, got " + std::to_string(s.warmup));
  if (s.decay != LrDecay::Constant && s.total_steps <= 0)
    throw_range(std::string("totalSteps must be > 0 for a ") + lr_decay_name(s.decay) + " schedule");
  if (!std::isfinite(s.min_lr) || s.min_lr < 0.0f || s.min_lr > s.lr)
    throw_range("minLr must be in [0, lr], got " + num_str(s.min_lr));
  if (!std::isfinite(c.clip_norm) || c.clip_norm < 0.0f)
    throw_range("clipNorm must be a finite number >= 0 (0 = off), got " + num_str(c.clip_norm));
  // (bounded as createTrainer's option is: a checkpoint asking for 2^40 rows would allocate that many)
  if (c.head_chunk <= 0 || c.head_chunk > (1 << 20)) throw_range("headChunk must be in [1, 1048576], got " + std::to_string(c.head_chunk));
  AdamWConfig a;
  a.lr = s.lr;
  a.beta1 = c.beta1;
  a.beta2 = c.beta2;
  a.eps = c.eps;
  a.weight_decay = c.weight_decay;
  validate_adamw(a);
}

Trainer::Trainer(Params params, const TrainerConfig& config) : params_(std::move(params)), config_(config) {
  validate_trainer_config(config_);
  grads_.assign(params_.size(), 0.0f);
  m_.assign(params_.size(), 0.0f);
  v_.assign(params_.size(), 0.0f);
}

void Trainer::set_config(const TrainerConfig& c) {
  validate_trainer_config(c);
  config_ = c;
}

StepResult Trainer::step(const Batch& batch) {
  ForwardOptions fo;
  fo.head_chunk = config_.head_chunk;
  StepResult r;
  r.loss = forward_backward(params_, batch, acts_, grads_.data(), fo);
  Backend& be = cpu_backend();
  r.grad_norm = be.global_norm(grads_.data(), grads_.size());
  r.step = step_;
  if (!std::isfinite(r.loss) || !std::isfinite(r.grad_norm)) return r;  // the guard: nothing changes
  // Nothing to learn from: no step (AdamW's momentum and weight decay would still move the weights).
  if (counted_rows(batch.loss, int64_t(batch.batch) * batch.seq_len).empty()) return r;

  AdamWConfig a;
  a.lr = r.lr = config_.schedule.at(step_ + 1);
  a.beta1 = config_.beta1;
  a.beta2 = config_.beta2;
  a.eps = config_.eps;
  a.weight_decay = config_.weight_decay;
  a.step = step_ + 1;
  a.grad_scale = config_.clip_norm > 0.0f && r.grad_norm > config_.clip_norm
                     ? static_cast<float>(config_.clip_norm / r.grad_norm)
                     : 1.0f;
  // Matrices with weight decay, then norms and biases without.
  const size_t de = params_.layout().decay_end(), n = params_.size();
  be.adamw_step(params_.data(), grads_.data(), m_.data(), v_.data(), de, a);
  a.weight_decay = 0.0f;
  be.adamw_step(params_.data() + de, grads_.data() + de, m_.data() + de, v_.data() + de, n - de, a);
  r.step = ++step_;
  r.applied = true;
  return r;
}

double Trainer::eval_loss(const Batch& batch) {
  ForwardOptions fo;
  fo.head_chunk = config_.head_chunk;
  return forward(params_, batch, acts_, fo);
}

// ---- Checkpoints ---------------------------------------------------------------------------------

namespace {
const char* kMoment1 = "osd.adam_m.";
const char* kMoment2 = "osd.adam_v.";
}  // namespace

void Trainer::save_checkpoint(const std::string& path) const {
  using gguf::Value;
  gguf::Writer w = params_.writer(gguf::TensorType::F32);
  const TrainerConfig& c = config_;
  w.set("osd.train.step", Value::i64(step_));
  w.set("osd.train.lr", Value::f32(c.schedule.lr));
  w.set("osd.train.warmup", Value::i64(c.schedule.warmup));
  w.set("osd.train.decay", Value::str(lr_decay_name(c.schedule.decay)));
  w.set("osd.train.total_steps", Value::i64(c.schedule.total_steps));
  w.set("osd.train.min_lr", Value::f32(c.schedule.min_lr));
  w.set("osd.train.beta1", Value::f32(c.beta1));
  w.set("osd.train.beta2", Value::f32(c.beta2));
  w.set("osd.train.eps", Value::f32(c.eps));
  w.set("osd.train.weight_decay", Value::f32(c.weight_decay));
  w.set("osd.train.clip_norm", Value::f32(c.clip_norm));
  w.set("osd.train.head_chunk", Value::i64(c.head_chunk));
  for (const ParamTensor& t : params_.layout().tensors()) {
    const std::vector<uint64_t> dims = t.matrix ? std::vector<uint64_t>{static_cast<uint64_t>(t.cols), static_cast<uint64_t>(t.rows)}
                                                : std::vector<uint64_t>{static_cast<uint64_t>(t.cols)};
    w.add_tensor(kMoment1 + t.name, gguf::TensorType::F32, dims, m_.data() + t.offset);
    w.add_tensor(kMoment2 + t.name, gguf::TensorType::F32, dims, v_.data() + t.offset);
  }
  io::write_atomic(path, [&](io::Output& out) { w.write_to(out); });
}

std::unique_ptr<Trainer> Trainer::load_checkpoint(const std::string& path) {
  std::unique_ptr<gguf::File> file = gguf::File::open(path);
  const gguf::File& f = *file;
  if (!f.find("osd.train.step")) throw_io(f.name() + ": not a training checkpoint (no osd.train.step)");
  TrainerConfig c;
  c.schedule.lr = static_cast<float>(f.get_float("osd.train.lr"));
  c.schedule.warmup = f.get_int("osd.train.warmup");
  c.schedule.decay = parse_lr_decay(f.get_string("osd.train.decay"), f.name() + ": osd.train.decay");
  c.schedule.total_steps = f.get_int("osd.train.total_steps");
  c.schedule.min_lr = static_cast<float>(f.get_float("osd.train.min_lr"));
  c.beta1 = static_cast<float>(f.get_float("osd.train.beta1"));
  c.beta2 = static_cast<float>(f.get_float("osd.train.beta2"));
  c.eps = static_cast<float>(f.get_float("osd.train.eps"));
  c.weight_decay = static_cast<float>(f.get_float("osd.train.weight_decay"));
  c.clip_norm = static_cast<float>(f.get_float("osd.train.clip_norm"));
  c.head_chunk = f.get_int("osd.train.head_chunk");
  const int64_t step = f.get_int("osd.train.step");
  if (step < 0) throw_io(f.name() + ": osd.train.step is negative");
  try {
    validate_trainer_config(c);
  } catch (const Error& e) {
    throw_io(f.name() + ": bad training settings: " + e.what());
  }

  std::shared_ptr<Model> model = Model::from_gguf(std::move(file));
  auto t = std::make_unique<Trainer>(Params::from_model(*model), c);
  t->step_ = step;
  const gguf::File& g = *model->gguf();
  for (const ParamTensor& pt : t->params_.layout().tensors())
    for (int which = 0; which < 2; ++which) {
      const std::string name = (which == 0 ? kMoment1 : kMoment2) + pt.name;
      const gguf::TensorInfo& info = g.tensor(name);
      if (info.type != gguf::TensorType::F32 || info.n_elements != pt.size())
        throw_io(g.name() + ": tensor '" + name + "' must be F32 with " + std::to_string(pt.size()) + " elements");
      float* dst = (which == 0 ? t->m_ : t->v_).data() + pt.offset;
      std::memcpy(dst, info.data, pt.size() * sizeof(float));
      // A damaged moment would pass the step's guards (loss and gradient stay finite) and turn every
      // weight it touches into NaN: second moments are finite and >= 0, first moments finite.
      for (size_t i = 0; i < pt.size(); ++i)
        if (!std::isfinite(dst[i]) || (which == 1 && dst[i] < 0.0f))
          throw_io(g.name() + ": tensor '" + name + "' holds " + num_str(dst[i]) + " at element " + std::to_string(i) +
                   (which == 1 ? " (second moments are finite and >= 0)" : " (moments are finite)"));
    }
  for (size_t i = 0; i < t->params_.size(); ++i)
    if (!std::isfinite(t->params_.data()[i]))
      throw_io(g.name() + ": a weight is not finite (element " + std::to_string(i) + " of the flat parameters)");
  return t;
}

}  // namespace osd::train
