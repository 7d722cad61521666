// N-API binding of the generic GGUF writer and a metadata reader, for files the project writes
// itself (the trained tokenizer, the default model pair).
//
//   writeGguf(path: string, spec: {
//     metadata: Array<{ key: string, type: 'string'|'u32'|'i32'|'f32'|'bool'|'u64'|'f64'|
//                                         'string[]'|'f32[]'|'i32[]', value }>,
//     tensors?: Array<{ name: string, type: 'F32'|'F16'|'BF16', dims: number[], data: Float32Array }>,
//   }): void
//     Synchronous and atomic (gguf::Writer::write: temp file, fsync, rename). dims are in ggml
//     order (dims[0] varies fastest); data.length must equal their product; F16/BF16 round to
//     nearest even. u64 takes a non-negative safe integer or a bigint. Keys must be unique.
//
//   readGgufMetadata(path: string, options?: { maxArrayLength?: number }): {
//     version: number, alignment: number,
//     metadata: Record<string, value>,   // numbers, bigints (64-bit beyond 2^53), booleans, strings,
//                                        // arrays of those; an array longer than maxArrayLength
//                                        // (default 2^24) is { skipped: 'array[T]', length }
//     types: Record<string, string>,     // "uint32", "array[string]", ...
//     tensors: Array<{ name, type, dims, offset, nBytes }>,
//   }
//
// Bad arguments are TypeError / RangeError naming the argument (spec.metadata[3].value ...);
// file errors are Error with code OSD_IO naming the file.
#include <napi.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <unordered_set>
#include <vector>

#include "io/gguf.h"
#include "napi/napi_util.h"

namespace osd::napi {

namespace {

constexpr double kMaxSafeInteger = 9007199254740991.0;

std::string req_path(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsString()) throw Napi::TypeError::New(info.Env(), "path must be a string");
  std::string path = info[0].As<Napi::String>().Utf8Value();
  if (path.empty()) throw Napi::RangeError::New(info.Env(), "path must not be empty");
  return path;
}

// (Each property is read once: a getter could answer differently the second time.)
std::string req_string_prop(const Napi::Object& o, const char* key, const std::string& name) {
  const Napi::Value v = get_prop(o, key);
  if (!v.IsString()) throw Napi::TypeError::New(o.Env(), name + " must be a string");
  return v.As<Napi::String>().Utf8Value();
}

// An integral number in [lo, hi].
double integral(Napi::Env env, const Napi::Value& v, double lo, double hi, const std::string& name) {
  if (!v.IsNumber()) throw Napi::TypeError::New(env, name + " must be a number");
  const double d = v.As<Napi::Number>().DoubleValue();
  if (!(d == std::floor(d)) || d < lo || d > hi)
    throw Napi::RangeError::New(env, name + " must be an integer in [" + std::to_string(static_cast<int64_t>(lo)) +
                                         ", " + std::to_string(static_cast<uint64_t>(hi)) + "], got " +
                                         num_str(d));
  return d;
}

double number(Napi::Env env, const Napi::Value& v, const std::string& name) {
  if (!v.IsNumber()) throw Napi::TypeError::New(env, name + " must be a number");
  return v.As<Napi::Number>().DoubleValue();
}

uint64_t u64_value(Napi::Env env, const Napi::Value& v, const std::string& name) {
  if (v.IsBigInt()) {
    int sign = 0;
    size_t words = 2;
    uint64_t w[2] = {0, 0};
    v.As<Napi::BigInt>().ToWords(&sign, &words, w);
    if (sign || words > 1) throw Napi::RangeError::New(env, name + " must be a bigint in [0, 2^64 - 1]");
    return w[0];
  }
  if (!v.IsNumber()) throw Napi::TypeError::New(env, name + " must be a number or a bigint");
  return static_cast<uint64_t>(integral(env, v, 0, kMaxSafeInteger, name));
}

Napi::Array req_array(Napi::Env env, const Napi::Value& v, const std::string& name, const char* what) {
  if (!v.IsArray()) throw Napi::TypeError::New(env, name + " must be " + what);
  return v.As<Napi::Array>();
}

std::vector<std::string> strings(Napi::Env env, const Napi::Value& v, const std::string& name) {
  Napi::Array a = req_array(env, v, name, "an array of strings");
  // The length is read once: an element's getter could grow the array while it is read.
  const uint32_t n = a.Length();
  std::vector<std::string> out(n);
  for (uint32_t i = 0; i < n; ++i) {
    Napi::Value e = a.Get(i);
    if (!e.IsString()) throw Napi::TypeError::New(env, name + "[" + std::to_string(i) + "] must be a string");
    out[i] = e.As<Napi::String>().Utf8Value();
  }
  return out;
}

std::vector<float> floats(Napi::Env env, const Napi::Value& v, const std::string& name) {
  if (v.IsTypedArray()) {
    auto view = typed_array<float>(env, v, name);
    return std::vector<float>(view.data, view.data + view.length);
  }
  Napi::Array a = req_array(env, v, name, "a Float32Array or an array of numbers");
  const uint32_t n = a.Length();
  std::vector<float> out(n);
  for (uint32_t i = 0; i < n; ++i)
    out[i] = static_cast<float>(number(env, a.Get(i), name + "[" + std::to_string(i) + "]"));
  return out;
}

std::vector<int32_t> int32s(Napi::Env env, const Napi::Value& v, const std::string& name) {
  if (v.IsTypedArray()) {
    auto view = typed_array<int32_t>(env, v, name);
    return std::vector<int32_t>(view.data, view.data + view.length);
  }
  Napi::Array a = req_array(env, v, name, "an Int32Array or an array of integers");
  const uint32_t n = a.Length();
  std::vector<int32_t> out(n);
  for (uint32_t i = 0; i < n; ++i)
    out[i] = static_cast<int32_t>(integral(env, a.Get(i), -2147483648.0, 2147483647.0, name + "[" + std::to_string(i) + "]"));
  return out;
}

gguf::Value metadata_value(Napi::Env env, const std::string& type, const Napi::Value& v, const std::string& name) {
  if (type == "string") {
    if (!v.IsString()) throw Napi::TypeError::New(env, name + " must be a string (type 'string')");
    return gguf::Value::str(v.As<Napi::String>().Utf8Value());
  }
  if (type == "u32") return gguf::Value::u32(static_cast<uint32_t>(integral(env, v, 0, 4294967295.0, name)));
  if (type == "i32") return gguf::Value::i32(static_cast<int32_t>(integral(env, v, -2147483648.0, 2147483647.0, name)));
  if (type == "f32") return gguf::Value::f32(static_cast<float>(number(env, v, name)));
  if (type == "f64") return gguf::Value::f64(number(env, v, name));
  if (type == "u64") return gguf::Value::u64(u64_value(env, v, name));
  if (type == "bool") {
    if (!v.IsBoolean()) throw Napi::TypeError::New(env, name + " must be a boolean (type 'bool')");
    return gguf::Value::boolean(v.As<Napi::Boolean>().Value());
  }
  if (type == "string[]") return gguf::Value::array(strings(env, v, name));
  if (type == "f32[]") return gguf::Value::array(floats(env, v, name));
  if (type == "i32[]") return gguf::Value::array(int32s(env, v, name));
  return gguf::Value();  // unreachable: the caller checked the type
}

bool known_type(const std::string& t) {
  static const char* const kTypes[] = {"string", "u32", "i32", "f32", "bool", "u64", "f64", "string[]", "f32[]", "i32[]"};
  for (const char* k : kTypes)
    if (t == k) return true;
  return false;
}

Napi::Value write_gguf_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string path = req_path(info);
  Napi::Object spec = require_object(info, 1, "spec");
  gguf::Writer writer;

  // Phase 1 (see napi_util.h): every entry is read and checked, in order; getters may run.
  // Metadata values are copied as they are read; tensor data is kept as values.
  const Napi::Value metadata_v = get_prop(spec, "metadata");
  if (!present(metadata_v)) throw Napi::TypeError::New(env, "spec.metadata is required (an array)");
  Napi::Array metadata = req_array(env, metadata_v, "spec.metadata", "an array of { key, type, value }");
  std::unordered_set<std::string> keys;
  const uint32_t n_metadata = metadata.Length();
  for (uint32_t i = 0; i < n_metadata; ++i) {
    const std::string p = "spec.metadata[" + std::to_string(i) + "]";
    Napi::Value ev = metadata.Get(i);
    if (!ev.IsObject()) throw Napi::TypeError::New(env, p + " must be an object { key, type, value }");
    Napi::Object e = ev.As<Napi::Object>();
    const std::string key = req_string_prop(e, "key", p + ".key");
    if (key.empty()) throw Napi::RangeError::New(env, p + ".key must not be empty");
    if (!keys.insert(key).second) throw Napi::RangeError::New(env, p + ".key '" + key + "' appears twice");
    const std::string type = req_string_prop(e, "type", p + ".type");
    if (!known_type(type))
      throw Napi::RangeError::New(env, p + ".type '" + type +
                                           "' is not one of string, u32, i32, f32, bool, u64, f64, string[], f32[], i32[]");
    const Napi::Value value = get_prop(e, "value");
    if (value.IsUndefined()) throw Napi::TypeError::New(env, p + ".value is required");
    gguf::Value gv = metadata_value(env, type, value, p + ".value");
    guarded(env, [&] { writer.set(key, std::move(gv)); });
  }

  struct TensorSpec {
    std::string name;
    gguf::TensorType type;
    std::vector<uint64_t> dims;
    size_t elements;
    Napi::Value data;
  };
  std::vector<TensorSpec> specs;
  gguf::Writer probe;
  const Napi::Value tensors_v = get_prop(spec, "tensors");
  if (present(tensors_v)) {
    Napi::Array tensors = req_array(env, tensors_v, "spec.tensors", "an array of { name, type, dims, data }");
    const uint32_t n_tensors = tensors.Length();
    specs.reserve(n_tensors);
    for (uint32_t i = 0; i < n_tensors; ++i) {
      const std::string p = "spec.tensors[" + std::to_string(i) + "]";
      Napi::Value tv = tensors.Get(i);
      if (!tv.IsObject()) throw Napi::TypeError::New(env, p + " must be an object { name, type, dims, data }");
      Napi::Object t = tv.As<Napi::Object>();
      TensorSpec ts;
      ts.name = req_string_prop(t, "name", p + ".name");
      const std::string type = req_string_prop(t, "type", p + ".type");
      if (type == "F32") ts.type = gguf::TensorType::F32;
      else if (type == "F16") ts.type = gguf::TensorType::F16;
      else if (type == "BF16") ts.type = gguf::TensorType::BF16;
      else throw Napi::RangeError::New(env, p + ".type '" + type + "' is not one of F32, F16, BF16");
      const Napi::Value dims_v = get_prop(t, "dims");
      if (!present(dims_v)) throw Napi::TypeError::New(env, p + ".dims is required");
      Napi::Array dims_js = req_array(env, dims_v, p + ".dims", "an array of 1 to 4 positive integers");
      const uint32_t n_dims = dims_js.Length();
      if (n_dims < 1 || n_dims > 4)
        throw Napi::RangeError::New(env, p + ".dims must have 1 to 4 entries, got " + std::to_string(n_dims));
      ts.dims.resize(n_dims);
      double n = 1;
      for (uint32_t d = 0; d < n_dims; ++d) {
        ts.dims[d] = static_cast<uint64_t>(
            integral(env, dims_js.Get(d), 1, kMaxSafeInteger, p + ".dims[" + std::to_string(d) + "]"));
        n *= static_cast<double>(ts.dims[d]);
      }
      ts.data = required_prop(t, "data", p + ".");
      const size_t length = checked_length<float>(env, ts.data, p + ".data");
      if (static_cast<double>(length) != n)
        throw Napi::RangeError::New(env, p + ".data has " + std::to_string(length) + " elements, dims need " +
                                             std::to_string(static_cast<uint64_t>(n)));
      ts.elements = length;
      // The writer's own checks (a repeated name...) in argument order too: on a writer that is
      // never written, with a placeholder for the data.
      static const float placeholder = 0.0f;
      guarded(env, [&] { probe.add_tensor(ts.name, ts.type, ts.dims, &placeholder); });
      specs.push_back(std::move(ts));
    }
  }

  // Phase 2: tensor data is borrowed by the writer: the pointers are taken (and the lengths checked
  // again) after every getter ran, and no JavaScript runs until the file is written.
  for (size_t i = 0; i < specs.size(); ++i) {
    TensorSpec& ts = specs[i];
    const std::string p = "spec.tensors[" + std::to_string(i) + "]";
    ArrayView<float> data = typed_array<float>(env, ts.data, p + ".data");
    if (data.length != ts.elements)
      throw Napi::RangeError::New(env, p + ".data has " + std::to_string(data.length) + " elements, dims need " +
                                           std::to_string(ts.elements));
    guarded(env, [&] { writer.add_tensor(ts.name, ts.type, ts.dims, data.data); });
  }

  guarded(env, [&] { writer.write(path); });
  return env.Undefined();
}

// ---- reading ----------------------------------------------------------------------------------

Napi::Value int_to_js(Napi::Env env, int64_t v) {
  if (v > static_cast<int64_t>(kMaxSafeInteger) || v < -static_cast<int64_t>(kMaxSafeInteger))
    return Napi::BigInt::New(env, v);
  return Napi::Number::New(env, static_cast<double>(v));
}

Napi::Value value_to_js(Napi::Env env, const gguf::Value& v, uint64_t max_array) {
  using VT = gguf::ValueType;
  switch (v.type()) {
    case VT::String: return Napi::String::New(env, v.as_string());
    case VT::Bool: return Napi::Boolean::New(env, v.as_bool());
    case VT::Float32:
    case VT::Float64: return Napi::Number::New(env, v.as_float());
    case VT::UInt64: {
      const uint64_t u = v.as_uint();
      if (u > static_cast<uint64_t>(kMaxSafeInteger)) return Napi::BigInt::New(env, u);
      return Napi::Number::New(env, static_cast<double>(u));
    }
    case VT::Array: break;
    default: return int_to_js(env, v.as_int());
  }
  if (v.size() > max_array) {
    Napi::Object marker = Napi::Object::New(env);
    marker.Set("skipped", Napi::String::New(env, v.describe()));
    marker.Set("length", Napi::Number::New(env, static_cast<double>(v.size())));
    return marker;
  }
  const uint32_t n = static_cast<uint32_t>(v.size());
  Napi::Array out = Napi::Array::New(env, n);
  switch (v.elem_type()) {
    case VT::String: {
      const auto& s = v.strings();
      for (uint32_t i = 0; i < n; ++i) out.Set(i, Napi::String::New(env, s[i]));
      break;
    }
    case VT::Array: {
      const auto& a = v.arrays();
      for (uint32_t i = 0; i < n; ++i) out.Set(i, value_to_js(env, a[i], max_array));
      break;
    }
    case VT::Bool: {
      const auto& p = v.packed();
      for (uint32_t i = 0; i < n; ++i) out.Set(i, Napi::Boolean::New(env, p[i] != 0));
      break;
    }
    case VT::Float32: {
      const std::vector<float> f = v.to_floats();
      for (uint32_t i = 0; i < n; ++i) out.Set(i, Napi::Number::New(env, f[i]));
      break;
    }
    case VT::Float64: {
      const auto& p = v.packed();
      for (uint32_t i = 0; i < n; ++i) {
        double d;
        std::memcpy(&d, p.data() + 8 * static_cast<size_t>(i), 8);
        out.Set(i, Napi::Number::New(env, d));
      }
      break;
    }
    case VT::UInt64: {
      const auto& p = v.packed();
      for (uint32_t i = 0; i < n; ++i) {
        uint64_t u;
        std::memcpy(&u, p.data() + 8 * static_cast<size_t>(i), 8);
        out.Set(i, u > static_cast<uint64_t>(kMaxSafeInteger) ? Napi::Value(Napi::BigInt::New(env, u))
                                                               : Napi::Value(Napi::Number::New(env, static_cast<double>(u))));
      }
      break;
    }
    default: {
      const std::vector<int64_t> ints = v.to_ints();
      for (uint32_t i = 0; i < n; ++i) out.Set(i, int_to_js(env, ints[i]));
      break;
    }
  }
  return out;
}

Napi::Value read_gguf_metadata_js(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const std::string path = req_path(info);
  uint64_t max_array = uint64_t{1} << 24;
  if (info.Length() > 1 && !info[1].IsUndefined()) {
    if (!info[1].IsObject()) throw Napi::TypeError::New(env, "options must be an object");
    Napi::Object o = info[1].As<Napi::Object>();
    max_array = static_cast<uint64_t>(get_int_or(o, "maxArrayLength", 0, static_cast<int64_t>(kMaxSafeInteger),
                                                 static_cast<int64_t>(max_array), "options."));
  }
  std::unique_ptr<gguf::File> file = guarded(env, [&] { return gguf::File::open(path); });

  Napi::Object out = Napi::Object::New(env);
  out.Set("version", Napi::Number::New(env, file->version()));
  out.Set("alignment", Napi::Number::New(env, static_cast<double>(file->alignment())));
  Napi::Object metadata = Napi::Object::New(env);
  Napi::Object types = Napi::Object::New(env);
  for (const gguf::KeyValue& kv : file->metadata()) {
    metadata.Set(kv.key, guarded(env, [&] { return value_to_js(env, kv.value, max_array); }));
    types.Set(kv.key, Napi::String::New(env, kv.value.describe()));
  }
  out.Set("metadata", metadata);
  out.Set("types", types);
  Napi::Array tensors = Napi::Array::New(env, file->tensors().size());
  for (size_t i = 0; i < file->tensors().size(); ++i) {
    const gguf::TensorInfo& t = file->tensors()[i];
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", Napi::String::New(env, t.name));
    const gguf::TypeInfo* ti = gguf::find_type_info(static_cast<uint32_t>(t.type));
    o.Set("type", Napi::String::New(env, ti ? ti->name : "unknown"));
    Napi::Array dims = Napi::Array::New(env, t.n_dims);
    for (uint32_t d = 0; d < t.n_dims; ++d) dims.Set(d, Napi::Number::New(env, static_cast<double>(t.ne[d])));
    o.Set("dims", dims);
    o.Set("offset", Napi::Number::New(env, static_cast<double>(t.offset)));
    o.Set("nBytes", Napi::Number::New(env, static_cast<double>(t.n_bytes)));
    tensors.Set(static_cast<uint32_t>(i), o);
  }
  out.Set("tensors", tensors);
  return out;
}

void init(Napi::Env env, Napi::Object exports) {
  exports.Set("writeGguf", Napi::Function::New(env, write_gguf_js, "writeGguf"));
  exports.Set("readGgufMetadata", Napi::Function::New(env, read_gguf_metadata_js, "readGgufMetadata"));
}

ExportRegistrar reg(init);

}  // namespace

}  // namespace osd::napi
