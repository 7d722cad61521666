// Hostile arguments to the N-API bindings: getters (and array element accessors) that run while a
// binding parses its arguments and change what it read before (grow a length, detach or shrink a
// typed array, dispose the object, call back in), SharedArrayBuffers written by another thread
// during a call, and objects of the wrong class where a wrapped object is expected. Each must end
// in a clean JavaScript error or a correct result, never a crash or a read of freed memory.
//
// (A detached array's memory is freed when the garbage collector takes the transferred clone: the
// tests collect garbage inside the getter, with the engine's gc exposed for the purpose, so that
// without the two-phase parsing in native/napi/ the bindings would read or write freed memory.
// AddressSanitizer reports that; a plain build may or may not crash.)
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import v8 from 'node:v8';
import vm from 'node:vm';
import { Worker } from 'node:worker_threads';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { addon } from '../lib/addon.js';
import { distillLoss, verifyChain, verifyChainBatch, verifyTree, writeRandomModel } from '../lib/index.js';
import { suiteTempDir, tempDir } from './helpers/tmp.js';
import { treeOptions } from './helpers/treeFixture.js';

// The raw addon, loosely typed: these tests call it with arguments its types rule out.
// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Loose = any;
const raw = addon as unknown as Record<string, Loose>;

// A full garbage collection, so that memory freed by a detach is really gone.
const gc: () => void = (() => {
  const g = (globalThis as { gc?: () => void }).gc;
  if (g) return g;
  try {
    v8.setFlagsFromString('--expose-gc');
    return vm.runInNewContext('gc') as () => void;
  } catch {
    return () => {};
  }
})();

/**
 * Runs `run` while a worker thread rewrites SharedArrayBuffers as fast as it can: `setup` runs once
 * (the buffers are `w.<name>`), then `step` in a loop (with its counter `i`) until `run` is done.
 */
async function withRacingWriter(buffers: Record<string, SharedArrayBuffer>, setup: string, step: string, run: () => void): Promise<void> {
  const stop = new Int32Array(new SharedArrayBuffer(4));
  const worker = new Worker(
    `const { workerData: w } = require('node:worker_threads');
     const stop = new Int32Array(w.stopBuf);
     ${setup}
     for (let i = 0; Atomics.load(stop, 0) === 0; ++i) { ${step} }`,
    { eval: true, workerData: { ...buffers, stopBuf: stop.buffer } },
  );
  await new Promise((r) => setTimeout(r, 50));
  try {
    run();
  } finally {
    Atomics.store(stop, 0, 1);
    await worker.terminate();
  }
}

/** Detaches a typed array's buffer (transfers it to a clone that is garbage), and collects it. */
function detach(a: ArrayBufferView): void {
  structuredClone(a.buffer, { transfer: [a.buffer as ArrayBuffer] });
  gc();
  gc();
}

function thrown(fn: () => unknown): unknown {
  try {
    fn();
  } catch (e) {
    return e;
  }
  return undefined;
}

function expectThrows(fn: () => unknown, cls: typeof Error, message: RegExp): void {
  const err = thrown(fn);
  expect(err, `expected ${cls.name} matching ${message}`).toBeInstanceOf(cls);
  expect((err as Error).message).toMatch(message);
}

async function expectRejects(p: Promise<unknown>, cls: typeof Error, message: RegExp): Promise<void> {
  let err: unknown;
  try {
    await p;
  } catch (e) {
    err = e;
  }
  expect(err, `expected ${cls.name} matching ${message}`).toBeInstanceOf(cls);
  expect((err as Error).message).toMatch(message);
}

const hasResizable = typeof (ArrayBuffer.prototype as { resize?: unknown }).resize === 'function';

/** A Float32Array over a resizable ArrayBuffer, tracking its length: resize() shrinks it in place. */
function resizable(values: ArrayLike<number>): { array: Float32Array; resize(n: number): void } {
  const Ctor = ArrayBuffer as unknown as new (n: number, o: { maxByteLength: number }) => ArrayBuffer & { resize(n: number): void };
  const buf = new Ctor(values.length * 4, { maxByteLength: values.length * 4 });
  const array = new Float32Array(buf);
  array.set(Array.from(values));
  return { array, resize: (n) => buf.resize(n * 4) };
}

// ---- kernels ------------------------------------------------------------------------------------

const V = 4;
const batchBase = () => ({
  // Three sequences with draft lengths 2, 0, 1: (3 + 3) target rows, 3 draft rows.
  targetLogits: new Float32Array(6 * V).map((_, i) => i % 5),
  draftLogits: new Float32Array(3 * V).map((_, i) => i % 3),
  draftTokens: Int32Array.from([0, 1, 2]),
  draftLengths: Int32Array.from([2, 0, 1]),
  vocabSize: V,
  sampling: { temperature: 1 } as object,
  seed: 1 as unknown,
  streams: undefined as unknown,
});

/** options with `key` turned into a getter that runs hook() once and then answers the value. */
function withGetter<T extends object>(options: T, key: string, hook: () => void): T {
  const o = { ...options } as Record<string, unknown>;
  const value = o[key];
  delete o[key];
  let fired = false;
  Object.defineProperty(o, key, {
    enumerable: true,
    get() {
      if (!fired) {
        fired = true;
        hook();
      }
      return value;
    },
  });
  return o as T;
}

describe('verifyChainBatch', () => {
  const expected = verifyChainBatch(batchBase() as never);

  it.each(['sampling', 'streams', 'seed'])('a %s getter that grows draftLengths after the sum was taken changes nothing', (key) => {
    const o = batchBase();
    if (key === 'streams') o.streams = [0, 1, 2];
    const r = verifyChainBatch(withGetter(o, key, () => {
      o.draftLengths[0] = 1000;
      o.draftLengths[2] = 1 << 30;
    }) as never);
    // The lengths were copied when read: the call ran on [2, 0, 1].
    expect(r).toEqual(expected);
  });

  it('a getter that rewrites draftTokens out of range after they were read changes nothing', () => {
    const o = batchBase();
    const r = verifyChainBatch(withGetter(o, 'seed', () => o.draftTokens.fill(-(2 ** 31))) as never);
    expect(r).toEqual(expected);
  });

  it.each(['sampling', 'streams', 'seed', '_fault'])('a %s getter that detaches the logits is a TypeError naming them', (key) => {
    for (const arg of ['targetLogits', 'draftLogits'] as const) {
      const o = batchBase();
      if (key === 'streams') o.streams = [0, 1, 2];
      expectThrows(
        () => verifyChainBatch(withGetter(o, key, () => detach(o[arg])) as never),
        TypeError,
        new RegExp(`^${arg} is detached`),
      );
    }
  });

  it('a getter that detaches draftLengths or draftTokens after they were read changes nothing', () => {
    for (const arg of ['draftLengths', 'draftTokens'] as const) {
      const o = batchBase();
      expect(verifyChainBatch(withGetter(o, 'seed', () => detach(o[arg])) as never)).toEqual(expected);
    }
  });

  it('a per-sequence sampling getter that detaches the target logits is a TypeError', () => {
    const o = batchBase();
    const s1 = { get temperature() { detach(o.targetLogits); return 1; } };
    o.sampling = [{ temperature: 1 }, s1, { temperature: 1 }];
    expectThrows(() => verifyChainBatch(o as never), TypeError, /^targetLogits is detached/);
  });

  it('a streams element getter that grows draftLengths changes nothing', () => {
    const o = batchBase();
    const streams = [0, 1, 2];
    Object.defineProperty(streams, 1, { get: () => { o.draftLengths[1] = 500; return 1; } });
    o.streams = streams;
    expect(verifyChainBatch(o as never)).toEqual(expected);
  });

  it.skipIf(!hasResizable)('a getter that shrinks a resizable targetLogits is a RangeError', () => {
    const o = batchBase();
    const t = resizable(o.targetLogits);
    o.targetLogits = t.array;
    expectThrows(() => verifyChainBatch(withGetter(o, 'seed', () => t.resize(2)) as never), RangeError, /^targetLogits has length 2, expected/);
  });

  it('draftLengths and draftTokens in a SharedArrayBuffer that another thread rewrites: errors or results, no crash', async () => {
    const B = 8;
    const lengthsBuf = new SharedArrayBuffer(4 * B);
    const tokensBuf = new SharedArrayBuffer(4 * 4 * B);
    const lengths = new Int32Array(lengthsBuf).fill(4);
    const tokens = new Int32Array(tokensBuf).fill(1);
    let ok = 0;
    let errors = 0;
    // The writer flips lengths between 4 and huge, tokens between valid and far out of range.
    await withRacingWriter(
      { lengthsBuf, tokensBuf },
      'const l = new Int32Array(w.lengthsBuf), t = new Int32Array(w.tokensBuf);',
      'l.fill(i & 1 ? 4 : 1 << 28); t.fill(i & 2 ? 1 : -(2 ** 31) + (i & 0xffff));',
      () => {
        for (let i = 0; i < 3000; ++i) {
          try {
            const r = verifyChainBatch({
              targetLogits: new Float32Array(5 * B * V).fill(0),
              draftLogits: new Float32Array(4 * B * V).fill(0),
              draftTokens: tokens,
              draftLengths: lengths,
              vocabSize: V,
              sampling: { temperature: 1 },
              seed: i,
            });
            expect(r.offsets.length).toBe(B + 1);
            expect(r.offsets[B]).toBeLessThanOrEqual(5 * B);
            for (const x of r.tokens) expect(x >= 0 && x < V).toBe(true);
            ++ok;
          } catch (e) {
            expect(e).toBeInstanceOf(RangeError);
            expect((e as Error).message).toMatch(/draftTokens|targetLogits|draftLogits/);
            ++errors;
          }
        }
      },
    );
    expect(ok + errors).toBe(3000);
  });
});

describe('verifyTree', () => {
  const treeBase = () => treeOptions(V);
  const expected = verifyTree(treeBase() as never);

  it('a getter that rewrites parents and tokens out of range after they were read changes nothing', () => {
    const o = treeBase();
    const r = verifyTree(withGetter(o, 'seed', () => {
      o.parents.fill(1 << 30);
      o.tokens.fill(-5);
    }) as never);
    expect(r).toEqual(expected);
  });

  it.each(['seed', 'stream', 'draftLogits'])('a %s getter that detaches the target logits is a TypeError', (key) => {
    const o = { ...treeBase(), stream: 0 };
    expectThrows(() => verifyTree(withGetter(o, key, () => detach(o.targetLogits)) as never), TypeError, /^targetLogits is detached/);
  });

  it('a getter that detaches the draft logits is a TypeError', () => {
    const o = treeBase();
    expectThrows(() => verifyTree(withGetter(o, 'seed', () => detach(o.draftLogits)) as never), TypeError, /^draftLogits is detached/);
  });
});

describe('verifyChain and distillLoss (options read in JavaScript)', () => {
  const chainBase = () => ({
    targetLogits: Float32Array.from([0, 1, 2, 3, 1, 0, 0, 1, 2, 2, 0, 0]),
    draftLogits: Float32Array.from([1, 1, 1, 1, 0, 2, 0, 0]),
    draftTokens: Int32Array.from([0, 1]),
    vocabSize: V,
    sampling: { temperature: 1 },
    seed: 1,
  });

  it('verifyChain: a _fault whose toString detaches the logits is a TypeError, not a read of freed memory', () => {
    const o = chainBase();
    const fault = { toString: () => { detach(o.targetLogits); return 'residual-no-clamp'; } };
    expectThrows(() => verifyChain({ ...o, _fault: fault } as never), TypeError, /^targetLogits is detached/);
  });

  it('verifyChain: a getter that detaches an array before the call is a TypeError naming it', () => {
    for (const arg of ['targetLogits', 'draftLogits', 'draftTokens'] as const) {
      const o = chainBase();
      expectThrows(() => verifyChain(withGetter(o, 'seed', () => detach(o[arg])) as never), TypeError, new RegExp(`^${arg} is detached`));
    }
  });

  it('verifyChain: draftTokens in a SharedArrayBuffer that another thread rewrites: errors or results, no crash', async () => {
    const g = 16;
    const tokensBuf = new SharedArrayBuffer(4 * g);
    const tokens = new Int32Array(tokensBuf).fill(1);
    const target = new Float32Array((g + 1) * V).fill(0);
    const draft = new Float32Array(g * V).fill(0);
    await withRacingWriter({ tokensBuf }, 'const t = new Int32Array(w.tokensBuf);', 't.fill(i & 1 ? 1 : 1 << 30);', () => {
      for (let i = 0; i < 3000; ++i) {
        try {
          const r = verifyChain({ targetLogits: target, draftLogits: draft, draftTokens: tokens, vocabSize: V, sampling: { temperature: 1 }, seed: i });
          for (const x of r.tokens) expect(x >= 0 && x < V).toBe(true);
        } catch (e) {
          expect(e).toBeInstanceOf(RangeError);
          expect((e as Error).message).toMatch(/^draftTokens\[\d+\] = \d+ is out of range/);
        }
      }
    });
  });

  const W = 5;
  const sparse = () => ({
    kind: 'forward-kl' as const,
    studentLogits: new Float32Array(2 * W).map((_, i) => Math.sin(i)),
    teacher: { indices: Int32Array.from([0, 3, 4, 1]), probs: Float32Array.from([0.5, 0.2, 0.6, 0.1]) },
    vocabSize: W,
  });

  it('distillLoss: getters that detach arrays before the call are TypeErrors naming them', () => {
    const o = sparse();
    expectThrows(() => distillLoss(withGetter(o, 'vocabSize', () => detach(o.studentLogits))), TypeError, /^studentLogits is detached/);
    const p = sparse();
    const teacher = withGetter(p.teacher, 'probs', () => detach(p.teacher.indices));
    expectThrows(() => distillLoss({ ...p, teacher }), TypeError, /^teacher\.indices is detached/);
  });

  it('distillLoss: teacher.indices and mask in a SharedArrayBuffer that another thread rewrites: errors or results, no crash', async () => {
    const N = 64;
    const k = 2;
    const idsBuf = new SharedArrayBuffer(4 * N * k);
    const maskBuf = new SharedArrayBuffer(N);
    const ids = new Int32Array(idsBuf);
    for (let r = 0; r < N; ++r) ids.set([0, 1], r * k);
    const mask = new Uint8Array(maskBuf).fill(1);
    const student = new Float32Array(N * W).map((_, i) => Math.sin(i));
    const probs = new Float32Array(N * k).fill(0.4);
    // Rows are masked off and their ids made huge, then restored: a row checked while masked and
    // read while unmasked would index far outside the logits.
    await withRacingWriter(
      { idsBuf, maskBuf },
      'const ids = new Int32Array(w.idsBuf), mask = new Uint8Array(w.maskBuf);',
      'if (i & 1) { mask.fill(0); ids.fill(1 << 29); } else { for (let r = 0; r < ids.length; r += 2) { ids[r] = 0; ids[r + 1] = 1; } mask.fill(1); }',
      () => {
        for (let i = 0; i < 1500; ++i) {
          try {
            const r = distillLoss({ kind: 'forward-kl', studentLogits: student, teacher: { indices: ids, probs }, vocabSize: W, mask });
            expect(Number.isNaN(r.loss)).toBe(false);
          } catch (e) {
            expect(e).toBeInstanceOf(RangeError);
            expect((e as Error).message).toMatch(/^teacher/);
          }
        }
      },
    );
  });
});

describe('adamwStep', () => {
  const base = () => ({
    params: new Float32Array(1 << 12).fill(1),
    grads: new Float32Array(1 << 12).fill(0.5),
    m: new Float32Array(1 << 12),
    v: new Float32Array(1 << 12),
    step: 1,
    lr: 1e-3,
  });

  it.each(['params', 'grads', 'm', 'v'] as const)('an lr getter that detaches %s is a TypeError naming it', (arg) => {
    const o = base();
    expectThrows(() => raw.adamwStep(withGetter(o, 'lr', () => detach(o[arg]))), TypeError, new RegExp(`^${arg} is detached`));
  });

  it('a getter that detaches an array it read earlier (params from the grads getter) is a TypeError', () => {
    const o = base();
    expectThrows(() => raw.adamwStep(withGetter(o, 'grads', () => detach(o.params))), TypeError, /^params is detached/);
  });

  it.skipIf(!hasResizable)('a getter that shrinks a resizable params is a RangeError', () => {
    const o = base();
    const p = resizable(o.params);
    expectThrows(() => raw.adamwStep(withGetter({ ...o, params: p.array }, 'eps', () => p.resize(7))), RangeError, /^grads has length 4096, expected params\.length = 7/);
  });

  it('getters that do nothing give the same update as plain options', () => {
    const a = base();
    const b = base();
    raw.adamwStep(a);
    raw.adamwStep(withGetter(b, 'lr', () => {}));
    expect(b.params).toEqual(a.params);
  });
});

// ---- writeGguf ----------------------------------------------------------------------------------

describe('writeGguf', () => {
  it('a later tensor getter that detaches an earlier tensor is a TypeError, and no file is written', () => {
    const dir = tempDir('osd-hostile-');
    const path = join(dir, 'a.gguf');
    const victim = new Float32Array(1 << 14).fill(1);
    const a = { name: 'a', type: 'F32', dims: [1 << 14], data: victim };
    const b = withGetter({ name: 'b', type: 'F32', dims: [4], data: new Float32Array(4) }, 'name', () => detach(victim));
    expectThrows(() => raw.writeGguf(path, { metadata: [], tensors: [a, b] }), TypeError, /^spec\.tensors\[0\]\.data is detached/);
    expect(existsSync(path)).toBe(false);
  });

  it('argument errors still come in argument order (a repeated name before a later bad entry)', () => {
    const dir = tempDir('osd-hostile-');
    const t = (name: string) => ({ name, type: 'F32', dims: [2], data: new Float32Array(2) });
    expectThrows(
      () => raw.writeGguf(join(dir, 'x.gguf'), { metadata: [], tensors: [t('a'), t('a'), { ...t('c'), type: 'Q9' }] }),
      RangeError,
      /tensor 'a' added twice/,
    );
  });

  it.skipIf(!hasResizable)('a getter that shrinks an earlier tensor is a RangeError', () => {
    const dir = tempDir('osd-hostile-');
    const r = resizable(new Float32Array(8));
    const b = withGetter({ name: 'b', type: 'F32', dims: [4], data: new Float32Array(4) }, 'dims', () => r.resize(3));
    expectThrows(
      () => raw.writeGguf(join(dir, 'x.gguf'), { metadata: [], tensors: [{ name: 'a', type: 'F32', dims: [8], data: r.array }, b] }),
      RangeError,
      /^spec\.tensors\[0\]\.data has 3 elements, dims need 8/,
    );
  });

  it('array element getters that grow the array do not write past what was read', () => {
    const dir = tempDir('osd-hostile-');
    const path = join(dir, 'g.gguf');
    const strs = ['a', 'b'];
    Object.defineProperty(strs, 0, { enumerable: true, get: () => { for (let i = 0; i < 1000; ++i) strs.push('z'); return 'a'; } });
    const nums = [1, 2];
    Object.defineProperty(nums, 0, { enumerable: true, get: () => { for (let i = 0; i < 1000; ++i) nums.push(9); return 1; } });
    const dims = [2, 2];
    Object.defineProperty(dims, 0, { enumerable: true, get: () => { dims.push(1, 1, 1, 1, 1); return 2; } });
    raw.writeGguf(path, {
      metadata: [
        { key: 's', type: 'string[]', value: strs },
        { key: 'f', type: 'f32[]', value: nums },
      ],
      tensors: [{ name: 't', type: 'F32', dims, data: new Float32Array(4) }],
    });
    const m = raw.readGgufMetadata(path);
    expect(m.metadata.s).toEqual(['a', 'b']);
    expect(m.metadata.f).toEqual([1, 2]);
    expect(m.tensors[0].dims).toEqual([2, 2]);
  });

  it('a getter that answers a string first and a number after is read once', () => {
    const dir = tempDir('osd-hostile-');
    let n = 0;
    const e = { get key() { return n++ === 0 ? 'k' : 5; }, type: 'u32', value: 1 };
    raw.writeGguf(join(dir, 'k.gguf'), { metadata: [e] });
    expect(raw.readGgufMetadata(join(dir, 'k.gguf')).metadata).toMatchObject({ k: 1 });
  });
});

// ---- models, sequences, sampling, trainers, tokenizers --------------------------------------------

describe('models and sequences', () => {
  const dir = suiteTempDir('osd-hostile-model-');
  const config = { vocabSize: 64, embeddingLength: 16, layers: 1, heads: 2, feedForwardLength: 32, contextLength: 32, seed: 1 };
  let model: Loose;
  let tok: Loose;
  beforeAll(async () => {
    await writeRandomModel(join(dir, 'm.gguf'), config);
    model = await raw.loadModel(join(dir, 'm.gguf'));
    tok = new raw.Tokenizer({ model: 'gpt2', tokens: ['a', 'b'], merges: [] });
  });
  afterAll(() => model?.dispose());

  /** Objects that are not NativeModels but may look like one. */
  const impostors = () => {
    const plain = Object.setPrototypeOf({}, raw.NativeModel.prototype);
    const reprotoTok = Object.setPrototypeOf(new raw.Tokenizer({ model: 'gpt2', tokens: ['a'], merges: [] }), raw.NativeModel.prototype);
    const seq = new raw.NativeSequence(model, 8);
    return { tokenizer: tok, plain, reprotoTok, sequence: seq, number: 5, undefined };
  };

  it('a Tokenizer, or any object given the NativeModel prototype, is a TypeError where a model goes', async () => {
    for (const [what, bad] of Object.entries(impostors())) {
      expectThrows(() => new raw.NativeSequence(bad, 4), TypeError, /^model must be a NativeModel$/);
      expectThrows(() => model.setWeights(bad), TypeError, /^weights must be a NativeModel$/);
      if (typeof bad === 'object') {
        expectThrows(() => raw.convertModel(bad, { type: 'F32' }), TypeError, /^model must be a NativeModel$/);
        expectThrows(() => raw.saveModel(bad, join(dir, `x-${what}.gguf`)), TypeError, /^model must be a NativeModel$/);
        await expectRejects(Promise.resolve().then(() => raw.createTrainer(bad)), TypeError, /^source must be a loaded model$/);
      }
    }
    // A real model still works everywhere.
    const seq = new raw.NativeSequence(model, 8);
    expect(seq.capacity).toBe(8);
    expect((await seq.evaluate(Int32Array.of(1, 2))).length).toBe(2 * 64);
    const converted = await raw.convertModel(model, { type: 'F32' });
    expect(converted.info().vocabSize).toBe(64);
    model.setWeights(converted);
    converted.dispose();
  });

  it('a NativeModel is a TypeError where a Tokenizer goes', () => {
    expectThrows(() => new raw.TokenizerStreamDecoder(model), TypeError, /^tokenizer must be a Tokenizer$/);
    expectThrows(() => new raw.TokenizerStreamDecoder(Object.setPrototypeOf({}, raw.Tokenizer.prototype)), TypeError, /^tokenizer must be a Tokenizer$/);
  });

  it('the constructors take only the handles this addon makes', () => {
    for (const bad of [undefined, 5, {}, tok])
      expectThrows(() => new raw.NativeModel(bad), TypeError, /NativeModel is created by loadModel/);
    for (const bad of [undefined, 5, {}, model]) expectThrows(() => new raw.NativeTrainer(bad), TypeError, /NativeTrainer is created by createTrainer/);
  });

  it('accessors and methods called on another class\'s instance are TypeErrors, not reads of it as that class', () => {
    const seq = new raw.NativeSequence(model, 8);
    const dec = new raw.TokenizerStreamDecoder(tok);
    const accessors: Array<[object, string]> = [
      [raw.NativeModel.prototype, 'disposed'],
      [raw.NativeSequence.prototype, 'length'],
      [raw.NativeSequence.prototype, 'capacity'],
      [raw.NativeTrainer.prototype, 'steps'],
      [raw.NativeTrainer.prototype, 'parameterCount'],
      [raw.TokenizerStreamDecoder.prototype, 'pendingBytes'],
      ...['vocabSize', 'bos', 'eos', 'unk', 'pad', 'addBos', 'addEos', 'addSpacePrefix', 'model', 'pre'].map(
        (k) => [raw.Tokenizer.prototype, k] as [object, string],
      ),
    ];
    const receivers = [model, seq, tok, dec, {}, Object.setPrototypeOf({}, raw.NativeSequence.prototype)];
    for (const [proto, key] of accessors) {
      const get = Object.getOwnPropertyDescriptor(proto, key)!.get!;
      for (const r of receivers) {
        if (Object.getPrototypeOf(r) === proto && r !== receivers[5]) expect(() => get.call(r)).not.toThrow();
        else expectThrows(() => get.call(r), TypeError, /Illegal invocation/);
      }
    }
    expectThrows(() => raw.NativeSequence.prototype.truncate.call(tok, 0), TypeError, /Illegal invocation/);
    expectThrows(() => raw.Tokenizer.prototype.decode.call(seq, Int32Array.of(0)), TypeError, /Illegal invocation/);
    // The accessors still work on their own instances.
    expect(seq.capacity).toBe(8);
    expect(seq.length).toBe(0);
    expect(model.disposed).toBe(false);
    expect(tok.vocabSize).toBe(2);
    expect(dec.pendingBytes).toBe(0);
  });

  it('draft: an options getter that detaches tokens is a TypeError naming them', async () => {
    const seq = new raw.NativeSequence(model, 16);
    const tokens = Int32Array.from([1, 2, 3]);
    const opts = withGetter({ count: 2, sampling: { temperature: 1 }, seed: 1 }, 'seed', () => detach(tokens));
    expectThrows(() => seq.draft(tokens, opts), TypeError, /^tokens is detached/);
    // The sequence is not left busy.
    const r = await seq.draft(Int32Array.from([1, 2, 3]), { count: 2, sampling: { temperature: 1 }, seed: 1 });
    expect(r.tokens.length).toBe(2);
  });

  it('draft: a getter that rewrites tokens out of range before they are read', () => {
    const seq = new raw.NativeSequence(model, 16);
    const tokens = Int32Array.from([1, 2, 3]);
    // Tokens are read (copied) after every getter ran: the rewrite is seen, and refused.
    expectThrows(
      () => seq.draft(tokens, withGetter({ count: 2, sampling: { temperature: 0 } }, 'sampling', () => tokens.fill(1 << 30))),
      RangeError,
      /^tokens\[0\] = 1073741824 is out of range/,
    );
  });

  it('draft: a getter that disposes the sequence, or starts an evaluation on it, is an error', async () => {
    const a = new raw.NativeSequence(model, 16);
    expectThrows(
      () => a.draft(Int32Array.of(1), withGetter({ count: 2, sampling: { temperature: 0 } }, 'sampling', () => a.dispose())),
      Error,
      /^the sequence was disposed$/,
    );
    const b = new raw.NativeSequence(model, 16);
    let running: Promise<unknown> | undefined;
    expectThrows(
      () => b.draft(Int32Array.of(1), withGetter({ count: 2, sampling: { temperature: 0 } }, 'sampling', () => { running = b.evaluate(Int32Array.of(1)); })),
      Error,
      /busy/,
    );
    expect((await running) as Float32Array).toHaveLength(64);
  });

  /** A target and a draft sequence of `capacity`, each holding the tokens 1, 2. */
  async function sequencePair(capacity: number): Promise<Loose[]> {
    const t = new raw.NativeSequence(model, capacity);
    const d = new raw.NativeSequence(model, capacity);
    await t.evaluate(Int32Array.of(1, 2));
    await d.evaluate(Int32Array.of(1, 2));
    return [t, d];
  }

  it('chainStep: getters that dispose either sequence or start an evaluation on it are errors; pending is copied late', async () => {
    const opts = (key: string, hook: () => void) => withGetter({ last: 1, count: 2, sampling: { temperature: 0 }, seed: 1 }, key, hook);
    const fresh = () => sequencePair(16);
    let [t, d] = await fresh();
    for (const bad of [undefined, 5, {}, tok, model, Object.setPrototypeOf({}, raw.NativeSequence.prototype)])
      expectThrows(() => t.chainStep(bad, Int32Array.of(3), { last: 1, count: 2 }), TypeError, /^draft must be a NativeSequence$/);
    expectThrows(() => t.chainStep(d, Int32Array.of(3), opts('last', () => t.dispose())), Error, /^the sequence was disposed$/);
    [t, d] = await fresh();
    expectThrows(() => t.chainStep(d, Int32Array.of(3), opts('sampling', () => d.dispose())), Error, /^the sequence was disposed$/);
    [t, d] = await fresh();
    let running: Promise<unknown> | undefined;
    expectThrows(() => t.chainStep(d, Int32Array.of(3), opts('targetStream', () => { running = d.evaluate(Int32Array.of(1)); })), Error, /busy/);
    await running;
    const pending = Int32Array.of(3);
    expectThrows(() => t.chainStep(d, pending, opts('draftStream', () => detach(pending))), TypeError, /^pending is detached/);
    const out = Int32Array.of(3);
    expectThrows(() => t.chainStep(d, out, opts('seed', () => out.fill(1 << 30))), RangeError, /^pending\[0\] = 1073741824 is out of range/);
    // Neither sequence is left busy.
    const r = await t.chainStep(d, Int32Array.of(3), { last: 1, count: 2, sampling: { temperature: 1 }, seed: 2 });
    expect(r.draftTokens).toHaveLength(2);
    expect(t.length).toBe(3 + r.acceptedCount);
  });

  it('chainRun: getters that dispose either sequence are errors; stopTokens are copied when read', async () => {
    const opts = (key: string, hook: () => void, extra = {}) =>
      withGetter({ last: 1, count: 2, sampling: { temperature: 0 }, seed: 1, maxSteps: 3, stopTokens: Int32Array.of(5), keepLogits: false, ...extra }, key, hook);
    const fresh = () => sequencePair(32);
    let [t, d] = await fresh();
    expectThrows(() => t.chainRun(d, Int32Array.of(3), opts('maxSteps', () => t.dispose())), Error, /^the sequence was disposed$/);
    [t, d] = await fresh();
    expectThrows(() => t.chainRun(d, Int32Array.of(3), opts('keepLogits', () => d.dispose())), Error, /^the sequence was disposed$/);
    [t, d] = await fresh();
    const stop = Int32Array.of(5);
    const r = await t.chainRun(d, Int32Array.of(3), opts('keepLogits', () => stop.fill(1 << 30), { stopTokens: stop }));
    expect(r.acceptedCounts.length).toBeGreaterThanOrEqual(1);
    expectThrows(() => t.chainRun(d, Int32Array.of(3), { last: 1, count: 2, sampling: { temperature: 0 }, maxMs: -1 }), RangeError, /maxMs/);
  });

  it('keepPath takes a path in a SharedArrayBuffer (copied before it is checked; no writer races it here)', async () => {
    const seq = new raw.NativeSequence(model, 16);
    await seq.evaluate(Int32Array.of(1, 2, 3), Int32Array.of(-1, 0, 0));
    const path = new Int32Array(new SharedArrayBuffer(8));
    path.set([0, 2]);
    seq.keepPath(0, path);
    expect(seq.length).toBe(2);
  });

  it('convertModel / saveModel: a type getter that disposes the model does not free it under the call', async () => {
    const m = await raw.loadModel(join(dir, 'm.gguf'));
    const converted = await raw.convertModel(m, { get type() { m.dispose(); gc(); return 'F16'; } });
    expect(converted.info().matrixType).toBe('F16');
    converted.dispose();
    const m2 = await raw.loadModel(join(dir, 'm.gguf'));
    await raw.saveModel(m2, join(dir, 'saved.gguf'), { get type() { m2.dispose(); gc(); return 'F32'; } });
    expect(existsSync(join(dir, 'saved.gguf'))).toBe(true);
  });

  it('sampleLogits: a getter that detaches logits is a TypeError naming them', () => {
    for (const key of ['sampling', 'seed', 'stream', 'position', 'exclude']) {
      const logits = new Float32Array(1 << 12).fill(0.5);
      const o = withGetter(
        { logits, vocabSize: 1 << 12, sampling: { temperature: 1 }, seed: 1, stream: 0, position: 0, exclude: Int32Array.of(1) },
        key,
        () => detach(logits),
      );
      expectThrows(() => raw.sampleLogits(o), TypeError, /^logits is detached/);
    }
    // Without hostile getters the same options sample a token.
    const t = raw.sampleLogits({ logits: new Float32Array(8), vocabSize: 8, sampling: { temperature: 1 }, seed: 1, position: 0, exclude: Int32Array.of(1) });
    expect(t >= 0 && t < 8 && t !== 1).toBe(true);
  });

  it('sampleLogits: errors keep their order and messages', () => {
    const base = { logits: new Float32Array(8), vocabSize: 8, sampling: { temperature: 1 }, seed: 1, position: 0 };
    expectThrows(() => raw.sampleLogits({ ...base, logits: new Float32Array(7) }), RangeError, /^logits has length 7, expected vocabSize = 8$/);
    expectThrows(() => raw.sampleLogits({ ...base, position: undefined }), TypeError, /^position is required$/);
    expectThrows(() => raw.sampleLogits({ ...base, seed: undefined }), TypeError, /^seed is required/);
    expect(raw.sampleLogits({ ...base, seed: undefined, sampling: { temperature: 0 } })).toBe(0);
    expectThrows(() => raw.sampleLogits({ ...base, exclude: Int32Array.of(9) }), RangeError, /^exclude\[0\] = 9 is out of range/);
    expectThrows(() => raw.sampleLogits({ ...base, exclude: Int32Array.of(1), sampling: { temperature: 0 } }), TypeError, /^exclude needs temperature > 0/);
  });
});

describe('trainers', () => {
  const config = { vocabSize: 53, embeddingLength: 16, layers: 1, heads: 2, feedForwardLength: 32, contextLength: 32 };
  const batch = () => ({
    tokens: new Int32Array(8).map((_, i) => (i * 7 + 3) % 53),
    batchSize: 2,
    seqLen: 4,
    teacher: { indices: new Int32Array(8 * 2).map((_, i) => (i % 2 === 0 ? 1 : 2)), probs: new Float32Array(16).fill(0.4) },
  });

  it('a teacher getter that detaches or rewrites an array already read changes nothing', async () => {
    const t = await raw.createTrainer({ config, seed: 1 });
    const want = await t.evalLoss(batch());
    const b = batch();
    b.teacher = withGetter(b.teacher, 'probs', () => {
      b.teacher.indices.fill(1 << 30);
      detach(b.teacher.indices);
    });
    const b2 = withGetter(b, 'temperature', () => detach(b.tokens));
    expect(await t.evalLoss(b2)).toBe(want);
    await t.dispose();
  });

  it('a batch getter that disposes the trainer is an error; configure from a getter does not deadlock', async () => {
    const t = await raw.createTrainer({ config, seed: 1 });
    expectThrows(() => t.step(withGetter(batch(), 'temperature', () => void t.dispose())), Error, /^the trainer was disposed$/);
    const u = await raw.createTrainer({ config, seed: 1 });
    u.configure({ get lr() { u.configure({ lr: 0.5 }); return 0.25; } });
    const r = await u.step(batch());
    expect(r.lr).toBeCloseTo(0.25);
    await u.dispose();
  });
});

describe('tokenizers', () => {
  it('a vocabulary whose getters grow its arrays, or answer differently the second time, is read once', () => {
    const tokens = ['a', 'b', 'ab'];
    Object.defineProperty(tokens, 0, { enumerable: true, get: () => { for (let i = 0; i < 1000; ++i) tokens.push('q' + i); return 'a'; } });
    let n = 0;
    const vocab = { get model() { return n++ === 0 ? 'gpt2' : 42; }, tokens, merges: ['a b'] };
    const t = new raw.Tokenizer(vocab);
    expect(t.vocabSize).toBe(3);
    expect(t.model).toBe('gpt2');
  });

  it('decode and stream push read a SharedArrayBuffer once (another thread may rewrite it)', async () => {
    const t = new raw.Tokenizer({ model: 'gpt2', tokens: ['a', 'b', 'ab'], merges: ['a b'] });
    const ids = new Int32Array(new SharedArrayBuffer(4 * 256)).fill(2);
    const dec = new raw.TokenizerStreamDecoder(t);
    await withRacingWriter({ buf: ids.buffer as SharedArrayBuffer }, 'const t = new Int32Array(w.buf);', 't.fill(i & 1 ? 2 : 1 << 30);', () => {
      for (let i = 0; i < 2000; ++i) {
        for (const f of [() => t.decode(ids), () => dec.push(ids)]) {
          const e = thrown(f);
          if (e !== undefined) {
            expect(e).toBeInstanceOf(RangeError);
            expect((e as Error).message).toMatch(/tokens\[\d+\]/);
          }
        }
      }
    });
  });
});
