// Bindings for the kernels: verifyChain, verifyChainBatch, verifyTree, distillLoss, adamwStep,
// globalNorm, bandwidthProbe, backends, selectBackend. The kernels run on the selected backend
// (backend/select.h). Every argument is checked here or in the engine, and every
// error is a TypeError or RangeError that names the argument. These calls are synchronous: they
// take microseconds to a few milliseconds, less than a hop to a worker thread would cost.
#include <napi.h>

#include <string>
#include <vector>

#include "backend/backend.h"
#include "backend/select.h"
#include "core/bandwidth.h"
#include "core/thread_pool.h"
#include "distill/teacher.h"
#include "napi/napi_util.h"

#ifdef OSD_WITH_CUDA
#include "cuda_backend.h"
#endif

namespace osd::napi {

namespace {

int32_t get_vocab(const Napi::Object& o) { return static_cast<int32_t>(get_int(o, "vocabSize", 1, 1 << 30)); }

// A planted bug (tests only): the exactness tests prove their power by catching these.
Fault fault_value(Napi::Env env, const Napi::Value& v) {
  if (!present(v)) return Fault::None;
  std::string f = v.ToString();
  if (f == "residual-no-clamp") return Fault::ResidualNoClamp;
  if (f == "residual-from-target") return Fault::ResidualFromTarget;
  throw Napi::RangeError::New(env, "_fault is not a known fault: " + f);
}
Fault parse_fault(const Napi::Object& o) { return fault_value(o.Env(), get_prop(o, "_fault")); }

uint64_t get_stream(const Napi::Object& o) {
  Napi::Value v = get_prop(o, "stream");
  return present(v) ? seed_value(o.Env(), v, "stream") : 0;
}

// (Names and formulas are literals: the message is built only when it is thrown.)
void expect_length(Napi::Env env, size_t got, size_t want, const char* name, const char* formula) {
  if (got != want)
    throw Napi::RangeError::New(env, std::string(name) + " has length " + std::to_string(got) + ", expected " +
                                         formula + " = " + std::to_string(want));
}

// verifyChain(targetLogits, draftLogits, draftTokens, vocabSize, sampling, temperature, topK, topP,
// seed, stream, _fault, out) -> acceptedCount, with the emitted tokens in out[0..acceptedCount].
// lib/kernels.ts reads the options (and sampling's fields when it is an object): a property read
// costs nanoseconds in JavaScript and a few hundred through Node-API, and those reads with the
// result object were most of a small call's fixed cost.
Napi::Value verify_chain(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    if (info.Length() != 12) throw Napi::TypeError::New(env, "verifyChain: internal binding takes 12 arguments");
    // Every argument is a value lib/kernels.ts read: no JavaScript runs in this call, except a
    // _fault that is not a string (ToString may call a toString): that is read first, before any
    // typed array's pointer is taken.
    const Fault fault = fault_value(env, info[10]);
    const int32_t V =
        static_cast<int32_t>(int_value(env, required_arg(info, 3, "vocabSize"), "vocabSize", 1, 1 << 30, ""));
    Sampling s = sampling_values(env, required_arg(info, 4, "sampling"), info[5], info[6], info[7], "sampling");
    // The draft tokens are checked and then used as indices: copied, so that another thread
    // writing a SharedArrayBuffer cannot change them in between (a few ints, into a reused buffer).
    thread_local std::vector<int32_t> tokens;
    copy_array_into<int32_t>(env, required_arg(info, 2, "draftTokens"), "draftTokens", tokens);
    auto target = typed_array<float>(env, required_arg(info, 0, "targetLogits"), "targetLogits");
    const size_t g = tokens.size();
    expect_length(env, target.length, (g + 1) * V, "targetLogits", "(draftTokens.length + 1) * vocabSize");
    ArrayView<float> draft;
    if ((!s.greedy() && g > 0) || present(info[1])) {  // g = 0 has no draft rows to give
      draft = typed_array<float>(env, required_arg(info, 1, "draftLogits"), "draftLogits");
      expect_length(env, draft.length, g * V, "draftLogits", "draftTokens.length * vocabSize");
    }
    int32_t len = static_cast<int32_t>(g), accepted = 0;
    uint64_t stream = present(info[9]) ? seed_value(env, info[9], "stream") : 0;
    const uint64_t seed = seed_value(env, info[8], "seed");
    auto out = typed_array<int32_t>(env, info[11], "out");
    if (out.length < g + 1) throw Napi::RangeError::New(env, "verifyChain: internal out buffer too short");
    ChainBatch b;
    b.target = target.data;
    b.draft = s.greedy() ? nullptr : draft.data;
    b.tokens = tokens.data();
    b.lengths = &len;
    b.streams = &stream;
    b.sampling = &s;
    b.batch = 1;
    b.vocab = V;
    b.seed = seed;
    ChainBatchOut bo{&accepted, out.data};
    current_backend().verify_chain_batch(b, bo, fault);
    return Napi::Number::New(env, accepted);
  });
}

Napi::Value verify_chain_batch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    // Phase 1 (see napi_util.h): read and check every option; getters may run. draftLengths and
    // draftTokens are copied (the buffers are sized from the lengths' sum, and the tokens are
    // checked before they index the logits); the logits are kept as values.
    Napi::Object o = require_object(info, 0, "options");
    const int32_t V = get_vocab(o);
    const std::vector<int32_t> lengths = copy_array<int32_t>(env, required_prop(o, "draftLengths"), "draftLengths");
    if (lengths.size() > static_cast<size_t>(INT32_MAX))
      throw Napi::RangeError::New(env, "draftLengths has more than 2^31 - 1 entries");
    const int32_t B = static_cast<int32_t>(lengths.size());
    size_t total_g = 0;
    for (int32_t b = 0; b < B; ++b) {
      if (lengths[b] < 0)
        throw Napi::RangeError::New(env, "draftLengths[" + std::to_string(b) + "] must be >= 0");
      total_g += lengths[b];
    }
    // Sampling: one object for every sequence, or an array of B objects.
    Napi::Value sv = get_prop(o, "sampling");
    if (!present(sv)) throw Napi::TypeError::New(env, "sampling is required");
    std::vector<Sampling> samp(B);
    bool any_sampled = false;
    if (sv.IsArray()) {
      Napi::Array arr = sv.As<Napi::Array>();
      expect_length(env, arr.Length(), B, "sampling", "draftLengths.length");
      for (int32_t b = 0; b < B; ++b)
        samp[b] = parse_sampling(env, arr.Get(b), ("sampling[" + std::to_string(b) + "]").c_str());
    } else {
      Sampling s = parse_sampling(env, sv, "sampling");
      std::fill(samp.begin(), samp.end(), s);
    }
    for (auto& s : samp) any_sampled |= !s.greedy();
    const std::vector<int32_t> tokens = copy_array<int32_t>(env, required_prop(o, "draftTokens"), "draftTokens");
    expect_length(env, tokens.size(), total_g, "draftTokens", "sum(draftLengths)");
    const Napi::Value target_v = required_prop(o, "targetLogits");
    expect_length(env, checked_length<float>(env, target_v, "targetLogits"), (total_g + B) * V, "targetLogits",
                  "(sum(draftLengths) + batch) * vocabSize");
    const Napi::Value draft_v = get_prop(o, "draftLogits");
    const bool with_draft = (any_sampled && total_g > 0) || present(draft_v);
    if (with_draft) {
      if (!present(draft_v)) throw Napi::TypeError::New(env, "draftLogits is required");
      expect_length(env, checked_length<float>(env, draft_v, "draftLogits"), total_g * V, "draftLogits",
                    "sum(draftLengths) * vocabSize");
    }
    std::vector<uint64_t> streams(B);
    Napi::Value st = get_prop(o, "streams");
    if (present(st)) {
      if (!st.IsArray()) throw Napi::TypeError::New(env, "streams must be an array of numbers or bigints");
      Napi::Array arr = st.As<Napi::Array>();
      expect_length(env, arr.Length(), B, "streams", "draftLengths.length");
      for (int32_t b = 0; b < B; ++b) {
        const Napi::Value e = arr.Get(b);
        try {
          streams[b] = seed_value(env, e, "value");
        } catch (const Napi::Error&) {
          throw Napi::RangeError::New(env, "streams[" + std::to_string(b) + "] must be a non-negative integer or bigint");
        }
      }
    } else {
      for (int32_t b = 0; b < B; ++b) streams[b] = static_cast<uint64_t>(b);
    }
    const uint64_t seed = get_seed(o, "seed");
    const Fault fault = parse_fault(o);
    Napi::Int32Array accepted = Napi::Int32Array::New(env, B);

    // Phase 2: the logits' pointers, checked again (a getter may have detached or shrunk them).
    auto target = typed_array<float>(env, target_v, "targetLogits");
    expect_length(env, target.length, (total_g + B) * V, "targetLogits", "(sum(draftLengths) + batch) * vocabSize");
    ArrayView<float> draft;
    if (with_draft) {
      draft = typed_array<float>(env, draft_v, "draftLogits");
      expect_length(env, draft.length, total_g * V, "draftLogits", "sum(draftLengths) * vocabSize");
    }
    // Counts go straight into the result array; tokens into a per-thread staging buffer (one slot
    // per draft token plus one per sequence), then packed.
    thread_local std::vector<int32_t> out;
    out.resize(total_g + B);
    ChainBatch b;
    b.target = target.data;
    b.draft = draft.data;
    b.tokens = tokens.data();
    b.lengths = lengths.data();
    b.streams = streams.data();
    b.sampling = samp.data();
    b.batch = B;
    b.vocab = V;
    b.seed = seed;
    ChainBatchOut bo{accepted.Data(), out.data()};
    current_backend().verify_chain_batch(b, bo, fault);
    // Compact the per-sequence slots (g_b + 1 each) into emitted tokens with offsets.
    auto offsets = Napi::Int32Array::New(env, B + 1);
    int32_t* off = offsets.Data();
    size_t emitted = 0;
    for (int32_t i = 0; i < B; ++i) emitted += accepted.Data()[i] + 1;
    auto packed = Napi::Int32Array::New(env, emitted);
    int32_t* pk = packed.Data();
    size_t slot = 0, n = 0;
    off[0] = 0;
    for (int32_t i = 0; i < B; ++i) {
      const int32_t* src = out.data() + slot;
      for (int32_t k = 0; k <= accepted.Data()[i]; ++k) pk[n++] = src[k];
      slot += lengths[i] + 1;
      off[i + 1] = static_cast<int32_t>(n);
    }
    Napi::Object r = Napi::Object::New(env);
    set_prop(r, "acceptedCounts", accepted);
    set_prop(r, "tokens", packed);
    set_prop(r, "offsets", offsets);
    return r;
  });
}

Napi::Value verify_tree(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    // Phase 1 (see napi_util.h): parents and tokens are copied (checked, then used as indices).
    Napi::Object o = require_object(info, 0, "options");
    const int32_t V = get_vocab(o);
    const Napi::Value sv = get_prop(o, "sampling");
    if (!present(sv)) throw Napi::TypeError::New(env, "sampling is required");
    Sampling s = parse_sampling(env, sv, "sampling");
    TreeChildren mode = TreeChildren::WithReplacement;
    const Napi::Value cv = get_prop(o, "children");
    if (present(cv)) {
      if (!cv.IsString()) throw Napi::TypeError::New(env, "children must be a string");
      std::string c = cv.As<Napi::String>();
      if (c == "sampled-with-replacement") mode = TreeChildren::WithReplacement;
      else if (c == "sampled-without-replacement") mode = TreeChildren::WithoutReplacement;
      else if (c == "deterministic") mode = TreeChildren::Deterministic;
      else
        throw Napi::RangeError::New(env, "children must be 'sampled-with-replacement', 'sampled-without-replacement'"
                                         " or 'deterministic', got '" + c + "'");
    }
    const std::vector<int32_t> parents = copy_array<int32_t>(env, required_prop(o, "parents"), "parents");
    const std::vector<int32_t> tokens = copy_array<int32_t>(env, required_prop(o, "tokens"), "tokens");
    const size_t n = parents.size();
    expect_length(env, tokens.size(), n, "tokens", "parents.length");
    if (n > static_cast<size_t>(INT32_MAX)) throw Napi::RangeError::New(env, "parents has more than 2^31 - 1 entries");
    const Napi::Value target_v = required_prop(o, "targetLogits");
    expect_length(env, checked_length<float>(env, target_v, "targetLogits"), (n + 1) * V, "targetLogits",
                  "(parents.length + 1) * vocabSize");
    const bool need_draft = !s.greedy() && mode != TreeChildren::Deterministic;
    const Napi::Value draft_v = get_prop(o, "draftLogits");
    const bool with_draft = need_draft || present(draft_v);
    if (with_draft) {
      if (!present(draft_v)) throw Napi::TypeError::New(env, "draftLogits is required");
      expect_length(env, checked_length<float>(env, draft_v, "draftLogits"), (n + 1) * V, "draftLogits",
                    "(parents.length + 1) * vocabSize");
    }
    const uint64_t seed = get_seed(o, "seed");
    const uint64_t stream = get_stream(o);
    const Fault fault = parse_fault(o);

    // Phase 2: the logits' pointers, checked again.
    auto target = typed_array<float>(env, target_v, "targetLogits");
    expect_length(env, target.length, (n + 1) * V, "targetLogits", "(parents.length + 1) * vocabSize");
    ArrayView<float> draft;
    if (with_draft) {
      draft = typed_array<float>(env, draft_v, "draftLogits");
      expect_length(env, draft.length, (n + 1) * V, "draftLogits", "(parents.length + 1) * vocabSize");
    }
    TreeInput in;
    in.parents = parents.data();
    in.tokens = tokens.data();
    in.n = static_cast<int32_t>(n);
    in.target = target.data;
    in.draft = need_draft ? draft.data : nullptr;
    in.vocab = V;
    std::vector<int32_t> path(n + 1), out(n + 1);
    TreeResult r = current_backend().verify_tree(in, s, mode, seed, stream, path.data(), out.data(), fault);
    Napi::Object res = Napi::Object::New(env);
    res.Set("path", to_js(env, path.data(), r.path_len));
    res.Set("tokens", to_js(env, out.data(), r.emitted));
    return res;
  });
}

// distillLoss(kind, studentLogits, teacherLogits, teacher, teacher.indices, teacher.probs,
// teacher.residual, vocabSize, temperature, beta, mask, computeGrad, gradOut, freshGrad) -> loss.
// lib/kernels.ts reads the options (as for verifyChain) and passes freshGrad, a new array of
// studentLogits.length, when a gradient is wanted and gradOut is not given.
Napi::Value distill_loss(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    if (info.Length() != 14) throw Napi::TypeError::New(env, "distillLoss: internal binding takes 14 arguments");
    DistillInput in;
    const Napi::Value kind = required_arg(info, 0, "kind");
    if (!kind.IsString()) throw Napi::TypeError::New(env, "kind must be a string");
    in.kind = parse_distill_kind(kind.As<Napi::String>(), "kind");
    in.vocab = static_cast<int32_t>(int_value(env, required_arg(info, 7, "vocabSize"), "vocabSize", 1, 1 << 30, ""));
    auto student = typed_array<float>(env, required_arg(info, 1, "studentLogits"), "studentLogits");
    if (student.length % in.vocab != 0)
      throw Napi::RangeError::New(env, "studentLogits has length " + std::to_string(student.length) +
                                           ", not a multiple of vocabSize " + std::to_string(in.vocab));
    const size_t rows = student.length / in.vocab;
    in.rows = static_cast<int32_t>(rows);
    in.student = student.data;
    in.temperature = static_cast<float>(present(info[8]) ? number_value(env, info[8], "temperature", "") : 1.0);
    in.beta = static_cast<float>(present(info[9]) ? number_value(env, info[9], "beta", "") : 0.5);
    const Napi::Value dense = info[2], sparse = info[3];
    if (present(dense) && present(sparse))
      throw Napi::TypeError::New(env, "give either teacherLogits (dense) or teacher (sparse top-k), not both");
    if (present(dense)) {
      auto t = typed_array<float>(env, dense, "teacherLogits");
      expect_length(env, t.length, rows * in.vocab, "teacherLogits", "studentLogits.length");
      in.teacher = t.data;
    } else if (present(sparse)) {
      if (!sparse.IsObject()) throw Napi::TypeError::New(env, "teacher must be an object { indices, probs, residual? }");
      // The ids are checked and then used as indices (and the mask says which rows are checked):
      // both are copied, so that another thread writing a SharedArrayBuffer cannot change them in
      // between. (No JavaScript runs in this call: lib/kernels.ts read the options.)
      thread_local std::vector<int32_t> ids;
      copy_array_into<int32_t>(env, required_arg(info, 4, "teacher.indices"), "teacher.indices", ids);
      auto probs = typed_array<float>(env, required_arg(info, 5, "teacher.probs"), "teacher.probs");
      if (rows == 0 || ids.size() % rows != 0)
        throw Napi::RangeError::New(env, "teacher.indices has length " + std::to_string(ids.size()) +
                                             ", not a multiple of the row count " + std::to_string(rows));
      in.k = static_cast<int32_t>(ids.size() / rows);
      if (in.k > in.vocab) throw Napi::RangeError::New(env, "teacher.indices has more than vocabSize entries per row");
      expect_length(env, probs.length, ids.size(), "teacher.probs", "teacher.indices.length");
      in.topk_ids = ids.data();
      in.topk_probs = probs.data;
      if (present(info[6])) {
        auto res = typed_array<float>(env, info[6], "teacher.residual");
        expect_length(env, res.length, rows, "teacher.residual", "row count");
        in.residual = res.data;
      }
    } else {
      throw Napi::TypeError::New(env, "teacherLogits (dense) or teacher (sparse top-k) is required");
    }
    if (present(info[10])) {
      thread_local std::vector<uint8_t> mask;
      copy_array_into<uint8_t>(env, info[10], "mask", mask);
      expect_length(env, mask.size(), rows, "mask", "row count");
      in.mask = mask.data();
    }
    const bool want_grad = !present(info[11]) || info[11].ToBoolean();
    // gradOut: a caller-owned gradient buffer, reused across calls (a fresh array per call pays a
    // page fault per 4 KiB on first touch, about as much as the loss itself at large V).
    float* grad_ptr = nullptr;
    if (present(info[12])) {
      if (!want_grad) throw Napi::TypeError::New(env, "gradOut cannot be combined with computeGrad: false");
      auto g = typed_array<float>(env, info[12], "gradOut");
      expect_length(env, g.length, rows * in.vocab, "gradOut", "studentLogits.length");
      // The kernels read their inputs after writing parts of the gradient: no overlap with any.
      const char* g0 = reinterpret_cast<const char*>(g.data);
      const char* g1 = g0 + g.length * sizeof(float);
      auto overlaps = [&](const void* a, size_t bytes) {
        const char* p = static_cast<const char*>(a);
        return p && g0 < p + bytes && p < g1;
      };
      const size_t logits = rows * in.vocab * sizeof(float), sparse = rows * static_cast<size_t>(in.k);
      if (overlaps(in.student, logits) || overlaps(in.teacher, logits) || overlaps(in.topk_probs, sparse * sizeof(float)) ||
          overlaps(in.residual, rows * sizeof(float)))  // (the ids are a copy)
        throw Napi::RangeError::New(env, "gradOut must not share memory with studentLogits, teacherLogits or the teacher's arrays");
      grad_ptr = g.data;
    } else if (want_grad) {
      auto g = typed_array<float>(env, info[13], "freshGrad");
      if (g.length != rows * in.vocab) throw Napi::RangeError::New(env, "distillLoss: internal gradient buffer size");
      grad_ptr = g.data;
    }
    return Napi::Number::New(env, current_backend().distill_loss(in, grad_ptr));
  });
}

Napi::Value adamw_step(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    // Phase 1 (see napi_util.h): the arrays are checked here and kept as values; the numbers'
    // getters may run after them.
    Napi::Object o = require_object(info, 0, "options");
    static const char* const kNames[] = {"params", "grads", "m", "v"};
    Napi::Value arr_v[4];
    size_t len[4];
    for (int i = 0; i < 4; ++i) {
      arr_v[i] = required_prop(o, kNames[i]);
      len[i] = checked_length<float>(env, arr_v[i], kNames[i]);
    }
    // Each array is read and written element by element: two of them sharing memory would corrupt
    // the update silently.
    auto check = [&](const float* const* data, const size_t* lengths) {
      for (int i = 1; i < 4; ++i) expect_length(env, lengths[i], lengths[0], kNames[i], "params.length");
      const size_t n = lengths[0];
      for (int i = 0; i < 4; ++i)
        for (int j = i + 1; j < 4 && n > 0; ++j)
          if (data[i] < data[j] + n && data[j] < data[i] + n)
            throw Napi::RangeError::New(env, std::string(kNames[j]) + " must not share memory with " + kNames[i]);
    };
    {
      // (Pointers compared only: whether the arrays overlap is told in argument order.)
      const float* data[4];
      for (int i = 0; i < 4; ++i) data[i] = typed_array<float>(env, arr_v[i], kNames[i]).data;
      check(data, len);
    }
    AdamWConfig c;
    c.step = get_int(o, "step", 1, int64_t(1) << 52);
    c.lr = get_f32_or(o, "lr", c.lr);
    c.beta1 = get_f32_or(o, "beta1", c.beta1);
    c.beta2 = get_f32_or(o, "beta2", c.beta2);
    c.eps = get_f32_or(o, "eps", c.eps);
    c.weight_decay = get_f32_or(o, "weightDecay", c.weight_decay);
    c.grad_scale = get_f32_or(o, "gradScale", c.grad_scale);

    // Phase 2: the pointers, checked again (a getter may have detached or shrunk an array).
    ArrayView<float> a[4];
    const float* data[4];
    for (int i = 0; i < 4; ++i) {
      a[i] = typed_array<float>(env, arr_v[i], kNames[i]);
      data[i] = a[i].data;
      len[i] = a[i].length;
    }
    check(data, len);
    current_backend().adamw_step(a[0].data, a[1].data, a[2].data, a[3].data, a[0].length, c);
    return env.Undefined();
  });
}

Napi::Value global_norm(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    if (info.Length() < 1) throw Napi::TypeError::New(env, "values must be a Float32Array");
    auto x = typed_array<float>(env, info[0], "values");
    return Napi::Number::New(env, current_backend().global_norm(x.data, x.length));
  });
}

// teacherTopK(logits, vocabSize, k): the sparse teacher of each row (distill/teacher.h), on the CPU.
Napi::Value teacher_top_k_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    auto l = typed_array<float>(env, info.Length() > 0 ? info[0] : env.Undefined(), "logits");
    const int64_t vocab = int_value(env, info.Length() > 1 ? info[1] : env.Undefined(), "vocabSize", 1, INT32_MAX, "");
    const int64_t k = int_value(env, info.Length() > 2 ? info[2] : env.Undefined(), "k", 1, vocab, "");
    if (l.length == 0 || l.length % static_cast<size_t>(vocab) != 0)
      throw Napi::RangeError::New(env, "logits.length must be a positive multiple of vocabSize (" + std::to_string(vocab) + "), got " +
                                           std::to_string(l.length));
    const size_t rows = l.length / static_cast<size_t>(vocab);
    std::vector<int32_t> ids(rows * k);
    std::vector<float> probs(rows * k), residual(rows);
    teacher_top_k(l.data, rows, static_cast<int32_t>(vocab), static_cast<int32_t>(k), ids.data(), probs.data(), residual.data());
    Napi::Object r = Napi::Object::New(env);
    r.Set("ids", to_js(env, ids.data(), ids.size()));
    r.Set("probs", to_js(env, probs.data(), probs.size()));
    r.Set("residual", to_js(env, residual.data(), residual.size()));
    return r;
  });
}

Napi::Value bandwidth_probe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    Napi::Object o = info.Length() > 0 && info[0].IsObject() ? info[0].As<Napi::Object>() : Napi::Object::New(env);
    size_t bytes = static_cast<size_t>(get_int_or(o, "bytes", 1 << 20, int64_t(1) << 34, int64_t(1) << 30));
    int iters = static_cast<int>(get_int_or(o, "iterations", 1, 1000, 5));
    BandwidthResult b = measure_bandwidth(bytes, iters);
    Napi::Object r = Napi::Object::New(env);
    r.Set("readBytesPerSecond", b.read_bytes_per_s);
    r.Set("copyBytesPerSecond", b.copy_bytes_per_s);
    r.Set("threads", default_threads());
    return r;
  });
}

Napi::Value flops_probe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    Napi::Object o = info.Length() > 0 && info[0].IsObject() ? info[0].As<Napi::Object>() : Napi::Object::New(env);
    int iters = static_cast<int>(get_int_or(o, "iterations", 1, 100, 3));
    Napi::Object r = Napi::Object::New(env);
    r.Set("flopsPerSecond", measure_peak_flops(iters));
    r.Set("threads", default_threads());
    return r;
  });
}

Napi::Value set_threads(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsNumber()) throw Napi::TypeError::New(env, "threads must be a number");
  double t = info[0].As<Napi::Number>().DoubleValue();
  if (t != std::floor(t) || t < 0 || t > 1024)
    throw Napi::RangeError::New(env, "threads must be an integer in [0, 1024] (0 = all cores)");
  set_default_threads(static_cast<int>(t));
  return Napi::Number::New(env, default_threads());
}

Napi::Value backends(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Array arr = Napi::Array::New(env);
  for (const BackendInfo& b : backend_infos()) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", b.name);
    o.Set("compiled", b.compiled);
    o.Set("usable", b.usable);
    o.Set("detail", b.detail);
    arr.Set(arr.Length(), o);
  }
  return arr;
}

Napi::Object choice_object(Napi::Env env, const BackendChoice& c) {
  Napi::Object o = Napi::Object::New(env);
  o.Set("name", c.backend->name());
  o.Set("requested", c.requested);
  o.Set("reason", c.reason);
  return o;
}

// selectBackend('cpu' | 'cuda' | 'auto'): 'cuda' throws with the reason when it is not usable.
Napi::Value select_backend_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsString())
    throw Napi::TypeError::New(env, "backend must be a string: 'cpu', 'cuda' or 'auto'");
  const std::string name = info[0].As<Napi::String>().Utf8Value();
  if (name != "cpu" && name != "cuda" && name != "auto")
    throw Napi::RangeError::New(env, "backend must be 'cpu', 'cuda' or 'auto', got '" + name + "'");
  return guarded(env, [&]() -> Napi::Value { return choice_object(env, select_backend(name)); });
}

Napi::Value active_backend_js(const Napi::CallbackInfo& info) { return choice_object(info.Env(), active_backend()); }

void init(Napi::Env env, Napi::Object exports) {
  exports.Set("verifyChain", Napi::Function::New(env, verify_chain, "verifyChain"));
  exports.Set("verifyChainBatch", Napi::Function::New(env, verify_chain_batch, "verifyChainBatch"));
  exports.Set("verifyTree", Napi::Function::New(env, verify_tree, "verifyTree"));
  exports.Set("distillLoss", Napi::Function::New(env, distill_loss, "distillLoss"));
  exports.Set("adamwStep", Napi::Function::New(env, adamw_step, "adamwStep"));
  exports.Set("globalNorm", Napi::Function::New(env, global_norm, "globalNorm"));
  exports.Set("teacherTopK", Napi::Function::New(env, teacher_top_k_js, "teacherTopK"));
  exports.Set("bandwidthProbe", Napi::Function::New(env, bandwidth_probe, "bandwidthProbe"));
  exports.Set("flopsProbe", Napi::Function::New(env, flops_probe, "flopsProbe"));
  exports.Set("setThreads", Napi::Function::New(env, set_threads, "setThreads"));
  exports.Set("backends", Napi::Function::New(env, backends, "backends"));
  exports.Set("selectBackend", Napi::Function::New(env, select_backend_js, "selectBackend"));
  exports.Set("activeBackend", Napi::Function::New(env, active_backend_js, "activeBackend"));
#ifdef OSD_WITH_CUDA
  register_device("cuda", cuda_backend_or_null, cuda_backend_targets());
#endif
}

ExportRegistrar reg(init);

}  // namespace

}  // namespace osd::napi
