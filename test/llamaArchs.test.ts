// The architectures' own parts against llama.cpp (node-llama-cpp 3.21.1): small random models (every
// weight random, F32) read by both engines from the same file, log-probabilities of every token at
// 24 positions compared.
// - llama: the control.
// - llama with rope_freqs.weight: Llama 3.1 and later divide each RoPE frequency by a factor.
// - qwen2: biases on the query, key and value projections, NeoX rotation.
// - qwen3: each query and key head RMS-normed (attn_q_norm, attn_k_norm) before a NeoX rotation.
// Each feature also shows that it moves the logits by far more than the engines differ on the
// control, so that a model that ignored it would fail; both train (test_train checks their
// gradients against finite differences).
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createTrainer, loadModel, writeRandomModel } from '../lib/index.js';
import { kvString, readGgufLayout, readTensorBytes, writeGgufRaw, type GgufKv, type OutTensor } from '../lib/train/ggufRewrite.js';
import { writeCut } from '../lib/train/draftProbe.js';
import { XorShift } from '../lib/train/trainDefault.js';
import { compareWithLlama, f32, logProbDiff, ourLogProbs, spmVocab } from './helpers/ggufBuild.js';
import { importNodeLlamaCpp } from './helpers/llamaCpp.js';
import { suiteTempDir } from './helpers/tmp.js';

const nlc = await importNodeLlamaCpp('the architectures are not compared with llama.cpp');

const V = 512;
const D = 128;
const HEADS = 4;
const HD = D / HEADS;
const TOKENS = Array.from({ length: 24 }, (_, i) => (i * 37 + 5) % V);

interface Variant {
  arch: 'llama' | 'qwen2' | 'qwen3';
  ropeFactors?: boolean;
  /** Multiplies attn_q and attn_k (the qwen3 norms undo it; nothing else does). */
  qkScale?: number;
  /** Writes the rope factors or the q/k norm gains as 1. */
  neutral?: boolean;
  /** Changes the tensors before writing (malformed files). */
  mutate?: (tensors: OutTensor[]) => OutTensor[];
}

async function buildModel(dir: string, name: string, v: Variant): Promise<string> {
  const src = join(dir, 'random-llama.gguf');
  await writeRandomModel(src, { vocabSize: V, embeddingLength: D, layers: 2, heads: HEADS, kvHeads: 2, feedForwardLength: 256, contextLength: 64, type: 'F32', seed: 5 });
  const file = readGgufLayout(src);
  const rng = new XorShift(17);
  const tensors: OutTensor[] = [];
  for (const t of file.tensors) {
    let data = readTensorBytes(file, t.name);
    if (v.qkScale && /attn_[qk]\.weight$/.test(t.name)) {
      const a = new Float32Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.length));
      data = f32(a.length, (i) => a[i]! * v.qkScale!);
    }
    tensors.push({ name: t.name, dims: t.dims, type: t.type, data });
  }
  if (v.ropeFactors) {
    // Llama 3.1's shape: short wavelengths kept (1), long ones divided (up to 8), a ramp between.
    tensors.push({ name: 'rope_freqs.weight', dims: [HD / 2], type: 0, data: f32(HD / 2, (i) => (v.neutral ? 1 : 1 + (7 * i) / (HD / 2 - 1))) });
  }
  for (let l = 0; l < 2; l++) {
    const p = `blk.${l}.`;
    if (v.arch === 'qwen2')
      for (const [n, len] of [['attn_q.bias', D], ['attn_k.bias', D / 2], ['attn_v.bias', D / 2]] as const)
        tensors.push({ name: p + n, dims: [len], type: 0, data: f32(len, () => rng.normal() * 0.5) });
    if (v.arch === 'qwen3')
      for (const n of ['attn_q_norm.weight', 'attn_k_norm.weight'])
        tensors.push({ name: p + n, dims: [HD], type: 0, data: f32(HD, () => (v.neutral ? 1 : 0.5 + rng.next() * 1.5)) });
  }
  // The architecture's own metadata keys: llama.* renamed.
  const kvs: GgufKv[] = [];
  for (const kv of file.kvs) {
    if (kv.key.startsWith('tokenizer.')) continue;
    if (kv.key === 'general.architecture') kvs.push({ key: kv.key, raw: kvString(v.arch) });
    else kvs.push({ key: kv.key.startsWith('llama.') ? v.arch + kv.key.slice(5) : kv.key, raw: kv.raw });
  }
  const path = join(dir, `${name}.gguf`);
  writeGgufRaw(path, [...kvs, ...spmVocab(V)], v.mutate ? v.mutate(tensors) : tensors);
  return path;
}

describe('architectures', () => {
  const dir = suiteTempDir('osd-archs-');

  it('rope_freqs.weight and the qwen3 norms change the logits (a model ignoring them would differ)', async () => {
    const factors = logProbDiff(
      await ourLogProbs(await buildModel(dir, 'factors', { arch: 'llama', ropeFactors: true }), TOKENS),
      await ourLogProbs(await buildModel(dir, 'factors-1', { arch: 'llama', ropeFactors: true, neutral: true }), TOKENS),
    );
    const control = logProbDiff(
      await ourLogProbs(await buildModel(dir, 'plain', { arch: 'llama' }), TOKENS),
      await ourLogProbs(await buildModel(dir, 'factors-1b', { arch: 'llama', ropeFactors: true, neutral: true }), TOKENS),
    );
    // Factors of 1 are no factors, bit for bit; factors up to 8 move log-probabilities by far more
    // than the llama.cpp bound below.
    expect(control.worst).toBe(0);
    expect(factors.worst).toBeGreaterThan(0.02);
    // RMS norms are scale invariant: scaling W_q and W_k by 8 changes nothing in qwen3 beyond
    // rounding (up to eps), and much in llama.
    const qwen3 = logProbDiff(
      await ourLogProbs(await buildModel(dir, 'q3', { arch: 'qwen3' }), TOKENS),
      await ourLogProbs(await buildModel(dir, 'q3-scaled', { arch: 'qwen3', qkScale: 8 }), TOKENS),
    );
    const llama = logProbDiff(
      await ourLogProbs(await buildModel(dir, 'l', { arch: 'llama' }), TOKENS),
      await ourLogProbs(await buildModel(dir, 'l-scaled', { arch: 'llama', qkScale: 8 }), TOKENS),
    );
    const gains = logProbDiff(
      await ourLogProbs(await buildModel(dir, 'q3-gains', { arch: 'qwen3' }), TOKENS),
      await ourLogProbs(await buildModel(dir, 'q3-gains-1', { arch: 'qwen3', neutral: true }), TOKENS),
    );
    console.log(
      `rope factors move log p by ${factors.worst.toFixed(3)}, the qwen3 norm gains by ${gains.worst.toFixed(3)}; ` +
        `W_q, W_k x 8: qwen3 ${qwen3.worst.toExponential(2)}, llama ${llama.worst.toFixed(3)}`,
    );
    expect(qwen3.worst).toBeLessThan(2e-3); // measured 4.8e-4 (eps, and rounding)
    expect(llama.worst).toBeGreaterThan(0.5);
    expect(gains.worst).toBeGreaterThan(0.1);
  });

  it('saving keeps rope_freqs.weight and the qwen3 norms (the same logits after a round trip)', async () => {
    for (const [name, v] of [['rt-factors', { arch: 'llama', ropeFactors: true }], ['rt-q3', { arch: 'qwen3' }]] as const) {
      const path = await buildModel(dir, name, v);
      const out = join(dir, `${name}-saved.gguf`);
      {
        await using m = await loadModel(path);
        expect(m.info.architecture).toBe(v.arch);
        await m.save(out);
      }
      expect(logProbDiff(await ourLogProbs(path, TOKENS), await ourLogProbs(out, TOKENS)).worst).toBe(0);
    }
  });

  it('trains as drafts: the loss falls, and a snapshot keeps the architecture and the rope factors', async () => {
    const B = 2, T = 12;
    const batch = {
      tokens: new Int32Array(B * T).map((_, i) => (i * 7 + 3) % V),
      targets: new Int32Array(B * T).map((_, i) => (i * 11 + 10) % V),
      batchSize: B,
      seqLen: T,
    };
    for (const [name, v] of [['tr-factors', { arch: 'llama', ropeFactors: true }], ['tr-q3', { arch: 'qwen3' }]] as const) {
      await using m = await loadModel(await buildModel(dir, name, v));
      await using trainer = await createTrainer(m, { lr: 3e-3 });
      const first = await trainer.step(batch);
      let last = first;
      for (let i = 0; i < 30; i++) last = await trainer.step(batch);
      expect(last.loss).toBeLessThan(first.loss * 0.5);
      await using snap = await trainer.snapshot();
      expect(snap.info.architecture).toBe(v.arch);
      const out = join(dir, `${name}-trained.gguf`);
      await snap.save(out);
      // The saved draft reads back with the same logits (its rope factors and head norms kept).
      const a = await snap.forward(TOKENS);
      await using back = await loadModel(out);
      const b = await back.forward(TOKENS);
      expect(Buffer.compare(Buffer.from(a.buffer), Buffer.from(b.buffer))).toBe(0);
    }
  });

  it('a cut of every block is the model itself; a cut of one keeps the architecture and the rope factors', async () => {
    for (const [name, v] of [['cut-factors', { arch: 'llama', ropeFactors: true }], ['cut-q3', { arch: 'qwen3' }]] as const) {
      const path = await buildModel(dir, name, v);
      const all = join(dir, `${name}-all.gguf`);
      const one = join(dir, `${name}-one.gguf`);
      writeCut(readGgufLayout(path), all, { layers: 2 });
      writeCut(readGgufLayout(path), one, { layers: 1 });
      expect(logProbDiff(await ourLogProbs(path, TOKENS), await ourLogProbs(all, TOKENS)).worst).toBe(0);
      await using m = await loadModel(one);
      expect([m.info.architecture, m.info.layers]).toEqual([v.arch, 1]);
    }
  });

  it('osd info names the architecture and its parts', async () => {
    const cli = join(import.meta.dirname, '..', 'lib/cli.ts');
    for (const [name, v, parts] of [
      ['info-factors', { arch: 'llama', ropeFactors: true }, { ropeFactors: true, headNorms: false }],
      ['info-q3', { arch: 'qwen3' }, { ropeFactors: false, headNorms: true }],
    ] as const) {
      const path = await buildModel(dir, name, v);
      const r = spawnSync(process.execPath, ['--import', 'tsx', cli, 'info', path, '--json'], { encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(0);
      expect(JSON.parse(r.stdout)).toMatchObject({ architecture: v.arch, layers: 2, ...parts });
    }
  });

  it('malformed files are refused with errors that name the tensor', async () => {
    const cases: Array<[string, Variant, RegExp]> = [
      ['no-k-norm', { arch: 'qwen3', mutate: (ts) => ts.filter((t) => t.name !== 'blk.1.attn_k_norm.weight') }, /blk\.1\.attn_k_norm\.weight/],
      [
        'short-factors',
        { arch: 'llama', ropeFactors: true, mutate: (ts) => ts.map((t) => (t.name === 'rope_freqs.weight' ? { ...t, dims: [8], data: f32(8, () => 1) } : t)) },
        /rope_freqs\.weight' has 8 elements, expected 16/,
      ],
      [
        'zero-factor',
        { arch: 'llama', ropeFactors: true, mutate: (ts) => ts.map((t) => (t.name === 'rope_freqs.weight' ? { ...t, data: f32(HD / 2, (i) => (i === 3 ? 0 : 1)) } : t)) },
        /rope_freqs\.weight\[3\] must be a finite number > 0, got 0/,
      ],
      ['gemma', { arch: 'gemma' as 'llama' }, /architecture 'gemma' is not supported \(supported: llama, qwen2, qwen3\)/],
    ];
    for (const [name, v, message] of cases) await expect(loadModel(await buildModel(dir, name, v))).rejects.toThrow(message);
  });

  describe.skipIf(!nlc)('against llama.cpp', () => {
    const variants: Array<[string, Variant]> = [
      ['llama', { arch: 'llama' }],
      ['llama with rope_freqs.weight', { arch: 'llama', ropeFactors: true }],
      ['qwen2', { arch: 'qwen2' }],
      ['qwen3', { arch: 'qwen3' }],
    ];
    for (const [label, v] of variants)
      it(`${label}: log-probabilities agree with llama.cpp's`, async () => {
        const { worst, rms } = await compareWithLlama(nlc!, await buildModel(dir, `cmp-${label.replace(/\W+/g, '-')}`, v), TOKENS, 'f32');
        console.log(`${label}: max |d log p| ${worst.toExponential(2)}, rms ${rms.toExponential(2)}`);
        // F32 weights, keys and values, and exact attention in both (llama.cpp's flash attention,
        // its default on the CPU, takes the queries to fp16: 6e-3 apart then): float rounding
        // only, measured 2e-6 to 3.7e-6. Leaving a feature out moves log-probabilities by 3.
        expect(worst).toBeLessThan(5e-5);
      });
  });
});
