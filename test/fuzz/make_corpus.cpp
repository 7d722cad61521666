// Writes the seed corpus for fuzz_gguf into the folder given as argv[1] (test/fuzz/corpus):
// small valid GGUF files made by osd::gguf::Writer, each under 10 KB.
#include <cstdio>
#include <string>
#include <vector>

#include "io/gguf.h"

using osd::gguf::TensorType;
using osd::gguf::Value;
using osd::gguf::ValueType;
using osd::gguf::Writer;

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];

  {
    Writer w;
    w.write(dir + "/empty.gguf");
  }
  {
    Writer w;
    w.set("u8", Value::u8(200));
    w.set("i8", Value::i8(-5));
    w.set("u16", Value::u16(60000));
    w.set("i16", Value::i16(-300));
    w.set("u32", Value::u32(4000000000u));
    w.set("i32", Value::i32(-70000));
    w.set("f32", Value::f32(0.5f));
    w.set("bool", Value::boolean(true));
    w.set("str", Value::str("hello"));
    w.set("u64", Value::u64(1ull << 63));
    w.set("i64", Value::i64(-(1ll << 40)));
    w.set("f64", Value::f64(-1.25));
    w.set("a.u8", Value::array(std::vector<uint8_t>{1, 2}));
    w.set("a.i16", Value::array(std::vector<int16_t>{-1, 2}));
    w.set("a.u32", Value::array(std::vector<uint32_t>{7}));
    w.set("a.f32", Value::array(std::vector<float>{1.5f, -2}));
    w.set("a.f64", Value::array(std::vector<double>{3}));
    w.set("a.i64", Value::array(std::vector<int64_t>{-9}));
    w.set("a.bool", Value::bool_array({true, false}));
    w.set("a.str", Value::array(std::vector<std::string>{"x", "", "yz"}));
    w.set("a.empty", Value::empty_array(ValueType::String));
    w.set("a.nested", Value::array_of_arrays({Value::array(std::vector<int32_t>{1}),
                                              Value::array_of_arrays({Value::array(std::vector<std::string>{"d"})})}));
    w.write(dir + "/metadata_all_types.gguf");
  }
  // A tiny llama-shaped model with float tensors.
  std::vector<float> emb(16 * 8), norm(8, 1.0f), wq(8 * 8);
  for (size_t i = 0; i < emb.size(); ++i) emb[i] = 0.01f * static_cast<float>(i);
  for (size_t i = 0; i < wq.size(); ++i) wq[i] = -0.02f * static_cast<float>(i);
  {
    Writer w;
    w.set("general.architecture", Value::str("llama"));
    w.set("llama.block_count", Value::u32(1));
    w.set("llama.embedding_length", Value::u32(8));
    w.set("llama.rope.freq_base", Value::f32(10000.0f));
    w.add_tensor("token_embd.weight", TensorType::F16, {8, 16}, emb.data());
    w.add_tensor("blk.0.attn_norm.weight", TensorType::F32, {8}, norm.data());
    w.add_tensor("blk.0.attn_q.weight", TensorType::BF16, {8, 8}, wq.data());
    w.write(dir + "/tiny_llama_float.gguf");
    // The same as GGUF v2, which shares this layout.
    std::vector<uint8_t> v2 = w.to_bytes();
    v2[4] = 2;
    osd::io::write_atomic(dir + "/tiny_llama_float_v2.gguf",
                          [&](osd::io::Output& out) { out.write(v2.data(), v2.size()); });
  }
  // Quantised tensors: one block of each of a few formats (contents arbitrary).
  {
    std::vector<uint8_t> q(256);
    for (size_t i = 0; i < q.size(); ++i) q[i] = static_cast<uint8_t>(i * 37);
    Writer w;
    w.set("general.alignment", Value::u32(64));
    w.add_tensor_raw("q4_0", TensorType::Q4_0, {32}, q.data(), 18);
    w.add_tensor_raw("q4_1", TensorType::Q4_1, {32}, q.data(), 20);
    w.add_tensor_raw("q8_0", TensorType::Q8_0, {32, 2}, q.data(), 68);
    w.add_tensor_raw("q4_k", TensorType::Q4_K, {256}, q.data(), 144);
    w.add_tensor_raw("q6_k", TensorType::Q6_K, {256}, q.data(), 210);
    w.write(dir + "/quantized_align64.gguf");
  }
  // Vocabulary-only, like llama.cpp's ggml-vocab-*.gguf files.
  {
    std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
    std::vector<float> scores = {0, 0, 0};
    std::vector<int32_t> types = {2, 3, 3};
    for (int i = 0; i < 40; ++i) {
      tokens.push_back("\xe2\x96\x81t" + std::to_string(i));
      scores.push_back(-static_cast<float>(i));
      types.push_back(1);
    }
    Writer w;
    w.set("general.architecture", Value::str("llama"));
    w.set("tokenizer.ggml.model", Value::str("llama"));
    w.set("tokenizer.ggml.tokens", Value::array(tokens));
    w.set("tokenizer.ggml.scores", Value::array(scores));
    w.set("tokenizer.ggml.token_type", Value::array(types));
    w.set("tokenizer.ggml.merges", Value::array(std::vector<std::string>{"\xe2\x96\x81 t", "t 1"}));
    w.set("tokenizer.ggml.bos_token_id", Value::u32(1));
    w.set("tokenizer.ggml.add_bos_token", Value::boolean(true));
    w.write(dir + "/vocab_only.gguf");
  }
  return 0;
}
