// Bad input gets a TypeError or RangeError whose message names the argument, never a crash.
import { describe, expect, it } from 'vitest';
import { adamwStep, distillLoss, globalNorm, verifyChain, verifyChainBatch, verifyTree } from '../lib/index.js';
import { treeOptions } from './helpers/treeFixture.js';

type AnyOptions = Record<string, unknown>;
type ErrorClass = typeof TypeError | typeof RangeError;

function expectThrows(fn: () => unknown, cls: ErrorClass, message: RegExp): void {
  let err: unknown;
  try {
    fn();
  } catch (e) {
    err = e;
  }
  expect(err, `expected ${cls.name} matching ${message}`).toBeInstanceOf(cls);
  expect((err as Error).message).toMatch(message);
}

// Valid baselines, modified one argument at a time.
const V = 4;
const row = (...v: number[]): number[] => v;
const chainBase = (): AnyOptions => ({
  targetLogits: Float32Array.from([...row(0, 1, 2, 3), ...row(1, 0, 0, 1), ...row(2, 2, 0, 0)]),
  draftLogits: Float32Array.from([...row(1, 1, 1, 1), ...row(0, 2, 0, 0)]),
  draftTokens: Int32Array.from([0, 1]),
  vocabSize: V,
  sampling: { temperature: 1 },
  seed: 1,
});
const batchBase = (): AnyOptions => ({
  // Three sequences with draft lengths 2, 0, 1: (3 + 3) target rows, 3 draft rows.
  targetLogits: new Float32Array(6 * V).map((_, i) => i % 5),
  draftLogits: new Float32Array(3 * V).map((_, i) => i % 3),
  draftTokens: Int32Array.from([0, 1, 2]),
  draftLengths: Int32Array.from([2, 0, 1]),
  vocabSize: V,
  sampling: { temperature: 1 },
  seed: 1,
});
const treeBase = (): AnyOptions => treeOptions(V);

const kernels = {
  verifyChain: [chainBase, (o: AnyOptions) => verifyChain(o as never)],
  verifyChainBatch: [batchBase, (o: AnyOptions) => verifyChainBatch(o as never)],
  verifyTree: [treeBase, (o: AnyOptions) => verifyTree(o as never)],
} as const;
type KernelName = keyof typeof kernels;
const names = Object.keys(kernels) as KernelName[];

function call(name: KernelName, patch: AnyOptions): unknown {
  const [base, fn] = kernels[name];
  return fn({ ...base(), ...patch });
}

const floatArgs: Record<KernelName, string[]> = {
  verifyChain: ['targetLogits', 'draftLogits'],
  verifyChainBatch: ['targetLogits', 'draftLogits'],
  verifyTree: ['targetLogits', 'draftLogits'],
};
const intArgs: Record<KernelName, string[]> = {
  verifyChain: ['draftTokens'],
  verifyChainBatch: ['draftTokens', 'draftLengths'],
  verifyTree: ['parents', 'tokens'],
};

describe('verification kernels reject bad input', () => {
  it('the baselines are valid', () => {
    for (const name of names) expect(() => call(name, {})).not.toThrow();
  });

  it.each(names)('%s: wrong typed-array types are TypeErrors naming the argument', (name) => {
    const base = kernels[name][0]();
    for (const arg of floatArgs[name]) {
      const good = base[arg] as Float32Array;
      for (const bad of [Float64Array.from(good), Array.from(good), new Int32Array(good.length), 'x', 5, {}])
        expectThrows(() => call(name, { [arg]: bad }), TypeError, new RegExp(`${arg}.*Float32Array`));
    }
    for (const arg of intArgs[name]) {
      const good = base[arg] as Int32Array;
      for (const bad of [Float32Array.from(good), Array.from(good), new Uint32Array(good.length), BigInt64Array.from(Array.from(good, BigInt))])
        expectThrows(() => call(name, { [arg]: bad }), TypeError, new RegExp(`${arg}.*Int32Array`));
    }
  });

  it.each(names)('%s: wrong lengths are RangeErrors naming the argument', (name) => {
    const base = kernels[name][0]();
    for (const arg of floatArgs[name]) {
      const good = base[arg] as Float32Array;
      for (const len of [good.length - 1, good.length + 1, good.length + V, 0])
        expectThrows(() => call(name, { [arg]: new Float32Array(len) }), RangeError, new RegExp(`${arg} has length ${len}`));
    }
    // A token array of the wrong length makes the logits the wrong length for it.
    const tokenArg = name === 'verifyTree' ? 'tokens' : 'draftTokens';
    const n = (base[tokenArg] as Int32Array).length;
    expectThrows(() => call(name, { [tokenArg]: new Int32Array(n + 1) }), RangeError, /(draftTokens|tokens|targetLogits) has length/);
    if (name === 'verifyTree')
      expectThrows(() => call(name, { parents: Int32Array.from([-1, 0]) }), RangeError, /tokens has length 3, expected parents.length/);
    if (name === 'verifyChainBatch')
      expectThrows(() => call(name, { draftLengths: Int32Array.from([2, 1, 1]) }), RangeError, /draftTokens has length 3/);
  });

  it.each(names)('%s: vocabSize must be a positive integer', (name) => {
    for (const bad of [0, -1, -4, 2.5, NaN, Infinity, 2 ** 40])
      expectThrows(() => call(name, { vocabSize: bad }), RangeError, /vocabSize/);
    expectThrows(() => call(name, { vocabSize: '4' }), TypeError, /vocabSize/);
    expectThrows(() => call(name, { vocabSize: undefined }), TypeError, /vocabSize is required/);
  });

  it.each(names)('%s: NaN and +Infinity logits are RangeErrors naming the array and the row', (name) => {
    const base = kernels[name][0]();
    for (const arg of ['targetLogits', 'draftLogits']) {
      const good = base[arg] as Float32Array;
      for (const bad of [NaN, Infinity]) {
        const a = Float32Array.from(good);
        a[V + 2] = bad; // row 1
        expectThrows(() => call(name, { [arg]: a }), RangeError, new RegExp(`${arg} row 1 contains NaN or \\+Infinity`));
        // Also in greedy mode for the target (every target row is validated).
        if (arg === 'targetLogits')
          expectThrows(() => call(name, { [arg]: a, sampling: { temperature: 0 } }), RangeError, /targetLogits row 1/);
      }
    }
  });

  it.each(names)('%s: -Infinity logits are probability 0, but a row of all -Infinity is a RangeError', (name) => {
    const base = kernels[name][0]();
    for (const arg of ['targetLogits', 'draftLogits']) {
      const a = Float32Array.from(base[arg] as Float32Array);
      a[0] = -Infinity;
      a[V + 1] = -Infinity;
      expect(() => call(name, { [arg]: a })).not.toThrow();
      a.fill(-Infinity, V, 2 * V);
      expectThrows(() => call(name, { [arg]: a }), RangeError, new RegExp(`${arg} row 1 is all -Infinity`));
    }
    // A -Infinity target logit can never be emitted.
    const t = Float32Array.from(base.targetLogits as Float32Array).fill(-Infinity);
    for (let r = 0; r < t.length / V; ++r) t[r * V + 3] = 0;
    for (let seed = 0; seed < 50; ++seed) {
      const r = call(name, { targetLogits: t, seed }) as { tokens: Int32Array };
      // Every draft token has target probability 0, so each is rejected and 3 is emitted.
      expect(Array.from(r.tokens).every((x) => x === 3)).toBe(true);
    }
  });

  it.each(names)('%s: token ids out of range are RangeErrors naming the index', (name) => {
    const arg = name === 'verifyTree' ? 'tokens' : 'draftTokens';
    for (const bad of [-1, V, V + 10, -(2 ** 31)]) {
      const t = Int32Array.from(kernels[name][0]()[arg] as Int32Array);
      t[1] = bad;
      expectThrows(() => call(name, { [arg]: t }), RangeError, new RegExp(`${arg}\\[1\\] = ${bad} is out of range`));
      // Greedy too.
      expectThrows(() => call(name, { [arg]: t, sampling: { temperature: 0 } }), RangeError, new RegExp(`${arg}\\[1\\]`));
    }
  });

  it('verifyTree: a parent not earlier than its child, or below -1, is a RangeError', () => {
    for (const bad of [[-1, 1, -1], [-1, 2, -1], [-1, 0, 5], [-2, 0, -1], [-1, -7, 0], [0, 0, 0]]) {
      const parents = Int32Array.from(bad);
      const i = bad.findIndex((p, k) => p < -1 || p >= k);
      expectThrows(() => call('verifyTree', { parents }), RangeError, new RegExp(`parents\\[${i}\\]`));
    }
  });

  it.each(names)('%s: sampling options are checked', (name) => {
    for (const t of [-0.5, -1e-9, -Infinity, Infinity, NaN])
      expectThrows(() => call(name, { sampling: { temperature: t } }), RangeError, /sampling\.temperature/);
    expectThrows(() => call(name, { sampling: { temperature: '1' } }), TypeError, /sampling\.temperature/);
    expectThrows(() => call(name, { sampling: {} }), TypeError, /sampling\.temperature is required/);
    for (const p of [0, -0.1, 1.5, NaN, Infinity])
      expectThrows(() => call(name, { sampling: { temperature: 1, topP: p } }), RangeError, /sampling\.topP/);
    // A subnormal temperature made 1 / T infinite: token -1 or garbage. The smallest normal float works.
    for (const t of [1e-40, 1e-45])
      expectThrows(() => call(name, { sampling: { temperature: t } }), RangeError, /sampling\.temperature must be 0 \(greedy\) or at least 1\.1754944e-38/);
    expect(() => call(name, { sampling: { temperature: 2 ** -126 } })).not.toThrow();
    // Numbers in messages as JavaScript writes them (they read "-0.500000" and "1.500000").
    expectThrows(() => call(name, { sampling: { temperature: -0.5 } }), RangeError, /, got -0\.5$/);
    expectThrows(() => call(name, { sampling: { temperature: 1, topP: 1.5 } }), RangeError, /, got 1\.5$/);
    expectThrows(() => call(name, { sampling: { temperature: -Infinity } }), RangeError, /, got -Infinity$/);
    for (const k of [-1, 2.5, NaN, 2 ** 40])
      expectThrows(() => call(name, { sampling: { temperature: 1, topK: k } }), RangeError, /sampling\.topK/);
    for (const bad of [null, 1, 'greedy'])
      expectThrows(() => call(name, { sampling: bad }), TypeError, /sampling/);
    // Valid corner values.
    expect(() => call(name, { sampling: { temperature: 1, topP: 1, topK: 0 } })).not.toThrow();
    expect(() => call(name, { sampling: { temperature: 1, topK: 1000 } })).not.toThrow();
  });

  it('verifyChainBatch: per-sequence sampling, streams and draftLengths are checked', () => {
    expectThrows(() => call('verifyChainBatch', { sampling: [{ temperature: 1 }] }), RangeError, /sampling has length 1/);
    expectThrows(
      () => call('verifyChainBatch', { sampling: [{ temperature: 1 }, { temperature: -1 }, { temperature: 1 }] }),
      RangeError,
      /sampling\[1\]\.temperature/,
    );
    expectThrows(() => call('verifyChainBatch', { sampling: [{ temperature: 1 }, 3, { temperature: 1 }] }), TypeError, /sampling\[1\]/);
    expectThrows(() => call('verifyChainBatch', { streams: [0, 1] }), RangeError, /streams has length 2/);
    expectThrows(() => call('verifyChainBatch', { streams: [0, -1, 2] }), RangeError, /streams\[1\]/);
    expectThrows(() => call('verifyChainBatch', { streams: [0, 1.5, 2] }), RangeError, /streams\[1\]/);
    expectThrows(() => call('verifyChainBatch', { streams: [0, 1, 'x'] }), RangeError, /streams\[2\]/);
    expectThrows(() => call('verifyChainBatch', { streams: new Int32Array(3) }), TypeError, /streams/);
    expect(() => call('verifyChainBatch', { streams: [0n, 2n ** 64n - 1n, 7] })).not.toThrow();
    expectThrows(
      () => call('verifyChainBatch', { draftLengths: Int32Array.from([2, -1, 2]) }),
      RangeError,
      /draftLengths\[1\] must be >= 0/,
    );
    // No sequences at all is not an error.
    const r = call('verifyChainBatch', {
      targetLogits: new Float32Array(0),
      draftLogits: new Float32Array(0),
      draftTokens: new Int32Array(0),
      draftLengths: new Int32Array(0),
    }) as { tokens: Int32Array; offsets: Int32Array };
    expect(r.tokens.length).toBe(0);
    expect(Array.from(r.offsets)).toEqual([0]);
  });

  it('verifyTree: the error names the first bad row in row order, the target row before the draft row', () => {
    const W = 5000; // several 2048-entry blocks, validated over the thread pool
    const base = {
      parents: Int32Array.from([-1, 0, 1]),
      tokens: Int32Array.from([0, 1, 2]),
      targetLogits: new Float32Array(4 * W).map((_, i) => (i % 7) / 7),
      draftLogits: new Float32Array(4 * W).map((_, i) => (i % 5) / 5),
      vocabSize: W,
      sampling: { temperature: 1 },
      seed: 1,
    };
    const t = Float32Array.from(base.targetLogits);
    const d = Float32Array.from(base.draftLogits);
    t[2 * W + 4500] = NaN; // target row 2, third block
    d[1 * W + 10] = Infinity; // draft row 1
    expectThrows(() => verifyTree({ ...base, targetLogits: t, draftLogits: d }), RangeError, /^draftLogits row 1 /);
    d[1 * W + 10] = 0;
    d[2 * W + 3000] = NaN; // draft row 2: the target row 2 comes first
    expectThrows(() => verifyTree({ ...base, targetLogits: t, draftLogits: d }), RangeError, /^targetLogits row 2 /);
    t[2 * W + 4500] = 0;
    expectThrows(() => verifyTree({ ...base, targetLogits: t, draftLogits: d }), RangeError, /^draftLogits row 2 /);
  });

  it('verifyTree: unknown children modes are rejected', () => {
    expectThrows(() => call('verifyTree', { children: 'greedy' }), RangeError, /children must be/);
    expectThrows(() => call('verifyTree', { children: '' }), RangeError, /children must be/);
    expectThrows(() => call('verifyTree', { children: 1 }), TypeError, /children must be a string/);
    for (const c of ['sampled-with-replacement', 'sampled-without-replacement', 'deterministic'])
      expect(() => call('verifyTree', { children: c })).not.toThrow();
    // Deterministic children and greedy need no draft logits.
    expect(() => call('verifyTree', { children: 'deterministic', draftLogits: undefined })).not.toThrow();
  });

  it.each(names)('%s: missing required options are TypeErrors naming them', (name) => {
    const required: Record<KernelName, string[]> = {
      verifyChain: ['targetLogits', 'draftLogits', 'draftTokens', 'vocabSize', 'sampling', 'seed'],
      verifyChainBatch: ['targetLogits', 'draftLogits', 'draftTokens', 'draftLengths', 'vocabSize', 'sampling', 'seed'],
      verifyTree: ['parents', 'tokens', 'targetLogits', 'draftLogits', 'vocabSize', 'sampling', 'seed'],
    };
    for (const arg of required[name]) {
      expectThrows(() => call(name, { [arg]: undefined }), TypeError, new RegExp(`${arg}.*required`));
      expectThrows(() => call(name, { [arg]: null }), TypeError, new RegExp(`${arg}.*required`));
    }
    // Greedy needs no draft logits.
    expect(() => call(name, { draftLogits: undefined, sampling: { temperature: 0 } })).not.toThrow();
    const fn = kernels[name][1] as (o: unknown) => unknown;
    for (const bad of [undefined, null, 5, 'x']) expectThrows(() => fn(bad), TypeError, /options must be an object/);
  });

  it.each(names)('%s: seeds and streams must be non-negative integers or bigints', (name) => {
    for (const key of name === 'verifyChainBatch' ? ['seed'] : ['seed', 'stream']) {
      for (const bad of [-1, 1.5, NaN, Infinity, 2 ** 53, -1n])
        expectThrows(() => call(name, { [key]: bad }), RangeError, new RegExp(`${key} must`));
      for (const bad of ['1', {}, true]) expectThrows(() => call(name, { [key]: bad }), TypeError, new RegExp(key));
    }
    // Bigints work up to 2^64 - 1 (larger ones wrapped silently, so 2^64 + 5 gave seed 5's tokens).
    const a = call(name, { seed: 5n }) as { tokens: Int32Array };
    expect(call(name, { seed: 5 })).toEqual(a);
    expectThrows(() => call(name, { seed: 2n ** 64n + 5n }), RangeError, /^seed must be below 2\^64$/);
    expectThrows(() => call(name, { seed: 2n ** 200n }), RangeError, /^seed must be below 2\^64$/);
    expect(() => call(name, { seed: 2n ** 64n - 1n })).not.toThrow();
    expect(() => call(name, { seed: 2n ** 63n + 12345n })).not.toThrow();
    expect(() => call(name, { seed: Number.MAX_SAFE_INTEGER })).not.toThrow();
  });
});

describe('distillLoss rejects bad input', () => {
  const N = 2;
  const W = 5;
  const base = (): AnyOptions => ({
    kind: 'forward-kl',
    studentLogits: new Float32Array(N * W).map((_, i) => Math.sin(i)),
    teacherLogits: new Float32Array(N * W).map((_, i) => Math.cos(i)),
    vocabSize: W,
  });
  const sparse = (): AnyOptions => ({
    ...base(),
    teacherLogits: undefined,
    teacher: { indices: Int32Array.from([0, 3, 4, 1]), probs: Float32Array.from([0.5, 0.2, 0.6, 0.1]) },
  });
  const run = (o: AnyOptions) => distillLoss(o as never);

  it('the baselines are valid', () => {
    expect(Number.isFinite(run(base()).loss)).toBe(true);
    expect(Number.isFinite(run(sparse()).loss)).toBe(true);
  });

  it('gradOut must be a Float32Array of N x V that does not overlap the logits', () => {
    expectThrows(() => run({ ...base(), gradOut: new Float32Array(N * W - 1) }), RangeError, /gradOut has length 9/);
    expectThrows(() => run({ ...base(), gradOut: new Float64Array(N * W) }), TypeError, /gradOut must be a Float32Array/);
    expectThrows(() => run({ ...base(), gradOut: [0, 0] }), TypeError, /gradOut must be a Float32Array/);
    expectThrows(() => run({ ...base(), gradOut: new Float32Array(N * W), computeGrad: false }), TypeError, /gradOut cannot be combined/);
    const o = base();
    const shared = new Float32Array(3 * N * W);
    shared.set(o.studentLogits as Float32Array);
    expectThrows(() => run({ ...o, studentLogits: shared.subarray(0, N * W), gradOut: shared.subarray(N * W - 1, 2 * N * W - 1) }), RangeError, /gradOut must not share memory/);
    expectThrows(() => run({ ...o, gradOut: o.teacherLogits }), RangeError, /gradOut must not share memory/);
    expect(Number.isFinite(run({ ...o, studentLogits: shared.subarray(0, N * W), gradOut: shared.subarray(N * W, 2 * N * W) }).loss)).toBe(true);
    // Nor the sparse teacher's arrays (a shared probs buffer gave a wrong loss without a word).
    const sp = sparse() as { teacher: { indices: Int32Array; probs: Float32Array; residual?: Float32Array } };
    sp.teacher.residual = Float32Array.from([0.3, 0.3]);
    expect(Number.isFinite(run(sp).loss)).toBe(true);
    const pool = new Float32Array(N * W + 64);
    for (const [which, at] of [['probs', 0], ['residual', N * W - 1]] as const) {
      const arr = sp.teacher[which]!;
      pool.set(arr, at);
      const teacher = { ...sp.teacher, [which]: pool.subarray(at, at + arr.length) };
      expectThrows(() => run({ ...sp, teacher, gradOut: pool.subarray(0, N * W) }), RangeError, /gradOut must not share memory/);
    }
  });

  it('kind must be a known loss', () => {
    expectThrows(() => run({ ...base(), kind: 'kl' }), RangeError, /kind must be one of/);
    expectThrows(() => run({ ...base(), kind: 'Forward-KL' }), RangeError, /kind/);
    expectThrows(() => run({ ...base(), kind: 3 }), TypeError, /kind must be a string/);
    expectThrows(() => run({ ...base(), kind: undefined }), TypeError, /kind is required/);
  });

  it('mismatched lengths and wrong types name the argument', () => {
    expectThrows(() => run({ ...base(), studentLogits: new Float32Array(N * W + 1) }), RangeError, /studentLogits has length 11, not a multiple/);
    expectThrows(() => run({ ...base(), teacherLogits: new Float32Array(N * W - W) }), RangeError, /teacherLogits has length/);
    expectThrows(() => run({ ...base(), mask: new Uint8Array(N + 1) }), RangeError, /mask has length/);
    expectThrows(() => run({ ...base(), mask: new Int32Array(N) }), TypeError, /mask must be a Uint8Array/);
    expectThrows(() => run({ ...base(), studentLogits: new Float64Array(N * W) }), TypeError, /studentLogits must be a Float32Array/);
    expectThrows(() => run({ ...base(), teacherLogits: Array.from({ length: N * W }, () => 0) }), TypeError, /teacherLogits/);
    const t = sparse().teacher as AnyOptions;
    expectThrows(() => run({ ...sparse(), teacher: { ...t, probs: new Float32Array(3) } }), RangeError, /teacher\.probs has length 3/);
    expectThrows(() => run({ ...sparse(), teacher: { ...t, indices: new Int32Array(3) } }), RangeError, /teacher\.indices has length 3/);
    expectThrows(() => run({ ...sparse(), teacher: { ...t, residual: new Float32Array(3) } }), RangeError, /teacher\.residual has length 3/);
    expectThrows(() => run({ ...sparse(), teacher: { ...t, indices: new Float32Array(4) } }), TypeError, /teacher\.indices must be an Int32Array/);
    expectThrows(() => run({ ...sparse(), teacher: { ...t, probs: undefined } }), TypeError, /teacher\.probs is required/);
    expectThrows(() => run({ ...sparse(), teacher: 5 }), TypeError, /teacher must be an object/);
    expectThrows(() => run({ ...base(), teacher: t }), TypeError, /either teacherLogits .* or teacher/);
    expectThrows(() => run({ ...base(), teacherLogits: undefined }), TypeError, /teacherLogits .* or teacher .* is required/);
    expectThrows(() => run({ ...base(), vocabSize: 0 }), RangeError, /vocabSize/);
    expectThrows(() => run({ ...sparse(), teacher: { ...t, indices: new Int32Array(3 * W * N), probs: new Float32Array(3 * W * N) } }), RangeError, /teacher\.indices has more than vocabSize/);
  });

  it('non-finite logits are RangeErrors naming the array and the row', () => {
    for (const bad of [NaN, Infinity, -Infinity]) {
      const s = base().studentLogits as Float32Array;
      s[W + 1] = bad;
      expectThrows(() => run({ ...base(), studentLogits: s }), RangeError, /studentLogits row 1 contains NaN or Infinity/);
      const t = base().teacherLogits as Float32Array;
      t[2] = bad;
      for (const kind of ['forward-kl', 'reverse-kl', 'jsd', 'tvd'])
        expectThrows(() => run({ ...base(), kind, teacherLogits: t }), RangeError, /teacherLogits row 0 contains NaN or Infinity/);
      expectThrows(() => run({ ...sparse(), studentLogits: s }), RangeError, /studentLogits row 1/);
    }
  });

  it('sparse teachers are validated', () => {
    const t = sparse().teacher as { indices: Int32Array; probs: Float32Array };
    for (const bad of [-1, W, 1000]) {
      const indices = Int32Array.from(t.indices);
      indices[3] = bad;
      expectThrows(() => run({ ...sparse(), teacher: { ...t, indices } }), RangeError, new RegExp(`teacher\\.indices\\[3\\] = ${bad} is out of range`));
    }
    expectThrows(() => run({ ...sparse(), teacher: { ...t, indices: Int32Array.from([0, 3, 4, 4]) } }), RangeError, /teacher\.indices row 1 repeats/);
    for (const bad of [-0.1, NaN, Infinity])
      expectThrows(() => run({ ...sparse(), teacher: { ...t, probs: Float32Array.from([0.5, 0.2, bad, 0.1]) } }), RangeError, /teacher\.probs\[2\]/);
    // probs + residual must sum to 1.
    expectThrows(() => run({ ...sparse(), teacher: { ...t, probs: Float32Array.from([0.9, 0.2, 0.6, 0.1]) } }), RangeError, /teacher row 0: probabilities plus residual sum to/);
    expectThrows(() => run({ ...sparse(), teacher: { ...t, residual: Float32Array.from([0.3, 0.1]) } }), RangeError, /teacher row 1: probabilities plus residual/);
    expectThrows(() => run({ ...sparse(), teacher: { ...t, residual: Float32Array.from([0.3, -0.1]) } }), RangeError, /teacher\.residual\[1\]/);
    expectThrows(() => run({ ...sparse(), teacher: { ...t, residual: Float32Array.from([0.3, NaN]) } }), RangeError, /teacher\.residual\[1\]/);
    expect(() => run({ ...sparse(), teacher: { ...t, residual: Float32Array.from([0.3, 0.3]) } })).not.toThrow();
  });

  it('beta must be in (0, 1) for jsd and temperature must be > 0', () => {
    for (const beta of [0, 1, -0.5, 1.5, Infinity])
      expectThrows(() => run({ ...base(), kind: 'jsd', beta }), RangeError, /beta must be in \(0, 1\)/);
    expectThrows(() => run({ ...base(), kind: 'jsd', beta: NaN }), RangeError, /beta/);
    expect(() => run({ ...base(), kind: 'jsd', beta: 0.1 })).not.toThrow();
    for (const temperature of [0, -1, Infinity, -Infinity])
      for (const o of [base(), sparse()])
        expectThrows(() => run({ ...o, temperature }), RangeError, /temperature must be a finite number > 0/);
    expectThrows(() => run({ ...base(), temperature: NaN }), RangeError, /temperature/);
    expectThrows(() => run({ ...base(), temperature: '1' }), TypeError, /temperature/);
    // Numbers in messages as JavaScript writes them (they read "-1.000000").
    expectThrows(() => run({ ...base(), temperature: -1 }), RangeError, /, got -1$/);
    expectThrows(() => run({ ...base(), kind: 'jsd', beta: 1.5 }), RangeError, /, got 1\.5$/);
    expectThrows(() => run({ ...base(), temperature: -0.1 }), RangeError, /, got -0\.1$/);
    // A subnormal temperature made every loss NaN.
    expectThrows(() => run({ ...base(), temperature: 1e-40 }), RangeError, /^temperature must be at least 1\.1754944e-38, got 1e-40$/);
  });
});

describe('adamwStep and globalNorm reject bad input', () => {
  const base = (): AnyOptions => ({
    params: new Float32Array(8).fill(1),
    grads: new Float32Array(8).fill(0.5),
    m: new Float32Array(8),
    v: new Float32Array(8),
    step: 1,
  });
  const run = (o: AnyOptions) => adamwStep(o as never);

  it('mismatched lengths and wrong types name the argument', () => {
    expect(() => run(base())).not.toThrow();
    for (const arg of ['grads', 'm', 'v']) {
      expectThrows(() => run({ ...base(), [arg]: new Float32Array(7) }), RangeError, new RegExp(`${arg} has length 7, expected params.length`));
      expectThrows(() => run({ ...base(), [arg]: new Float64Array(8) }), TypeError, new RegExp(`${arg} must be a Float32Array`));
    }
    expectThrows(() => run({ ...base(), params: new Float32Array(9) }), RangeError, /grads has length 8/);
    expectThrows(() => run({ ...base(), params: [1, 2] }), TypeError, /params must be a Float32Array/);
    expectThrows(() => run({ ...base(), params: undefined }), TypeError, /params is required/);
    // Arrays sharing memory would corrupt the update silently.
    const o = base();
    expectThrows(() => run({ ...o, v: o.m }), RangeError, /^v must not share memory with m$/);
    expectThrows(() => run({ ...o, grads: o.params }), RangeError, /^grads must not share memory with params$/);
    const big = new Float32Array(12);
    expectThrows(() => run({ ...base(), m: big.subarray(0, 8), v: big.subarray(4, 12) }), RangeError, /^v must not share memory with m$/);
    expect(() => run({ ...base(), m: big.subarray(0, 8), v: new Float32Array(8) })).not.toThrow();
    // A detached array is called detached (it read as empty, and the error named another argument).
    const gone = new Float32Array(8);
    structuredClone(gone.buffer, { transfer: [gone.buffer] });
    expectThrows(() => run({ ...base(), grads: gone }), TypeError, /^grads is detached/);
  });

  it('step must be an integer >= 1, and the hyperparameters must be in range', () => {
    for (const step of [0, -1, 1.5, NaN]) expectThrows(() => run({ ...base(), step }), RangeError, /step/);
    expectThrows(() => run({ ...base(), step: undefined }), TypeError, /step is required/);
    const bad: Array<[string, number]> = [
      ['lr', -1],
      ['lr', NaN],
      ['lr', Infinity],
      ['beta1', 1],
      ['beta1', -0.1],
      ['beta2', 1],
      ['eps', 0],
      ['weightDecay', -0.1],
      ['gradScale', -1],
      ['gradScale', Infinity],
      // float32 cannot hold these: lr 1e-50 became 0 (no update, silently), eps 1e300 Infinity.
      ['lr', 1e-50],
      ['eps', 1e300],
      ['weightDecay', 1e-60],
    ];
    for (const [k, v] of bad) expectThrows(() => run({ ...base(), [k]: v }), RangeError, new RegExp(k));
    expectThrows(() => run({ ...base(), lr: 1e-50 }), RangeError, /^lr is 1e-50, which a 32-bit float cannot hold \(it would be 0\)$/);
    // Nothing was modified by the failed calls.
    const o = base();
    expectThrows(() => run({ ...o, step: 0 }), RangeError, /step/);
    expect(Array.from(o.params as Float32Array)).toEqual(new Array(8).fill(1));
  });

  it('globalNorm needs a Float32Array', () => {
    expectThrows(() => globalNorm(new Float64Array(3) as never), TypeError, /values must be a Float32Array/);
    expectThrows(() => globalNorm([1, 2] as never), TypeError, /values/);
    expectThrows(() => (globalNorm as () => number)(), TypeError, /values/);
    expect(globalNorm(new Float32Array(0))).toBe(0);
  });
});
