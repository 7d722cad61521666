// GGUF (versions 2 and 3, little-endian) reader and v3 writer.
//
// The reader memory-maps the file (or takes a buffer) and validates everything before anyone
// looks at it: every read is bounds-checked, counts are checked against the bytes left before
// anything is allocated, and tensor data must lie inside the file, aligned and without overlaps.
// Any problem is an osd::Error of kind Io whose message starts with the file name.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "io/file.h"

namespace osd::gguf {

enum class ValueType : uint32_t {
  UInt8 = 0,
  Int8 = 1,
  UInt16 = 2,
  Int16 = 3,
  UInt32 = 4,
  Int32 = 5,
  Float32 = 6,
  Bool = 7,
  String = 8,
  Array = 9,
  UInt64 = 10,
  Int64 = 11,
  Float64 = 12,
};

// "uint8", "string", ...; "unknown" for ids outside the enum.
const char* type_name(ValueType t);

// ggml tensor types (the ids are part of the file format).
enum class TensorType : uint32_t {
  F32 = 0,
  F16 = 1,
  Q4_0 = 2,
  Q4_1 = 3,
  Q5_0 = 6,
  Q5_1 = 7,
  Q8_0 = 8,
  Q8_1 = 9,
  Q2_K = 10,
  Q3_K = 11,
  Q4_K = 12,
  Q5_K = 13,
  Q6_K = 14,
  Q8_K = 15,
  IQ2_XXS = 16,
  IQ2_XS = 17,
  IQ3_XXS = 18,
  IQ1_S = 19,
  IQ4_NL = 20,
  IQ3_S = 21,
  IQ2_S = 22,
  IQ4_XS = 23,
  I8 = 24,
  I16 = 25,
  I32 = 26,
  I64 = 27,
  F64 = 28,
  IQ1_M = 29,
  BF16 = 30,
  TQ1_0 = 34,
  TQ2_0 = 35,
  MXFP4 = 39,
};

struct TypeInfo {
  const char* name;      // "Q4_1"
  uint32_t block_size;   // elements per block
  uint32_t block_bytes;  // bytes per block
};

// nullptr for type ids this table does not know.
const TypeInfo* find_type_info(uint32_t type_id);
const TypeInfo& type_info(TensorType t);

// One metadata value. Arrays keep numbers and bools as packed little-endian bytes (a 50k-entry
// float array is one memcpy to read), strings as std::string, and nested arrays as Values.
class Value {
 public:
  Value() = default;

  static Value u8(uint8_t v);
  static Value i8(int8_t v);
  static Value u16(uint16_t v);
  static Value i16(int16_t v);
  static Value u32(uint32_t v);
  static Value i32(int32_t v);
  static Value f32(float v);
  static Value boolean(bool v);
  static Value str(std::string v);
  static Value u64(uint64_t v);
  static Value i64(int64_t v);
  static Value f64(double v);

  // Arrays; the element type follows the C++ element type.
  static Value array(const std::vector<uint8_t>& v);
  static Value array(const std::vector<int8_t>& v);
  static Value array(const std::vector<uint16_t>& v);
  static Value array(const std::vector<int16_t>& v);
  static Value array(const std::vector<uint32_t>& v);
  static Value array(const std::vector<int32_t>& v);
  static Value array(const std::vector<float>& v);
  static Value array(const std::vector<uint64_t>& v);
  static Value array(const std::vector<int64_t>& v);
  static Value array(const std::vector<double>& v);
  static Value array(std::vector<std::string> v);
  static Value bool_array(const std::vector<bool>& v);
  // An array whose elements are arrays (each item must itself be an array).
  static Value array_of_arrays(std::vector<Value> items);
  // Fixed-size raw form: `count` elements of numeric or bool type `elem`, packed little-endian.
  static Value packed_array(ValueType elem, uint64_t count, std::vector<uint8_t> bytes);
  static Value empty_array(ValueType elem);

  ValueType type() const { return type_; }
  bool is_int() const;    // any integer type (bool is not an integer)
  bool is_float() const;  // float32 or float64
  bool is_array() const { return type_ == ValueType::Array; }

  // Scalar access; each throws osd::Error (Type) when the value has another type.
  int64_t as_int() const;      // any integer type; a uint64 above INT64_MAX throws (Range)
  uint64_t as_uint() const;    // any integer type; a negative value throws (Range)
  double as_float() const;     // float or integer types
  bool as_bool() const;
  const std::string& as_string() const;

  // Array access.
  ValueType elem_type() const { return elem_; }
  uint64_t size() const { return count_; }                             // element count
  const std::vector<std::string>& strings() const;                     // string arrays
  const std::vector<Value>& arrays() const;                            // arrays of arrays
  const std::vector<uint8_t>& packed() const;                          // numeric and bool arrays
  std::vector<float> to_floats() const;    // numeric arrays (float32 copies exactly)
  std::vector<int64_t> to_ints() const;    // integer and bool arrays (uint64 > INT64_MAX throws)

  // The type as text, arrays with their element type: "array[string]".
  std::string describe() const;

 private:
  ValueType type_ = ValueType::UInt8;
  ValueType elem_ = ValueType::UInt8;  // arrays only
  int64_t int_ = 0;                    // integer and bool scalars (uint64 kept as its bit pattern)
  double float_ = 0;                   // float scalars
  std::string str_;
  uint64_t count_ = 0;
  std::vector<uint8_t> packed_;
  std::vector<std::string> strings_;
  std::vector<Value> arrays_;
};

struct KeyValue {
  std::string key;
  Value value;
};

struct TensorInfo {
  std::string name;
  TensorType type = TensorType::F32;
  uint32_t n_dims = 0;                 // as stored, 0..4
  uint64_t ne[4] = {1, 1, 1, 1};       // ggml order: ne[0] varies fastest; unused dims are 1
  uint64_t n_elements = 0;
  uint64_t offset = 0;                 // from the start of the data section
  uint64_t n_bytes = 0;
  const uint8_t* data = nullptr;       // into the file's bytes; valid while the File lives
};

class File {
 public:
  // Memory-maps `path`. Tensor data of a mapped file is aligned to general.alignment in memory.
  static std::unique_ptr<File> open(const std::string& path);
  // Parses a buffer; `name` stands for the file in error messages.
  static std::unique_ptr<File> from_memory(std::vector<uint8_t> bytes, std::string name);

  const std::string& name() const { return name_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t data_offset() const { return data_offset_; }  // start of the tensor data section
  const uint8_t* bytes() const { return bytes_.data(); }
  size_t size() const { return bytes_.size(); }
  void drop_pages(const uint8_t* p, size_t n) const { bytes_.drop_pages(p, n); }  // see io::FileBytes

  // Metadata in file order.
  const std::vector<KeyValue>& metadata() const { return metadata_; }
  const Value* find(const std::string& key) const;
  const Value& get(const std::string& key) const;  // throws Io when missing

  // Typed getters. A missing key (without _or) or a value of the wrong type throws osd::Error
  // (Io) naming the file and the key.
  std::string get_string(const std::string& key) const;
  std::string get_string_or(const std::string& key, const std::string& fallback) const;
  int64_t get_int(const std::string& key) const;  // any integer type
  int64_t get_int_or(const std::string& key, int64_t fallback) const;
  double get_float(const std::string& key) const;  // float or integer types
  double get_float_or(const std::string& key, double fallback) const;
  bool get_bool(const std::string& key) const;
  bool get_bool_or(const std::string& key, bool fallback) const;
  const std::vector<std::string>& get_strings(const std::string& key) const;  // array[string]
  std::vector<float> get_floats(const std::string& key) const;                // numeric array
  std::vector<int64_t> get_ints(const std::string& key) const;                // integer array

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find_tensor(const std::string& name) const;
  const TensorInfo& tensor(const std::string& name) const;  // throws Io when missing

 private:
  File() = default;
  void parse();
  void parse_layout();
  [[noreturn]] void wrong_type(const std::string& key, const Value& v, const char* wanted) const;

  std::string name_;
  io::FileBytes bytes_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<KeyValue> metadata_;
  std::unordered_map<std::string, size_t> key_index_;
  std::vector<TensorInfo> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;
};

// Collects metadata and tensors and writes a GGUF v3 file that llama.cpp can load.
// Tensor data is borrowed: pointers passed to add_tensor* must stay valid until the last
// to_bytes()/write() call. Argument errors throw osd::Error (Range).
class Writer {
 public:
  // Sets `key`, replacing an earlier value in place (metadata keeps insertion order).
  // general.alignment, if set, must be a uint32 power of two; it sets the data alignment.
  void set(const std::string& key, Value value);

  // dims are in ggml order (dims[0] varies fastest), 1 to 4 of them, all > 0.
  // F32, F16 or BF16 from float data, converted (round to nearest even) when written.
  void add_tensor(const std::string& name, TensorType type, const std::vector<uint64_t>& dims,
                  const float* data);
  // Data already in `type`'s layout; n_bytes must be exactly what the dims need.
  void add_tensor_raw(const std::string& name, TensorType type, const std::vector<uint64_t>& dims,
                      const void* data, size_t n_bytes);

  std::vector<uint8_t> to_bytes() const;
  void write_to(io::Output& out) const;
  // Atomic: temp file in the same directory, fsync, rename over `path`, fsync the directory.
  // On failure `path` keeps its old contents and the temp file is removed.
  void write(const std::string& path) const;

 private:
  struct Tensor {
    std::string name;
    TensorType type;
    std::vector<uint64_t> dims;
    uint64_t n_elements;
    uint64_t n_bytes;
    const float* floats;  // converted on write, or
    const void* raw;      // copied as is
  };
  void check_new_tensor(const std::string& name, TensorType type, const std::vector<uint64_t>& dims,
                        uint64_t* n_elements, uint64_t* n_bytes) const;

  std::vector<KeyValue> metadata_;
  std::vector<Tensor> tensors_;
  uint64_t alignment_ = 32;
};

}  // namespace osd::gguf
