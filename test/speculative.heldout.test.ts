// Greedy exactness on the default pair (issue 5): for every strategy, speculative output is
// token-identical to the target's own greedy output on 50 held-out prompts of every domain of the
// pair's data. The prompts are test/fixtures/heldout-prompts.json, cut from the held-out splits by
// `npx tsx lib/train/demoPrompts.ts --per-domain 64 --chars 160 --out test/fixtures/heldout-prompts.json`
// after `npm run prepare:data` (never training text). The draft knows general English only, so the
// code, SQL and email domains exercise frequent rejections, and English frequent acceptances; the
// tree strategy compacts the KV cache on every step.
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createSpeculativeDecoder, loadModel, type Model, type Strategy } from '../lib/index.js';

const root = join(import.meta.dirname, '..');
const TARGET = join(root, 'models', 'default-target.gguf');
const DRAFT = join(root, 'models', 'default-draft.gguf');
const PROMPTS = join(root, 'test', 'fixtures', 'heldout-prompts.json');
const DOMAINS = ['speeches', 'novel', 'definitions', 'code', 'sql', 'email'] as const;
const PER_DOMAIN = 50;
const MAX_TOKENS = 16;

const have = existsSync(TARGET) && existsSync(DRAFT);
if (!have) console.warn('skip: the default pair (models/default-*.gguf) is missing');

const STRATEGIES: Strategy[] = [
  { kind: 'chain', length: 4 },
  { kind: 'tree', budget: 16, maxDepth: 6, branching: 3 },
  { kind: 'adaptive', maxLength: 8 },
  { kind: 'ngram', length: 4 },
];

describe.skipIf(!have)('greedy exactness on the default pair, held-out prompts of every domain', () => {
  let target: Model;
  let draft: Model;
  const prompts = (JSON.parse(readFileSync(PROMPTS, 'utf8')) as { domains: Record<string, string[]> }).domains;

  beforeAll(async () => {
    target = await loadModel(TARGET);
    draft = await loadModel(DRAFT);
  });

  afterAll(async () => {
    await Promise.all([target?.dispose(), draft?.dispose()]);
  });

  it('the fixture holds at least 50 distinct held-out prompts per domain', () => {
    for (const d of DOMAINS) {
      expect(prompts[d]?.length ?? 0, d).toBeGreaterThanOrEqual(PER_DOMAIN);
      expect(new Set(prompts[d]).size, d).toBe(prompts[d]!.length);
    }
  });

  for (const domain of DOMAINS) {
    it(`${domain}: every strategy's greedy output equals the target's on ${PER_DOMAIN} prompts`, { timeout: 300_000 }, async () => {
      const mine = prompts[domain]!.slice(0, PER_DOMAIN);
      const want: number[][] = [];
      for (const p of mine) want.push(Array.from((await target.generate({ prompt: p, maxTokens: MAX_TOKENS, stopTokens: [] })).tokens));
      for (const strategy of STRATEGIES) {
        const dec = createSpeculativeDecoder({ target, draft, strategy, maxConcurrent: 1 });
        const mismatches: string[] = [];
        for (const [i, p] of mine.entries()) {
          const got = Array.from((await dec.generate({ prompt: p, maxTokens: MAX_TOKENS, stopTokens: [] })).tokens);
          if (got.join(',') !== want[i]!.join(',')) mismatches.push(`prompt ${i}: want [${want[i]!.join(',')}] got [${got.join(',')}]`);
        }
        const m = dec.metrics();
        await dec.dispose();
        expect(mismatches, `${strategy.kind}: ${mismatches.length} of ${mine.length} prompts differ`).toEqual([]);
        expect(m.tokens).toBe(PER_DOMAIN * MAX_TOKENS);
        // Speculation really happened: drafts were proposed and verified.
        expect(m.drafted).toBeGreaterThan(0);
      }
    });
  }

  it("Model.stream's text adds up to generate()'s, whole characters per chunk", async () => {
    for (const p of [prompts.novel![0]!, prompts.code![0]!]) {
      const want = await target.generate({ prompt: p, maxTokens: 30, stopTokens: [] });
      let text = '';
      const tokens: number[] = [];
      for await (const c of target.stream({ prompt: p, maxTokens: 30, stopTokens: [] })) {
        text += c.text;
        tokens.push(...c.tokens);
        expect(c.text).not.toContain('\uFFFD');
      }
      expect(tokens).toEqual(Array.from(want.tokens));
      expect(text).toBe(want.text);
    }
  });

  it('stop strings end the output at the token that completes them, the same tokens for every strategy', { timeout: 120_000 }, async () => {
    const tk = target.tokenizer!;
    const mine = [...prompts.novel!.slice(0, 4), ...prompts.code!.slice(0, 4)];
    let stopped = 0;
    for (const p of mine)
      for (const stop of [['e'], ['.'], [' the', '\n']]) {
        // The target's greedy tokens cut one token at a time: where the decoded text first holds a stop string.
        const plain = Array.from((await target.generate({ prompt: p, maxTokens: 40, stopTokens: [] })).tokens);
        let want = plain;
        for (let i = 1; i <= plain.length; i++)
          if (stop.some((s) => tk.decode(plain.slice(0, i)).includes(s))) {
            want = plain.slice(0, i);
            break;
          }
        const cut = want.length < plain.length || stop.some((s) => tk.decode(plain).includes(s));
        stopped += cut ? 1 : 0;
        for (const strategy of [{ kind: 'chain', length: 1 }, { kind: 'chain', length: 8 }, ...STRATEGIES] as Strategy[]) {
          const dec = createSpeculativeDecoder({ target, draft, strategy, maxConcurrent: 1 });
          const r = await dec.generate({ prompt: p, maxTokens: 40, stopTokens: [], stop });
          await dec.dispose();
          expect(Array.from(r.tokens), `${strategy.kind} ${JSON.stringify(stop)} on ${JSON.stringify(p.slice(0, 30))}`).toEqual(want);
          expect(r.stopReason).toBe(cut ? 'stop' : 'maxTokens');
        }
      }
    expect(stopped).toBeGreaterThan(mine.length); // most cases really stop early
  });
});
