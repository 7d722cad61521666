// `osd demo` end to end on the embedded default pair (a very short run), and `osd generate`.
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { demoSvg, formatDemo, DEFAULT_DRAFT, DEFAULT_TARGET, type DemoResult } from '../lib/demo.js';
import { tempDir } from './helpers/tmp.js';

const root = join(import.meta.dirname, '..');
const have = existsSync(DEFAULT_TARGET) && existsSync(DEFAULT_DRAFT);
if (!have) console.warn('skip: the default pair (models/default-*.gguf) is not there; run npm run train:default');

const cli = (args: string[]) =>
  execFileSync(process.execPath, ['--import', 'tsx', join(root, 'lib/cli.ts'), ...args], { encoding: 'utf8', cwd: root, timeout: 300_000 });

describe.skipIf(!have)('osd demo', () => {
  it('runs the three runs over the four phases and prints JSON and a plot', () => {
    const out = tempDir('osd-demo-');
    const json = JSON.parse(cli(['demo', '--json', '--requests', '2', '--max-tokens', '8', '--out', out]));
    expect(json.runs.map((r: { run: string }) => r.run)).toEqual(['static', 'online', 'pool']);
    for (const r of json.runs) {
      expect(r.phases.map((p: { phase: string }) => p.phase)).toEqual(['english', 'code', 'sql', 'email']);
      for (const p of r.phases) {
        expect(p.acceptanceStart).toBeGreaterThanOrEqual(0);
        expect(p.acceptanceEnd).toBeLessThanOrEqual(1);
        expect(p.speedupEnd).toBeGreaterThan(0);
      }
    }
    expect(json.runs[0].updates).toBe(0);
    // Every phase's denominator comes from the target-only runs paired with its requests.
    expect(Object.keys(json.targetTokensPerSecond)).toEqual(['english', 'code', 'sql', 'email']);
    for (const v of Object.values(json.targetTokensPerSecond)) expect(v).toBeGreaterThan(0);
    const svg = readFileSync(join(out, 'demo.svg'), 'utf8');
    expect(svg).toContain('<svg');
    expect(svg).toContain('online distillation');
  });

  it('osd demo takes a strategy and what the updates learn from', () => {
    const out = tempDir('osd-demo-');
    const args = ['demo', '--json', '--requests', '2', '--max-tokens', '8', '--runs', 'online', '--out', out];
    const json = JSON.parse(cli([...args, '--strategy', 'adaptive+lookup:6', '--positions', 'all']));
    expect(json.strategy).toEqual({ kind: 'adaptive', maxLength: 6, lookup: true });
    expect(json.distill.positions).toBe('all');
    expect(json.runs.map((r: { run: string }) => r.run)).toEqual(['online']);
    // Adaptive may decode a phase with the target alone: its acceptance is then null, not 0.
    for (const p of json.runs[0].phases) for (const a of [p.acceptanceStart, p.acceptanceEnd]) expect(a === null || (a >= 0 && a <= 1)).toBe(true);
    expect(() => cli([...args, '--positions', 'some'])).toThrow(/--positions must be all or mismatch, got 'some'/);
  });

  it('osd generate writes text from the default target, greedy and reproducible', () => {
    const a = cli(['generate', '--max-tokens', '12', 'The President said']);
    const b = cli(['generate', '--max-tokens', '12', 'The President said']);
    expect(a).toBe(b);
    expect(a.trim().length).toBeGreaterThan(0);
  });

  it('osd generate --json prints the text and tokens with or without --draft (greedy: the same)', () => {
    const args = ['generate', '--json', '--max-tokens', '12', 'The President said'];
    const plain = JSON.parse(cli(args));
    const spec = JSON.parse(cli([...args, '--draft', DEFAULT_DRAFT]));
    expect(plain.tokens.length).toBe(12);
    expect(spec.text).toBe(plain.text);
    expect(spec.tokens).toEqual(plain.tokens);
    expect(spec.stopReason).toBe(plain.stopReason);
    expect(spec.stats.tokens).toBe(12);
  });
});

describe('demo plot', () => {
  it('draws every run and phase', () => {
    const series = Array.from({ length: 8 }, (_, i) => ({ phase: ['english', 'code', 'sql', 'email'][Math.floor(i / 2)]!, drafted: 10, accepted: i, acceptance: i / 10, speedup: 1 + i / 10 }));
    const svg = demoSvg({
      target: 't',
      draft: 'd',
      requestsPerPhase: 2,
      maxTokens: 4,
      targetTokensPerSecond: {},
      runs: (['static', 'online', 'pool'] as const).map((run) => ({ run, phases: [], series, updates: 0, rollbacks: 0, forgetting: 0 })),
    });
    for (const s of ['english', 'code', 'sql', 'email', 'no adaptation', 'per-domain drafts']) expect(svg).toContain(s);
    expect((svg.match(/<path /g) ?? []).length).toBe(6);
  });

  it('acceptance is pooled over drafted tokens, and requests that drafted nothing (adaptive decoding alone) leave gaps, not zeros', () => {
    // Requests 2-5 drafted nothing: the 4-request window ending at request 5 has no acceptance.
    const series = Array.from({ length: 8 }, (_, i) => {
      const drafted = i >= 2 && i <= 5 ? 0 : 8;
      return { phase: ['english', 'code', 'sql', 'email'][Math.floor(i / 2)]!, drafted, accepted: drafted / 2, acceptance: drafted ? 0.5 : null, speedup: 1 };
    });
    const base = { target: 't', draft: 'd', requestsPerPhase: 2, maxTokens: 4, targetTokensPerSecond: {} };
    const svg = demoSvg({ ...base, runs: [{ run: 'online', phases: [], series, updates: 0, rollbacks: 0, forgetting: null }] });
    // The acceptance line: requests 0-4 then 6-7 (two pieces); the speedup line: one piece.
    const paths = svg.match(/<path d="[^"]*"/g) ?? [];
    expect(paths.length).toBe(2);
    expect((paths[0]!.match(/M/g) ?? []).length).toBe(2);
    expect((paths[1]!.match(/M/g) ?? []).length).toBe(1);
    const table = formatDemo({
      ...base,
      runs: [{ run: 'online', phases: [{ phase: 'code', acceptanceStart: null, acceptanceEnd: 0.25, draftedStart: 0, draftedEnd: 16, speedupStart: 1, speedupEnd: 1.1 }], series, updates: 1, rollbacks: 0, forgetting: null }],
      load: { start: 0, end: 0, cores: 2 },
    });
    expect(table).toMatch(/online\s+code\s+- \(0\)\s+0\.250 \(16\)\s+-\s+1\.00x\s+1\.10x/);
    expect(table).toContain('English forgetting -');
  });

  it('the table says what target-only decoding ran at, and warns when the machine was busy', () => {
    const result = (load: DemoResult['load']): DemoResult => ({
      target: 't', draft: 'd', requestsPerPhase: 2, maxTokens: 4, targetTokensPerSecond: { english: 812.4, code: 790 }, runs: [], load,
    });
    const idle = formatDemo(result({ start: 0.2, end: 0.4, cores: 2 }));
    expect(idle).toContain('target-only decoding, tokens/s: english 812, code 790');
    expect(idle).not.toContain('busy');
    expect(formatDemo(result({ start: 0.3, end: 2.8, cores: 2 }))).toContain('note: the machine was busy (load average 0.3 -> 2.8 on 2 cores)');
  });
});
