// DraftPool: routing by label, classifier and bandits; forking on a new label; per-draft metrics.
import { existsSync, mkdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { createDraftPool, draftCheckpointPath, loadModel, OnlineDecoder, writeRandomModel, type Model } from '../lib/index.js';
import { suiteTempDir } from './helpers/tmp.js';

const STORIES = join(import.meta.dirname, '../../shared/models/stories260K.bin');
const have = existsSync(STORIES);

describe.skipIf(!have)('DraftPool (stories260K)', () => {
  let target: Model;
  let good: Model;
  let bad: Model;
  const dir = suiteTempDir('osd-pool-');
  beforeAll(async () => {
    target = await loadModel(STORIES);
    await target.save(join(dir, 'good.gguf'), { type: 'F16' });
    good = await loadModel(join(dir, 'good.gguf'));
    await writeRandomModel(join(dir, 'bad.gguf'), { vocabSize: 512, embeddingLength: 16, layers: 1, heads: 2, feedForwardLength: 32, contextLength: 512, seed: 9 });
    bad = await loadModel(join(dir, 'bad.gguf'));
  });
  afterAll(async () => {
    await Promise.all([target?.dispose(), good?.dispose(), bad?.dispose()]);
  });

  it('routes by label, forks a new label from a base draft, and reports per draft', async () => {
    await using pool = createDraftPool({ target, drafts: { base: good }, forkFrom: 'base', distill: { interval: 1000 } });
    const forks: string[] = [];
    pool.on('fork', (e: { draft: string }) => forks.push(e.draft));
    const a = await pool.generate({ tokens: [1, 403], maxTokens: 10, label: 'base' });
    const b = await pool.generate({ tokens: [1, 403], maxTokens: 10, label: 'code' });
    expect(a.draft).toBe('base');
    expect(b.draft).toBe('code');
    expect(forks).toEqual(['code']);
    expect(Array.from(b.tokens)).toEqual(Array.from(a.tokens));
    expect(pool.drafts).toEqual(['base', 'code']);
    const m = pool.metrics();
    expect(m.base!.requests).toBe(1);
    expect(m.code!.requests).toBe(1);
    await expect(pool.generate({ tokens: [1], maxTokens: 2 })).rejects.toThrow(/label is required/);
    await expect(pool.generate({ tokens: [1], maxTokens: 2, label: 5 as never })).rejects.toThrow(new TypeError('label must be a non-empty string, got number'));
    // stream(): the same tokens, the draft named in the return value, counted per draft.
    const got: number[] = [];
    const it = pool.stream({ tokens: [1, 403], maxTokens: 10, label: 'code' });
    let r = await it.next();
    for (; !r.done; r = await it.next()) got.push(...r.value.tokens);
    expect(got).toEqual(Array.from(a.tokens));
    expect(r.value).toEqual({ stopReason: a.stopReason, draft: 'code' });
    expect(pool.metrics().code!.requests).toBe(2);
  });

  it('forkFrom { closest: true } ranks drafts with a restricted head too (a token outside it is not an infinite loss)', async () => {
    const story = [1, ...(await target.generate({ tokens: [1], maxTokens: 24 })).tokens];
    // good restricted to every id but one the story uses: still far closer than the random model.
    const missing = story[3]!;
    await using closeButRestricted = await good.withHead(Array.from({ length: 512 }, (_, i) => i).filter((i) => i !== missing));
    for (const drafts of [{ bad, close: closeButRestricted }, { close: closeButRestricted, bad }]) {
      await using pool = createDraftPool({ target, drafts, forkFrom: { closest: true }, distill: { interval: 1000 } });
      const forks: { draft: string; from: string }[] = [];
      pool.on('fork', (e) => forks.push(e));
      await pool.generate({ tokens: story, maxTokens: 4, label: 'stories' });
      expect(forks).toEqual([{ draft: 'stories', from: 'close' }]);
    }
  });

  it('forkFrom { closest: true }: a new label starts from the draft that predicts its first prompt best', async () => {
    const story = [1, ...(await target.generate({ tokens: [1], maxTokens: 24 })).tokens];
    for (const drafts of [{ bad, good }, { good, bad }]) {
      await using pool = createDraftPool({ target, drafts, forkFrom: { closest: true }, distill: { interval: 1000 } });
      const forks: { draft: string; from: string }[] = [];
      pool.on('fork', (e) => forks.push(e));
      const r = await pool.generate({ tokens: story, maxTokens: 4, label: 'stories' });
      expect(r.draft).toBe('stories');
      // good is the target itself (stored as F16), bad a random model: good, whichever comes first.
      expect(forks).toEqual([{ draft: 'stories', from: 'good' }]);
      // A prompt of one token says nothing: the first draft.
      await pool.generate({ tokens: [1], maxTokens: 4, label: 'short' });
      expect(forks[1]).toEqual({ draft: 'short', from: Object.keys(drafts)[0] });
    }
    expect(() => createDraftPool({ target, drafts: { a: good }, forkFrom: { closest: false } as never })).toThrow(new TypeError('forkFrom must name a draft, or be { closest: true }'));
    expect(() => createDraftPool({ target, drafts: { a: good }, forkFrom: { closest: true, among: ['a'] } as never })).toThrow(/^forkFrom\.among is not an option/);
    expect(() => createDraftPool({ target, drafts: { a: good }, forkFrom: 5 as never })).toThrow(new TypeError('forkFrom must name a draft, or be { closest: true }'));
  });

  it('a constructor that fails on one draft stops the decoders it had started for the others', async () => {
    const dispose = vi.spyOn(OnlineDecoder.prototype, 'dispose');
    try {
      expect(() => createDraftPool({ target, drafts: { a: good, b: bad, c: 'not a model' as never }, distill: { interval: 1000 } })).toThrow(
        new TypeError('drafts.c must be a loaded Model'),
      );
      expect(dispose).toHaveBeenCalledTimes(2);
      await Promise.all(dispose.mock.results.map((r) => r.value));
    } finally {
      dispose.mockRestore();
    }
  });

  it('a classifier routes, and a bandit learns to prefer the draft with higher acceptance', async () => {
    await using byClass = createDraftPool({ target, drafts: { good, bad }, router: (r) => (r.tokens && Array.from(r.tokens).includes(7) ? 'bad' : 'good'), distill: { enabled: false } });
    expect((await byClass.generate({ tokens: [1, 7], maxTokens: 4 })).draft).toBe('bad');
    expect((await byClass.generate({ tokens: [1, 8], maxTokens: 4 })).draft).toBe('good');
    for (const router of ['ucb', 'thompson'] as const) {
      await using pool = createDraftPool({ target, drafts: { good, bad }, router, distill: { enabled: false }, seed: 3 });
      const picks: string[] = [];
      for (let i = 0; i < 16; i++) picks.push((await pool.generate({ tokens: [1, 403 + (i % 5)], maxTokens: 12 })).draft);
      const lateGood = picks.slice(8).filter((p) => p === 'good').length;
      expect(lateGood).toBeGreaterThanOrEqual(6);
    }
    // Concurrent first requests spread over the untried drafts (they all went to the first one).
    await using fresh = createDraftPool({ target, drafts: { good, bad }, router: 'ucb', distill: { enabled: false } });
    const first = await Promise.all([0, 1, 2, 3].map((i) => fresh.generate({ tokens: [1, 403 + i], maxTokens: 6 })));
    expect(new Set(first.map((r) => r.draft))).toEqual(new Set(['good', 'bad']));
  });

  it("forwards a draft's update errors, and a fork that failed is tried again (it failed for good)", async () => {
    const sub = join(dir, 'gone');
    mkdirSync(sub);
    await using base = await loadModel(join(dir, 'good.gguf'));
    await using pool = createDraftPool({ target, drafts: { base }, forkFrom: 'base', distill: { interval: 1000, autosaveEvery: 1, autosavePath: join(sub, 'ck.gguf'), positions: 'all' } });
    const errors: { draft: string; error: Error }[] = [];
    pool.on('update-error', (e) => errors.push(e));
    rmSync(sub, { recursive: true });
    // The fork's decoder cannot autosave there: the request fails...
    await expect(pool.generate({ tokens: [1, 403], maxTokens: 4, label: 'code' })).rejects.toThrow(/cannot write in/);
    // ... and so does the base draft's autosave after an update, reported with the draft's name.
    await pool.generate({ tokens: [1, 403, 407], maxTokens: 12, label: 'base' });
    await pool.updateNow().catch(() => {});
    expect(errors.map((e) => e.draft)).toEqual(['base']);
    expect(errors[0]!.error.message).toMatch(/ck\.base\.gguf|gone/);
    // Once the directory is back, the label forks.
    mkdirSync(sub);
    expect((await pool.generate({ tokens: [1, 403], maxTokens: 4, label: 'code' })).draft).toBe('code');
    expect(pool.drafts).toEqual(['base', 'code']);
  });

  it('each draft checkpoints to its own file and resumes from it', async () => {
    const ck = join(dir, 'ck.gguf');
    expect(draftCheckpointPath(ck, 'code')).toBe(join(dir, 'ck.code.gguf'));
    expect(draftCheckpointPath('/a/ck', 'x/y')).toBe('/a/ck.x%2Fy');
    const load = () => Promise.all([loadModel(join(dir, 'good.gguf')), loadModel(join(dir, 'bad.gguf'))]);
    const [g1, b1] = await load();
    {
      await using pool = createDraftPool({ target, drafts: { good: g1, bad: b1 }, distill: { interval: 1000, autosaveEvery: 1, autosavePath: ck, lr: 1e-3, positions: 'all' } });
      await pool.generate({ tokens: [1, 403, 407], maxTokens: 12, label: 'good' });
      await pool.generate({ tokens: [1, 261, 378], maxTokens: 12, label: 'bad' });
      await pool.updateNow();
    }
    expect(existsSync(ck)).toBe(false);
    const probe = [1, 403, 407, 11];
    for (const [name, m] of [['good', g1], ['bad', b1]] as const) {
      await using saved = await loadModel(draftCheckpointPath(ck, name));
      expect(Array.from(await saved.forward(probe))).toEqual(Array.from(await m.forward(probe)));
    }
    // A new pool over fresh copies resumes each draft from its own file.
    const [g2, b2] = await load();
    {
      await using pool = createDraftPool({ target, drafts: { good: g2, bad: b2 }, distill: { interval: 1000, resumeFrom: ck } });
      await pool.generate({ tokens: [1, 403], maxTokens: 2, label: 'good' });
      await pool.generate({ tokens: [1, 403], maxTokens: 2, label: 'bad' });
    }
    expect(Array.from(await g2.forward(probe))).toEqual(Array.from(await g1.forward(probe)));
    expect(Array.from(await b2.forward(probe))).toEqual(Array.from(await b1.forward(probe)));
    expect(Array.from(await g2.forward(probe))).not.toEqual(Array.from(await b2.forward(probe)));
    await Promise.all([g1, b1, g2, b2].map((m) => m.dispose()));
  });

  it('rejects bad configuration', () => {
    expect(() => createDraftPool({ target, drafts: {} })).toThrow(/at least one/);
    expect(() => createDraftPool({ target, drafts: { a: good }, router: 'epsilon' as never })).toThrow(/router/);
    expect(() => createDraftPool({ target, drafts: { a: good }, forkFrom: 'b' })).toThrow(/forkFrom/);
    // Inherited keys are no drafts ('toString' is `in` every object; a fork from it threw later, unnamed).
    expect(() => createDraftPool({ target, drafts: { a: good }, forkFrom: 'toString' })).toThrow(new RangeError("forkFrom names no draft: 'toString'"));
    expect(() => createDraftPool({ target, drafts: [good] as never })).toThrow(/drafts must name/);
    expect(() => createDraftPool({ target, drafts: { a: good }, seed: 'x' as never })).toThrow(new TypeError('seed must be a number, got "x"'));
  });

  it('rejects bad requests and drafts, and drafts added after dispose', async () => {
    const pool = createDraftPool({ target, drafts: { a: good } });
    await expect(pool.generate(undefined as never)).rejects.toThrow(new TypeError('options must be an object'));
    expect(() => pool.addDraft(5 as never, bad)).toThrow(new TypeError('name must be a non-empty string'));
    await pool.dispose();
    expect(() => pool.addDraft('b', bad)).toThrow(/the pool was disposed/);
    expect(pool.drafts).toEqual(['a']);
  });
});
