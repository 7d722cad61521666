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
  c.schedule.lr = static_cast<float>(get_number_or(o, "lr", c.schedule.lr));
  c.schedule.warmup = get_int_or(o, "warmupSteps", 0, int64_t(1) << 40, c.schedule.warmup);
  if (has(o, "schedule")) c.schedule.decay = train::parse_lr_decay(o.Get("schedule").ToString().Utf8Value(), "schedule");
  c.schedule.total_steps = get_int_or(o, "totalSteps", 0, int64_t(1) << 40, c.schedule.total_steps);
  c.schedule.min_lr = static_cast<float>(get_number_or(o, "minLr", c.schedule.min_lr));
  c.beta1 = static_cast<float>(get_number_or(o, "beta1", c.beta1));
  c.beta2 = static_cast<float>(get_number_or(o, "beta2", c.beta2));
  c.eps = static_cast<float>(get_number_or(o, "eps", c.eps));
  c.weight_decay = static_cast<float>(get_number_or(o, "weightDecay", c.weight_decay));
  c.clip_norm = static_cast<float>(get_number_or(o, "clipNorm", c.clip_norm));
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

std::unique_ptr<OwnedBatch> parse_batch(Napi::Env env, const Napi::Value& v, int32_t vocab) {
  if (!v.IsObject()) throw Napi::TypeError::New(env, "batch must be an object");
  Napi::Object o = v.As<Napi::Object>();
  auto ob = std::make_unique<OwnedBatch>();
  Batch& b = ob->batch;
  b.batch = static_cast<int32_t>(get_int(o, "batchSize", 1, 1 << 20, "batch."));
  b.seq_len = static_cast<int32_t>(get_int(o, "seqLen", 1, 1 << 20, "batch."));
  const size_t n = static_cast<size_t>(b.batch) * b.seq_len;
  auto tok = get_array<int32_t>(o, "tokens", "batch.");
  if (tok.length != n)
    throw Napi::RangeError::New(env, "batch.tokens has length " + std::to_string(tok.length) +
                                         ", expected batchSize * seqLen = " + std::to_string(n));
  ob->tokens.assign(tok.data, tok.data + n);
  b.tokens = ob->tokens.data();
  if (has(o, "targets")) {
    auto t = get_array<int32_t>(o, "targets", "batch.");
    if (t.length != n) throw Napi::RangeError::New(env, "batch.targets must have batchSize * seqLen entries");
    ob->targets.assign(t.data, t.data + n);
    b.loss.targets = ob->targets.data();
    return ob;
  }
  DistillInput& d = b.loss.distill;
  d.kind = parse_distill_kind(has(o, "kind") ? o.Get("kind").ToString().Utf8Value() : "forward-kl", "batch.kind");
  d.temperature = static_cast<float>(get_number_or(o, "temperature", 1.0, "batch."));
  d.beta = static_cast<float>(get_number_or(o, "beta", 0.5, "batch."));
  if (has(o, "mask")) {
    auto m = get_array<uint8_t>(o, "mask", "batch.");
    if (m.length != n) throw Napi::RangeError::New(env, "batch.mask must have batchSize * seqLen entries");
    ob->mask.assign(m.data, m.data + n);
    d.mask = ob->mask.data();
  }
  if (has(o, "teacherLogits")) {
    auto t = get_array<float>(o, "teacherLogits", "batch.");
    if (t.length != n * vocab) throw Napi::RangeError::New(env, "batch.teacherLogits must have batchSize * seqLen * vocabSize entries");
    ob->teacher.assign(t.data, t.data + t.length);
    d.teacher = ob->teacher.data();
  } else if (has(o, "teacher")) {
    if (!o.Get("teacher").IsObject()) throw Napi::TypeError::New(env, "batch.teacher must be an object { indices, probs, residual? }");
    Napi::Object t = o.Get("teacher").As<Napi::Object>();
    auto ids = get_array<int32_t>(t, "indices", "batch.teacher.");
    auto probs = get_array<float>(t, "probs", "batch.teacher.");
    if (ids.length % n != 0 || probs.length != ids.length)
      throw Napi::RangeError::New(env, "batch.teacher.indices and probs must hold k entries for each of the batchSize * seqLen rows");
    d.k = static_cast<int32_t>(ids.length / n);
    ob->topk_ids.assign(ids.data, ids.data + ids.length);
    ob->topk_probs.assign(probs.data, probs.data + probs.length);
    d.topk_ids = ob->topk_ids.data();
    d.topk_probs = ob->topk_probs.data();
    if (has(t, "residual")) {
      auto r = get_array<float>(t, "residual", "batch.teacher.");
      if (r.length != n) throw Napi::RangeError::New(env, "batch.teacher.residual must have batchSize * seqLen entries");
      ob->residual.assign(r.data, r.data + n);
      d.residual = ob->residual.data();
    }
  } else {
    throw Napi::TypeError::New(env, "batch needs targets (cross-entropy), teacherLogits or teacher (distillation)");
  }
  return ob;
}

class TrainerWrap;

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
    d_.Reject(err.Value());
  }

 private:
  Napi::Promise::Deferred d_;
  std::shared_ptr<std::mutex> mu_;
  std::function<void()> fn_;
  std::function<Napi::Value(Napi::Env)> make_;
  ErrorKind kind_ = ErrorKind::State;
};

class TrainerWrap : public Napi::ObjectWrap<TrainerWrap> {
 public:
  static Napi::Function define(Napi::Env env) {
    return DefineClass(env, "NativeTrainer",
                       {InstanceMethod("step", &TrainerWrap::step), InstanceMethod("evalLoss", &TrainerWrap::eval_loss),
                        InstanceMethod("snapshot", &TrainerWrap::snapshot), InstanceMethod("save", &TrainerWrap::save),
                        InstanceMethod("configure", &TrainerWrap::configure),
                        InstanceMethod("dispose", &TrainerWrap::dispose),
                        InstanceAccessor("steps", &TrainerWrap::steps, nullptr),
                        InstanceAccessor("parameterCount", &TrainerWrap::param_count, nullptr)});
  }

  explicit TrainerWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TrainerWrap>(info) {
    if (info.Length() < 1 || !info[0].IsExternal())
      throw Napi::TypeError::New(info.Env(), "NativeTrainer is created by createTrainer()");
    trainer_.reset(info[0].As<Napi::External<Trainer>>().Data());
  }

 private:
  Trainer& get(Napi::Env env) {
    if (!trainer_) throw Napi::Error::New(env, "the trainer was disposed");
    return *trainer_;
  }

  Napi::Value step(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      Trainer& t = get(env);
      std::shared_ptr<OwnedBatch> b(parse_batch(env, info.Length() ? info[0] : env.Undefined(), t.params().config().vocab));
      auto keep = trainer_;
      auto res = std::make_shared<train::StepResult>();
      auto* w = new TrainWorker(
          env, mu_, [keep, b, res] { *res = keep->step(b->batch); },
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
      Trainer& t = get(env);
      std::shared_ptr<OwnedBatch> b(parse_batch(env, info.Length() ? info[0] : env.Undefined(), t.params().config().vocab));
      auto keep = trainer_;
      auto loss = std::make_shared<double>(0);
      auto* w = new TrainWorker(env, mu_, [keep, b, loss] { *loss = keep->eval_loss(b->batch); },
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
    auto* w = new TrainWorker(env, mu_, [keep, out] { *out = keep->snapshot(); },
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
    auto* w = new TrainWorker(env, mu_, [keep, path] { keep->save_checkpoint(path); },
                              [](Napi::Env e) { return e.Undefined(); });
    w->Queue();
    return w->promise();
  }

  Napi::Value configure(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    return guarded(env, [&]() -> Napi::Value {
      Trainer& t = get(env);
      Napi::Object o = require_object(info, 0, "options");
      std::lock_guard<std::mutex> lk(*mu_);
      t.set_config(parse_config(o, t.config()));
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
};

Napi::FunctionReference* g_trainer_ctor = nullptr;

Napi::Value new_trainer(Napi::Env env, std::unique_ptr<Trainer> t) {
  auto ext = Napi::External<Trainer>::New(env, t.release());
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
    const bool from_model = !has(src, "config");
    if (from_model) {
      model = unwrap_model(env, src, "source");
    } else {
      if (!src.Get("config").IsObject()) throw Napi::TypeError::New(env, "source.config must be an object");
      Napi::Object c = src.Get("config").As<Napi::Object>();
      mc.vocab = static_cast<int32_t>(get_int(c, "vocabSize", 1, 1 << 24, "config."));
      mc.dim = static_cast<int32_t>(get_int(c, "embeddingLength", 1, 1 << 16, "config."));
      mc.n_layers = static_cast<int32_t>(get_int(c, "layers", 1, 1024, "config."));
      mc.n_heads = static_cast<int32_t>(get_int(c, "heads", 1, 1024, "config."));
      mc.n_kv_heads = static_cast<int32_t>(get_int_or(c, "kvHeads", 1, 1024, mc.n_heads, "config."));
      mc.ffn_dim = static_cast<int32_t>(get_int(c, "feedForwardLength", 1, 1 << 18, "config."));
      mc.context = static_cast<int32_t>(get_int(c, "contextLength", 1, 1 << 20, "config."));
      mc.rope_theta = get_rope_theta(c, "config.");
      mc.tied_output = !has(c, "tiedOutput") || c.Get("tiedOutput").ToBoolean();
      if (mc.dim % mc.n_heads != 0) throw Napi::RangeError::New(env, "config.embeddingLength must be a multiple of config.heads");
      mc.head_dim = mc.dim / mc.n_heads;
      seed = has(src, "seed") ? get_seed(src, "seed") : 0;
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
