// Block formats against llama.cpp (node-llama-cpp 3.21.1): small models built so that one tensor in
// the format under test decides the logits, read by both engines from the same file.
// - Embeddings: every layer matrix is zero, so the residual stream is the token's embedding row as
//   dequantised, and the logits an F32 product of it: the two engines agree to float rounding
//   unless they read the blocks differently.
// - Output matrix: F32 embeddings, the output matrix in the format: the engines' quantised products
//   (8-bit activations in both; llama.cpp rounds the 32-value formats' activation scales to fp16).
// Q2_K, IQ4_NL and IQ4_XS have no reference vectors from gguf-py (test_quant checks them against
// ggml's loops); this is where they meet llama.cpp itself. Q3_K .. Q6_K (random blocks: the engine
// does not write them) check the K-quant products end to end; Q4_0 and Q8_0 run as controls.
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { writeRandomModel, type StoreType } from '../lib/index.js';
import { readGgufLayout, readTensorBytes, writeGgufRaw, type OutTensor } from '../lib/train/ggufRewrite.js';
import { XorShift } from '../lib/train/trainDefault.js';
import { compareWithLlama, f32, spmVocab } from './helpers/ggufBuild.js';
import { importNodeLlamaCpp } from './helpers/llamaCpp.js';
import { suiteTempDir } from './helpers/tmp.js';

const nlc = await importNodeLlamaCpp('the block formats are not compared with llama.cpp');

const V = 512;
const D = 512; // a whole number of 256-value blocks, so that no format falls back
const TOKENS = [0, 1, 7, 100, 255, 256, 300, 511];

// The K-quants this engine reads but does not write: GGML type id, block bytes, where each block's
// fp16 factors sit (d, and dmin for the formats with mins) and their value (fp16 bits: 2^-10, or
// 2^-14 for Q6_K, whose scales are full bytes), so that weights stay within about +-1.
const K_QUANTS = {
  Q3_K: { id: 11, bytes: 110, d: [108], f16: 0x1400 },
  Q4_K: { id: 12, bytes: 144, d: [0, 2], f16: 0x1400 },
  Q5_K: { id: 13, bytes: 176, d: [0, 2], f16: 0x1400 },
  Q6_K: { id: 14, bytes: 210, d: [208], f16: 0x0400 },
} as const;
type Format = StoreType | keyof typeof K_QUANTS;

/** V x D random blocks of a K-quant: random bytes, each block's factors set as K_QUANTS says. */
function randomKBlocks(type: keyof typeof K_QUANTS, rng: XorShift): Buffer {
  const k = K_QUANTS[type];
  const data = Buffer.alloc((V * D * k.bytes) / 256);
  for (let i = 0; i < data.length; i++) data[i] = Math.floor(rng.next() * 256);
  for (let b = 0; b < data.length; b += k.bytes) for (const off of k.d) data.writeUInt16LE(k.f16, b + off);
  return data;
}

/**
 * A one-layer model whose layer matrices are all zero: `embd` and `output` in the format (blocks
 * of a random model written as `type`, or random K-quant blocks), the other F32 random values,
 * with a small sentencepiece vocabulary (llama.cpp needs one; both engines read the logits of
 * token ids).
 */
async function buildModel(dir: string, type: Format, quantised: 'embd' | 'output'): Promise<string> {
  const src = join(dir, `random-${type}.gguf`);
  const written: StoreType = type in K_QUANTS ? 'F32' : (type as StoreType);
  await writeRandomModel(src, { vocabSize: V, embeddingLength: D, layers: 1, heads: 4, feedForwardLength: 512, contextLength: 64, type: written, seed: 3 });
  const file = readGgufLayout(src);
  const rng = new XorShift(11);
  const random = (dims: number[]) => f32(dims.reduce((a, b) => a * b, 1), () => rng.normal() * 0.5);
  // The random model ties its output to the embeddings: here both are written, one of them in the format.
  const embd = file.tensors.find((t) => t.name === 'token_embd.weight')!;
  const blocks =
    type in K_QUANTS
      ? { dims: embd.dims, type: K_QUANTS[type as keyof typeof K_QUANTS].id, data: randomKBlocks(type as keyof typeof K_QUANTS, rng) }
      : { dims: embd.dims, type: embd.type, data: readTensorBytes(file, embd.name) };
  const floats = () => ({ dims: embd.dims, type: 0, data: random(embd.dims) });
  const tensors: OutTensor[] = [
    { name: 'token_embd.weight', ...(quantised === 'embd' ? blocks : floats()) },
    { name: 'output.weight', ...(quantised === 'output' ? blocks : floats()) },
  ];
  for (const t of file.tensors) {
    if (t.name === 'token_embd.weight' || t.name === 'output.weight') continue;
    const n = t.dims.reduce((a, b) => a * b, 1);
    // Zero layer matrices; norms' gains in [0.5, 1.5).
    tensors.push({ name: t.name, dims: t.dims, type: 0, data: f32(n, () => (t.dims.length === 1 ? 0.5 + rng.next() : 0)) });
  }
  expect(blocks.type, `${type} is stored in its own type`).not.toBe(0);
  const kvs = [...file.kvs.filter((kv) => !kv.key.startsWith('tokenizer.')), ...spmVocab(V)];
  const path = join(dir, `${type}-${quantised}.gguf`);
  writeGgufRaw(path, kvs, tensors);
  return path;
}

describe.skipIf(!nlc)('block formats read as llama.cpp reads them', () => {
  const dir = suiteTempDir('osd-formats-');
  const types: Format[] = ['IQ4_NL', 'IQ4_XS', 'Q2_K', 'Q3_K', 'Q4_K', 'Q5_K', 'Q6_K', 'Q4_0', 'Q8_0'];
  const k256 = (t: Format) => t === 'Q2_K' || t === 'IQ4_XS' || t in K_QUANTS;

  const compare = (path: string) => compareWithLlama(nlc!, path, TOKENS);

  for (const type of types) {
    it(`${type} embeddings dequantise to llama.cpp's values`, async () => {
      const { worst, rms } = await compare(await buildModel(dir, type, 'embd'));
      console.log(`${type} embeddings: max |d log p| ${worst.toExponential(2)}, rms ${rms.toExponential(2)}`);
      // F32 arithmetic on the same floats in both: rounding only (measured 1.5e-5 to 2e-5). A wrong
      // scale, nibble order or table entry moves log-probabilities by 1e-2 and more.
      expect(worst).toBeLessThan(2e-4);
    });

    it(`${type} output matrix: the quantised products agree with llama.cpp's`, async () => {
      const { worst, rms } = await compare(await buildModel(dir, type, 'output'));
      console.log(`${type} output matrix: max |d log p| ${worst.toExponential(2)}, rms ${rms.toExponential(2)}`);
      // The 256-value formats: 8-bit activations with f32 scales per 256 values in both (Q8_K),
      // exact integer sums, so float rounding only (measured 1e-6 to 1.3e-5, Q4_K and Q5_K the
      // most). The 32-value formats: llama.cpp rounds each activation scale to fp16 (measured 1e-3).
      expect(worst).toBeLessThan(k256(type) ? 5e-5 : 5e-3);
    });
  }
});
