// The main job: a stream of prompts whose domain shifts in phases (general English, then code, SQL
// and email), served three ways side by side: a fixed draft, one draft adapting online, and
// per-domain drafts routed by a DraftPool. Prompts come from the held-out splits.
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { availableParallelism, loadavg } from 'node:os';
import { join, resolve } from 'node:path';
import { packageRoot } from './addon.js';
import { createDraftPool } from './DraftPool.js';
import { loadModel, type Model, type ModelDevice } from './Model.js';
import { createOnlineDecoder, type OnlineDistillOptions } from './OnlineDecoder.js';
import type { SpeculativeResult, Strategy } from './SpeculativeDecoder.js';
import type { SamplingOptions } from './addonTypes.js';

/** The embedded default pair (OSD_DEFAULT_TARGET / OSD_DEFAULT_DRAFT override them). */
export const DEFAULT_TARGET = resolve(process.env.OSD_DEFAULT_TARGET ?? join(packageRoot, 'models', 'default-target.gguf'));
export const DEFAULT_DRAFT = resolve(process.env.OSD_DEFAULT_DRAFT ?? join(packageRoot, 'models', 'default-draft.gguf'));
export const DEFAULT_PROMPTS = join(packageRoot, 'models', 'demo-prompts.json');

export const PHASES: { name: string; domains: string[] }[] = [
  { name: 'english', domains: ['speeches', 'novel', 'definitions'] },
  { name: 'code', domains: ['code'] },
  { name: 'sql', domains: ['sql'] },
  { name: 'email', domains: ['email'] },
];

export type RunKind = 'static' | 'online' | 'pool';

export interface DemoOptions {
  target?: string;
  draft?: string;
  prompts?: string;
  /** Requests per phase. Default 24. */
  requests?: number;
  maxTokens?: number;
  sampling?: SamplingOptions;
  strategy?: Strategy;
  /** Overrides of the learning settings (default: demoDistill() for the draft's vocabulary). */
  distill?: OnlineDistillOptions;
  runs?: RunKind[];
  /** Write the online run's adapted draft here (GGUF, in the type it served in), e.g. to benchmark it afterwards. */
  saveDraft?: string;
  /** Called with a progress line (the CLI redraws it in place). */
  onProgress?: (line: string) => void;
  signal?: AbortSignal;
  /** Where the models' passes run (loadModel's device). Default 'cpu'. */
  device?: ModelDevice;
}

export interface PhaseSummary {
  phase: string;
  /**
   * Accepted over drafted tokens of the phase's first and last requests (up to 6 each), pooled; null
   * where those requests drafted nothing (an adaptive strategy decoding with the target alone).
   */
  acceptanceStart: number | null;
  acceptanceEnd: number | null;
  /** The draft tokens those rates are over (few where adaptive only probed). */
  draftedStart: number;
  draftedEnd: number;
  speedupStart: number;
  speedupEnd: number;
}

export interface RunSummary {
  run: RunKind;
  phases: PhaseSummary[];
  /**
   * Per request, in order: phase, draft tokens drafted and accepted, their rate (null when the
   * request drafted none), speedup over target-only.
   */
  series: { phase: string; drafted: number; accepted: number; acceptance: number | null; speedup: number }[];
  updates: number;
  rollbacks: number;
  /**
   * English acceptance at the end of its phase minus English acceptance after the whole run (both
   * pooled as in PhaseSummary); null where either drafted nothing.
   */
  forgetting: number | null;
}

export interface DemoResult {
  target: string;
  draft: string;
  requestsPerPhase: number;
  maxTokens: number;
  /** Target-only decoding per phase, over the paired runs of every served prompt (the speedups' denominators). */
  targetTokensPerSecond: Record<string, number>;
  /** The learning settings in force. */
  distill?: OnlineDistillOptions;
  /** The speculation strategy every run served with. */
  strategy?: Strategy;
  runs: RunSummary[];
  /** Where the online run's adapted draft was written (DemoOptions.saveDraft). */
  savedDraft?: string;
  /** The 1-minute load average at the start and end of the run, and the cores: speedups need an idle machine. */
  load: { start: number; end: number; cores: number };
}

/** The demo's learning settings: faster than the serving defaults, so a short run shows adaptation. */
export const DEMO_DISTILL: OnlineDistillOptions = { interval: 4, lr: 3e-3, epochs: 4, positions: 'mismatch', acceptedFraction: 0.5, topK: 32 };

/**
 * Settings for drafts with a large vocabulary (SmolLM2's 49,152 tokens and up): more teacher entries,
 * and a third of the learning rate. On SmolLM2 lr 3e-3 made English forget 0.10 of its acceptance
 * and had 6 of 11 updates rolled back; 1e-3 forgot nothing, 2 of 10 rolled back, and learnt more of
 * unseen code prompts (README, "OSD on SmolLM2-135M").
 */
export const DEMO_DISTILL_LARGE_VOCAB: OnlineDistillOptions = { ...DEMO_DISTILL, lr: 1e-3, topK: 64 };

/**
 * The demo's learning settings for a draft of this vocabulary. With tens of thousands of tokens the
 * target's mass spreads wider, so more teacher entries are kept per position.
 */
export function demoDistill(vocabSize: number): OnlineDistillOptions {
  return vocabSize >= 32768 ? DEMO_DISTILL_LARGE_VOCAB : DEMO_DISTILL;
}

function mean(xs: number[]): number {
  return xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : 0;
}

/** The draft tokens some requests drafted, and accepted over drafted (null when they drafted none). */
function pooled(xs: readonly { drafted: number; accepted: number }[]): { acceptance: number | null; drafted: number } {
  const drafted = xs.reduce((a, x) => a + x.drafted, 0);
  return { acceptance: drafted > 0 ? xs.reduce((a, x) => a + x.accepted, 0) / drafted : null, drafted };
}

function loadPrompts(path: string): Record<string, string[]> {
  if (!existsSync(path)) throw new Error(`demo prompts not found: ${path} (run npm run train:default or lib/train/demoPrompts.ts)`);
  return (JSON.parse(readFileSync(path, 'utf8')) as { domains: Record<string, string[]> }).domains;
}

/** The phase's prompts: its domains round-robin. */
function phasePrompts(all: Record<string, string[]>, domains: string[], n: number, offset = 0): string[] {
  const out: string[] = [];
  for (let i = 0; out.length < n; i++) {
    const d = domains[i % domains.length]!;
    const list = all[d] ?? [];
    if (list.length === 0) throw new Error(`no demo prompts for domain '${d}'`);
    out.push(list[(Math.floor(i / domains.length) + offset) % list.length]!);
  }
  return out;
}

/** Tokens and wall-clock ms of target-only decoding per phase, over every run's paired requests. */
interface Baseline {
  tokens: Record<string, number>;
  ms: Record<string, number>;
}

export async function runDemo(options: DemoOptions = {}): Promise<DemoResult> {
  const targetPath = options.target ?? DEFAULT_TARGET;
  const draftPath = options.draft ?? DEFAULT_DRAFT;
  const prompts = loadPrompts(options.prompts ?? DEFAULT_PROMPTS);
  const R = options.requests ?? 24;
  const maxTokens = options.maxTokens ?? 32;
  const loadStart = loadavg()[0]!;
  const sampling = options.sampling ?? { temperature: 0 };
  const strategy = options.strategy ?? { kind: 'chain', length: 4 };
  const runs = options.runs ?? ['static', 'online', 'pool'];
  const progress = options.onProgress ?? (() => {});
  const device = options.device ?? 'cpu';
  const target = await loadModel(targetPath, { device });
  try {
    if (!target.tokenizer) throw new Error(`${targetPath} has no tokenizer: the demo needs text prompts`);
    if (!existsSync(draftPath)) throw new Error(`draft not found: ${draftPath}`);
    const distill = { ...demoDistill(target.info.vocabSize), ...options.distill };
    // Target-only decoding of each served prompt in the same turn: the denominator of every speedup.
    const baseline: Baseline = { tokens: {}, ms: {} };
    // One untimed request first, so that the first timed pair does not pay for warming up.
    await target.generate({ prompt: phasePrompts(prompts, PHASES[0]!.domains, 1)[0]!, maxTokens, sampling, stopTokens: [], signal: options.signal });
    const summaries: RunSummary[] = [];
    for (const kind of runs) {
      options.signal?.throwIfAborted();
      summaries.push(await runOne(kind, target, draftPath, device, prompts, R, maxTokens, sampling, strategy, distill, baseline, progress, options.signal, kind === 'online' ? options.saveDraft : undefined));
    }
    const targetTps: Record<string, number> = {};
    for (const phase of PHASES) if (baseline.ms[phase.name]) targetTps[phase.name] = (baseline.tokens[phase.name]! * 1000) / baseline.ms[phase.name]!;
    const load = { start: loadStart, end: loadavg()[0]!, cores: availableParallelism() };
    return { target: targetPath, draft: draftPath, requestsPerPhase: R, maxTokens, targetTokensPerSecond: targetTps, distill, strategy, runs: summaries, ...(options.saveDraft && runs.includes('online') ? { savedDraft: options.saveDraft } : {}), load };
  } finally {
    await target.dispose();
  }
}

async function runOne(
  kind: RunKind,
  target: Model,
  draftPath: string,
  device: ModelDevice,
  prompts: Record<string, string[]>,
  R: number,
  maxTokens: number,
  sampling: SamplingOptions,
  strategy: Strategy,
  distill: OnlineDistillOptions,
  baseline: Baseline,
  progress: (line: string) => void,
  signal: AbortSignal | undefined,
  saveDraft?: string,
): Promise<RunSummary> {
  const draft = await loadModel(draftPath, { device });
  const series: RunSummary['series'] = [];
  let updates = 0;
  let rollbacks = 0;
  const online = kind === 'online' ? createOnlineDecoder({ target, draft, strategy, sampling, distill }) : undefined;
  const pool = kind === 'pool' ? createDraftPool({ target, drafts: { english: draft }, router: 'label', forkFrom: { closest: true }, strategy, sampling, distill }) : undefined;
  const fixed = kind === 'static' ? createOnlineDecoder({ target, draft, strategy, sampling, distill: { enabled: false } }) : undefined;
  online?.on('update', () => updates++);
  online?.on('rollback', () => rollbacks++);
  pool?.on('update', () => updates++);
  pool?.on('rollback', () => rollbacks++);
  const serve = async (prompt: string, phase: string): Promise<SpeculativeResult> => {
    const req = { prompt, maxTokens, sampling, stopTokens: [] as number[], signal };
    if (pool) return pool.generate({ ...req, label: phase });
    return (online ?? fixed)!.generate(req);
  };
  const wall = async <T>(fn: () => Promise<T>): Promise<[T, number]> => {
    const t0 = performance.now();
    const r = await fn();
    return [r, performance.now() - t0];
  };
  try {
    const phases: PhaseSummary[] = [];
    for (const phase of PHASES) {
      const list = phasePrompts(prompts, phase.domains, R);
      for (let i = 0; i < list.length; i++) {
        // The prompt served, and decoded by the target alone, in alternating order: a drifting machine
        // (clocks, other load, an update training beside) weighs on both sides of the ratio alike.
        const alone = () => wall(() => target.generate({ prompt: list[i]!, maxTokens, sampling, stopTokens: [], signal }));
        const served = () => wall(() => serve(list[i]!, phase.name));
        let b: [{ tokens: Int32Array }, number];
        let s: [SpeculativeResult, number];
        if (i % 2 === 0) {
          b = await alone();
          s = await served();
        } else {
          s = await served();
          b = await alone();
        }
        const [r, ms] = s;
        baseline.tokens[phase.name] = (baseline.tokens[phase.name] ?? 0) + b[0].tokens.length;
        baseline.ms[phase.name] = (baseline.ms[phase.name] ?? 0) + b[1];
        const tps = (r.tokens.length * 1000) / ms;
        const speedup = tps / ((b[0].tokens.length * 1000) / b[1]);
        const { drafted, accepted } = r.stats;
        series.push({ phase: phase.name, drafted, accepted, acceptance: drafted > 0 ? accepted / drafted : null, speedup });
        progress(
          `[${kind}] ${phase.name} ${String(i + 1).padStart(3)}/${list.length}  acceptance ${drafted > 0 ? (accepted / drafted).toFixed(2) : '-'}  ${tps.toFixed(0)} tokens/s  ${speedup.toFixed(2)}x  updates ${updates}`,
        );
      }
      const mine = series.filter((s) => s.phase === phase.name);
      const w = Math.max(1, Math.min(6, Math.floor(mine.length / 3)));
      const start = pooled(mine.slice(0, w));
      const end = pooled(mine.slice(-w));
      phases.push({
        phase: phase.name,
        acceptanceStart: start.acceptance,
        acceptanceEnd: end.acceptance,
        draftedStart: start.drafted,
        draftedEnd: end.drafted,
        speedupStart: mean(mine.slice(0, w).map((s) => s.speedup)),
        speedupEnd: mean(mine.slice(-w).map((s) => s.speedup)),
      });
    }
    // Forgetting: serve the end of the English phase again with the final draft(s).
    const english = phasePrompts(prompts, PHASES[0]!.domains, R).slice(-Math.max(1, Math.min(6, Math.floor(R / 3))));
    const again: { drafted: number; accepted: number }[] = [];
    for (const p of english) {
      const req = { prompt: p, maxTokens, sampling, stopTokens: [] as number[] };
      const r = pool ? await pool.generate({ ...req, label: 'english' }) : await (online ?? fixed)!.generate(req);
      again.push(r.stats);
    }
    // After the updates still running, each matrix in the type it serves in.
    if (saveDraft && online) await online.saveDraft(saveDraft);
    const before = phases[0]!.acceptanceEnd;
    const after = pooled(again).acceptance;
    return { run: kind, phases, series, updates, rollbacks, forgetting: before === null || after === null ? null : before - after };
  } finally {
    await online?.dispose();
    await pool?.dispose();
    await fixed?.dispose();
    await draft.dispose();
  }
}

/** A table of the summaries, for the terminal. */
export function formatDemo(result: DemoResult): string {
  const lines = [
    `target ${result.target}`,
    `draft  ${result.draft}`,
    `${result.requestsPerPhase} requests per phase, ${result.maxTokens} tokens each; speedup = tokens/s over the target alone on the same prompt, same turn`,
    ...(result.strategy ? [`strategy ${JSON.stringify(result.strategy)}; acceptance counts the draft's tokens only`] : []),
    '',
    'run      phase     accept start (of drafted)  accept end (of drafted)  gain    speedup start  speedup end',
    '-------  --------  -------------------------  -----------------------  ------  -------------  -----------',
  ];
  // '-' where the requests drafted nothing (adaptive decoding with the target alone).
  const f3 = (x: number | null) => (x === null ? '-' : x.toFixed(3));
  const gain = (a: number | null, b: number | null) => (a === null || b === null ? '-' : (b - a >= 0 ? '+' : '') + (b - a).toFixed(3));
  for (const r of result.runs) {
    for (const p of r.phases)
      lines.push(
        `${r.run.padEnd(7)}  ${p.phase.padEnd(8)}  ${`${f3(p.acceptanceStart)} (${p.draftedStart})`.padStart(25)}  ${`${f3(p.acceptanceEnd)} (${p.draftedEnd})`.padStart(23)}  ${gain(p.acceptanceStart, p.acceptanceEnd).padEnd(6)}  ${p.speedupStart.toFixed(2).padStart(12)}x  ${p.speedupEnd.toFixed(2).padStart(10)}x`,
      );
    lines.push(`${r.run.padEnd(7)}  updates ${r.updates}, rollbacks ${r.rollbacks}, English forgetting ${f3(r.forgetting)}`);
  }
  const tps = Object.entries(result.targetTokensPerSecond).map(([phase, v]) => `${phase} ${v.toFixed(0)}`);
  if (tps.length) lines.push('', `target-only decoding, tokens/s: ${tps.join(', ')} (below 1x, speculation was slower than the target alone)`);
  const { load } = result;
  if (load && Math.max(load.start, load.end) > 0.75 * load.cores)
    lines.push(
      `note: the machine was busy (load average ${load.start.toFixed(1)} -> ${load.end.toFixed(1)} on ${load.cores} cores): ` +
        'speedups measure the contention as much as the decoding; rerun on an idle machine',
    );
  return lines.join('\n');
}

/** An SVG plot: acceptance and speedup over requests, one line per run, phases marked. */
export function demoSvg(result: DemoResult): string {
  const W = 900;
  const H = 560;
  const panels = [
    { key: 'acceptance' as const, title: 'acceptance rate (pooled over 4 requests)', top: 40, max: 1 },
    { key: 'speedup' as const, title: 'speedup over target-only decoding', top: 310, max: Math.max(2, ...result.runs.flatMap((r) => r.series.map((s) => s.speedup))) },
  ];
  const colors: Record<string, string> = { static: '#888888', online: '#d9480f', pool: '#1971c2' };
  const n = Math.max(...result.runs.map((r) => r.series.length));
  const x = (i: number) => 60 + (i / Math.max(1, n - 1)) * (W - 90);
  const parts: string[] = [`<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" font-family="sans-serif" font-size="12">`, `<rect width="${W}" height="${H}" fill="white"/>`];
  for (const p of panels) {
    const h = 200;
    const y = (v: number) => p.top + h - (Math.min(v, p.max) / p.max) * h;
    parts.push(`<text x="60" y="${p.top - 10}" font-size="14">${p.title}</text>`);
    parts.push(`<rect x="60" y="${p.top}" width="${W - 90}" height="${h}" fill="none" stroke="#ccc"/>`);
    for (let t = 0; t <= 4; t++) {
      const v = (p.max * t) / 4;
      parts.push(`<text x="52" y="${y(v) + 4}" text-anchor="end">${v.toFixed(p.key === 'acceptance' ? 2 : 1)}</text>`);
    }
    const perPhase = result.requestsPerPhase;
    PHASES.forEach((ph, k) => {
      const xi = x(k * perPhase);
      parts.push(`<line x1="${xi}" x2="${xi}" y1="${p.top}" y2="${p.top + h}" stroke="#ddd"/>`);
      parts.push(`<text x="${xi + 4}" y="${p.top + 14}" fill="#555">${ph.name}</text>`);
    });
    if (p.key === 'speedup') parts.push(`<line x1="60" x2="${W - 30}" y1="${y(1)}" y2="${y(1)}" stroke="#999" stroke-dasharray="4 3"/>`);
    for (const r of result.runs) {
      // Acceptance pooled over the last 4 requests; the line breaks where they drafted nothing.
      const smooth = r.series.map((_, i) => {
        const w = r.series.slice(Math.max(0, i - 3), i + 1);
        return p.key === 'acceptance' ? pooled(w).acceptance : mean(w.map((s) => s.speedup));
      });
      let d = '';
      smooth.forEach((v, i) => {
        if (v !== null) d += `${i && smooth[i - 1] !== null ? 'L' : 'M'}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
      });
      if (d) parts.push(`<path d="${d}" fill="none" stroke="${colors[r.run]}" stroke-width="2"/>`);
    }
  }
  result.runs.forEach((r, i) => {
    parts.push(`<line x1="${80 + i * 200}" x2="${110 + i * 200}" y1="${H - 15}" y2="${H - 15}" stroke="${colors[r.run]}" stroke-width="3"/>`);
    parts.push(`<text x="${116 + i * 200}" y="${H - 11}">${{ static: 'no adaptation', online: 'online distillation', pool: 'per-domain drafts (pool)' }[r.run]}</text>`);
  });
  parts.push('</svg>');
  return parts.join('\n');
}

/** Writes demo.svg, and demo.png where a converter (rsvg-convert or ImageMagick) exists. */
export function writeDemoPlots(result: DemoResult, dir: string): string[] {
  mkdirSync(dir, { recursive: true });
  const svg = join(dir, 'demo.svg');
  writeFileSync(svg, demoSvg(result));
  const written = [svg];
  const png = join(dir, 'demo.png');
  for (const [cmd, args] of [
    ['rsvg-convert', ['-o', png, svg]],
    ['convert', [svg, png]],
  ] as const) {
    const r = spawnSync(cmd, args, { stdio: 'ignore' });
    if (r.status === 0 && existsSync(png)) {
      written.push(png);
      break;
    }
  }
  return written;
}
