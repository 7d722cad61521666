// Small GGUF models built for a test, and their log-probabilities next to llama.cpp's on the same
// file (node-llama-cpp): what test/llamaFormats.test.ts and test/llamaArchs.test.ts share.
import { expect } from 'vitest';
import { loadModel, type KvType } from '../../lib/index.js';
import { kvString } from '../../lib/train/ggufRewrite.js';
import type { Nlc } from './llamaCpp.js';

export function logSoftmax(x: Float32Array | Float64Array): Float64Array {
  let m = -Infinity;
  for (const v of x) m = Math.max(m, v);
  let s = 0;
  for (const v of x) s += Math.exp(v - m);
  const l = Math.log(s) + m;
  return Float64Array.from(x, (v) => v - l);
}

/** n float32 values f(0) .. f(n - 1) as bytes. */
export function f32(n: number, f: (i: number) => number): Buffer {
  const a = new Float32Array(n);
  for (let i = 0; i < n; i++) a[i] = f(i);
  return Buffer.from(a.buffer);
}

// A GGUF array entry (value type 9) of u32 elements type `et`, each written by `put`.
function kvArray<T>(et: number, items: T[], size: (x: T) => number, put: (b: Buffer, at: number, x: T) => void): Buffer {
  const n = items.reduce((a, x) => a + size(x), 0);
  const b = Buffer.alloc(16 + n);
  b.writeUInt32LE(9, 0);
  b.writeUInt32LE(et, 4);
  b.writeBigUInt64LE(BigInt(items.length), 8);
  let at = 16;
  for (const x of items) {
    put(b, at, x);
    at += size(x);
  }
  return b;
}

/** A minimal sentencepiece vocabulary of V tokens (unknown, BOS, EOS, 256 bytes, then pieces). */
export function spmVocab(V: number): Array<{ key: string; raw: Buffer }> {
  const tokens = Array.from({ length: V }, (_, i) =>
    i === 0 ? '<unk>' : i === 1 ? '<s>' : i === 2 ? '</s>' : i < 259 ? `<0x${(i - 3).toString(16).toUpperCase().padStart(2, '0')}>` : `\u2581t${i}`,
  );
  const types = tokens.map((_, i) => (i === 0 ? 2 : i < 3 ? 3 : i < 259 ? 6 : 1));
  return [
    { key: 'tokenizer.ggml.model', raw: kvString('llama') },
    {
      key: 'tokenizer.ggml.tokens',
      raw: kvArray(8, tokens, (t) => 8 + Buffer.byteLength(t), (b, at, t) => {
        b.writeBigUInt64LE(BigInt(Buffer.byteLength(t)), at);
        b.write(t, at + 8, 'utf8');
      }),
    },
    { key: 'tokenizer.ggml.scores', raw: kvArray(6, tokens, () => 4, (b, at, _t) => b.writeFloatLE(-(at % 997), at)) },
    { key: 'tokenizer.ggml.token_type', raw: kvArray(5, types, () => 4, (b, at, t) => b.writeInt32LE(t, at)) },
  ];
}

/** This engine's log-probabilities after each of `tokens` (a causal chain from position 0). */
export async function ourLogProbs(path: string, tokens: number[], kvType: KvType = 'f16'): Promise<Float64Array[]> {
  await using ours = await loadModel(path);
  const V = ours.info.vocabSize;
  await using seq = ours.createSequence({ kvType });
  const logits = await seq.evaluate(tokens);
  return tokens.map((_, i) => logSoftmax(logits.subarray(i * V, (i + 1) * V)));
}

/** The largest and the rms difference between two runs' log-probabilities. */
export function logProbDiff(a: Float64Array[], b: Float64Array[]): { worst: number; rms: number } {
  let worst = 0;
  let sq = 0;
  let count = 0;
  for (let i = 0; i < a.length; i++)
    for (let t = 0; t < a[i]!.length; t++) {
      const d = Math.abs(a[i]![t]! - b[i]![t]!);
      worst = Math.max(worst, d);
      sq += d * d;
      count++;
    }
  return { worst, rms: Math.sqrt(sq / count) };
}

/**
 * Per position, log-probabilities of every token from both engines (llama.cpp on one thread, all V
 * probabilities at temperature 1, without flash attention, which rounds the queries to fp16 on the
 * CPU), both with keys and values cached as `kvType`; returns the largest difference and the rms.
 */
export async function compareWithLlama(nlc: Nlc, path: string, tokens: number[], kvType: KvType = 'f16'): Promise<{ worst: number; rms: number }> {
  const llama = await nlc.getLlama({ gpu: false, build: 'never', logLevel: nlc.LlamaLogLevel.error });
  const lm = await llama.loadModel({ modelPath: path });
  const kv = kvType === 'f32' ? 'F32' : 'F16';
  const ctx = await lm.createContext({ contextSize: 64, threads: 1, flashAttention: false, experimentalKvCacheKeyType: kv, experimentalKvCacheValueType: kv });
  try {
    const res = await ctx.getSequence().controlledEvaluate(
      tokens.map((t) => [t, { generateNext: { probabilities: true, options: { temperature: 1, topK: 0, topP: 1, minP: 0 } } }] as const) as never,
    );
    const mine = await ourLogProbs(path, tokens, kvType);
    const V = mine[0]!.length;
    const theirs = tokens.map((_, i) => {
      const probs = (res[i] as { next: { probabilities: Map<number, number> } }).next.probabilities;
      expect(probs.size).toBe(V);
      const l = new Float64Array(V);
      for (const [t, p] of probs) l[t] = Math.log(p);
      return l;
    });
    return logProbDiff(mine, theirs);
  } finally {
    await ctx.dispose();
    await lm.dispose();
    await llama.dispose();
  }
}
