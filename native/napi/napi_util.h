// Shared helpers for the N-API bindings: argument extraction with errors that name the argument,
// and conversion of engine errors (osd::Error) to TypeError / RangeError / Error.
#pragma once
#include <napi.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/error.h"
#include "spec/sampling.h"

namespace osd::napi {

// Each binding file registers its exports with a static ExportRegistrar; addon.cpp calls them all
// at module init, so adding a binding file needs no central edit.
using InitFn = void (*)(Napi::Env env, Napi::Object exports);
struct ExportRegistrar {
  explicit ExportRegistrar(InitFn fn);
};

// Rethrows an osd::Error (or std::exception) as the matching JavaScript error.
[[noreturn]] void throw_js(Napi::Env env, const std::exception& e);

// Runs fn and converts C++ exceptions into JavaScript exceptions.
template <typename Fn>
auto guarded(Napi::Env env, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::exception& e) {
    throw_js(env, e);
  }
}

inline Napi::Object require_object(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (info.Length() <= i || !info[i].IsObject())
    throw Napi::TypeError::New(info.Env(), std::string(name) + " must be an object");
  return info[i].As<Napi::Object>();
}

// The property `key` of o. Keys are string literals: each is made a JavaScript string once per
// environment and kept (making it on every call, as o.Get(const char*) does, was about a third of
// a small verifyChain call). Absent properties read as undefined.
napi_value key_string(napi_env env, const char* key);
inline Napi::Value get_prop(const Napi::Object& o, const char* key) {
  napi_value v;
  if (napi_get_property(o.Env(), o, key_string(o.Env(), key), &v) != napi_ok) throw Napi::Error::New(o.Env());
  return Napi::Value(o.Env(), v);
}
inline void set_prop(Napi::Object& o, const char* key, napi_value v) {
  if (napi_set_property(o.Env(), o, key_string(o.Env(), key), v) != napi_ok) throw Napi::Error::New(o.Env());
}
inline bool present(const Napi::Value& v) { return !v.IsUndefined() && !v.IsNull(); }

// Positional argument i of a binding, which must be present; `name` is the option it came from.
inline Napi::Value required_arg(const Napi::CallbackInfo& info, size_t i, const char* name) {
  if (!present(info[i])) throw Napi::TypeError::New(info.Env(), std::string(name) + " is required");
  return info[i];
}

inline bool has(const Napi::Object& o, const char* key) { return present(get_prop(o, key)); }

// ---- Two-phase argument parsing ------------------------------------------------------------------
//
// Reading a property can run JavaScript (a getter, a Proxy trap, an array element accessor), and
// that JavaScript can detach (transfer) or shrink a typed array passed earlier, or rewrite its
// contents: a data pointer taken before such a read may point at freed memory afterwards, and
// values checked before it may have changed. So every binding parses in two phases:
//
//   1. read (and check, in argument order) every value the call needs: here user code may run.
//      Typed arrays are kept as values (a pointer taken here is not used later), except index
//      arrays that are checked and then used to index memory (token ids, lengths, tree parents):
//      those are copied, so that neither a later getter nor another thread writing a
//      SharedArrayBuffer can change them after the check.
//   2. take the typed arrays' data pointers and lengths from the kept values (typed_array: a
//      detached one is a TypeError naming it) and check the lengths again. No JavaScript runs from
//      here until the engine is done with the pointers.
//
// Each property is read once (a getter could answer differently the second time).

// The property `key` of o, which must be present ("<prefix><key> is required").
inline Napi::Value required_prop(const Napi::Object& o, const char* key, const std::string& prefix = "") {
  Napi::Value v = get_prop(o, key);
  if (!present(v)) throw Napi::TypeError::New(o.Env(), prefix + key + " is required");
  return v;
}

// Type tags tell our wrapped objects from look-alikes (another class's instance, or an object
// whose prototype was set to the class's): ObjectWrap::Unwrap returns whatever an object wraps,
// and InstanceOf follows the prototype chain, so neither is a type check.
inline void tag_object(Napi::Env env, napi_value v, const napi_type_tag& t) {
  if (napi_type_tag_object(env, v, &t) != napi_ok) throw Napi::Error::New(env);
}
inline bool has_tag(Napi::Env env, napi_value v, const napi_type_tag& t) {
  bool ok = false;
  return napi_check_object_type_tag(env, v, &t, &ok) == napi_ok && ok;
}
// Whether v is an object (or external) carrying tag t.
inline bool tagged(Napi::Env env, const Napi::Value& v, const napi_type_tag& t) {
  return !v.IsEmpty() && (v.IsObject() || v.IsExternal()) && has_tag(env, v, t);
}

// The ObjectWrap<W> instance behind v when v carries tag t, else a TypeError `message`.
template <typename W>
W* unwrap_tagged(Napi::Env env, const Napi::Value& v, const napi_type_tag& t, const std::string& message) {
  if (!v.IsObject() || !has_tag(env, v, t)) throw Napi::TypeError::New(env, message);
  return W::Unwrap(v.As<Napi::Object>());
}

// Node-API checks the receiver of a class's methods ("Illegal invocation" on another object) but
// not of its accessors: a getter taken off the prototype and called on another object read that
// object as an instance of the class. Accessors go through this: W::self checks the tag of `this`.
template <typename W, Napi::Value (W::*Getter)(const Napi::CallbackInfo&)>
Napi::Value checked_getter(const Napi::CallbackInfo& info) {
  return (W::self(info)->*Getter)(info);
}
template <typename W>
W* checked_this(const Napi::CallbackInfo& info, const napi_type_tag& t) {
  return unwrap_tagged<W>(info.Env(), info.This(), t, "Illegal invocation");
}

// A typed array of the exact element type T, with an optional exact length check.
template <typename T>
struct TypedArrayTraits;
template <>
struct TypedArrayTraits<float> {
  static constexpr napi_typedarray_type type = napi_float32_array;
  static constexpr const char* name = "Float32Array";
  static constexpr const char* article = "a";
};
template <>
struct TypedArrayTraits<int32_t> {
  static constexpr napi_typedarray_type type = napi_int32_array;
  static constexpr const char* name = "Int32Array";
  static constexpr const char* article = "an";
};
template <>
struct TypedArrayTraits<uint8_t> {
  static constexpr napi_typedarray_type type = napi_uint8_array;
  static constexpr const char* name = "Uint8Array";
  static constexpr const char* article = "a";
};
template <>
struct TypedArrayTraits<uint32_t> {
  static constexpr napi_typedarray_type type = napi_uint32_array;
  static constexpr const char* name = "Uint32Array";
  static constexpr const char* article = "a";
};

template <typename T>
struct ArrayView {
  T* data = nullptr;
  size_t length = 0;
};

// Whether v is a typed array whose ArrayBuffer was detached (transferred): it reads as empty.
inline bool detached_view(Napi::Env env, const Napi::Value& v) {
  napi_typedarray_type type;
  size_t length = 0, offset = 0;
  void* data = nullptr;
  napi_value buffer = nullptr;
  bool detached = false;
  return !v.IsEmpty() && napi_get_typedarray_info(env, v, &type, &length, &data, &buffer, &offset) == napi_ok &&
         napi_is_detached_arraybuffer(env, buffer, &detached) == napi_ok && detached;
}

// One napi_get_typedarray_info call gives the type, length and data (already offset by the view's
// byteOffset); Napi::TypedArrayOf's checks make three calls. A detached view (length 0) fails.
template <typename T>
bool typed_array_info(Napi::Env env, const Napi::Value& v, ArrayView<T>& out) {
  napi_typedarray_type type;
  size_t length = 0;
  void* data = nullptr;
  // (A value that is not a typed array is napi_invalid_arg, with no JavaScript exception pending.)
  if (v.IsEmpty() || napi_get_typedarray_info(env, v, &type, &length, &data, nullptr, nullptr) != napi_ok ||
      type != TypedArrayTraits<T>::type)
    return false;
  if (length == 0 && detached_view(env, v)) return false;
  out = {static_cast<T*>(data), length};
  return true;
}

template <typename T>
ArrayView<T> typed_array(Napi::Env env, const Napi::Value& v, const std::string& name) {
  using Tr = TypedArrayTraits<T>;
  ArrayView<T> a;
  if (!typed_array_info(env, v, a)) {
    if (detached_view(env, v))
      throw Napi::TypeError::New(env, name + " is detached (its ArrayBuffer was transferred or detached)");
    throw Napi::TypeError::New(env, name + " must be " + Tr::article + " " + Tr::name);
  }
  return a;
}

// Argument names for messages are built only when a message is thrown.
template <typename T>
ArrayView<T> get_array(const Napi::Object& o, const char* key, const std::string& prefix = "") {
  Napi::Value v = get_prop(o, key);
  if (!present(v)) throw Napi::TypeError::New(o.Env(), prefix + key + " is required");
  ArrayView<T> a;
  if (!typed_array_info(o.Env(), v, a)) return typed_array<T>(o.Env(), v, prefix + key);
  return a;
}

inline double number_value(Napi::Env env, const Napi::Value& v, const char* key, const std::string& prefix) {
  if (!v.IsNumber()) throw Napi::TypeError::New(env, prefix + key + " must be a number");
  double d = v.As<Napi::Number>().DoubleValue();
  if (std::isnan(d)) throw Napi::RangeError::New(env, prefix + key + " must not be NaN");
  return d;
}

inline double get_number(const Napi::Object& o, const char* key, const std::string& prefix = "") {
  Napi::Value v = get_prop(o, key);
  if (!present(v)) throw Napi::TypeError::New(o.Env(), prefix + key + " is required");
  return number_value(o.Env(), v, key, prefix);
}

inline double get_number_or(const Napi::Object& o, const char* key, double fallback,
                            const std::string& prefix = "") {
  Napi::Value v = get_prop(o, key);
  return present(v) ? number_value(o.Env(), v, key, prefix) : fallback;
}

// A number stored as float32: one that float32 cannot hold (a finite value past FLT_MAX, or a value
// other than 0 that rounds to 0, such as lr: 1e-50, which would silently train nothing) is a
// RangeError naming the key. Range checks on the float are the caller's.
inline float get_f32_or(const Napi::Object& o, const char* key, float fallback, const std::string& prefix = "") {
  Napi::Value v = get_prop(o, key);
  if (!present(v)) return fallback;
  const double d = number_value(o.Env(), v, key, prefix);
  const float f = static_cast<float>(d);
  if ((std::isfinite(d) && !std::isfinite(f)) || (d != 0.0 && f == 0.0f))
    throw Napi::RangeError::New(o.Env(), prefix + key + " is " + num_str(d) + ", which a 32-bit float cannot hold (it would be " +
                                             num_str(f) + ")");
  return f;
}

// ropeTheta of a model config: a finite number > 0 (any other RoPE base makes NaN logits).
inline float get_rope_theta(const Napi::Object& o, const std::string& prefix = "") {
  const float t = static_cast<float>(get_number_or(o, "ropeTheta", 10000.0, prefix));
  if (!(t > 0) || !std::isfinite(t))
    throw Napi::RangeError::New(o.Env(), prefix + "ropeTheta must be a finite number > 0, got " + num_str(t));
  return t;
}

inline int64_t int_value(Napi::Env env, const Napi::Value& v, const char* key, int64_t lo, int64_t hi,
                         const std::string& prefix) {
  double d = number_value(env, v, key, prefix);
  if (d != std::floor(d) || d < static_cast<double>(lo) || d > static_cast<double>(hi))
    throw Napi::RangeError::New(env, prefix + key + " must be an integer in [" + std::to_string(lo) +
                                             ", " + std::to_string(hi) + "], got " + num_str(d));
  return static_cast<int64_t>(d);
}

// An integer in [lo, hi]; fractional values and values out of range are RangeErrors.
inline int64_t get_int(const Napi::Object& o, const char* key, int64_t lo, int64_t hi,
                       const std::string& prefix = "") {
  Napi::Value v = get_prop(o, key);
  if (!present(v)) throw Napi::TypeError::New(o.Env(), prefix + key + " is required");
  return int_value(o.Env(), v, key, lo, hi, prefix);
}

inline int64_t get_int_or(const Napi::Object& o, const char* key, int64_t lo, int64_t hi, int64_t fallback,
                          const std::string& prefix = "") {
  Napi::Value v = get_prop(o, key);
  return present(v) ? int_value(o.Env(), v, key, lo, hi, prefix) : fallback;
}

// A 64-bit seed given as a number (a non-negative safe integer) or a bigint (taken modulo 2^64).
uint64_t get_seed(const Napi::Object& o, const char* key);
uint64_t seed_value(Napi::Env env, const Napi::Value& v, const char* key);

// Sampling options { temperature, topK?, topP? } named `name` in errors, validated: from the
// object's properties, or (sampling_values) from values the caller read from it.
inline Sampling sampling_values(Napi::Env env, const Napi::Value& obj, const Napi::Value& temperature,
                                const Napi::Value& top_k, const Napi::Value& top_p, const char* name) {
  if (!obj.IsObject()) throw Napi::TypeError::New(env, std::string(name) + " must be an object { temperature, topK?, topP? }");
  const std::string prefix = std::string(name) + ".";
  if (!present(temperature)) throw Napi::TypeError::New(env, prefix + "temperature is required");
  Sampling s;
  const double t = number_value(env, temperature, "temperature", prefix);
  s.temperature = static_cast<float>(t);
  // A positive temperature that rounds to the float 0 would silently mean greedy.
  if (t > 0.0 && s.temperature < std::numeric_limits<float>::min())
    throw Napi::RangeError::New(env, prefix + "temperature must be 0 (greedy) or at least " +
                                         num_str(std::numeric_limits<float>::min()) + ", got " + num_str(t));
  s.top_k = present(top_k) ? static_cast<int32_t>(int_value(env, top_k, "topK", 0, INT32_MAX, prefix)) : 0;
  s.top_p = present(top_p) ? static_cast<float>(number_value(env, top_p, "topP", prefix)) : 1.0f;
  validate_sampling(s, name);
  return s;
}

inline Sampling parse_sampling(Napi::Env env, const Napi::Value& v, const char* name) {
  if (!v.IsObject()) return sampling_values(env, v, v, v, v, name);  // throws
  Napi::Object o = v.As<Napi::Object>();
  return sampling_values(env, v, get_prop(o, "temperature"), get_prop(o, "topK"), get_prop(o, "topP"), name);
}

// A typed array's contents, copied (see "Two-phase argument parsing" above).
template <typename T>
std::vector<T> copy_array(Napi::Env env, const Napi::Value& v, const std::string& name) {
  auto a = typed_array<T>(env, v, name);
  return std::vector<T>(a.data, a.data + a.length);
}
// As copy_array, into a buffer the caller reuses (only where no JavaScript runs until it is used).
template <typename T>
void copy_array_into(Napi::Env env, const Napi::Value& v, const std::string& name, std::vector<T>& out) {
  auto a = typed_array<T>(env, v, name);
  out.assign(a.data, a.data + a.length);
}

// The length of a typed array of type T (phase 1: its type is checked, its pointer not kept).
template <typename T>
size_t checked_length(Napi::Env env, const Napi::Value& v, const std::string& name) {
  return typed_array<T>(env, v, name).length;
}

template <typename T>
Napi::TypedArrayOf<T> to_js(Napi::Env env, const T* data, size_t n) {
  auto out = Napi::TypedArrayOf<T>::New(env, n);
  if (n) std::copy(data, data + n, out.Data());
  return out;
}

}  // namespace osd::napi
