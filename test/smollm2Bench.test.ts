// The SmolLM2 measurements end to end on tiny settings: `npm run bench:smollm2` (bench/smollm2.ts)
// in --quick mode with one prompt of a few tokens per domain, and `osd demo --target --draft` on the
// SmolLM2 pair with 2 requests per phase. Both need ../shared/models/smollm2 (they skip and say why
// without it); the draft is the trained one where it exists (models/ or data/smollm2/, from npm run
// train:smollm2-draft), else a 1-block cut of the target. The error paths run everywhere.
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { SMOLLM2_DRAFTS, findDraft, type Row } from '../bench/smollm2.js';
import { createOnlineDecoder, loadModel, type UpdateEvent } from '../lib/index.js';
import { DEMO_DISTILL_LARGE_VOCAB } from '../lib/demo.js';
import { writeCut } from '../lib/train/draftProbe.js';
import { readGgufLayout } from '../lib/train/ggufRewrite.js';
import { SMOLLM2 } from './helpers/llamaCpp.js';
import { suiteTempDir, tempDir } from './helpers/tmp.js';

const root = join(import.meta.dirname, '..');
const haveTarget = existsSync(SMOLLM2);
// The trained draft where it exists; otherwise the target's first block with its head, cut byte for
// byte (a valid draft with the same tokenizer, weak but enough to run every path end to end), written
// before this file's tests into a directory removed after them.
const trained = SMOLLM2_DRAFTS.find((p) => existsSync(p));
const cutDir = suiteTempDir('osd-smolcut-');
const draft = trained ?? (haveTarget ? join(cutDir, 'cut1.gguf') : undefined);
beforeAll(() => {
  if (draft && !trained) writeCut(readGgufLayout(SMOLLM2), draft, { layers: 1 });
});
if (!haveTarget) console.warn(`skip: ${SMOLLM2} not found; the SmolLM2 bench and demo runs are skipped`);
let haveLlama = true;
try {
  await import('node-llama-cpp');
} catch {
  haveLlama = false;
  console.warn('skip: node-llama-cpp is not installed; the bench runs without its rows');
}

const tsx = (args: string[]) => [process.execPath, ['--import', 'tsx', ...args]] as const;

describe('bench/smollm2.ts', () => {
  it('names the training script when the draft is missing', () => {
    expect(() => findDraft('/nonexistent/draft.gguf')).toThrow(/npm run train:smollm2-draft/);
    const [cmd, args] = tsx([join(root, 'bench/smollm2.ts'), '--quick', '--draft', '/nonexistent/draft.gguf', '--target', haveTarget ? SMOLLM2 : '/nonexistent/t.gguf']);
    const r = spawnSync(cmd, args, { cwd: root, encoding: 'utf8', timeout: 60_000 });
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(haveTarget ? /npm run train:smollm2-draft/ : /target not found/);
  });

  it('rejects unknown flags with its usage', () => {
    const [cmd, args] = tsx([join(root, 'bench/smollm2.ts'), '--bogus']);
    const r = spawnSync(cmd, args, { cwd: root, encoding: 'utf8', timeout: 60_000 });
    expect(r.status).toBe(2);
    expect(r.stderr).toMatch(/usage: npx tsx bench\/smollm2.ts/);
  });

  it.skipIf(!haveTarget || !draft)('--quick runs every configuration on every domain and sampling and writes JSON', async () => {
    const out = join(tempDir('osd-smolbench-'), 'smollm2.json');
    const [cmd, args] = tsx([join(root, 'bench/smollm2.ts'), '--quick', '--tokens', '6', '--llama-threads', '1', '--draft', draft!, '--out', out, '--json-only']);
    execFileSync(cmd, args, { cwd: root, encoding: 'utf8', timeout: 240_000, stdio: ['ignore', 'pipe', 'pipe'] });
    const json = JSON.parse(readFileSync(out, 'utf8')) as { rows: Row[]; summary: string[]; draft: string; machine: object; probe: object };
    expect(json.draft).toBe(draft);
    expect(json.machine).toBeTruthy();
    // A draft with a restricted head also runs with its whole head.
    await using d = await loadModel(draft!);
    const fullHead = d.info.headTokens < d.info.vocabSize ? ['chain g=4 (full head)', 'tree 16 (full head)', 'adaptive (full head)'] : [];
    if (fullHead.length) expect(json.summary.some((l) => /restricted head over the whole head/.test(l))).toBe(true);
    const configs = ['target only', 'chain g=4', 'tree 16', 'adaptive', 'adaptive+lookup', 'ngram', ...fullHead, ...(haveLlama ? ['llama.cpp', 'llama.cpp draft', 'llama.cpp draft g=4', 'llama.cpp lookup'] : [])];
    for (const domain of ['english', 'code', 'sql', 'email'])
      for (const sampling of ['greedy', 'T=0.8']) {
        const mine = json.rows.filter((r) => r.domain === domain && r.sampling === sampling);
        expect(mine.map((r) => r.config)).toEqual(configs);
        for (const r of mine) {
          expect(r.tokensPerSecond).toBeGreaterThan(0);
          expect(r.speedup).toBeGreaterThan(0);
        }
        const chain = mine.find((r) => r.config === 'chain g=4')!;
        expect(chain.acceptance).toBeGreaterThanOrEqual(0);
        expect(chain.acceptance).toBeLessThanOrEqual(1);
        expect(chain.tokensPerPass).toBeGreaterThanOrEqual(1);
        expect(mine.find((r) => r.config === 'target only')!.speedup).toBe(1);
      }
    expect(json.summary.length).toBeGreaterThan(0);
  }, 300_000);
});

describe('osd demo on SmolLM2', () => {
  it('needs both --target and --draft', () => {
    const [cmd, args] = tsx([join(root, 'lib/cli.ts'), 'demo', '--target', SMOLLM2]);
    const r = spawnSync(cmd, args, { cwd: root, encoding: 'utf8', timeout: 60_000 });
    expect(r.status).toBe(2); // a usage error
    expect(r.stderr).toMatch(/give both --target and --draft/);
  });

  it.skipIf(!haveTarget || !draft)('accepts --target and --draft and reports every phase as JSON (2 requests per phase)', () => {
    const dir = tempDir('osd-smoldemo-');
    const saved = join(dir, 'adapted.gguf');
    const [cmd, args] = tsx([
      join(root, 'lib/cli.ts'), 'demo', '--json', '--target', SMOLLM2, '--draft', draft!,
      '--requests-per-phase', '2', '--max-tokens', '6', '--runs', 'online', '--save-draft', saved, '--out', dir,
    ]);
    const json = JSON.parse(execFileSync(cmd, args, { cwd: root, encoding: 'utf8', timeout: 240_000 }));
    expect(json.target).toBe(SMOLLM2);
    expect(json.draft).toBe(draft);
    expect(json.requestsPerPhase).toBe(2);
    expect(json.distill.topK).toBe(64); // the large-vocabulary settings
    expect(json.runs.map((r: { run: string }) => r.run)).toEqual(['online']);
    const phases = json.runs[0].phases as { phase: string; acceptanceStart: number; acceptanceEnd: number; speedupEnd: number }[];
    expect(phases.map((p) => p.phase)).toEqual(['english', 'code', 'sql', 'email']);
    for (const p of phases) {
      expect(p.acceptanceStart).toBeGreaterThanOrEqual(0);
      expect(p.acceptanceEnd).toBeLessThanOrEqual(1);
      expect(p.speedupEnd).toBeGreaterThan(0);
    }
    expect(Number.isFinite(json.runs[0].forgetting)).toBe(true);
    expect(json.savedDraft).toBe(saved);
    expect(existsSync(saved)).toBe(true);
  }, 300_000);
});

describe.skipIf(!haveTarget || !draft)('online decoding on SmolLM2', () => {
  it('stays token-identical to target-only greedy decoding across draft updates', async () => {
    await using target = await loadModel(SMOLLM2);
    await using d = await loadModel(draft!);
    const dec = createOnlineDecoder({
      target,
      draft: d,
      strategy: { kind: 'chain', length: 3 },
      distill: { ...DEMO_DISTILL_LARGE_VOCAB, interval: 2, epochs: 2 },
    });
    const updates: UpdateEvent[] = [];
    dec.on('update', (e: UpdateEvent) => updates.push(e));
    const prompts = ['The history of the city begins', 'SELECT name FROM users WHERE', 'def parse_args(argv):', 'Dear team, thank you for'];
    for (let round = 0; round < 2; round++) {
      for (const prompt of prompts) {
        const want = await target.generate({ prompt, maxTokens: 10 });
        const got = await dec.generate({ prompt, maxTokens: 10 });
        expect(Array.from(got.tokens)).toEqual(Array.from(want.tokens));
      }
      await dec.updateNow().catch(() => null); // the next round decodes with the updated draft
    }
    expect(updates.length).toBeGreaterThanOrEqual(1);
    expect(dec.metrics().updates).toBe(updates.length);
    await dec.dispose();
  }, 300_000);
});
