// Bindings for training: a Trainer over an owned f32 copy of a model (or a fresh random one),
// whose steps run on worker threads. snapshot() makes an inference model from the current weights
// that can be swapped into a running model between decoding steps (NativeModel.setWeights).
#include <napi.h>

#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/error.h"
#include "model/model.h"
#include "napi/napi_util.h"
#include "train/train_ops.h"
#include "train/trainer.h"

namespace osd::napi {

// Defined in model_napi.cpp: wraps a model in a NativeModel, and reads one out of a NativeModel.
Napi::Value wrap_model(Napi::Env env, std::shared_ptr<Model> m);
std::shared_ptr<Model> unwrap_model(Napi::Env env, const Napi::Value& v, const char* name);

namespace {

using train::Batch;
using train::Trainer;
using train::TrainerConfig;

TrainerConfig parse_config(const Napi::Object& o, TrainerConfig c) {
  c.schedule.lr = get_f32_or(o, "lr", c.schedule.lr);
  c.schedule.warmup = get_int_or(o, "warmupSteps", 0, int64_t(1) << 40, c.schedule.warmup);
  const Napi::Value schedule = get_prop(o, "schedule");
  if (present(schedule)) c.schedule.decay = train::parse_lr_decay(schedule.ToString().Utf8Value(), "schedule");
  c.schedule.total_steps = get_int_or(o, "totalSteps", 0, int64_t(1) << 40, c.schedule.total_steps);
  c.schedule.min_lr = get_f32_or(o, "minLr", c.schedule.min_lr);
  c.beta1 = get_f32_or(o, "beta1", c.beta1);
  c.beta2 = get_f32_or(o, "beta2", c.beta2);
  c.eps = get_f32_or(o, "eps", c.eps);
  c.weight_decay = get_f32_or(o, "weightDecay", c.weight_decay);
  c.clip_norm = get_f32_or(o, "clipNorm", c.clip_norm);
  c.head_chunk = get_int_or(o, "headChunk", 1, 1 << 20, c.head_chunk);
  train::validate_trainer_config(c);
  return c;
}

// A batch with its own copies of every array, so the worker thread never touches JS memory.
struct OwnedBatch {
  std::vector<int32_t> tokens, targets, topk_ids;
  std::vector<float> teacher, topk_probs, residual;
  std::vector<uint8_t> mask;
  Batch batch;
};

// Every array is copied as soon as it is read (before the next property read, whose getter could
// detach it), and each property is read once.
std::unique_ptr<OwnedBatch> parse_batch(Napi::Env env, const Napi::Value& v, int32_t vocab) {
  if (!v.IsObject()) throw Napi::TypeError::New(env, "batch must be an object");
  Napi::Object o = v.As<Napi::Object>();
  auto ob = std::make_unique<OwnedBatch>();
  Batch& b = ob->batch;
  b.batch = static_cast<int32_t>(get_int(o, "batchSize", 1, 1 << 20, "batch."));
  b.seq_len = static_cast<int32_t>(get_int(o, "seqLen", 1, 1 << 20, "batch."));
  const size_t n = static_cast<size_t>(b.batch) * b.seq_len;
  ob->tokens = copy_array<int32_t>(env, required_prop(o, "tokens", "batch."), "batch.tokens");
  if (ob->tokens.size() != n)
    throw Napi::RangeError::New(env, "batch.tokens has length " + std::to_string(ob->tokens.size()) +
                                         ", expected batchSize * seqLen = " + std::to_string(n));
  b.tokens = ob->tokens.data();
  const Napi::Value targets = get_prop(o, "targets");
  if (present(targets)) {
    ob->targets = copy_array<int32_t>(env, targets, "batch.targets");
    if (ob->targets.size() != n) throw Napi::RangeError::New(env, "batch.targets must have batchSize * seqLen entries");
    b.loss.targets = ob->targets.data();
    return ob;
  }
  DistillInput& d = b.loss.distill;
  const Napi::Value kind = get_prop(o, "kind");
  d.kind = parse_distill_kind(present(kind) ? kind.ToString().Utf8Value() : "forward-kl", "batch.kind");
  d.temperature = static_cast<float>(get_number_or(o, "temperature", 1.0, "batch."));
  d.beta = static_cast<float>(get_number_or(o, "beta", 0.5, "batch."));
  const Napi::Value mask = get_prop(o, "mask");
  if (present(mask)) {
    ob->mask = copy_array<uint8_t>(env, mask, "batch.mask");
    if (ob->mask.size() != n) throw Napi::RangeError::New(env, "batch.mask must have batchSize * seqLen entries");
    d.mask = ob->mask.data();
  }
  const Napi::Value teacher_logits = get_prop(o, "teacherLogits");
  const Napi::Value teacher = present(teacher_logits) ? env.Undefined() : get_prop(o, "teacher");
  if (present(teacher_logits)) {
    ob->teacher = copy_array<float>(env, teacher_logits, "batch.teacherLogits");
    if (ob->teacher.size() != n * vocab) throw Napi::RangeError::New(env, "batch.teacherLogits must have batchSize * seqLen * vocabSize entries");
    d.teacher = ob->teacher.data();
  } else if (present(teacher)) {
    if (!teacher.IsObject()) throw Napi::TypeError::New(env, "batch.teacher must be an object { indices, probs, residual? }");
    Napi::Object t = teacher.As<Napi::Object>();
    ob->topk_ids = copy_array<int32_t>(env, required_prop(t, "indices", "batch.teacher."), "batch.teacher.indices");
    ob->topk_probs = copy_array<float>(env, required_prop(t, "probs", "batch.teacher."), "batch.teacher.probs");
    if (ob->topk_ids.size() % n != 0 || ob->topk_probs.size() != ob->topk_ids.size())
      throw Napi::RangeError::New(env, "batch.teacher.indices and probs must hold k entries for each of the batchSize * seqLen rows");
    d.k = static_cast<int32_t>(ob->topk_ids.size() / n);
    d.topk_ids = ob->topk_ids.data();
    d.topk_probs = ob->topk_probs.data();
    const Napi::Value residual = get_prop(t, "residual");
    if (present(residual)) {
      ob->residual = copy_array<float>(env, residual, "batch.teacher.residual");
      if (ob->residual.size() != n) throw Napi::RangeError::New(env, "batch.teacher.residual must have batchSize * seqLen entries");
      d.residual = ob->residual.data();
    }
  } else {
    throw Napi::TypeError::New(env, "batch needs targets (cross-entropy), teacherLogits or teacher (distillation)");
  }
  return ob;
}

class TrainerWrap;

// Type tags (napi_util.h) of NativeTrainer instances and of the externals its constructor takes.
constexpr napi_type_tag kTrainerTag = {0x747261696e657277ULL, 0x7261a1b2c3d4e501ULL};
constexpr napi_type_tag kTrainerHandleTag = {0x747261696e657268ULL, 0x616e646c65a1b202ULL};

// Runs fn on a worker thread under the trainer's lock and settles a promise with make(env).
class TrainWorker : public Napi::AsyncWorker {
 public:
  TrainWorker(Napi::Env env, std::shared_ptr<std::mutex> mu, std::function<void()> fn,
              std::function<Napi::Value(Napi::Env)> make)
      : Napi::AsyncWorker(env), d_(Napi::Promise::Deferred::New(env)), mu_(std::move(mu)), fn_(std::move(fn)),
        make_(std::move(make)) {}
  Napi::Promise promise() { return d_.Promise(); }

 protected:
  void Execute() override {
    std::lock_guard<std::mutex> lk(*mu_);
    try {
      fn_();
    } catch (const Error& e) {
      kind_ = e.kind;
      engine_ = true;
      SetError(e.what());
    } catch (const std::exception& e) {
      SetError(e.what());
    }
  }
  void OnOK() override { d_.Resolve(make_(Env())); }
  void OnError(const Napi::Error& e) override {
    Napi::Env env = Env();
    Napi::Error err = kind_ == ErrorKind::Range  ? Napi::RangeError::New(env, e.Message())
                      : kind_ == ErrorKind::Type ? Napi::TypeError::New(env, e.Message())
                                                 : Napi::Error::New(env, e.Message());
    // The codes the other bindings give (throw_js): a damaged checkpoint is OSD_IO, as a model file.
    if (engine_ && kind_ != ErrorKind::Range && kind_ != ErrorKind::Type)
      err.Set("code", Napi::String::New(env, kind_ == ErrorKind::Io ? "OSD_IO" : "OSD_STATE"));
    d_.Reject(err.Value());
  }

 private:
  Napi::Promise::Deferred d_;
  std::shared_ptr<std::mutex> mu_;
  std::function<void()> fn_;
  std::function<Napi::Value(Napi::Env)> make_;
  ErrorKind kind_ = ErrorKind::State;
  bool engine_ = false;  // an osd::Error (kind_ is its kind)
};

// Settings configure() leaves for the next call that runs under the trainer's lock: configure
// itself does not wait for that lock, which a running step holds for its whole length.
struct ConfigSlot {
  std::mutex mu;
  TrainerConfig latest;  // what configure() last set (the base of the next configure)
  bool pending = false;
  void apply(Trainer& t) {
    std::lock_guard<std::mutex> lk(mu);
    if (pending) t.set_config(latest);
    pending = false;
  }
};

class TrainerWrap : public Napi::ObjectWrap<TrainerWrap> {
 public:
  static Napi::Function define(Napi::Env env) {
    Napi::Function ctor = DefineClass(
        env, "NativeTrainer",
        {InstanceMethod("step", &TrainerWrap::step), InstanceMethod("evalLoss", &TrainerWrap::eval_loss),
         InstanceMethod("snapshot", &TrainerWrap::snapshot), InstanceMethod("save", &TrainerWrap::save),
         InstanceMethod("configure", &TrainerWrap::configure), InstanceMethod("dispose", &TrainerWrap::dispose)});
    ctor.Get("prototype").As<Napi::Object>().DefineProperties(
        {Napi::PropertyDescriptor::Accessor<checked_getter<TrainerWrap, &TrainerWrap::steps>>("steps"),
         Napi::PropertyDescriptor::Accessor<checked_getter<TrainerWrap, &TrainerWrap::param_count>>("parameterCount")});
    return ctor;
  }
  static TrainerWrap* self(const Napi::CallbackInfo& info) { return checked_this<TrainerWrap>(info, kTrainerTag); }

  explicit TrainerWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TrainerWrap>(info) {
    if (info.Length() < 1 || !info[0].IsExternal() || !has_tag(info.Env(), info[0], kTrainerHandleTag))
      throw Napi::TypeError::New(info.Env(), "NativeTrainer is created by createTrainer()");
    // Moved out: the external (freed by the garbage collector) must not hold the trainer, which
    // dispose() frees on a worker thread.
    trainer_ = std::move(*info[0].As<Napi::External<std::shared_ptr<Trainer>>>().Data());
    slot_->latest = trainer_->config();
    tag_object(info.Env(), info.This(), kTrainerTag);
  }

 private:
  Trainer& get(Napi::Env env) {
    if (!trainer_) throw Napi::Error::New(env, "the trainer was disposed");
    return *trainer_;
  }

  // fn, run under the trainer's lock after the settings configure() left (they apply from the next
  // step on, in call order).
  std::function<void()> configured(std::shared_ptr<Trainer> keep, std::function<void()> fn) {
    return [slot = slot_, keep = std::move(keep), fn = std::move(fn)] {
      slot->apply(*keep);
      fn();
    };
  }

  Napi::Value step(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      // The batch's getters may run (and dispose this trainer): it is held, and checked again after.
      auto keep = trainer_;
      const int32_t vocab = get(env).params().config().vocab;
      std::shared_ptr<OwnedBatch> b(parse_batch(env, info.Length() ? info[0] : env.Undefined(), vocab));
      get(env);
      auto res = std::make_shared<train::StepResult>();
      auto* w = new TrainWorker(
          env, mu_, configured(keep, [keep, b, res] { *res = keep->step(b->batch); }),
          [res](Napi::Env e) {
            Napi::Object o = Napi::Object::New(e);
            o.Set("loss", res->loss);
            o.Set("gradNorm", res->grad_norm);
            o.Set("lr", res->lr);
            o.Set("step", static_cast<double>(res->step));
            o.Set("applied", res->applied);
            return o;
          });
      w->Queue();
      return w->promise();
    });
  }

  Napi::Value eval_loss(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      auto keep = trainer_;
      const int32_t vocab = get(env).params().config().vocab;
      std::shared_ptr<OwnedBatch> b(parse_batch(env, info.Length() ? info[0] : env.Undefined(), vocab));
      get(env);
      auto loss = std::make_shared<double>(0);
      auto* w = new TrainWorker(env, mu_, configured(keep, [keep, b, loss] { *loss = keep->eval_loss(b->batch); }),
                                [loss](Napi::Env e) { return Napi::Number::New(e, *loss); });
      w->Queue();
      return w->promise();
    });
  }

  Napi::Value snapshot(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    get(env);
    auto keep = trainer_;
    auto out = std::make_shared<std::shared_ptr<Model>>();
    auto* w = new TrainWorker(env, mu_, configured(keep, [keep, out] { *out = keep->snapshot(); }),
                              [out](Napi::Env e) { return wrap_model(e, *out); });
    w->Queue();
    return w->promise();
  }

  Napi::Value save(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    get(env);
    if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(env, "path must be a string");
    std::string path = info[0].As<Napi::String>();
    auto keep = trainer_;
    auto* w = new TrainWorker(env, mu_, configured(keep, [keep, path] { keep->save_checkpoint(path); }),
                              [](Napi::Env e) { return e.Undefined(); });
    w->Queue();
    return w->promise();
  }

  Napi::Value configure(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      // The options are parsed without a lock held: their getters may run, and may call back into
      // this trainer. The settings wait in slot_ for the next call under the trainer's lock, so a
      // running step does not hold the event loop here.
      get(env);
      Napi::Object o = require_object(info, 0, "options");
      TrainerConfig base;
      {
        std::lock_guard<std::mutex> lk(slot_->mu);
        base = slot_->latest;
      }
      const TrainerConfig c = parse_config(o, base);  // (checked there)
      get(env);
      std::lock_guard<std::mutex> lk(slot_->mu);
      slot_->latest = c;
      slot_->pending = true;
      return env.Undefined();
    });
  }

  // Frees the trainer on a worker thread (parameters, moments and activations: hundreds of MB for
  // a real draft, whose release held the event loop for a quarter of a second). A running step
  // keeps its own reference.
  Napi::Value dispose(const Napi::CallbackInfo& info) {
    auto* w = new TrainWorker(
        info.Env(), mu_, [t = std::move(trainer_)]() mutable { t.reset(); },
        [](Napi::Env env) { return env.Undefined(); });
    w->Queue();
    return w->promise();
  }
  Napi::Value steps(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), trainer_ ? static_cast<double>(trainer_->steps()) : 0);
  }
  Napi::Value param_count(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), trainer_ ? static_cast<double>(trainer_->params().size()) : 0);
  }

  std::shared_ptr<Trainer> trainer_;
  std::shared_ptr<std::mutex> mu_ = std::make_shared<std::mutex>();
  std::shared_ptr<ConfigSlot> slot_ = std::make_shared<ConfigSlot>();
};

Napi::FunctionReference* g_trainer_ctor = nullptr;

Napi::Value new_trainer(Napi::Env env, std::unique_ptr<Trainer> t) {
  auto ext = Napi::External<std::shared_ptr<Trainer>>::New(env, new std::shared_ptr<Trainer>(std::move(t)),
                                                           [](Napi::Env, std::shared_ptr<Trainer>* p) { delete p; });
  tag_object(env, ext, kTrainerHandleTag);
  return g_trainer_ctor->New({ext});
}

// createTrainer(source: NativeModel | { config }, options) -> Promise<NativeTrainer>
Napi::Value create_trainer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(env, "source must be a model or { config, seed }");
    Napi::Object src = info[0].As<Napi::Object>();
    Napi::Object opts = info.Length() > 1 && info[1].IsObject() ? info[1].As<Napi::Object>() : Napi::Object::New(env);
    TrainerConfig cfg = parse_config(opts, TrainerConfig{});
    std::shared_ptr<Model> model;
    ModelConfig mc;
    uint64_t seed = 0;
    float init_std = 0.02f;
    const Napi::Value config = get_prop(src, "config");
    const bool from_model = !present(config);
    if (from_model) {
      model = unwrap_model(env, src, "source");
    } else {
      if (!config.IsObject()) throw Napi::TypeError::New(env, "source.config must be an object");
      Napi::Object c = config.As<Napi::Object>();
      mc.vocab = static_cast<int32_t>(get_int(c, "vocabSize", 1, 1 << 24, "config."));
      mc.dim = static_cast<int32_t>(get_int(c, "embeddingLength", 1, 1 << 16, "config."));
      mc.n_layers = static_cast<int32_t>(get_int(c, "layers", 1, 1024, "config."));
      mc.n_heads = static_cast<int32_t>(get_int(c, "heads", 1, 1024, "config."));
      mc.n_kv_heads = static_cast<int32_t>(get_int_or(c, "kvHeads", 1, 1024, mc.n_heads, "config."));
      mc.ffn_dim = static_cast<int32_t>(get_int(c, "feedForwardLength", 1, 1 << 18, "config."));
      mc.context = static_cast<int32_t>(get_int(c, "contextLength", 1, 1 << 20, "config."));
      mc.rope_theta = get_rope_theta(c, "config.");
      const Napi::Value tied = get_prop(c, "tiedOutput");
      mc.tied_output = !present(tied) || tied.ToBoolean();
      if (mc.dim % mc.n_heads != 0) throw Napi::RangeError::New(env, "config.embeddingLength must be a multiple of config.heads");
      mc.head_dim = mc.dim / mc.n_heads;
      const Napi::Value seed_v = get_prop(src, "seed");
      seed = present(seed_v) ? seed_value(env, seed_v, "seed") : 0;
      init_std = static_cast<float>(get_number_or(src, "initStd", 0.02));
    }
    auto d = std::make_shared<Napi::Promise::Deferred>(Napi::Promise::Deferred::New(env));
    auto out = std::make_shared<std::unique_ptr<Trainer>>();
    auto* w = new TrainWorker(
        env, std::make_shared<std::mutex>(),
        [model, mc, seed, init_std, cfg, out] {
          train::Params p = model ? train::Params::from_model(*model) : train::Params::random(mc, seed, init_std);
          *out = std::make_unique<Trainer>(std::move(p), cfg);
        },
        [out](Napi::Env e) { return new_trainer(e, std::move(*out)); });
    w->Queue();
    return w->promise();
  });
}

// loadTrainerCheckpoint(path) -> Promise<NativeTrainer>
Napi::Value load_trainer(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(env, "path must be a string");
  std::string path = info[0].As<Napi::String>();
  auto out = std::make_shared<std::unique_ptr<Trainer>>();
  auto* w = new TrainWorker(env, std::make_shared<std::mutex>(), [path, out] { *out = Trainer::load_checkpoint(path); },
                            [out](Napi::Env e) { return new_trainer(e, std::move(*out)); });
  w->Queue();
  return w->promise();
}

// setTrainThreads(n): training ops get their own pool of n threads (0: share the decoding pool).
Napi::Value set_train_threads_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) throw Napi::TypeError::New(env, "threads must be a number");
  double t = info[0].As<Napi::Number>().DoubleValue();
  if (!(t >= 0 && t <= 1024) || t != static_cast<double>(static_cast<int>(t)))
    throw Napi::RangeError::New(env, "threads must be an integer in [0, 1024] (0 = share the decoding pool)");
  train::set_train_threads(static_cast<int>(t));
  return Napi::Number::New(env, train::train_threads());
}

void init(Napi::Env env, Napi::Object exports) {
  exports.Set("setTrainThreads", Napi::Function::New(env, set_train_threads_js, "setTrainThreads"));
  Napi::Function ctor = TrainerWrap::define(env);
  g_trainer_ctor = new Napi::FunctionReference(Napi::Persistent(ctor));
  exports.Set("NativeTrainer", ctor);
  exports.Set("createTrainer", Napi::Function::New(env, create_trainer, "createTrainer"));
  exports.Set("loadTrainerCheckpoint", Napi::Function::New(env, load_trainer, "loadTrainerCheckpoint"));
}

ExportRegistrar reg(init);

}  // namespace

}  // namespace osd::napi
