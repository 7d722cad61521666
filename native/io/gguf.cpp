#include "io/gguf.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "core/error.h"
#include "core/fp16.h"

// Values are read and written with memcpy in host order.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "GGUF I/O assumes a little-endian host");

namespace osd::gguf {

namespace {

constexpr uint32_t kMaxDims = 4;
constexpr int kMaxArrayDepth = 8;        // nested arrays; bounds recursion on corrupt input
constexpr uint64_t kMaxAlignment = 1u << 30;
constexpr uint64_t kMinKvBytes = 8 + 4 + 1;         // key length, type, smallest value
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 4 + 8;  // name length, n_dims, type, offset
constexpr size_t kMaxWriterNameBytes = 63;          // llama.cpp's GGML_MAX_NAME is 64 with the NUL

struct TypeRow {
  uint32_t id;
  TypeInfo info;
};

// Block sizes and bytes per block, as in ggml's type_traits.
constexpr TypeRow kTypes[] = {
    {0, {"F32", 1, 4}},        {1, {"F16", 1, 2}},         {2, {"Q4_0", 32, 18}},
    {3, {"Q4_1", 32, 20}},     {6, {"Q5_0", 32, 22}},      {7, {"Q5_1", 32, 24}},
    {8, {"Q8_0", 32, 34}},     {9, {"Q8_1", 32, 36}},      {10, {"Q2_K", 256, 84}},
    {11, {"Q3_K", 256, 110}},  {12, {"Q4_K", 256, 144}},   {13, {"Q5_K", 256, 176}},
    {14, {"Q6_K", 256, 210}},  {15, {"Q8_K", 256, 292}},   {16, {"IQ2_XXS", 256, 66}},
    {17, {"IQ2_XS", 256, 74}}, {18, {"IQ3_XXS", 256, 98}}, {19, {"IQ1_S", 256, 50}},
    {20, {"IQ4_NL", 32, 18}},  {21, {"IQ3_S", 256, 110}},  {22, {"IQ2_S", 256, 82}},
    {23, {"IQ4_XS", 256, 136}}, {24, {"I8", 1, 1}},        {25, {"I16", 1, 2}},
    {26, {"I32", 1, 4}},       {27, {"I64", 1, 8}},        {28, {"F64", 1, 8}},
    {29, {"IQ1_M", 256, 56}},  {30, {"BF16", 1, 2}},       {34, {"TQ1_0", 256, 54}},
    {35, {"TQ2_0", 256, 66}},  {39, {"MXFP4", 32, 17}},
};

// Bytes of one element of a numeric or bool value type; 0 for string, array and unknown ids.
size_t scalar_bytes(uint32_t t) {
  switch (static_cast<ValueType>(t)) {
    case ValueType::UInt8:
    case ValueType::Int8:
    case ValueType::Bool:
      return 1;
    case ValueType::UInt16:
    case ValueType::Int16:
      return 2;
    case ValueType::UInt32:
    case ValueType::Int32:
    case ValueType::Float32:
      return 4;
    case ValueType::UInt64:
    case ValueType::Int64:
    case ValueType::Float64:
      return 8;
    default:
      return 0;
  }
}

bool is_int_type(ValueType t) {
  switch (t) {
    case ValueType::UInt8:
    case ValueType::Int8:
    case ValueType::UInt16:
    case ValueType::Int16:
    case ValueType::UInt32:
    case ValueType::Int32:
    case ValueType::UInt64:
    case ValueType::Int64:
      return true;
    default:
      return false;
  }
}

bool is_float_type(ValueType t) { return t == ValueType::Float32 || t == ValueType::Float64; }

template <class T>
T load(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Element i of a packed integer array, widened; uint64 keeps its bit pattern.
int64_t packed_int(ValueType t, const uint8_t* p, size_t i) {
  switch (t) {
    case ValueType::UInt8: return load<uint8_t>(p + i);
    case ValueType::Int8: return load<int8_t>(p + i);
    case ValueType::Bool: return load<uint8_t>(p + i);
    case ValueType::UInt16: return load<uint16_t>(p + 2 * i);
    case ValueType::Int16: return load<int16_t>(p + 2 * i);
    case ValueType::UInt32: return load<uint32_t>(p + 4 * i);
    case ValueType::Int32: return load<int32_t>(p + 4 * i);
    case ValueType::UInt64: return static_cast<int64_t>(load<uint64_t>(p + 8 * i));
    case ValueType::Int64: return load<int64_t>(p + 8 * i);
    default: return 0;
  }
}

template <class T>
Value make_packed(ValueType elem, const std::vector<T>& v) {
  std::vector<uint8_t> bytes(v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(bytes.data(), v.data(), bytes.size());
  return Value::packed_array(elem, v.size(), std::move(bytes));
}

std::string to_str(uint64_t v) { return std::to_string(v); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// Types

const char* type_name(ValueType t) {
  switch (t) {
    case ValueType::UInt8: return "uint8";
    case ValueType::Int8: return "int8";
    case ValueType::UInt16: return "uint16";
    case ValueType::Int16: return "int16";
    case ValueType::UInt32: return "uint32";
    case ValueType::Int32: return "int32";
    case ValueType::Float32: return "float32";
    case ValueType::Bool: return "bool";
    case ValueType::String: return "string";
    case ValueType::Array: return "array";
    case ValueType::UInt64: return "uint64";
    case ValueType::Int64: return "int64";
    case ValueType::Float64: return "float64";
  }
  return "unknown";
}

const TypeInfo* find_type_info(uint32_t type_id) {
  for (const auto& row : kTypes)
    if (row.id == type_id) return &row.info;
  return nullptr;
}

const TypeInfo& type_info(TensorType t) {
  const TypeInfo* info = find_type_info(static_cast<uint32_t>(t));
  if (!info) throw_range("unknown ggml tensor type id " + to_str(static_cast<uint32_t>(t)));
  return *info;
}

// ---------------------------------------------------------------------------------------------
// Value

#define OSD_GGUF_SCALAR(fn, ctype, vtype, field)  \
  Value Value::fn(ctype v) {                      \
    Value out;                                    \
    out.type_ = ValueType::vtype;                 \
    out.field = v;                                \
    return out;                                   \
  }
OSD_GGUF_SCALAR(u8, uint8_t, UInt8, int_)
OSD_GGUF_SCALAR(i8, int8_t, Int8, int_)
OSD_GGUF_SCALAR(u16, uint16_t, UInt16, int_)
OSD_GGUF_SCALAR(i16, int16_t, Int16, int_)
OSD_GGUF_SCALAR(u32, uint32_t, UInt32, int_)
OSD_GGUF_SCALAR(i32, int32_t, Int32, int_)
OSD_GGUF_SCALAR(f32, float, Float32, float_)
OSD_GGUF_SCALAR(boolean, bool, Bool, int_)
OSD_GGUF_SCALAR(i64, int64_t, Int64, int_)
OSD_GGUF_SCALAR(f64, double, Float64, float_)
#undef OSD_GGUF_SCALAR

Value Value::u64(uint64_t v) {
  Value out;
  out.type_ = ValueType::UInt64;
  out.int_ = static_cast<int64_t>(v);  // bit pattern; as_int/as_uint interpret it
  return out;
}

Value Value::str(std::string v) {
  Value out;
  out.type_ = ValueType::String;
  out.str_ = std::move(v);
  return out;
}

Value Value::array(const std::vector<uint8_t>& v) { return make_packed(ValueType::UInt8, v); }
Value Value::array(const std::vector<int8_t>& v) { return make_packed(ValueType::Int8, v); }
Value Value::array(const std::vector<uint16_t>& v) { return make_packed(ValueType::UInt16, v); }
Value Value::array(const std::vector<int16_t>& v) { return make_packed(ValueType::Int16, v); }
Value Value::array(const std::vector<uint32_t>& v) { return make_packed(ValueType::UInt32, v); }
Value Value::array(const std::vector<int32_t>& v) { return make_packed(ValueType::Int32, v); }
Value Value::array(const std::vector<float>& v) { return make_packed(ValueType::Float32, v); }
Value Value::array(const std::vector<uint64_t>& v) { return make_packed(ValueType::UInt64, v); }
Value Value::array(const std::vector<int64_t>& v) { return make_packed(ValueType::Int64, v); }
Value Value::array(const std::vector<double>& v) { return make_packed(ValueType::Float64, v); }

Value Value::bool_array(const std::vector<bool>& v) {
  std::vector<uint8_t> bytes(v.begin(), v.end());
  return packed_array(ValueType::Bool, v.size(), std::move(bytes));
}

Value Value::array(std::vector<std::string> v) {
  Value out;
  out.type_ = ValueType::Array;
  out.elem_ = ValueType::String;
  out.count_ = v.size();
  out.strings_ = std::move(v);
  return out;
}

Value Value::array_of_arrays(std::vector<Value> items) {
  for (const auto& item : items)
    if (!item.is_array()) throw_range("gguf array of arrays: item is " + item.describe() + ", not an array");
  Value out;
  out.type_ = ValueType::Array;
  out.elem_ = ValueType::Array;
  out.count_ = items.size();
  out.arrays_ = std::move(items);
  return out;
}

Value Value::packed_array(ValueType elem, uint64_t count, std::vector<uint8_t> bytes) {
  const size_t size = scalar_bytes(static_cast<uint32_t>(elem));
  if (size == 0) throw_range(std::string("gguf packed array: element type ") + type_name(elem) + " is not numeric");
  if (count > bytes.size() / size || count * size != bytes.size())
    throw_range("gguf packed array: " + to_str(bytes.size()) + " bytes do not hold " + to_str(count) + " " +
                type_name(elem) + " elements");
  Value out;
  out.type_ = ValueType::Array;
  out.elem_ = elem;
  out.count_ = count;
  out.packed_ = std::move(bytes);
  return out;
}

Value Value::empty_array(ValueType elem) {
  if (elem == ValueType::String) return array(std::vector<std::string>{});
  if (elem == ValueType::Array) return array_of_arrays({});
  return packed_array(elem, 0, {});
}

bool Value::is_int() const { return is_int_type(type_); }
bool Value::is_float() const { return is_float_type(type_); }

std::string Value::describe() const {
  if (type_ == ValueType::Array) {
    if (elem_ == ValueType::Array && !arrays_.empty()) return "array[" + arrays_[0].describe() + "]";
    return std::string("array[") + type_name(elem_) + "]";
  }
  return type_name(type_);
}

int64_t Value::as_int() const {
  if (!is_int()) throw_type(std::string("gguf value is ") + describe() + ", not an integer");
  if (type_ == ValueType::UInt64 && int_ < 0)
    throw_range("gguf uint64 value " + to_str(static_cast<uint64_t>(int_)) + " does not fit in int64");
  return int_;
}

uint64_t Value::as_uint() const {
  if (!is_int()) throw_type(std::string("gguf value is ") + describe() + ", not an integer");
  if (type_ == ValueType::UInt64) return static_cast<uint64_t>(int_);
  if (int_ < 0) throw_range("gguf value " + std::to_string(int_) + " is negative");
  return static_cast<uint64_t>(int_);
}

double Value::as_float() const {
  if (is_float()) return float_;
  if (type_ == ValueType::UInt64) return static_cast<double>(static_cast<uint64_t>(int_));
  if (is_int()) return static_cast<double>(int_);
  throw_type(std::string("gguf value is ") + describe() + ", not a number");
}

bool Value::as_bool() const {
  if (type_ != ValueType::Bool) throw_type(std::string("gguf value is ") + describe() + ", not a bool");
  return int_ != 0;
}

const std::string& Value::as_string() const {
  if (type_ != ValueType::String) throw_type(std::string("gguf value is ") + describe() + ", not a string");
  return str_;
}

const std::vector<std::string>& Value::strings() const {
  if (type_ != ValueType::Array || elem_ != ValueType::String)
    throw_type(std::string("gguf value is ") + describe() + ", not array[string]");
  return strings_;
}

const std::vector<Value>& Value::arrays() const {
  if (type_ != ValueType::Array || elem_ != ValueType::Array)
    throw_type(std::string("gguf value is ") + describe() + ", not an array of arrays");
  return arrays_;
}

const std::vector<uint8_t>& Value::packed() const {
  if (type_ != ValueType::Array || scalar_bytes(static_cast<uint32_t>(elem_)) == 0)
    throw_type(std::string("gguf value is ") + describe() + ", not a numeric array");
  return packed_;
}

std::vector<float> Value::to_floats() const {
  const std::vector<uint8_t>& p = packed();
  std::vector<float> out(count_);
  if (elem_ == ValueType::Float32) {
    if (count_) std::memcpy(out.data(), p.data(), count_ * sizeof(float));
  } else if (elem_ == ValueType::Float64) {
    for (size_t i = 0; i < count_; ++i) out[i] = static_cast<float>(load<double>(p.data() + 8 * i));
  } else if (elem_ == ValueType::UInt64) {
    for (size_t i = 0; i < count_; ++i) out[i] = static_cast<float>(load<uint64_t>(p.data() + 8 * i));
  } else if (elem_ == ValueType::Bool) {
    throw_type("gguf value is array[bool], not a numeric array");
  } else {
    for (size_t i = 0; i < count_; ++i) out[i] = static_cast<float>(packed_int(elem_, p.data(), i));
  }
  return out;
}

std::vector<int64_t> Value::to_ints() const {
  const std::vector<uint8_t>& p = packed();
  if (!is_int_type(elem_) && elem_ != ValueType::Bool)
    throw_type(std::string("gguf value is ") + describe() + ", not an integer array");
  std::vector<int64_t> out(count_);
  for (size_t i = 0; i < count_; ++i) {
    out[i] = packed_int(elem_, p.data(), i);
    if (elem_ == ValueType::UInt64 && out[i] < 0)
      throw_range("gguf uint64 array element " + to_str(i) + " does not fit in int64");
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Reader

namespace {

// Bounds-checked reads over the file's bytes. `context` names what is being parsed, so that
// errors say e.g. "truncated value of metadata key 'general.name'".
class Cursor {
 public:
  Cursor(const uint8_t* data, size_t size, const std::string& name) : data_(data), size_(size), name_(name) {}

  size_t pos() const { return pos_; }
  size_t left() const { return size_ - pos_; }
  std::string context;

  [[noreturn]] void fail(const std::string& msg) const { throw_io(name_ + ": " + msg); }

  [[noreturn]] void truncated(const std::string& what, const std::string& needs) const {
    fail("truncated " + what + (context.empty() ? "" : " of " + context) + " (needs " + needs + " at offset " +
         to_str(pos_) + ", file has " + to_str(size_) + ")");
  }

  const uint8_t* take(uint64_t n, const char* what) {
    if (n > left()) truncated(what, to_str(n) + " bytes");
    const uint8_t* p = data_ + pos_;
    pos_ += n;
    return p;
  }

  template <class T>
  T read(const char* what) {
    return load<T>(take(sizeof(T), what));
  }

  std::string read_string(const char* what) {
    uint64_t n = read<uint64_t>(what);
    const uint8_t* p = take(n, what);  // checked against the bytes left before allocating
    return std::string(reinterpret_cast<const char*>(p), n);
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  const std::string& name_;
};

Value parse_value(Cursor& c, uint32_t type, int depth);

Value parse_array(Cursor& c, int depth) {
  if (depth >= kMaxArrayDepth) c.fail("arrays nested deeper than " + to_str(kMaxArrayDepth) + " in " + c.context);
  const uint32_t elem = c.read<uint32_t>("array element type");
  const uint64_t count = c.read<uint64_t>("array length");
  const size_t size = scalar_bytes(elem);
  if (size > 0) {
    if (count > c.left() / size)
      c.truncated("array data", to_str(count) + " elements of " + to_str(size) + " bytes");
    const uint8_t* p = c.take(count * size, "array data");
    if (static_cast<ValueType>(elem) == ValueType::Bool)
      for (uint64_t i = 0; i < count; ++i)
        if (p[i] > 1) c.fail("bad bool " + to_str(p[i]) + " at element " + to_str(i) + " of " + c.context);
    return Value::packed_array(static_cast<ValueType>(elem), count, std::vector<uint8_t>(p, p + count * size));
  }
  if (static_cast<ValueType>(elem) == ValueType::String) {
    // Each string takes at least its 8-byte length, which bounds the count before reserving.
    if (count > c.left() / 8) c.truncated("string array", to_str(count) + " strings of at least 8 bytes");
    std::vector<std::string> strings;
    strings.reserve(count);
    for (uint64_t i = 0; i < count; ++i) strings.push_back(c.read_string("string array element"));
    return Value::array(std::move(strings));
  }
  if (static_cast<ValueType>(elem) == ValueType::Array) {
    if (count > c.left() / 12) c.truncated("array of arrays", to_str(count) + " arrays of at least 12 bytes");
    std::vector<Value> items;
    items.reserve(count);
    for (uint64_t i = 0; i < count; ++i) items.push_back(parse_array(c, depth + 1));
    return Value::array_of_arrays(std::move(items));
  }
  c.fail("unknown array element type id " + to_str(elem) + " in " + c.context);
}

Value parse_value(Cursor& c, uint32_t type, int depth) {
  switch (static_cast<ValueType>(type)) {
    case ValueType::UInt8: return Value::u8(c.read<uint8_t>("value"));
    case ValueType::Int8: return Value::i8(c.read<int8_t>("value"));
    case ValueType::UInt16: return Value::u16(c.read<uint16_t>("value"));
    case ValueType::Int16: return Value::i16(c.read<int16_t>("value"));
    case ValueType::UInt32: return Value::u32(c.read<uint32_t>("value"));
    case ValueType::Int32: return Value::i32(c.read<int32_t>("value"));
    case ValueType::Float32: return Value::f32(c.read<float>("value"));
    case ValueType::UInt64: return Value::u64(c.read<uint64_t>("value"));
    case ValueType::Int64: return Value::i64(c.read<int64_t>("value"));
    case ValueType::Float64: return Value::f64(c.read<double>("value"));
    case ValueType::Bool: {
      uint8_t b = c.read<uint8_t>("value");
      if (b > 1) c.fail("bad bool " + to_str(b) + " for " + c.context);
      return Value::boolean(b != 0);
    }
    case ValueType::String: return Value::str(c.read_string("string value"));
    case ValueType::Array: return parse_array(c, depth);
  }
  c.fail("unknown value type id " + to_str(type) + " for " + c.context);
}

}  // namespace

namespace {
// Whether n bytes are well-formed UTF-8 as far as lead and continuation bytes go (a sequence cut by
// the end counts as valid: the scan may stop inside one).
bool valid_utf8(const uint8_t* p, size_t n) {
  for (size_t i = 0; i < n;) {
    const uint8_t c = p[i];
    const int extra = c < 0x80 ? 0 : c >= 0xc2 && c <= 0xdf ? 1 : c >= 0xe0 && c <= 0xef ? 2 : c >= 0xf0 && c <= 0xf4 ? 3 : -1;
    if (extra < 0) return false;
    for (int k = 1; k <= extra && i + k < n; ++k)
      if ((p[i + k] & 0xc0) != 0x80) return false;
    i += 1 + extra;
  }
  return true;
}
}  // namespace

std::unique_ptr<File> File::open(const std::string& path) {
  std::unique_ptr<File> f(new File());
  f->name_ = path;
  f->bytes_ = io::FileBytes::map(path);
  f->parse();
  return f;
}

std::unique_ptr<File> File::from_memory(std::vector<uint8_t> bytes, std::string name) {
  std::unique_ptr<File> f(new File());
  f->name_ = std::move(name);
  f->bytes_ = io::FileBytes::own(std::move(bytes));
  f->parse();
  return f;
}

void File::parse() {
  try {
    parse_layout();
  } catch (const Error& e) {
    // A binary file passed through a UTF-8 text conversion has each invalid byte sequence
    // replaced by U+FFFD (EF BF BD); say so, since the error offset alone is baffling then. Such a
    // file is valid UTF-8 throughout, which a sound GGUF (binary numbers, weights) never is; a few
    // U+FFFD alone prove nothing (a vocabulary's replacement-character token).
    static const uint8_t fffd[3] = {0xef, 0xbf, 0xbd};
    const size_t scan = std::min<size_t>(bytes_.size(), size_t{64} << 20);
    const uint8_t* end = bytes_.data() + scan;
    if (scan >= 3 && std::search(bytes_.data(), end, fffd, fffd + 3) != end && valid_utf8(bytes_.data(), scan))
      throw_io(std::string(e.what()) +
               "; the file contains EF BF BD (U+FFFD) byte sequences, so it was probably mangled by a UTF-8 text "
               "conversion (download it again as binary)");
    throw;
  }
}

void File::parse_layout() {
  Cursor c(bytes_.data(), bytes_.size(), name_);

  const uint8_t* magic = c.take(4, "header");
  if (std::memcmp(magic, "GGUF", 4) != 0) c.fail("not a GGUF file (bad magic)");
  version_ = c.read<uint32_t>("header");
  if (version_ != 2 && version_ != 3) {
    const uint32_t swapped = __builtin_bswap32(version_);
    if (swapped == 2 || swapped == 3) c.fail("big-endian GGUF files are not supported");
    c.fail("unsupported GGUF version " + to_str(version_) + " (only 2 and 3 are read)");
  }
  const uint64_t n_tensors = c.read<uint64_t>("header");
  const uint64_t n_kv = c.read<uint64_t>("header");
  // Sanity-limit the counts by the bytes left before anything is reserved.
  if (n_kv > c.left() / kMinKvBytes)
    c.fail("truncated or corrupt file: metadata count " + to_str(n_kv) + " does not fit in the " + to_str(c.left()) +
           " bytes left (each entry takes at least " + to_str(kMinKvBytes) + ")");
  if (n_tensors > c.left() / kMinTensorInfoBytes)
    c.fail("truncated or corrupt file: tensor count " + to_str(n_tensors) + " does not fit in the " +
           to_str(c.left()) + " bytes left (each tensor info takes at least " + to_str(kMinTensorInfoBytes) + ")");

  metadata_.reserve(n_kv);
  for (uint64_t i = 0; i < n_kv; ++i) {
    c.context = "metadata entry " + to_str(i);
    if (i > 0) c.context += " (after key '" + metadata_.back().key + "')";
    std::string key = c.read_string("key");
    c.context = "metadata key '" + key + "'";
    if (key_index_.count(key)) c.fail("duplicate metadata key '" + key + "'");
    const uint32_t type = c.read<uint32_t>("value type");
    Value value = parse_value(c, type, 0);
    key_index_.emplace(key, metadata_.size());
    metadata_.push_back({std::move(key), std::move(value)});
  }
  c.context.clear();

  if (const Value* a = find("general.alignment")) {
    if (!a->is_int()) c.fail("general.alignment is " + a->describe() + ", expected an integer");
    const uint64_t v = a->as_uint();
    if (v == 0 || (v & (v - 1)) != 0 || v > kMaxAlignment)
      c.fail("general.alignment " + to_str(v) + " is not a power of two up to " + to_str(kMaxAlignment));
    alignment_ = v;
  }

  tensors_.reserve(n_tensors);
  for (uint64_t i = 0; i < n_tensors; ++i) {
    c.context = "tensor info " + to_str(i);
    if (i > 0) c.context += " (after tensor '" + tensors_.back().name + "')";
    TensorInfo t;
    t.name = c.read_string("tensor name");
    c.context = "tensor '" + t.name + "'";
    if (tensor_index_.count(t.name)) c.fail("duplicate tensor name '" + t.name + "'");
    t.n_dims = c.read<uint32_t>("dimension count");
    if (t.n_dims > kMaxDims)
      c.fail("tensor '" + t.name + "' has " + to_str(t.n_dims) + " dimensions (at most " + to_str(kMaxDims) + ")");
    uint64_t n = 1;
    for (uint32_t d = 0; d < t.n_dims; ++d) {
      t.ne[d] = c.read<uint64_t>("dimensions");
      if (t.ne[d] == 0) c.fail("tensor '" + t.name + "' has a zero dimension (ne[" + to_str(d) + "] = 0)");
      if (t.ne[d] > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / n)
        c.fail("tensor '" + t.name + "' has too many elements (dimensions overflow)");
      n *= t.ne[d];
    }
    t.n_elements = n;
    const uint32_t type_id = c.read<uint32_t>("tensor type");
    const TypeInfo* info = find_type_info(type_id);
    if (!info) c.fail("tensor '" + t.name + "' has unknown ggml type id " + to_str(type_id));
    t.type = static_cast<TensorType>(type_id);
    if (t.ne[0] % info->block_size != 0)
      c.fail("tensor '" + t.name + "': row length " + to_str(t.ne[0]) + " is not a multiple of the " + info->name +
             " block size " + to_str(info->block_size));
    const uint64_t blocks = n / info->block_size;
    if (blocks > std::numeric_limits<uint64_t>::max() / info->block_bytes)
      c.fail("tensor '" + t.name + "' is too large (byte size overflows)");
    t.n_bytes = blocks * info->block_bytes;
    t.offset = c.read<uint64_t>("tensor data offset");
    if (t.offset % alignment_ != 0)
      c.fail("tensor '" + t.name + "': data offset " + to_str(t.offset) + " is not a multiple of the alignment " +
             to_str(alignment_));
    tensor_index_.emplace(t.name, tensors_.size());
    tensors_.push_back(std::move(t));
  }
  c.context.clear();

  // The data section starts at the next multiple of the alignment. A file without tensors may
  // end before it (llama.cpp's vocab-only files do).
  data_offset_ = (c.pos() + alignment_ - 1) / alignment_ * alignment_;
  const uint64_t size = bytes_.size();
  for (auto& t : tensors_) {
    const bool inside = data_offset_ <= size && t.offset <= size - data_offset_ &&
                        t.n_bytes <= size - data_offset_ - t.offset;
    if (!inside) {
      const std::string at = t.offset <= std::numeric_limits<uint64_t>::max() - data_offset_
                                 ? to_str(data_offset_ + t.offset)
                                 : to_str(data_offset_) + " + " + to_str(t.offset);
      c.fail("truncated tensor data for '" + t.name + "' (needs " + to_str(t.n_bytes) + " bytes at offset " + at +
             ", file has " + to_str(size) + ")");
    }
    t.data = bytes_.data() + data_offset_ + t.offset;
  }

  // No two tensors may share bytes.
  std::vector<const TensorInfo*> by_offset;
  by_offset.reserve(tensors_.size());
  for (const auto& t : tensors_) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TensorInfo* a = by_offset[i - 1];
    const TensorInfo* b = by_offset[i];
    if (a->offset + a->n_bytes > b->offset)
      c.fail("tensor data of '" + a->name + "' (offset " + to_str(a->offset) + ", " + to_str(a->n_bytes) +
             " bytes) overlaps '" + b->name + "' (offset " + to_str(b->offset) + ")");
  }
}

const Value* File::find(const std::string& key) const {
  auto it = key_index_.find(key);
  return it == key_index_.end() ? nullptr : &metadata_[it->second].value;
}

const Value& File::get(const std::string& key) const {
  const Value* v = find(key);
  if (!v) throw_io(name_ + ": missing metadata key '" + key + "'");
  return *v;
}

void File::wrong_type(const std::string& key, const Value& v, const char* wanted) const {
  throw_io(name_ + ": metadata key '" + key + "' is " + v.describe() + ", expected " + wanted);
}

std::string File::get_string(const std::string& key) const {
  const Value& v = get(key);
  if (v.type() != ValueType::String) wrong_type(key, v, "a string");
  return v.as_string();
}

std::string File::get_string_or(const std::string& key, const std::string& fallback) const {
  return find(key) ? get_string(key) : fallback;
}

int64_t File::get_int(const std::string& key) const {
  const Value& v = get(key);
  if (!v.is_int()) wrong_type(key, v, "an integer");
  if (v.type() == ValueType::UInt64 && v.as_uint() > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
    throw_io(name_ + ": metadata key '" + key + "' value " + to_str(v.as_uint()) + " does not fit in int64");
  return v.as_int();
}

int64_t File::get_int_or(const std::string& key, int64_t fallback) const {
  return find(key) ? get_int(key) : fallback;
}

double File::get_float(const std::string& key) const {
  const Value& v = get(key);
  if (!v.is_float() && !v.is_int()) wrong_type(key, v, "a number");
  return v.as_float();
}

double File::get_float_or(const std::string& key, double fallback) const {
  return find(key) ? get_float(key) : fallback;
}

bool File::get_bool(const std::string& key) const {
  const Value& v = get(key);
  if (v.type() != ValueType::Bool) wrong_type(key, v, "a bool");
  return v.as_bool();
}

bool File::get_bool_or(const std::string& key, bool fallback) const {
  return find(key) ? get_bool(key) : fallback;
}

const std::vector<std::string>& File::get_strings(const std::string& key) const {
  const Value& v = get(key);
  if (!v.is_array() || v.elem_type() != ValueType::String) wrong_type(key, v, "array[string]");
  return v.strings();
}

std::vector<float> File::get_floats(const std::string& key) const {
  const Value& v = get(key);
  if (!v.is_array() || !(is_float_type(v.elem_type()) || is_int_type(v.elem_type())))
    wrong_type(key, v, "a numeric array");
  return v.to_floats();
}

std::vector<int64_t> File::get_ints(const std::string& key) const {
  const Value& v = get(key);
  if (!v.is_array() || !is_int_type(v.elem_type())) wrong_type(key, v, "an integer array");
  try {
    return v.to_ints();
  } catch (const Error& e) {
    throw_io(name_ + ": metadata key '" + key + "': " + e.what());
  }
}

const TensorInfo* File::find_tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& File::tensor(const std::string& name) const {
  const TensorInfo* t = find_tensor(name);
  if (!t) throw_io(name_ + ": missing tensor '" + name + "'");
  return *t;
}

// ---------------------------------------------------------------------------------------------
// Writer

namespace {

template <class T>
void put(io::Output& out, T v) {
  out.write(&v, sizeof v);
}

void put_string(io::Output& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  out.write(s.data(), s.size());
}

void put_zeros(io::Output& out, uint64_t n) {
  static const uint8_t zeros[64] = {};
  while (n > 0) {
    const uint64_t k = std::min<uint64_t>(n, sizeof zeros);
    out.write(zeros, k);
    n -= k;
  }
}

// Everything after the value's type tag. Array items carry no tag of their own, but an array
// item is itself (element type, count, elements).
void put_payload(io::Output& out, const Value& v) {
  switch (v.type()) {
    case ValueType::UInt8: put<uint8_t>(out, static_cast<uint8_t>(v.as_int())); break;
    case ValueType::Int8: put<int8_t>(out, static_cast<int8_t>(v.as_int())); break;
    case ValueType::UInt16: put<uint16_t>(out, static_cast<uint16_t>(v.as_int())); break;
    case ValueType::Int16: put<int16_t>(out, static_cast<int16_t>(v.as_int())); break;
    case ValueType::UInt32: put<uint32_t>(out, static_cast<uint32_t>(v.as_int())); break;
    case ValueType::Int32: put<int32_t>(out, static_cast<int32_t>(v.as_int())); break;
    case ValueType::UInt64: put<uint64_t>(out, v.as_uint()); break;
    case ValueType::Int64: put<int64_t>(out, v.as_int()); break;
    case ValueType::Float32: put<float>(out, static_cast<float>(v.as_float())); break;
    case ValueType::Float64: put<double>(out, v.as_float()); break;
    case ValueType::Bool: put<uint8_t>(out, v.as_bool() ? 1 : 0); break;
    case ValueType::String: put_string(out, v.as_string()); break;
    case ValueType::Array:
      put<uint32_t>(out, static_cast<uint32_t>(v.elem_type()));
      put<uint64_t>(out, v.size());
      if (v.elem_type() == ValueType::String) {
        for (const auto& s : v.strings()) put_string(out, s);
      } else if (v.elem_type() == ValueType::Array) {
        for (const auto& item : v.arrays()) put_payload(out, item);
      } else {
        out.write(v.packed().data(), v.packed().size());
      }
      break;
  }
}

uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

}  // namespace

void Writer::set(const std::string& key, Value value) {
  if (key == "general.alignment") {
    if (value.type() != ValueType::UInt32)
      throw_range("gguf writer: general.alignment must be uint32, got " + value.describe());
    const uint64_t a = value.as_uint();
    if (a == 0 || (a & (a - 1)) != 0 || a > kMaxAlignment)
      throw_range("gguf writer: general.alignment " + to_str(a) + " is not a power of two up to " +
                  to_str(kMaxAlignment));
    alignment_ = a;
  }
  for (auto& kv : metadata_) {
    if (kv.key == key) {
      kv.value = std::move(value);
      return;
    }
  }
  metadata_.push_back({key, std::move(value)});
}

void Writer::check_new_tensor(const std::string& name, TensorType type, const std::vector<uint64_t>& dims,
                              uint64_t* n_elements, uint64_t* n_bytes) const {
  const std::string what = "gguf writer: tensor '" + name + "'";
  if (name.empty() || name.size() > kMaxWriterNameBytes)
    throw_range(what + ": name must be 1 to " + to_str(kMaxWriterNameBytes) + " bytes");
  for (const auto& t : tensors_)
    if (t.name == name) throw_range(what + " added twice");
  const TypeInfo* info = find_type_info(static_cast<uint32_t>(type));
  if (!info) throw_range(what + ": unknown ggml type id " + to_str(static_cast<uint32_t>(type)));
  if (dims.empty() || dims.size() > kMaxDims) throw_range(what + ": needs 1 to 4 dimensions, got " + to_str(dims.size()));
  uint64_t n = 1;
  for (uint64_t d : dims) {
    if (d == 0) throw_range(what + ": zero dimension");
    if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / n) throw_range(what + ": too many elements");
    n *= d;
  }
  if (dims[0] % info->block_size != 0)
    throw_range(what + ": row length " + to_str(dims[0]) + " is not a multiple of the " + info->name +
                " block size " + to_str(info->block_size));
  *n_elements = n;
  *n_bytes = n / info->block_size * info->block_bytes;
}

void Writer::add_tensor(const std::string& name, TensorType type, const std::vector<uint64_t>& dims,
                        const float* data) {
  if (type != TensorType::F32 && type != TensorType::F16 && type != TensorType::BF16)
    throw_range("gguf writer: tensor '" + name + "': float data converts only to F32, F16 or BF16");
  if (!data) throw_range("gguf writer: tensor '" + name + "': null data");
  Tensor t{name, type, dims, 0, 0, data, nullptr};
  check_new_tensor(name, type, dims, &t.n_elements, &t.n_bytes);
  tensors_.push_back(std::move(t));
}

void Writer::add_tensor_raw(const std::string& name, TensorType type, const std::vector<uint64_t>& dims,
                            const void* data, size_t n_bytes) {
  Tensor t{name, type, dims, 0, 0, nullptr, data};
  check_new_tensor(name, type, dims, &t.n_elements, &t.n_bytes);
  if (n_bytes != t.n_bytes)
    throw_range("gguf writer: tensor '" + name + "': " + to_str(n_bytes) + " bytes given, " +
                type_info(type).name + " with these dimensions needs " + to_str(t.n_bytes));
  if (!data) throw_range("gguf writer: tensor '" + name + "': null data");
  tensors_.push_back(std::move(t));
}

void Writer::write_to(io::Output& out) const {
  io::VectorOutput header;  // header and tensor infos, to know where the data section starts
  header.write("GGUF", 4);
  put<uint32_t>(header, 3);
  put<uint64_t>(header, tensors_.size());
  put<uint64_t>(header, metadata_.size());
  for (const auto& kv : metadata_) {
    put_string(header, kv.key);
    put<uint32_t>(header, static_cast<uint32_t>(kv.value.type()));
    put_payload(header, kv.value);
  }
  uint64_t offset = 0;
  for (const auto& t : tensors_) {
    put_string(header, t.name);
    put<uint32_t>(header, static_cast<uint32_t>(t.dims.size()));
    for (uint64_t d : t.dims) put<uint64_t>(header, d);
    put<uint32_t>(header, static_cast<uint32_t>(t.type));
    put<uint64_t>(header, offset);
    offset = align_up(offset + t.n_bytes, alignment_);
  }
  out.write(header.bytes.data(), header.bytes.size());
  put_zeros(out, align_up(header.bytes.size(), alignment_) - header.bytes.size());

  for (const auto& t : tensors_) {
    if (t.raw || t.type == TensorType::F32) {
      out.write(t.raw ? t.raw : static_cast<const void*>(t.floats), t.n_bytes);
    } else {
      // Convert in chunks so a large tensor needs no second full-size copy.
      uint16_t buf[4096];
      for (uint64_t i = 0; i < t.n_elements; i += 4096) {
        const uint64_t n = std::min<uint64_t>(4096, t.n_elements - i);
        for (uint64_t j = 0; j < n; ++j)
          buf[j] = t.type == TensorType::F16 ? float_to_half(t.floats[i + j]) : float_to_bf16(t.floats[i + j]);
        out.write(buf, n * sizeof(uint16_t));
      }
    }
    put_zeros(out, align_up(t.n_bytes, alignment_) - t.n_bytes);
  }
}

std::vector<uint8_t> Writer::to_bytes() const {
  io::VectorOutput out;
  write_to(out);
  return std::move(out.bytes);
}

void Writer::write(const std::string& path) const {
  io::write_atomic(path, [this](io::Output& out) { write_to(out); });
}

}  // namespace osd::gguf
