// Online distillation on the real stories260K target with a small random draft: recording,
// triggers, updates that lower the loss, exact output throughout, rollback, checkpoints.
import { spawn } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createOnlineDecoder, loadModel, Model, teacherTopK, writeRandomModel, type UpdateEvent } from '../lib/index.js';
import { suiteTempDir } from './helpers/tmp.js';

const STORIES = join(import.meta.dirname, '../../shared/models/stories260K.bin');
const have = existsSync(STORIES);
if (!have) console.warn(`skip: ${STORIES} not found (online tests need ../shared/models)`);

function argmax(row: Float32Array): number {
  let b = 0;
  for (let i = 1; i < row.length; i++) if (row[i]! > row[b]!) b = i;
  return b;
}

describe.skipIf(!have)('online distillation (stories260K)', () => {
  let target: Model;
  const dir = suiteTempDir('osd-online-');
  const draftPath = join(dir, 'draft.gguf');
  const prompts = [[1, 403, 407], [1, 261, 378], [1, 395, 42], [1, 300, 11], [1, 461, 461], [1, 288, 13], [1, 431, 293], [1, 363, 416]];

  beforeAll(async () => {
    target = await loadModel(STORIES);
    await writeRandomModel(draftPath, { vocabSize: 512, embeddingLength: 32, layers: 2, heads: 4, kvHeads: 2, feedForwardLength: 64, contextLength: 512, seed: 11 });
  });
  afterAll(async () => {
    await target?.dispose();
  });

  it('records exactly the corrected positions', async () => {
    await using draft = await loadModel(draftPath);
    const dec = createOnlineDecoder({ target, draft, strategy: { kind: 'chain', length: 3 }, distill: { interval: 1000 } });
    let mismatches = 0;
    dec.on('step', (e: { drafted: number; accepted: number }) => (mismatches += e.accepted < e.drafted ? 1 : 0));
    for (const p of prompts.slice(0, 3)) await dec.generate({ tokens: p, maxTokens: 20 });
    const recs = dec.recorded();
    expect(recs.length).toBe(3);
    expect(recs.reduce((a, r) => a + r.positions.length, 0)).toBe(mismatches);
    // At each recorded position the draft's greedy choice differs from the emitted (target) token.
    for (const r of recs) {
      for (const p of r.positions) {
        const dl = await draft.forward(r.tokens.slice(0, p + 1));
        const tl = await target.forward(r.tokens.slice(0, p + 1));
        const next = r.tokens[p + 1]!;
        expect(argmax(tl.subarray(p * 512))).toBe(next);
        expect(argmax(dl.subarray(p * 512))).not.toBe(next);
      }
    }
    await dec.dispose();
  });

  it('a record longer than maxRecordTokens keeps its trailing tokens and drops positions near the cut', async () => {
    await using draft = await loadModel(draftPath);
    const W = 16;
    const dec = createOnlineDecoder({ target, draft, strategy: { kind: 'chain', length: 3 }, distill: { interval: 1000, maxRecordTokens: W, positions: 'all' } });
    const r = await dec.generate({ tokens: prompts[0]!, maxTokens: 40, stopTokens: [] });
    const recs = dec.recorded();
    expect(recs.length).toBe(1);
    const all = [...prompts[0]!, ...r.tokens];
    expect(recs[0]!.tokens).toEqual(all.slice(all.length - W));
    // Every emitted position was a teacher (positions 'all'); those within W / 4 of the cut are gone.
    expect(recs[0]!.positions).toEqual(Array.from({ length: W - 1 - W / 4 }, (_, i) => W / 4 + i));
    await dec.dispose();
  });

  it('updates at the configured interval, lowers the loss, raises acceptance and stays exact', async () => {
    await using draft = await loadModel(draftPath);
    const dec = createOnlineDecoder({ target, draft, strategy: { kind: 'chain', length: 3 }, distill: { interval: 4, lr: 3e-3, epochs: 4, guardMargin: 1 } });
    const updates: UpdateEvent[] = [];
    dec.on('update', (e: UpdateEvent) => updates.push(e));
    const acceptance: number[] = [];
    for (let round = 0; round < 4; round++) {
      for (const p of prompts.slice(0, 4)) {
        const want = await target.generate({ tokens: p, maxTokens: 24 });
        const got = await dec.generate({ tokens: p, maxTokens: 24 });
        expect(Array.from(got.tokens)).toEqual(Array.from(want.tokens));
        acceptance.push(got.stats.acceptanceRate);
      }
      await dec.updateNow().catch(() => null); // let a triggered update finish before the next round
    }
    expect(updates.length).toBeGreaterThanOrEqual(3);
    expect(updates[0]!.records).toBe(4);
    for (const u of updates) expect(u.lossAfter).toBeLessThan(u.lossBefore);
    const first = acceptance.slice(0, 4).reduce((a, b) => a + b) / 4;
    const last = acceptance.slice(-4).reduce((a, b) => a + b) / 4;
    expect(last).toBeGreaterThan(first);
    expect(dec.metrics().updates).toBe(updates.length);
    await dec.dispose();
  });

  it('streamed requests count in the guard window: a stream-only server keeps updating', async () => {
    await using draft = await loadModel(draftPath);
    const dec = createOnlineDecoder({ target, draft, strategy: { kind: 'chain', length: 3 }, distill: { interval: 2, guardWindow: 2, guardMargin: 1 } });
    let updates = 0;
    dec.on('update', () => updates++);
    for (let round = 0; round < 4; round++) {
      for (const p of prompts.slice(2 * round, 2 * round + 2)) {
        const want = await target.generate({ tokens: p, maxTokens: 16 });
        const got: number[] = [];
        for await (const chunk of dec.stream({ tokens: p, maxTokens: 16 })) got.push(...chunk.tokens);
        expect(got).toEqual(Array.from(want.tokens));
      }
      // Each round's two streams end the previous update's guard window and fill the buffer
      // again: wait for the triggered update (no updateNow(), which would bypass the trigger).
      for (let t = 0; updates <= round && t < 200; t++) await new Promise((r) => setTimeout(r, 25));
    }
    expect(updates).toBe(4);
    expect(dec.metrics().recentAcceptance).toBeGreaterThanOrEqual(0);
    await dec.dispose();
  });

  it("many concurrent streams add no listener each (Node warned of a leak past ten) and give their stats through onStats", async () => {
    await using draft = await loadModel(draftPath);
    const dec = createOnlineDecoder({ target, draft, maxConcurrent: 16, distill: { interval: 1000 } });
    const warnings: Error[] = [];
    const onWarning = (w: Error) => warnings.push(w);
    let acceptanceEvents = 0;
    dec.on('acceptance', () => acceptanceEvents++);
    process.on('warning', onWarning);
    try {
      const stats: { drafted: number; tokens: number }[] = [];
      await Promise.all(
        Array.from({ length: 16 }, async (_, i) => {
          const got: number[] = [];
          for await (const chunk of dec.stream({ tokens: prompts[i % prompts.length]!, maxTokens: 12, stopTokens: [], onStats: (s) => stats.push(s) }))
            got.push(...chunk.tokens);
          expect(got.length).toBe(12);
        }),
      );
      await new Promise((r) => setImmediate(r));
      expect(warnings.filter((w) => w.name === 'MaxListenersExceededWarning')).toEqual([]);
      expect(stats.length).toBe(16);
      for (const s of stats) expect(s.tokens).toBe(12);
      // Every stream counted in the sliding window (from its stats, not a step listener's sums).
      expect(acceptanceEvents).toBe(16);
    } finally {
      process.off('warning', onWarning);
      await dec.dispose();
    }
  });

  it('an F16 draft keeps serving in F16 after updates (servedType auto), and checkpoints in F16', async () => {
    const { readGgufMetadata } = await import('../lib/train/bpe.js');
    const f16Path = join(dir, 'draft16.gguf');
    await writeRandomModel(f16Path, { vocabSize: 512, embeddingLength: 32, layers: 2, heads: 4, kvHeads: 2, feedForwardLength: 64, contextLength: 512, seed: 12, type: 'F16' });
    for (const [servedType, want] of [['auto', 'F16'], ['F32', 'F32'], ['Q8_0', 'Q8_0']] as const) {
      await using draft = await loadModel(f16Path);
      expect(draft.info.matrixType).toBe('F16');
      const before = await draft.forward([1, 2, 3]);
      const dec = createOnlineDecoder({ target, draft, strategy: { kind: 'chain', length: 3 }, distill: { interval: 1000, lr: 3e-3, servedType } });
      for (const p of prompts.slice(0, 3)) await dec.generate({ tokens: p, maxTokens: 16 });
      const u = await dec.updateNow();
      expect(u!.steps).toBeGreaterThan(0);
      expect(draft.info.matrixType, servedType).toBe(want);
      const after = await draft.forward([1, 2, 3]);
      expect(after.some((v, i) => v !== before[i]), 'the update changed the served weights').toBe(true);
      for (const p of prompts.slice(0, 2)) {
        const got = await dec.generate({ tokens: p, maxTokens: 16 });
        expect(Array.from(got.tokens)).toEqual(Array.from((await target.generate({ tokens: p, maxTokens: 16 })).tokens));
      }
      const ckpt = join(dir, `served-${servedType}.gguf`);
      await dec.saveDraft(ckpt);
      const { tensors } = readGgufMetadata(ckpt, { maxArrayLength: 0 }) as unknown as { tensors: { name: string; type: string }[] };
      expect(tensors.find((t) => t.name === 'blk.0.attn_q.weight')!.type).toBe(want);
      await expect(dec.saveDraft(join(dir, 'no-such-dir', 'x.gguf'))).rejects.toThrow();
      await dec.dispose();
    }
    await using draft = await loadModel(f16Path);
    expect(() => createOnlineDecoder({ target, draft, distill: { servedType: 'Q4_K' as never } })).toThrow(/servedType/);
  });

  it('rolls back to the previous weights bit for bit when acceptance falls', async () => {
    await using draft = await loadModel(draftPath);
    // First teach the draft something, so there is acceptance to lose.
    const good = createOnlineDecoder({ target, draft, strategy: { kind: 'chain', length: 3 }, distill: { interval: 1000, lr: 3e-3, epochs: 6 } });
    for (const p of prompts.slice(0, 4)) await good.generate({ tokens: p, maxTokens: 24 });
    await good.updateNow();
    await good.dispose();
    // Then an absurd learning rate wrecks it; the guard must restore the weights exactly.
    const dec = createOnlineDecoder({ target, draft, strategy: { kind: 'chain', length: 3 }, distill: { interval: 1000, lr: 50, epochs: 3, guardWindow: 2, guardMargin: 0 } });
    for (const p of prompts.slice(0, 2)) await dec.generate({ tokens: p, maxTokens: 24 });
    expect(dec.metrics().recentAcceptance).toBeGreaterThan(0);
    const before = await draft.forward([1, 403, 407]);
    const rollbacks: string[] = [];
    dec.on('rollback', (e: { reason: string }) => rollbacks.push(e.reason));
    expect(await dec.updateNow()).not.toBeNull();
    expect(Array.from(await draft.forward([1, 403, 407]))).not.toEqual(Array.from(before));
    const served: number[][] = [];
    for (const p of prompts.slice(0, 2)) served.push([...p, ...(await dec.generate({ tokens: p, maxTokens: 24 })).tokens]);
    await new Promise((r) => setTimeout(r, 50));
    expect(rollbacks.length).toBe(1);
    // The previous weights' agreement in the reason: how often their argmax after each prefix of a
    // served request is the target's next token, over the tokens it emitted.
    let hit = 0;
    let n = 0;
    for (const [i, all] of served.entries()) {
      const logits = await draft.forward(all);  // the previous weights: restored by now
      for (let j = prompts[i]!.length - 1; j < all.length - 1; j++, n++) hit += argmax(logits.subarray(j * 512, (j + 1) * 512)) === all[j + 1] ? 1 : 0;
    }
    expect(rollbacks[0]).toContain(`fell from ${(hit / n).toFixed(3)} (previous weights)`);
    expect(rollbacks[0]).toContain(`over the ${n} emitted tokens`);
    expect(rollbacks[0]).toMatch(/^agreement with the target fell from 0\.\d+ \(previous weights\) to 0\.\d+ over the \d+ emitted tokens of the 2 requests since$/);
    expect(Array.from(await draft.forward([1, 403, 407]))).toEqual(Array.from(before));
    expect(dec.metrics().rollbacks).toBe(1);
    await dec.dispose();
  });

  it('the guard compares both weights on the same requests: traffic that gets harder is no reason to roll back', async () => {
    await using draft = await loadModel(draftPath);
    // The draft learns two requests by heart ...
    const good = createOnlineDecoder({ target, draft, strategy: { kind: 'chain', length: 3 }, distill: { interval: 1000, lr: 3e-3, epochs: 30, positions: 'all' } });
    for (const p of prompts.slice(0, 2)) await good.generate({ tokens: p, maxTokens: 24 });
    await good.updateNow();
    await good.dispose();
    // ... then a harmless update (a learning rate too small to move any choice) comes between
    // those requests and others, which the draft predicts far worse.
    const dec = createOnlineDecoder({ target, draft, strategy: { kind: 'chain', length: 3 }, distill: { interval: 1000, lr: 1e-12, guardWindow: 2, guardMargin: 0 } });
    for (const p of prompts.slice(0, 2)) await dec.generate({ tokens: p, maxTokens: 24 });
    const before = dec.metrics().recentAcceptance;
    const rollbacks: string[] = [];
    dec.on('rollback', (e: { reason: string }) => rollbacks.push(e.reason));
    expect(await dec.updateNow()).not.toBeNull();
    for (const p of prompts.slice(4, 6)) await dec.generate({ tokens: p, maxTokens: 24 });
    await new Promise((r) => setTimeout(r, 50));
    // Acceptance fell by more than half (a guard comparing it before and after would roll back) ...
    expect(dec.metrics().recentAcceptance).toBeLessThan(before / 2);
    // ... but on those same requests the new weights agree with the target as often as the old.
    expect(dec.metrics().guardRequests).toBeNull();
    expect(rollbacks).toEqual([]);
    expect(dec.metrics()).toMatchObject({ updates: 1, rollbacks: 0 });
    await dec.dispose();
  });

  it('an update that fails keeps its number: the next update begun gets the next one', async () => {
    await using draft = await loadModel(draftPath);
    const before = await draft.forward([1, 403, 407]);
    // A learning rate this large makes the weights, then the loss, non-finite: each update rolls back.
    const dec = createOnlineDecoder({ target, draft, strategy: { kind: 'chain', length: 3 }, distill: { interval: 1000, lr: 1e30, epochs: 3 } });
    const seen: string[] = [];
    dec.on('update-start', (e) => seen.push(`start ${e.update}`));
    dec.on('rollback', (e) => seen.push(`rollback ${e.update}: ${e.reason}`));
    dec.on('update', (e) => seen.push(`update ${e.update}`));
    for (let round = 0; round < 2; round++) {
      await dec.generate({ tokens: prompts[round]!, maxTokens: 16 });
      await dec.updateNow();
    }
    // They used to be numbered 1 and 1 again (the number was the applied count plus one).
    expect(seen.map((l) => l.replace(/:.*/, ''))).toEqual(['start 1', 'rollback 1', 'start 2', 'rollback 2']);
    expect(seen[1]).toMatch(/not finite/);
    expect(dec.metrics()).toMatchObject({ updates: 0, rollbacks: 2 });
    expect(Array.from(await draft.forward([1, 403, 407]))).toEqual(Array.from(before));
    await dec.dispose();
  });

  it('updateNow while a guard window is open closes that window and frees its weight copy', async () => {
    await using draft = await loadModel(draftPath);
    // The guard's copies are made by convert('keep'): count them, and those still alive at the end.
    const copies: Model[] = [];
    const convert = Model.prototype.convert;
    Model.prototype.convert = async function (this: Model, type) {
      const m = await convert.call(this, type);
      if (type === 'keep') copies.push(m);
      return m;
    };
    try {
      const dec = createOnlineDecoder({ target, draft, strategy: { kind: 'chain', length: 3 }, distill: { interval: 1000, guardWindow: 8 } });
      for (const p of prompts.slice(0, 3)) {
        await dec.generate({ tokens: p, maxTokens: 12 });
        expect(await dec.updateNow()).not.toBeNull();
      }
      expect(copies.length).toBe(3);
      expect(copies.filter((m) => !m.disposed).length).toBe(1); // the open guard's
      await dec.dispose();
      expect(copies.filter((m) => !m.disposed).length).toBe(0);
      await expect(dec.updateNow()).rejects.toMatchObject({ code: 'OSD_DISPOSED', message: 'the decoder was disposed' });
      await expect(dec.saveDraft(join(dir, 'after-dispose.gguf'))).rejects.toMatchObject({ code: 'OSD_DISPOSED', message: 'the decoder was disposed' });
      // Disposed while an update trains: that update is dropped and says so (it resolved null, as
      // for an empty buffer).
      const dec2 = createOnlineDecoder({ target, draft, strategy: { kind: 'chain', length: 3 }, distill: { interval: 1000, epochs: 20 } });
      await dec2.generate({ tokens: prompts[4]!, maxTokens: 12 });
      const started = new Promise((r) => dec2.once('update-start', r));
      const training = expect(dec2.updateNow()).rejects.toMatchObject({ code: 'OSD_DISPOSED', message: 'the decoder was disposed' });  // handled from the start
      await started;
      await dec2.dispose();
      await training;
    } finally {
      Model.prototype.convert = convert;
    }
  });

  it("the guard judges an update by the requests that started after it", async () => {
    await using draft = await loadModel(draftPath);
    const dec = createOnlineDecoder({ target, draft, strategy: { kind: 'chain', length: 3 }, distill: { interval: 1000, guardWindow: 4, positions: 'all' }, maxConcurrent: 2 });
    await dec.generate({ tokens: prompts[0]!, maxTokens: 12 });
    expect(dec.metrics().guardRequests).toBeNull();
    // A long request on the old weights, still running when the update lands (checked: else the
    // test would pass without the fix).
    let steps = 0;
    let swapped = false;
    const onStep = () => void steps++;
    dec.on('step', onStep);
    dec.on('update', () => void (swapped = true));
    const old = dec.generate({ tokens: prompts[1]!, maxTokens: 480, stopTokens: [] }).then(() => swapped);
    while (steps < 2) await new Promise((r) => setImmediate(r));
    expect(await dec.updateNow()).not.toBeNull();
    expect(await old).toBe(true); // it ended after the swap
    dec.off('step', onStep);
    expect(dec.metrics().guardRequests).toBe(0);
    await dec.generate({ tokens: prompts[2]!, maxTokens: 8 });
    expect(dec.metrics().guardRequests).toBe(1);
    await dec.dispose();
  });

  it('checkpoints survive a process killed in the middle of writing', async () => {
    await using draft = await loadModel(draftPath);
    const ckpt = join(dir, 'ckpt.gguf');
    await draft.save(ckpt);
    const script = `
      const { loadModel } = await import(${JSON.stringify(join(import.meta.dirname, '../lib/index.ts'))});
      const m = await loadModel(${JSON.stringify(STORIES)});
      for (;;) await m.save(${JSON.stringify(ckpt)});
    `;
    for (const delay of [150, 400, 900]) {
      const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], { stdio: 'ignore' });
      await new Promise((r) => setTimeout(r, delay));
      child.kill('SIGKILL');
      await new Promise((r) => child.on('exit', r));
      const m = await loadModel(ckpt); // the old or a complete new file, never a torn one
      expect([512]).toContain(m.info.vocabSize);
      await m.dispose();
    }
    // saveDraft / resumeFrom round trip.
    const dec = createOnlineDecoder({ target, draft, distill: { resumeFrom: join(dir, 'none.gguf') } });
    await dec.saveDraft(join(dir, 'saved.gguf'));
    await dec.dispose();
    await using d2 = await loadModel(draftPath);
    const dec2 = createOnlineDecoder({ target, draft: d2, distill: { resumeFrom: join(dir, 'saved.gguf') } });
    await dec2.generate({ tokens: [1], maxTokens: 1 });
    expect(Array.from(await d2.forward([1, 5]))).toEqual(Array.from(await draft.forward([1, 5])));
    await dec2.dispose();
  });

  it('replay mixes records of earlier updates into later ones', async () => {
    await using draft = await loadModel(draftPath);
    const dec = createOnlineDecoder({ target, draft, strategy: { kind: 'chain', length: 3 }, distill: { interval: 100, replay: 0.5, replayRecords: 3, guardMargin: 1 } });
    for (const p of prompts.slice(0, 4)) await dec.generate({ tokens: p, maxTokens: 16 });
    const first = await dec.updateNow();
    expect(first).toMatchObject({ records: 4, replayed: 0 });
    for (const p of prompts.slice(4, 6)) {
      const want = await target.generate({ tokens: p, maxTokens: 16 });
      expect(Array.from((await dec.generate({ tokens: p, maxTokens: 16 })).tokens)).toEqual(Array.from(want.tokens));
    }
    // 2 new records, and as many again (replay 0.5) from the reservoir of the first 4, which keeps 3.
    expect(await dec.updateNow()).toMatchObject({ records: 4, replayed: 2 });
    await dec.dispose();
  });

  it('rejects bad configuration', async () => {
    await using draft = await loadModel(draftPath);
    expect(() => createOnlineDecoder({ target, draft, distill: { interval: 0 } })).toThrow(/interval/);
    expect(() => createOnlineDecoder({ target, draft, distill: { loss: 'kl' as never } })).toThrow(/distill.loss/);
    expect(() => createOnlineDecoder({ target, draft, distill: { lr: -1 } })).toThrow(/lr/);
    expect(() => createOnlineDecoder({ target, draft, distill: { trainThreads: -1 } })).toThrow(/distill.trainThreads/);
    expect(() => createOnlineDecoder({ target, draft, distill: { replay: 1 } })).toThrow(/distill.replay must be in \[0, 1\)/);
    expect(() => createOnlineDecoder({ target, draft, distill: { replayRecords: 0 } })).toThrow(/distill.replayRecords/);
    expect(() => createOnlineDecoder({ target, draft, distill: { autosaveEvery: 2 } })).toThrow(/autosavePath/);
    expect(() => createOnlineDecoder({ target, draft, strategy: { kind: 'ngram' } })).toThrow(/ngram/);
    // Strings passed the range checks by coercion ('0.5' > 0) and failed in a background update.
    expect(() => createOnlineDecoder({ target, draft, distill: { beta: '0.5' as never } })).toThrow(new TypeError('distill.beta must be a number, got string'));
    expect(() => createOnlineDecoder({ target, draft, distill: { autosaveEvery: 1, autosavePath: '/nonexistent/dir/draft.gguf' } })).toThrow(
      new Error('distill.autosavePath: cannot write in /nonexistent/dir'),
    );
    // A misspelt option was ignored, and the default trained instead.
    expect(() => createOnlineDecoder({ target, draft, distill: { learningRate: 1 } as never })).toThrow(/^distill\.learningRate is not an option; the options are: loss, beta, .*\blr\b/);
    expect(() => createOnlineDecoder({ target, draft, distill: { interval: 2.5 } })).toThrow(new RangeError('distill.interval must be an integer >= 1, got 2.5'));
    expect(() => createOnlineDecoder({ target, draft, distill: { maxBufferBytes: '4096' as never } })).toThrow(/distill.maxBufferBytes must be a number/);
    expect(() => createOnlineDecoder({ target, draft, distill: { enabled: 'no' as never } })).toThrow(new TypeError('distill.enabled must be a boolean'));
    expect(() => createOnlineDecoder({ target, draft, distill: { resumeFrom: 5 as never } })).toThrow(/distill.resumeFrom must be a non-empty string/);
    expect(() => teacherTopK(new Float32Array(4), NaN)).toThrow(/^k must be an integer >= 1/);
    expect(() => teacherTopK([1, 2] as never, 1)).toThrow(new TypeError('row must be a Float32Array'));
    expect(() => teacherTopK(new Float32Array(0), 1)).toThrow(new RangeError('row must not be empty'));
    expect(() => teacherTopK(Float32Array.of(1, NaN), 1)).toThrow(new RangeError('row contains NaN or +Infinity'));
    expect(() => teacherTopK(Float32Array.of(-Infinity, -Infinity), 1)).toThrow(new RangeError('row is all -Infinity (no token has probability > 0)'));
    // Best first, ties to the lower id; probabilities of softmax at temperature 1.
    const t = teacherTopK(Float32Array.of(0, 2, 1, 2, -Infinity), 3);
    expect(Array.from(t.ids)).toEqual([1, 3, 2]);
    const z = 2 * Math.exp(2) + Math.exp(1) + 1;
    Array.from(t.probs).forEach((p, i) => expect(p).toBeCloseTo([Math.exp(2) / z, Math.exp(2) / z, Math.exp(1) / z][i]!, 6));
    await writeRandomModel(join(dir, 'v500.gguf'), { vocabSize: 500, embeddingLength: 16, layers: 1, heads: 2, feedForwardLength: 32, contextLength: 64 });
    await using other = await loadModel(join(dir, 'v500.gguf'));
    expect(() => createOnlineDecoder({ target, draft: other })).toThrow(/vocabulary/);
    // A teacher wider than the vocabulary failed every update later; the target as its own draft
    // would be trained in place.
    expect(() => createOnlineDecoder({ target, draft, distill: { topK: 513 } })).toThrow(new RangeError('distill.topK must be at most the vocabulary (512), got 513'));
    expect(() => createOnlineDecoder({ target, draft: target })).toThrow(/draft must be another model than target/);
  });

  it('a draft with a shorter context than the records learns (every update failed)', async () => {
    await writeRandomModel(join(dir, 'ctx64.gguf'), { vocabSize: 512, embeddingLength: 32, layers: 1, heads: 2, feedForwardLength: 64, contextLength: 64, seed: 3 });
    await using draft = await loadModel(join(dir, 'ctx64.gguf'));
    await using dec = createOnlineDecoder({ target, draft, distill: { interval: 1000, positions: 'all' } });
    const errors: Error[] = [];
    dec.on('update-error', (e) => errors.push(e.error));
    await dec.generate({ tokens: prompts[0]!, maxTokens: 100, stopTokens: [] });
    expect(dec.recorded()[0]!.tokens.length).toBe(64);
    expect(await dec.updateNow()).toMatchObject({ records: 1 });
    expect(errors).toEqual([]);
  });

  it('maxAgeMs trains on an old record even when no other request comes (it was checked only as requests ended)', async () => {
    await using draft = await loadModel(draftPath);
    await using dec = createOnlineDecoder({ target, draft, distill: { interval: 1000, maxAgeMs: 50, positions: 'all' } });
    const updated = new Promise<UpdateEvent>((resolve) => dec.once('update', resolve));
    const t0 = Date.now();
    await dec.generate({ tokens: prompts[0]!, maxTokens: 12 });
    expect((await updated).records).toBe(1);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(50);
    expect(dec.recorded()).toEqual([]);
  });

  it('dispose stops an update between optimizer steps (it waited for every epoch)', async () => {
    await using draft = await loadModel(draftPath);
    const dec = createOnlineDecoder({ target, draft, distill: { interval: 1000, positions: 'all', epochs: 100_000 } });
    await dec.generate({ tokens: prompts[0]!, maxTokens: 12 });
    let started = false;
    dec.on('update-start', () => (started = true));
    const update = dec.updateNow();
    update.catch(() => {});
    while (!started) await new Promise((r) => setTimeout(r, 5));
    await dec.dispose(); // 100,000 epochs would take hours
    await expect(update).rejects.toMatchObject({ code: 'OSD_DISPOSED' });
  });

  it('a listener that throws does not stall the distiller; its error becomes a process warning', async () => {
    await using draft = await loadModel(draftPath);
    const dec = createOnlineDecoder({ target, draft, distill: { interval: 1000, positions: 'all' } });
    const warnings: Error[] = [];
    const onWarning = (w: Error) => warnings.push(w);
    process.on('warning', onWarning);
    try {
      let updates = 0;
      let later = 0;
      dec.on('update', () => {
        updates++;
        throw new Error('listener bug');
      });
      dec.on('update', () => later++); // listeners after the one that throws still hear the event
      for (let i = 0; i < 3; i++) {
        await dec.generate({ tokens: prompts[i]!, maxTokens: 12 });
        expect(await dec.updateNow()).toMatchObject({ update: i + 1 });
      }
      expect([updates, later]).toEqual([3, 3]);
      await new Promise((r) => setImmediate(r));
      const ours = warnings.filter((w) => (w as Error & { code?: string }).code === 'OSD_LISTENER_ERROR');
      expect(ours.length).toBe(3);
      expect(ours[0]!.message).toMatch(/a 'update' listener threw: Error: listener bug/);
    } finally {
      process.off('warning', onWarning);
      await dec.dispose();
    }
  });

  it('a checkpoint that cannot be resumed from rejects requests and reports it, and the process lives on', async () => {
    await using draft = await loadModel(draftPath);
    // A truncated checkpoint, and one of another shape.
    const bytes = readFileSync(draftPath);
    writeFileSync(join(dir, 'truncated.gguf'), bytes.subarray(0, Math.floor(bytes.length / 2)));
    for (const bad of [join(dir, 'truncated.gguf'), join(dir, 'v500.gguf')]) {
      const dec = createOnlineDecoder({ target, draft, distill: { resumeFrom: bad } });
      const errors: Error[] = [];
      dec.on('update-error', (e: { error: Error }) => errors.push(e.error));
      await new Promise((r) => setTimeout(r, 200)); // the load fails before any request: no crash
      await expect(dec.generate({ tokens: prompts[0]!, maxTokens: 4 })).rejects.toThrow(/distill.resumeFrom .* could not be resumed from/);
      await expect(dec.saveDraft(join(dir, 'after-bad-resume.gguf'))).rejects.toThrow(/could not be resumed from/);
      expect(existsSync(join(dir, 'after-bad-resume.gguf'))).toBe(false);
      expect(errors.length).toBe(1);
      await dec.dispose();
    }
  });
});
