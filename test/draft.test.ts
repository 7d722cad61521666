// Sequence.draft, the native draft loop: it must draft exactly what the JavaScript loop of
// evaluate() and sampleLogits() drafts (tokens, rows and the cache it leaves), check its arguments,
// stop on abort with the cache unchanged, and refuse a disposed sequence.
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { addon } from '../lib/addon.js';
import { loadModel, type Model, type SamplingOptions, type Sequence } from '../lib/index.js';

const DRAFT = join(import.meta.dirname, '../models/default-draft.gguf');
const sampleLogits = (addon as unknown as { sampleLogits(o: object): number }).sampleLogits;

interface Loop {
  sampling: SamplingOptions;
  seed: number | bigint;
  stream: number | bigint;
  positions: number[];
  vocabSize: number;
}

/** The reference: one evaluate() per token and sampleLogits() on each row cut to vocabSize. */
async function jsLoop(seq: Sequence, tokens: number[], o: Loop): Promise<{ tokens: Int32Array; logits: Float32Array }> {
  const g = o.positions.length;
  const V = o.vocabSize;
  const out = new Int32Array(g);
  const rows = new Float32Array(g * V);
  let q = await seq.evaluate(tokens, { lastOnly: true });
  for (let i = 0; i < g; i++) {
    const row = q.subarray(0, V);
    rows.set(row, i * V);
    out[i] = sampleLogits({ logits: row, vocabSize: V, sampling: o.sampling, seed: o.seed, stream: o.stream, position: o.positions[i] });
    if (i + 1 < g) q = await seq.evaluate(out.subarray(i, i + 1));
  }
  return { tokens: out, logits: rows };
}

function sameBits(a: Float32Array, b: Float32Array): boolean {
  if (a.length !== b.length) return false;
  const x = new Uint32Array(a.buffer, a.byteOffset, a.length);
  const y = new Uint32Array(b.buffer, b.byteOffset, b.length);
  return x.every((v, i) => v === y[i]);
}

describe('Sequence.draft (default draft model)', () => {
  let model: Model;
  const prompt = Array.from({ length: 23 }, (_, i) => (i * 131 + 7) % 4096);
  beforeAll(async () => {
    model = await loadModel(DRAFT);
  });
  afterAll(async () => {
    await model?.dispose();
  });

  const cases: { name: string; sampling: SamplingOptions; seed: number | bigint; stream: number | bigint }[] = [
    { name: 'greedy', sampling: { temperature: 0 }, seed: 0, stream: 0 },
    { name: 'T = 0.8', sampling: { temperature: 0.8 }, seed: 7, stream: (5n << 32n) + 3n },
    { name: 'T = 1.3', sampling: { temperature: 1.3 }, seed: 2n ** 40n + 1n, stream: 11 },
    { name: 'top-k 8', sampling: { temperature: 1, topK: 8 }, seed: 3, stream: 1 },
    { name: 'top-p 0.9', sampling: { temperature: 0.7, topP: 0.9 }, seed: 4, stream: 2 },
  ];
  for (const c of cases) {
    it(`drafts the tokens and rows of the evaluate + sampleLogits loop, bit for bit (${c.name})`, async () => {
      for (const g of [1, 2, 5]) {
        const a = model.createSequence();
        const b = model.createSequence();
        // A cached prefix, then two pending tokens, as a speculative step has after a full accept.
        await a.evaluate(prompt.slice(0, -2));
        await b.evaluate(prompt.slice(0, -2));
        const positions = Array.from({ length: g }, (_, i) => i);
        const ref = await jsLoop(a, prompt.slice(-2), { ...c, positions, vocabSize: 4096 });
        const got = await b.draft(prompt.slice(-2), { count: g, sampling: c.sampling, seed: c.seed, stream: c.stream });
        expect(Array.from(got.tokens)).toEqual(Array.from(ref.tokens));
        expect(sameBits(got.logits, ref.logits)).toBe(true);
        // The caches hold the same tokens: the next pass agrees bit for bit.
        expect(b.length).toBe(a.length);
        expect(b.length).toBe(prompt.length + g - 1);
        const last = [got.tokens[g - 1]!];
        expect(sameBits(await b.evaluate(last), await a.evaluate(last))).toBe(true);
        await Promise.all([a.dispose(), b.dispose()]);
      }
    });
  }

  it('takes Philox positions from `position` or `positions`, and cuts rows to vocabSize', async () => {
    const sampling = { temperature: 1 };
    const V = 3000;
    for (const positions of [[4, 5, 6, 7], [0, 3, 5, 9]]) {
      const a = model.createSequence();
      const b = model.createSequence();
      const ref = await jsLoop(a, prompt, { sampling, seed: 9, stream: 4, positions, vocabSize: V });
      const opts = positions[0] === 4 ? { position: 4 } : { positions: Int32Array.from(positions) };
      const got = await b.draft(prompt, { count: 4, vocabSize: V, sampling, seed: 9, stream: 4, ...opts });
      expect(got.logits.length).toBe(4 * V);
      expect(Array.from(got.tokens)).toEqual(Array.from(ref.tokens));
      expect(sameBits(got.logits, ref.logits)).toBe(true);
      await Promise.all([a.dispose(), b.dispose()]);
    }
    // Another seed or stream gives another chain (T = 1 on this model: 8 equal tokens are unlikely).
    const s = model.createSequence();
    const x = await s.draft(prompt, { count: 8, sampling, seed: 1 });
    s.truncate(0);
    const y = await s.draft(prompt, { count: 8, sampling, seed: 2 });
    expect(Array.from(x.tokens)).not.toEqual(Array.from(y.tokens));
    await s.dispose();
  });

  it('stopTokens end the chain at the first one drawn, as the loop stopping there would', async () => {
    const sampling = { temperature: 1.2 };
    const a = model.createSequence();
    const ref = await jsLoop(a, prompt, { sampling, seed: 5, stream: 1, positions: Array.from({ length: 12 }, (_, i) => i), vocabSize: 4096 });
    await a.dispose();
    const toks = Array.from(ref.tokens);
    // Stop on the token drawn at index 6 (and on one never drawn): the chain ends at its first
    // occurrence, which is the last token returned and is not evaluated.
    const first = toks.indexOf(toks[6]!);
    const unused = Array.from({ length: 4096 }, (_, i) => i).find((t) => !toks.includes(t))!;
    const b = model.createSequence();
    const got = await b.draft(prompt, { count: 12, sampling, seed: 5, stream: 1, stopTokens: [unused, toks[6]!] });
    expect(Array.from(got.tokens)).toEqual(toks.slice(0, first + 1));
    expect(got.logits.length).toBe((first + 1) * 4096);
    expect(sameBits(got.logits, ref.logits.subarray(0, (first + 1) * 4096))).toBe(true);
    expect(b.length).toBe(prompt.length + first);
    // The cache holds the same tokens as a loop stopped there: the next pass agrees bit for bit.
    const c = model.createSequence();
    await c.evaluate([...prompt, ...toks.slice(0, first)]);
    const last = [toks[first]!];
    expect(sameBits(await b.evaluate(last), await c.evaluate(last))).toBe(true);
    // A stop token drawn first ends the chain after one token; none drawn: the whole chain.
    b.truncate(0);
    expect(Array.from((await b.draft(prompt, { count: 12, sampling, seed: 5, stream: 1, stopTokens: [toks[0]!] })).tokens)).toEqual([toks[0]]);
    expect(b.length).toBe(prompt.length);
    b.truncate(0);
    expect(Array.from((await b.draft(prompt, { count: 12, sampling, seed: 5, stream: 1, stopTokens: [unused] })).tokens)).toEqual(toks);
    await Promise.all([b.dispose(), c.dispose()]);
  });

  it('rejects bad arguments with errors that name them, leaving the cache as it was', async () => {
    const s = model.createSequence({ contextSize: 16 });
    await s.evaluate([1, 2, 3]);
    const ok = { count: 2, sampling: { temperature: 0.8 }, seed: 1 };
    await expect(s.draft([], ok)).rejects.toThrow(/tokens must not be empty/);
    await expect(s.draft(new Float32Array([1]) as unknown as Int32Array, ok)).rejects.toThrow(TypeError);
    await expect(s.draft([4096], ok)).rejects.toThrow(/tokens\[0\] = 4096/);
    await expect(s.draft([-1], ok)).rejects.toThrow(RangeError);
    await expect(s.draft([4], null as never)).rejects.toThrow(/options must be an object/);
    for (const count of [0, 1.5, -2, Number.NaN, '2', undefined])
      await expect(s.draft([4], { ...ok, count } as never)).rejects.toThrow(/options\.count/);
    for (const vocabSize of [0, 4097, 2.5])
      await expect(s.draft([4], { ...ok, vocabSize })).rejects.toThrow(/options\.vocabSize/);
    await expect(s.draft([4], { ...ok, position: -1 })).rejects.toThrow(/options\.position/);
    await expect(s.draft([4], { ...ok, positions: [0] })).rejects.toThrow(/options\.positions has length 1/);
    await expect(s.draft([4], { ...ok, positions: [0, -3] })).rejects.toThrow(/options\.positions\[1\]/);
    await expect(s.draft([4], { ...ok, sampling: { temperature: -1 } })).rejects.toThrow(/sampling\.temperature/);
    await expect(s.draft([4], { ...ok, sampling: { temperature: 1, topP: 0 } })).rejects.toThrow(/sampling\.topP/);
    await expect(s.draft([4], { ...ok, sampling: 'hot' as never })).rejects.toThrow(TypeError);
    await expect(s.draft([4], { ...ok, seed: -1 })).rejects.toThrow(/seed/);
    await expect(s.draft([4], { ...ok, stream: 1.5 })).rejects.toThrow(/stream/);
    await expect(s.draft([4], { ...ok, signal: {} as AbortSignal })).rejects.toThrow(/options\.signal must be an AbortSignal/);
    await expect(s.draft([4], { ...ok, stopTokens: [2, 4096] })).rejects.toThrow(new RangeError('options.stopTokens[1] = 4096 is out of range for a vocabulary of 4096'));
    await expect(s.draft([4], { ...ok, stopTokens: new Float32Array([1]) as never })).rejects.toThrow(TypeError);
    // 3 cached + 2 pending + 12 drafted, of which the last is not evaluated: 16 fits; one more does not.
    await expect(s.draft([4, 5], { ...ok, count: 13 })).rejects.toThrow(/context of 16/);
    expect(s.length).toBe(3);
    const r = await s.draft([4, 5], { ...ok, count: 12 });
    expect(r.tokens.length).toBe(12);
    expect(s.length).toBe(16);
    await s.dispose();
  });

  it('an AbortSignal stops the loop between passes and leaves the cache as it was', async () => {
    const s = model.createSequence();
    await s.evaluate(prompt);
    const copy = s.fork();
    const before = await copy.evaluate([9]);
    await copy.dispose();
    // Aborted before the call: rejects with the signal's reason, nothing evaluated.
    const pre = new AbortController();
    pre.abort(new Error('stop now'));
    await expect(s.draft([9], { count: 4, signal: pre.signal })).rejects.toThrow('stop now');
    expect(s.length).toBe(prompt.length);
    // Aborted while running: a long chain stops early.
    const ac = new AbortController();
    const p = s.draft([9], { count: 480, sampling: { temperature: 1 }, signal: ac.signal });
    setImmediate(() => ac.abort());
    await expect(p).rejects.toMatchObject({ name: 'AbortError' });
    expect(s.length).toBe(prompt.length);
    // The sequence stays usable and its cache unchanged.
    expect(sameBits(await s.evaluate([9]), before)).toBe(true);
    const r = await s.draft([3], { count: 2, signal: new AbortController().signal });
    expect(r.tokens.length).toBe(2);
    await s.dispose();
  });

  it('a disposed sequence is refused, and dispose waits for a running draft', async () => {
    const s = model.createSequence();
    const p = s.draft(prompt, { count: 64, sampling: { temperature: 1 } });
    const disposed = s.dispose();
    const r = await p;
    await disposed;
    expect(r.tokens.length).toBe(64);
    expect(s.disposed).toBe(true);
    await expect(s.draft([1], { count: 1 })).rejects.toThrow(/disposed/);
  });
});
