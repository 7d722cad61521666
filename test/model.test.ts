// The model API on the real llama2.c checkpoint stories260K: loading, forward, tree evaluation,
// generation, async behaviour, lifecycle and bad input.
import { copyFileSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { addon } from '../lib/addon.js';
import { loadModel, writeRandomModel, type Model } from '../lib/index.js';
import { suiteTempDir, tempDir } from './helpers/tmp.js';

const STORIES = join(import.meta.dirname, '../../shared/models/stories260K.bin');
const have = existsSync(STORIES);
if (!have) console.warn(`skip: ${STORIES} not found (the model tests need ../shared/models)`);

describe.skipIf(!have)('model (stories260K)', () => {
  let model: Model;
  beforeAll(async () => {
    model = await loadModel(STORIES);
  });
  afterAll(async () => {
    await model?.dispose();
  });

  it('reads the llama2.c header', () => {
    expect(model.info).toMatchObject({
      format: 'llama2c',
      architecture: 'llama',
      vocabSize: 512,
      contextLength: 512,
      embeddingLength: 64,
      layers: 5,
      heads: 8,
      kvHeads: 4,
      tiedOutput: true,
    });
  });

  it('greedy generation from BOS is deterministic and matches llama2.c', async () => {
    const a = await model.generate({ tokens: [1], maxTokens: 20 });
    const b = await model.generate({ tokens: [1], maxTokens: 20 });
    expect(Array.from(a.tokens)).toEqual(Array.from(b.tokens));
    // llama2.c's run.c (-t 0) on the same checkpoint.
    expect(Array.from(a.tokens)).toEqual([461, 461, 401, 401, 401, 461, 378, 455, 473, 456, 435, 299, 362, 409, 283, 264, 283, 452, 288, 13]);
    expect(a.stopReason).toBe('maxTokens');
  });

  it('greedy generation runs to the end of the context when nothing stops it', async () => {
    const r = await model.generate({ tokens: [1], maxTokens: 1000, stopTokens: [] });
    expect(r.stopReason).toBe('context');
    expect(r.tokens.length).toBe(511);
  });

  it('sampled generation is reproducible per seed and stops at EOS', async () => {
    const a = await model.generate({ tokens: [1], maxTokens: 500, sampling: { temperature: 1 }, seed: 1 });
    const b = await model.generate({ tokens: [1], maxTokens: 500, sampling: { temperature: 1 }, seed: 1 });
    expect(Array.from(a.tokens)).toEqual(Array.from(b.tokens));
    expect(a.stopReason).toBe('eos');
    expect(model.eosTokens).toContain(a.tokens[a.tokens.length - 1]);
    const c = await model.generate({ tokens: [1], maxTokens: 500, sampling: { temperature: 1 }, seed: 2 });
    expect(Array.from(c.tokens)).not.toEqual(Array.from(a.tokens));
  });

  it('generate gives the tokens and stop reason of the evaluate + sampleLogits loop, drawn in chunks', async () => {
    // The reference: one evaluate() per token, each drawn at Philox position seq.length.
    const sampleLogits = (addon as unknown as { sampleLogits(o: object): number }).sampleLogits;
    const ref = async (prompt: number[], o: { maxTokens: number; sampling?: object; seed?: number; stream?: number; stopTokens?: number[] }) => {
      const seq = model.createSequence();
      const stop = new Set(o.stopTokens ?? model.eosTokens);
      const out: number[] = [];
      let stopReason = 'maxTokens';
      let logits = await seq.evaluate(prompt, { lastOnly: true });
      while (out.length < o.maxTokens) {
        const t = sampleLogits({ logits, vocabSize: 512, sampling: o.sampling ?? { temperature: 0 }, seed: o.seed ?? 0, stream: o.stream ?? 0, position: seq.length });
        out.push(t);
        if (stop.has(t)) {
          stopReason = 'eos';
          break;
        }
        if (out.length >= o.maxTokens) break;
        if (prompt.length + out.length >= seq.capacity) {
          stopReason = 'context';
          break;
        }
        logits = await seq.evaluate([t]);
      }
      await seq.dispose();
      return { tokens: out, stopReason };
    };
    const greedy = await ref([1], { maxTokens: 100 });
    const long = Array.from({ length: 490 }, (_, i) => (i * 37 + 1) % 512);
    const cases: [number[], { maxTokens: number; sampling?: object; seed?: number; stream?: number; stopTokens?: number[] }][] = [
      [[1], { maxTokens: 100 }],
      [[1], { maxTokens: 0 }],
      [[1], { maxTokens: 1 }],
      [[1], { maxTokens: 37, sampling: { temperature: 0.9 }, seed: 11, stream: 3 }],
      [[1], { maxTokens: 500, sampling: { temperature: 1 }, seed: 1 }], // ends at EOS
      [[1, 403, 407], { maxTokens: 300, sampling: { temperature: 0.8, topK: 20, topP: 0.9 }, seed: 4, stream: 2 }],
      [[1], { maxTokens: 100, stopTokens: [greedy.tokens[41]!] }], // a stop token inside a chunk
      [[1], { maxTokens: 1000 }], // to the end of the context
      [long, { maxTokens: 100, sampling: { temperature: 1 }, seed: 9, stopTokens: [] }],
    ];
    for (const [prompt, o] of cases) {
      const want = await ref(prompt, o);
      const seen: number[] = [];
      const got = await model.generate({ tokens: prompt, ...o, onToken: (t) => void seen.push(t) });
      expect(Array.from(got.tokens)).toEqual(want.tokens);
      expect(seen).toEqual(want.tokens);
      expect(got.stopReason).toBe(want.stopReason);
    }
    expect(greedy.tokens.indexOf(greedy.tokens[41]!)).toBeGreaterThan(8); // the stop case stops mid-run
  });

  it('forward gives [n x V] logits equal to step-by-step decoding', async () => {
    const toks = Int32Array.from([1, 403, 407, 261, 378, 395]);
    const all = await model.forward(toks);
    expect(all.length).toBe(toks.length * 512);
    const seq = model.createSequence();
    for (let i = 0; i < toks.length; i++) {
      const row = await seq.evaluate(toks.subarray(i, i + 1));
      expect(Array.from(row)).toEqual(Array.from(all.subarray(i * 512, (i + 1) * 512)));
    }
    await seq.dispose();
  });

  it('a tree-masked pass gives each node the logits of its path, and keepPath compacts the cache', async () => {
    const prefix = [1, 403, 407];
    const parents = Int32Array.from([-1, -1, 0, 1, 3, 3]);
    const tokens = Int32Array.from([261, 378, 395, 42, 7, 300]);
    const seq = model.createSequence();
    await seq.evaluate(prefix);
    const tree = await seq.evaluate(tokens, { treeParents: parents });
    for (let i = 0; i < tokens.length; i++) {
      const path: number[] = [];
      for (let j = i; j >= 0; j = parents[j]!) path.unshift(tokens[j]!);
      const ref = await model.forward([...prefix, ...path]);
      const last = ref.subarray((prefix.length + path.length - 1) * 512);
      expect(Array.from(tree.subarray(i * 512, (i + 1) * 512))).toEqual(Array.from(last));
    }
    seq.keepPath(3, [1, 3, 5]);
    expect(seq.length).toBe(6);
    const next = await seq.evaluate([9]);
    const ref = await model.forward([...prefix, 378, 42, 300, 9]);
    expect(Array.from(next)).toEqual(Array.from(ref.subarray(6 * 512)));
    await seq.dispose();
  });

  it('keeps the event loop turning during a long evaluation', async () => {
    const toks = new Int32Array(500).map((_, i) => (i * 37 + 1) % 512);
    let ticks = 0;
    let running = true;
    const tick = () => {
      ticks++;
      if (running) setImmediate(tick);
    };
    setImmediate(tick);
    const started = performance.now();
    // Several sequential prefills make the call long enough to observe on any machine.
    for (let k = 0; k < 4; k++) await model.forward(toks);
    running = false;
    const ms = performance.now() - started;
    expect(ticks).toBeGreaterThan(4);
    console.log(`event loop: ${ticks} ticks during ${ms.toFixed(0)} ms of evaluation`);
  });

  it('stream() yields the tokens of generate() and returns its stop reason; leaving early stops it', async () => {
    for (const opts of [{ maxTokens: 40 }, { maxTokens: 40, sampling: { temperature: 1 }, seed: 7 }, { maxTokens: 600 }]) {
      const want = await model.generate({ tokens: [1], ...opts });
      const got: number[] = [];
      const it = model.stream({ tokens: [1], ...opts });
      let r = await it.next();
      for (; !r.done; r = await it.next()) got.push(...r.value.tokens);
      expect(got).toEqual(Array.from(want.tokens));
      expect(r.value).toBe(want.stopReason);
    }
    let n = 0;
    for await (const _ of model.stream({ tokens: [1], maxTokens: 400 })) if (++n === 3) break;
    expect(n).toBe(3);
    const ac = new AbortController();
    await expect(
      (async () => {
        for await (const _ of model.stream({ tokens: [1], maxTokens: 400, signal: ac.signal })) ac.abort();
      })(),
    ).rejects.toMatchObject({ name: 'AbortError' });
  });

  it('an AbortSignal stops generate within one step', async () => {
    const ac = new AbortController();
    let seen = 0;
    let afterAbort = 0;
    const p = model.generate({
      tokens: [1],
      maxTokens: 400,
      signal: ac.signal,
      onToken: () => {
        seen++;
        if (ac.signal.aborted) afterAbort++;
        if (seen === 5) ac.abort();
      },
    });
    await expect(p).rejects.toMatchObject({ name: 'AbortError' });
    expect(seen).toBe(5);
    expect(afterAbort).toBe(0);
    // The model stays usable.
    const r = await model.generate({ tokens: [1], maxTokens: 3 });
    expect(r.tokens.length).toBe(3);
  });

  it('an AbortSignal stops a long prefill between chunks and leaves the cache as it was; chunked logits are the same', async () => {
    const toks = new Int32Array(500).map((_, i) => (i * 37 + 1) % 512);
    const plain = model.createSequence();
    const chunked = model.createSequence();
    for (const lastOnly of [true, false]) {
      plain.truncate(0);
      chunked.truncate(0);
      const a = await plain.evaluate(toks, { lastOnly });
      const b = await chunked.evaluate(toks, { lastOnly, signal: new AbortController().signal });
      expect(b.length).toBe(lastOnly ? 512 : 500 * 512);
      expect(Array.from(b)).toEqual(Array.from(a));
      expect(chunked.length).toBe(500);
    }
    chunked.truncate(1);
    const ac = new AbortController();
    const p = chunked.evaluate(toks.subarray(0, 400), { lastOnly: true, signal: ac.signal });
    setImmediate(() => ac.abort()); // lands while the first chunk runs
    await expect(p).rejects.toMatchObject({ name: 'AbortError' });
    expect(chunked.length).toBe(1);
    // Still usable, and the same as before.
    chunked.truncate(0);
    plain.truncate(0);
    expect(Array.from(await chunked.evaluate(toks, { lastOnly: true }))).toEqual(Array.from(await plain.evaluate(toks, { lastOnly: true })));
    await Promise.all([plain.dispose(), chunked.dispose()]);
  });

  it('a float16 KV cache (the default) gives logits close to a float32 one, and forks keep their cache type', async () => {
    await using half = model.createSequence();
    await using full = model.createSequence({ kvType: 'f32' });
    expect([half.kvType, full.kvType]).toEqual(['f16', 'f32']);
    const toks = Array.from({ length: 60 }, (_, i) => 1 + ((i * 37) % 500));
    const [a, b] = [await half.evaluate(toks), await full.evaluate(toks)];
    let worst = 0, scale = 0;
    for (let i = 0; i < a.length; i++) (worst = Math.max(worst, Math.abs(a[i]! - b[i]!))), (scale = Math.max(scale, Math.abs(b[i]!)));
    expect(worst).toBeGreaterThan(0);
    expect(worst).toBeLessThan(0.01 * scale);
    await using forked = full.fork();
    expect(forked.kvType).toBe('f32');
    expect(Array.from(await forked.evaluate([7]))).toEqual(Array.from(await full.evaluate([7])));
    expect(() => model.createSequence({ kvType: 'f8' as never })).toThrow(new RangeError("options.kvType must be 'f16' or 'f32', got 'f8'"));
    expect(() => model.createSequence({ kvType: 16 as never })).toThrow(/options\.kvType must be 'f16' or 'f32', got 16/);
  });

  it('rejects bad input with errors that name the argument', async () => {
    const seq = model.createSequence({ contextSize: 8 });
    await expect(seq.evaluate([512])).rejects.toThrow(RangeError);
    await expect(seq.evaluate([512])).rejects.toThrow(/tokens\[0\]/);
    await expect(seq.evaluate([-1])).rejects.toThrow(/tokens\[0\]/);
    await expect(seq.evaluate([1, 2, 3, 4, 5, 6, 7, 8, 9])).rejects.toThrow(/context of 8/);
    await expect(seq.evaluate([1, 2], { treeParents: Int32Array.from([0, -1]) })).rejects.toThrow(/treeParents\[0\]/);
    await expect(seq.evaluate([1, 2], { treeParents: Int32Array.from([-1]) })).rejects.toThrow(/treeParents has length 1/);
    await expect(seq.evaluate(new Float32Array([1.5]) as unknown as Int32Array)).rejects.toThrow(TypeError);
    expect(() => seq.truncate(3)).toThrow(RangeError);
    await seq.dispose();
    await expect(seq.evaluate([1])).rejects.toThrow(/disposed/);
    await expect(model.generate({ tokens: [1], maxTokens: -1 })).rejects.toThrow(/maxTokens/);
    await expect(model.generate({ maxTokens: 2 })).rejects.toThrow(/tokens or prompt/);
    // The prompt is checked as the speculative decoder checks it: each id against the vocabulary.
    await expect(model.generate({ tokens: [1, 512], maxTokens: 1 })).rejects.toThrow(new RangeError('tokens[1] = 512 is out of range for a vocabulary of 512'));
    await expect(model.generate({ tokens: [], maxTokens: 1 })).rejects.toThrow(new RangeError('tokens must not be empty'));
    await expect(model.generate({ tokens: [1], prompt: 'x', maxTokens: 1 })).rejects.toThrow(new TypeError('give tokens or prompt, not both'));
  });
});

describe('loading bad files', () => {
  const dir = suiteTempDir('osd-model-');

  it('a missing file names the path', async () => {
    await expect(loadModel(join(dir, 'nope.gguf'))).rejects.toThrow(/nope\.gguf/);
  });

  it.skipIf(!have)('a truncated llama2.c checkpoint names the file and the problem', async () => {
    const cut = join(dir, 'cut.bin');
    writeFileSync(cut, readFileSync(STORIES).subarray(0, 100000));
    const err = await loadModel(cut).catch((e: Error) => e);
    expect(err).toBeInstanceOf(Error);
    expect((err as Error).message).toContain('cut.bin');
    expect((err as Error).message).toMatch(/nor a llama2\.c checkpoint \(truncated llama2\.c checkpoint/);
  });

  it('a file that is no model says it is neither GGUF nor llama2.c (a text file read as a llama2.c header)', async () => {
    const text = join(dir, 'notes.txt');
    writeFileSync(text, 'These are some notes, not a model. '.repeat(20));
    const err = (await loadModel(text).catch((e: Error) => e)) as Error & { code?: string };
    expect(err.message).toMatch(/notes\.txt: not a GGUF file \(it does not begin with "GGUF"\) nor a llama2\.c checkpoint \(bad llama2\.c header/);
    expect(err.code).toBe('OSD_IO');
  });

  it('an empty file is called empty (it was reported as a truncated llama2.c header)', async () => {
    writeFileSync(join(dir, 'empty.gguf'), '');
    await expect(loadModel(join(dir, 'empty.gguf'))).rejects.toThrow(/empty\.gguf: the file is empty \(expected a GGUF or llama2\.c model\)/);
  });

  it('a corrupt GGUF gives a clear error, not a crash', async () => {
    const bad = join(dir, 'bad.gguf');
    const bytes = Buffer.alloc(64);
    bytes.write('GGUF', 0);
    bytes.writeUInt32LE(3, 4);
    bytes.writeBigUInt64LE(1n << 60n, 8); // absurd tensor count
    writeFileSync(bad, bytes);
    const err = await loadModel(bad).catch((e: Error) => e);
    expect((err as Error).message).toContain('bad.gguf');
  });

  it.skipIf(!have)('dispose is idempotent, waits for work, and supports await using', async () => {
    const copy = join(dir, 'stories.bin');
    copyFileSync(STORIES, copy);
    const m = await loadModel(copy);
    const pending = m.forward([1, 2, 3]);
    await m.dispose();
    await expect(pending).resolves.toBeInstanceOf(Float32Array);
    await m.dispose();
    expect(m.disposed).toBe(true);
    expect(() => m.createSequence()).toThrow(/disposed/);
    // Work started while dispose() waits is refused (it ran on, past the dispose that had resolved).
    const m3 = await loadModel(copy);
    const idle = m3.createSequence();
    const running = m3.generate({ tokens: [1], maxTokens: 50 });
    const disposing = m3.dispose();
    expect(m3.disposed).toBe(true);
    expect(() => idle.fork()).toThrow('the model was disposed');  // before its sequences are freed: the fork outlived them
    await expect(m3.generate({ tokens: [1], maxTokens: 200 })).rejects.toThrow('the model was disposed');
    expect(() => m3.createSequence()).toThrow('the model was disposed');
    await disposing;
    await running.catch(() => {});  // the running one settles either way: its tokens, or the disposal named
    {
      await using m2 = await loadModel(copy);
      expect(m2.info.vocabSize).toBe(512);
    }
  });

  it('loadModel checks its arguments', async () => {
    await expect(loadModel('')).rejects.toThrow(TypeError);
    await expect(loadModel(STORIES, { threads: -1 })).rejects.toThrow(/threads/);
    await expect(loadModel(STORIES, { signal: 5 as unknown as AbortSignal })).rejects.toThrow(/signal/);
    const ac = new AbortController();
    ac.abort();
    await expect(loadModel(STORIES, { signal: ac.signal })).rejects.toMatchObject({ name: 'AbortError' });
  });
});

describe('written models', () => {
  const dir = suiteTempDir('osd-written-');

  it('a random model is deterministic per seed and loads with its config', async () => {
    const { writeRandomModel } = await import('../lib/index.js');
    const config = { vocabSize: 97, embeddingLength: 32, layers: 2, heads: 4, kvHeads: 2, feedForwardLength: 64, contextLength: 64, seed: 7 };
    await writeRandomModel(join(dir, 'a.gguf'), config);
    await writeRandomModel(join(dir, 'b.gguf'), config);
    expect(readFileSync(join(dir, 'a.gguf')).equals(readFileSync(join(dir, 'b.gguf')))).toBe(true);
    await using m = await loadModel(join(dir, 'a.gguf'));
    expect(m.info).toMatchObject({ format: 'gguf', vocabSize: 97, layers: 2, heads: 4, kvHeads: 2, contextLength: 64 });
    expect(m.tokenizer).toBeUndefined();
    await expect(writeRandomModel(join(dir, 'c.gguf'), { ...config, heads: 3 })).rejects.toThrow(/multiple of heads/);
    // Loading refuses an odd head dimension (RoPE turns pairs): so does writing.
    await expect(writeRandomModel(join(dir, 'c.gguf'), { ...config, embeddingLength: 6, heads: 2, kvHeads: 2 })).rejects.toThrow(
      new RangeError('config: embeddingLength / heads must be even (RoPE turns pairs of dimensions), got 3'),
    );
    await expect(writeRandomModel(join(dir, 'c.gguf'), { ...config, type: 'Q4' as never })).rejects.toThrow(/type/);
    // llama.cpp's explicit "no vocabulary" (tokenizer.ggml.model = "no_vocab", older files "none"):
    // token ids only, as without the key.
    const { readGgufLayout, readTensorBytes, writeGgufRaw, kvString } = await import('../lib/train/ggufRewrite.js');
    const file = readGgufLayout(join(dir, 'a.gguf'));
    const tensors = file.tensors.map((t) => ({ name: t.name, dims: t.dims, type: t.type, data: readTensorBytes(file, t.name) }));
    for (const marker of ['no_vocab', 'none']) {
      writeGgufRaw(join(dir, 'nv.gguf'), [...file.kvs, { key: 'tokenizer.ggml.model', raw: kvString(marker) }], tensors);
      await using nv = await loadModel(join(dir, 'nv.gguf'));
      expect(nv.tokenizer, marker).toBeUndefined();
      expect(Array.from(await nv.forward([1, 2, 3]))).toEqual(Array.from(await m.forward([1, 2, 3])));
    }
  });

  it.skipIf(!have)('a saved model reads back with identical logits (F32) and close logits (F16)', async () => {
    const src = await loadModel(STORIES);
    await src.save(join(dir, 'stories.gguf'));
    await src.save(join(dir, 'stories16.gguf'), { type: 'F16' });
    const back = await loadModel(join(dir, 'stories.gguf'));
    const half = await loadModel(join(dir, 'stories16.gguf'));
    const toks = [1, 403, 407, 261];
    const a = await src.forward(toks);
    expect(Array.from(await back.forward(toks))).toEqual(Array.from(a));
    const h = await half.forward(toks);
    let worst = 0;
    for (let i = 0; i < a.length; i++) worst = Math.max(worst, Math.abs(a[i]! - h[i]!));
    expect(worst).toBeLessThan(0.05);
    await Promise.all([src.dispose(), back.dispose(), half.dispose()]);
  });

  it.skipIf(!have)('quantised saves: llama.cpp block formats, close logits, F16 for odd rows, lossless in their own type', async () => {
    const { readGgufMetadata } = await import('../lib/train/bpe.js');
    await using src = await loadModel(STORIES);
    const toks = [1, 403, 407, 261, 280];
    const ref = await src.forward(toks);
    const scale = Math.max(...Array.from(ref, Math.abs));
    // Worst logit error relative to the largest logit. This tiny model is sensitive (F16 moves it by
    // 0.3%, Q8_0 by about 10%); what is checked is the order of the formats and a loose bound.
    const tolerance = { Q8_0: 0.15, Q5_0: 0.6, Q5_1: 0.6, Q4_0: 1, Q4_1: 1 } as const;
    const errors: Record<string, number> = {};
    const f32Bytes = readFileSync(join(dir, 'stories.gguf')).length;
    for (const type of Object.keys(tolerance) as (keyof typeof tolerance)[]) {
      const path = join(dir, `stories-${type}.gguf`);
      await src.save(path, { type });
      const { tensors } = readGgufMetadata(path, { maxArrayLength: 0 }) as unknown as { tensors: { name: string; type: string; dims: number[] }[] };
      for (const t of tensors) {
        // Norms stay F32; stories260K's feed-forward width (172) is not a whole number of 32-blocks.
        const want = t.dims.length === 1 ? 'F32' : t.dims[0]! % 32 === 0 ? type : 'F16';
        expect(t.type, `${type}: ${t.name} [${t.dims.join(', ')}]`).toBe(want);
      }
      expect(tensors.some((t) => t.type === type)).toBe(true);
      expect(tensors.some((t) => t.type === 'F16')).toBe(true);
      expect(readFileSync(path).length).toBeLessThan(f32Bytes * 0.6);
      await using q = await loadModel(path);
      const got = await q.forward(toks);
      let worst = 0;
      for (let i = 0; i < ref.length; i++) worst = Math.max(worst, Math.abs(ref[i]! - got[i]!));
      expect(worst / scale, type).toBeLessThan(tolerance[type]);
      expect(worst, `${type} changes the logits`).toBeGreaterThan(0);
      errors[type] = worst;
      // Saved again in its own type, every matrix is copied as it is; so with 'keep' (mixed types).
      expect(q.info.matrixType).toBe('mixed');
      await q.save(join(dir, `again-${type}.gguf`), { type });
      expect(readFileSync(join(dir, `again-${type}.gguf`)).equals(readFileSync(path)), type).toBe(true);
      await q.save(join(dir, `keep-${type}.gguf`), { type: 'keep' });
      expect(readFileSync(join(dir, `keep-${type}.gguf`)).equals(readFileSync(path)), type).toBe(true);
      await using copy = await q.convert('keep');
      expect(copy.info.matrixType).toBe('mixed');
      expect(Array.from(await copy.forward(toks))).toEqual(Array.from(got));
    }
    expect(errors.Q8_0).toBeLessThan(Math.min(errors.Q5_0!, errors.Q5_1!));
    expect(Math.max(errors.Q5_0!, errors.Q5_1!)).toBeLessThan(Math.min(errors.Q4_0!, errors.Q4_1!));
    await expect(src.save(join(dir, 'bad.gguf'), { type: 'Q4_K' as never })).rejects.toThrow(RangeError);
    await expect(src.save(join(dir, 'bad.gguf'), { type: 'Q4_K' as never })).rejects.toThrow(/Q8_0/);
  });

  it.skipIf(!have)('convert gives the model in another storage type, in memory, as a saved file would', async () => {
    await using src = await loadModel(STORIES);
    expect(src.info.matrixType).toBe('F32');
    const toks = [1, 403, 407, 261];
    for (const type of ['F16', 'Q8_0', 'Q4_1'] as const) {
      await using conv = await src.convert(type);
      // stories260K's feed-forward width (172) keeps ffn_down in F16 for the block types.
      expect(conv.info.matrixType).toBe(type === 'F16' ? 'F16' : 'mixed');
      await src.save(join(dir, `conv-${type}.gguf`), { type });
      await using file = await loadModel(join(dir, `conv-${type}.gguf`));
      expect(Array.from(await conv.forward(toks))).toEqual(Array.from(await file.forward(toks)));
      // The same type again copies every matrix: identical logits.
      await using again = await conv.convert(type);
      expect(Array.from(await again.forward(toks))).toEqual(Array.from(await conv.forward(toks)));
    }
    await expect(src.convert('Q6_K' as never)).rejects.toThrow(RangeError);
    await expect(src.save(join(dir, 'x.gguf'), { type: 'Q6_K' as never })).rejects.toThrow(RangeError);
  });

  it('random models can be written quantised', async () => {
    const { writeRandomModel } = await import('../lib/index.js');
    const config = { vocabSize: 96, embeddingLength: 64, layers: 1, heads: 4, kvHeads: 2, feedForwardLength: 96, contextLength: 64, seed: 3 };
    await writeRandomModel(join(dir, 'r32.gguf'), config);
    await writeRandomModel(join(dir, 'r8.gguf'), { ...config, type: 'Q8_0' });
    expect(readFileSync(join(dir, 'r8.gguf')).length).toBeLessThan(readFileSync(join(dir, 'r32.gguf')).length * 0.4);
    await using a = await loadModel(join(dir, 'r32.gguf'));
    await using b = await loadModel(join(dir, 'r8.gguf'));
    const x = await a.forward([1, 2, 3]);
    const y = await b.forward([1, 2, 3]);
    let worst = 0;
    for (let i = 0; i < x.length; i++) worst = Math.max(worst, Math.abs(x[i]! - y[i]!));
    expect(worst).toBeLessThan(0.05 * Math.max(...Array.from(x, Math.abs)));
  });

  it('IQ4_XS and Q2_K fall back to IQ4_NL for rows of 32-value blocks, to F16 otherwise (as llama.cpp does); saved again, every matrix is copied', async () => {
    const { readGgufMetadata } = await import('../lib/train/bpe.js');
    // Rows of 288 (9 x 32) values in every matrix but ffn_down's (512 = 2 x 256); a vocabulary of
    // 100 rows does not matter (rows are quantised along their length).
    const config = { vocabSize: 100, embeddingLength: 288, layers: 1, heads: 4, kvHeads: 2, feedForwardLength: 512, contextLength: 32, seed: 5 };
    await writeRandomModel(join(dir, 'f32.gguf'), config);
    await using src = await loadModel(join(dir, 'f32.gguf'));
    const ref = await src.forward([1, 2, 3]);
    const scale = Math.max(...Array.from(ref, Math.abs));
    for (const type of ['IQ4_XS', 'Q2_K', 'IQ4_NL'] as const) {
      const path = join(dir, `${type}.gguf`);
      await src.save(path, { type });
      const { tensors } = readGgufMetadata(path, { maxArrayLength: 0 }) as unknown as { tensors: { name: string; type: string; dims: number[] }[] };
      for (const t of tensors) {
        const want = t.dims.length === 1 ? 'F32' : t.dims[0]! % 256 === 0 || type === 'IQ4_NL' ? type : 'IQ4_NL';
        expect(t.type, `${type}: ${t.name} [${t.dims.join(', ')}]`).toBe(want);
      }
      // The random model written in the type directly takes the same types.
      await writeRandomModel(join(dir, `w-${type}.gguf`), { ...config, type });
      const written = readGgufMetadata(join(dir, `w-${type}.gguf`), { maxArrayLength: 0 }) as unknown as { tensors: { type: string }[] };
      expect(written.tensors.map((t) => t.type)).toEqual(tensors.map((t) => t.type));
      await using q = await loadModel(path);
      const got = await q.forward([1, 2, 3]);
      let worst = 0;
      for (let i = 0; i < ref.length; i++) worst = Math.max(worst, Math.abs(ref[i]! - got[i]!));
      expect(worst / scale, type).toBeLessThan(type === 'Q2_K' ? 1 : 0.5);
      await q.save(join(dir, `again-${type}.gguf`), { type });
      expect(readFileSync(join(dir, `again-${type}.gguf`)).equals(readFileSync(path)), type).toBe(true);
      await using conv = await src.convert(type);
      expect(Array.from(await conv.forward([1, 2, 3]))).toEqual(Array.from(got));
    }
  });
});

describe('bad input to models and sequences', () => {
  const dir = suiteTempDir('osd-badinput-');
  const config = { vocabSize: 64, embeddingLength: 16, layers: 1, heads: 2, feedForwardLength: 32, contextLength: 32, seed: 1 };
  let model: Model;
  beforeAll(async () => {
    await writeRandomModel(join(dir, 'm.gguf'), config);
    model = await loadModel(join(dir, 'm.gguf'));
  });
  afterAll(async () => {
    await model?.dispose();
  });

  it('keepPath refuses a path longer than the evaluated nodes, or out of batch order (it wrote past the cache)', async () => {
    await using seq = model.createSequence({ contextSize: 4 });
    await seq.evaluate([1, 2, 3], { treeParents: Int32Array.from([-1, 0, 0]) });
    expect(() => seq.keepPath(0, [0, 1, 2, 2, 2, 2, 2, 2, 2, 2])).toThrow(new RangeError('keep_path: path has length 10, more than the 3 nodes evaluated after base'));
    expect(() => seq.keepPath(0, [0, 2, 1])).toThrow(/path\[2\] = 1 must be a later batch index than path\[1\]/);
    expect(() => seq.keepPath(0, [0, 0])).toThrow(RangeError);
    expect(seq.length).toBe(3);
    seq.keepPath(0, [0, 2]);
    expect(seq.length).toBe(2);
  });

  const draftPath = join(import.meta.dirname, '../models/default-draft.gguf');
  // (a vocabulary of 4096: 1e7 rows of logits are more than V8 can allocate)
  it.skipIf(!existsSync(draftPath))('evaluate refuses tokens that cannot fit before it allocates their logits (10M tokens aborted the process)', async () => {
    await using m = await loadModel(draftPath);
    await using seq = m.createSequence();
    const C = seq.capacity;
    // 1e7 x 4096 floats is more than V8 can allocate: it was a fatal error, not an exception.
    await expect(seq.evaluate(new Int32Array(1e7))).rejects.toThrow(new RangeError(`the sequence would hold 10000000 tokens, more than its context of ${C}`));
    await expect(m.forward(new Int32Array(1e7))).rejects.toThrow(RangeError);
    // With a signal (evaluated 64 tokens a call), a bad id is named by its index in the whole array,
    // before anything runs.
    const bad = [...Array(100).fill(1), m.info.vocabSize];
    await expect(seq.evaluate(bad, { signal: new AbortController().signal })).rejects.toThrow(
      new RangeError(`tokens[100] = ${m.info.vocabSize} is out of range for a vocabulary of ${m.info.vocabSize}`),
    );
    expect(seq.length).toBe(0);
  });

  it('evaluate and forward read their tokens when called (a caller changing the array afterwards changed the call)', async () => {
    const want = await model.forward([1, 40, 47]);
    const tk = Int32Array.of(1, 40, 47);
    const p = model.forward(tk);
    tk.fill(0);
    expect(Array.from(await p)).toEqual(Array.from(want));
  });

  it('truncate, keepPath and fork refuse to run under an unfinished evaluate (they reordered with it)', async () => {
    await using seq = model.createSequence();
    const p = seq.evaluate([1, 2, 3]);
    expect(() => seq.truncate(0)).toThrow(new Error('truncate: an evaluate() or draft() on this sequence has not finished; await it first'));
    expect(() => seq.keepPath(0, [0])).toThrow(/^keepPath: an evaluate\(\) or draft\(\)/);
    expect(() => seq.fork()).toThrow(/^fork: an evaluate\(\) or draft\(\)/);
    await p;
    seq.truncate(1);
    expect(seq.length).toBe(1);
    await seq.evaluate([9]).catch(() => undefined);
    await expect(seq.evaluate([99999])).rejects.toThrow();
    seq.truncate(0); // a failed call counts as finished
  });

  it('disposing a model ends the generations still running with "the model was disposed"', async () => {
    const m = await loadModel(join(dir, 'm.gguf'));
    const seq = m.createSequence();
    let tokens = 0;
    const running = m.generate({ tokens: [1], maxTokens: 1000, stopTokens: [], onToken: () => void tokens++ });
    while (tokens < 3) await new Promise((r) => setImmediate(r));
    await m.dispose();
    await expect(running).rejects.toMatchObject({ code: 'OSD_DISPOSED', message: 'the model was disposed' });
    expect(() => seq.length).toThrow(expect.objectContaining({ code: 'OSD_DISPOSED', message: 'the model was disposed' }));
    await seq.dispose(); // a no-op
    const own = model.createSequence();
    await own.dispose();
    expect(() => own.length).toThrow(expect.objectContaining({ code: 'OSD_DISPOSED', message: 'the sequence was disposed' }));
  });

  it('ropeTheta must be a finite number > 0, in a config and in a file (else the logits are NaN)', async () => {
    for (const ropeTheta of [-1, 0, Infinity])
      await expect(writeRandomModel(join(dir, 'r.gguf'), { ...config, ropeTheta })).rejects.toThrow(/ropeTheta must be a finite number > 0/);
    const bytes = readFileSync(join(dir, 'm.gguf'));
    const key = 'llama.rope.freq_base';
    const at = bytes.indexOf(key) + key.length + 4; // after the key and its f32 type tag
    expect(bytes.readFloatLE(at)).toBe(10000);
    bytes.writeFloatLE(-1, at);
    writeFileSync(join(dir, 'neg.gguf'), bytes);
    await expect(loadModel(join(dir, 'neg.gguf'))).rejects.toThrow(/rope\.freq_base must be a finite number > 0, got -1/);
  });

  it('generate checks stopTokens, onToken, seed and stream (also when greedy) and the options object', async () => {
    const base = { tokens: [1], maxTokens: 2 };
    const call = (o: object) => model.generate({ ...base, ...o } as never);
    await expect(call({ stopTokens: 'x' })).rejects.toThrow(new TypeError('stopTokens must be an Int32Array or an array of integers'));
    await expect(call({ stopTokens: [NaN] })).rejects.toThrow(new RangeError('stopTokens[0] must be an integer token id, got NaN'));
    await expect(call({ onToken: 5 })).rejects.toThrow(new TypeError('onToken must be a function'));
    await expect(call({ stream: 'x' })).rejects.toThrow(/stream must be a number or a bigint/);
    await expect(call({ seed: -1 })).rejects.toThrow(/seed must be a non-negative/);
    await expect(model.generate(null as never)).rejects.toThrow(new TypeError('options must be an object'));
    await expect(loadModel(join(dir, 'm.gguf'), null as never)).rejects.toThrow(new TypeError('options must be an object'));
    expect(() => model.createSequence(null as never)).toThrow(new TypeError('options must be an object'));
    expect(() => model.createSequence({ contextSize: 2 ** 31 })).toThrow(/contextSize must be an integer in/);
    await expect(model.save(join(dir, 'x.gguf'), null as never)).rejects.toThrow(new TypeError('options must be an object'));
    await using seq = model.createSequence();
    await expect(seq.evaluate([1], null as never)).rejects.toThrow(new TypeError('options must be an object'));
    // 'yes' or 0 was taken for its truthiness.
    await expect(seq.evaluate([1], { lastOnly: 'yes' as never })).rejects.toThrow(new TypeError('options.lastOnly must be a boolean'));
    expect(Array.from((await call({ stopTokens: [] })).tokens)).toHaveLength(2);
  });
});

describe('a padded embedding matrix (more rows than tokens)', () => {
  // Some GGUF files pad the embedding matrix past the tokenizer (Qwen's do). The ids past the
  // tokenizer have no text: generation must never draw them (it drew one and then failed).
  const DRAFT = join(import.meta.dirname, '../models/default-draft.gguf');
  /** Raw bytes of a GGUF array entry without its last element (string, f32 or i32 elements). */
  function dropLast(raw: Buffer): Buffer {
    const elem = raw.readUInt32LE(4);
    const n = Number(raw.readBigUInt64LE(8));
    let end = 16;
    if (elem === 8) for (let i = 0; i < n - 1; i++) end += 8 + Number(raw.readBigUInt64LE(end));
    else end += 4 * (n - 1);
    const out = Buffer.from(raw.subarray(0, end));
    out.writeBigUInt64LE(BigInt(n - 1), 8);
    return out;
  }

  it.skipIf(!existsSync(DRAFT))('generation and the n-gram decoder draw only ids with a token', async () => {
    const { readGgufLayout, readTensorBytes, writeGgufRaw } = await import('../lib/train/ggufRewrite.js');
    const { createSpeculativeDecoder } = await import('../lib/index.js');
    const f = readGgufLayout(DRAFT);
    // (Its padding token is the last one: dropped with it.)
    const kvs = f.kvs.filter((kv) => kv.key !== 'tokenizer.ggml.padding_token_id').map((kv) => (kv.key === 'tokenizer.ggml.tokens' || kv.key === 'tokenizer.ggml.token_type' ? { key: kv.key, raw: dropLast(kv.raw) } : kv));
    const tensors = f.tensors.map((t) => ({ name: t.name, dims: t.dims, type: t.type, data: Buffer.from(readTensorBytes(f, t.name)) }));
    // The padding row: 10x another row's embedding (tied output), so that it outscores every token.
    const emb = tensors.find((t) => t.name === 'token_embd.weight')!;
    const [d, V] = emb.dims as [number, number];
    const rows = new Float32Array(emb.data.buffer, emb.data.byteOffset, d * V);
    for (let j = 0; j < d; j++) rows[(V - 1) * d + j] = 10 * rows[44 * d + j]!;
    const path = join(tempDir('osd-padded-'), 'padded.gguf');
    writeGgufRaw(path, kvs, tensors);
    await using m = await loadModel(path);
    expect(m.info.vocabSize).toBe(V);
    expect(m.tokenizer!.vocabSize).toBe(V - 1);
    // The padding row does win over the full row, so the test can fail.
    const seq = m.createSequence();
    const last = await seq.evaluate([1, 2], { lastOnly: true });
    await seq.dispose();
    const argmax = (row: Float32Array, n: number) => row.subarray(0, n).reduce((b, x, i, a) => (x > a[b]! ? i : b), 0);
    expect(argmax(last, V)).toBe(V - 1);
    const greedy = await m.generate({ tokens: [1, 2], maxTokens: 6 });
    expect(greedy.tokens[0]).toBe(argmax(last, V - 1));
    expect(Math.max(...greedy.tokens)).toBeLessThan(V - 1);
    const sampled = await m.generate({ tokens: [1, 2], maxTokens: 6, sampling: { temperature: 1 }, seed: 3 });
    expect(Math.max(...sampled.tokens)).toBeLessThan(V - 1);
    const streamed: number[] = [];
    for await (const c of m.stream({ tokens: [1, 2], maxTokens: 6 })) streamed.push(...c.tokens);
    expect(streamed).toEqual(Array.from(greedy.tokens));
    await using dec = createSpeculativeDecoder({ target: m, strategy: { kind: 'ngram' } });
    expect(Array.from((await dec.generate({ tokens: [1, 2], maxTokens: 6 })).tokens)).toEqual(Array.from(greedy.tokens));
    // A prompt whose tail occurred before: the first step verifies lookup tokens, on the target's
    // rows cut to the tokens (they were read at the padded width, every row after the first shifted).
    const repeated = [1, 2, 5, 2];
    const want = await m.generate({ tokens: repeated, maxTokens: 6 });
    const drafted = dec.metrics().drafted;
    expect(Array.from((await dec.generate({ tokens: repeated, maxTokens: 6 })).tokens)).toEqual(Array.from(want.tokens));
    expect(dec.metrics().drafted).toBeGreaterThan(drafted + 1);
  });
});
