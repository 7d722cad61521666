// SmolLM2-135M-Instruct (Q4_1) with a distilled draft: held-out acceptance per domain, the speedup
// of every strategy over target-only decoding, and node-llama-cpp on the same files (its plain
// decoding, its draft-model predictor with the same draft, its prompt-lookup predictor), all
// measured in one run.
//
//   npx tsx bench/smollm2.ts [--quick] [--prompts N] [--tokens N] [--draft PATH] [--target PATH]
//                            [--threads 2] [--llama-threads N] [--no-llama] [--out FILE] [--json-only]
//
// Prompts: the held-out prompts of test/fixtures/heldout-prompts.json, tokenized with the target's
// own tokenizer (the same ids go to both engines). English rotates over speeches, novel and
// definitions; code, SQL and email are the shifted domains. Every configuration serves every prompt,
// the order rotating per prompt, so that a change of load on a shared machine hits all alike; each
// speedup is tokens/s over target-only tokens/s from the same turns. Wall-clock time per request
// includes the prompt's prefill in both engines; generation never stops early (no EOS stop).
// --quick: 1 prompt of 12 tokens per domain (a smoke test).
// --llama-threads: node-llama-cpp's threads (default: --threads). ggml's thread pool spins at its
// barriers, so on a 2-core machine shared with other jobs its 2-thread decoding can stall badly
// (see README, "SmolLM2-135M against llama.cpp"); 1 thread is then its faster setting.
// Writes bench/results/smollm2-latest.json (and a timestamped copy), or --out FILE only.
import { existsSync, readFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { resolve } from 'node:path';
import {
  createSpeculativeDecoder,
  loadModel,
  setThreads,
  type Model,
  type SamplingOptions,
  type SpeculativeDecoder,
  type Strategy,
} from '../lib/index.js';
import { alphaFromTokensPerPass } from '../lib/train/smollm2Draft.js';
import { benchDir, fmtNum, formatTable, machineFacts, parseCommandLine, probeBandwidth, progress, writeJson, writeResults } from './common.js';

const root = resolve(benchDir, '..');
export const SMOLLM2_TARGET = resolve(root, '../shared/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf');
/** Where `npm run train:smollm2-draft` puts the draft (--out models), then its work folder. */
export const SMOLLM2_DRAFTS = [resolve(root, 'models/smollm2-draft.gguf'), resolve(root, 'data/smollm2/smollm2-draft.gguf')];
const HELDOUT = resolve(root, 'test/fixtures/heldout-prompts.json');

export const DOMAINS: { name: string; sources: string[] }[] = [
  { name: 'english', sources: ['speeches', 'novel', 'definitions'] },
  { name: 'code', sources: ['code'] },
  { name: 'sql', sources: ['sql'] },
  { name: 'email', sources: ['email'] },
];

const SAMPLINGS: { name: string; sampling: SamplingOptions }[] = [
  { name: 'greedy', sampling: { temperature: 0 } },
  { name: 'T=0.8', sampling: { temperature: 0.8 } },
];

const STRATEGIES: { name: string; strategy: Strategy }[] = [
  { name: 'chain g=4', strategy: { kind: 'chain', length: 4 } },
  { name: 'tree 16', strategy: { kind: 'tree', budget: 16, maxDepth: 6, branching: 3 } },
  { name: 'adaptive', strategy: { kind: 'adaptive', maxLength: 8 } },
  { name: 'adaptive+lookup', strategy: { kind: 'adaptive', maxLength: 8, lookup: true } },
  { name: 'ngram', strategy: { kind: 'ngram', length: 4 } },
];

// node-llama-cpp's configurations. Its draft predictor is shown with its defaults (up to 16 tokens,
// stop drafting below confidence 0.6) and as a plain chain of 4 like ours.
/** Suffix of the configurations that run a restricted-head draft with its whole head. */
export const FULL_HEAD = ' (full head)';

const LLAMA_CONFIGS = ['llama.cpp', 'llama.cpp draft', 'llama.cpp draft g=4', 'llama.cpp lookup'] as const;
type LlamaConfig = (typeof LLAMA_CONFIGS)[number];

export interface Row {
  domain: string;
  sampling: string;
  config: string;
  /** accepted / drafted (llama.cpp: validated / (validated + refuted)); NaN where nothing is drafted. */
  acceptance: number;
  /** Emitted tokens per verification pass, the prefill not counted (ours only). */
  tokensPerPass: number;
  /** Per-token acceptance implied by tokensPerPass for chain g = 4 (see smollm2Draft.ts). */
  alpha: number;
  tokensPerSecond: number;
  /** Over our target-only decoding, same turns. */
  speedup: number;
  /** Over node-llama-cpp's plain decoding, same turns (NaN without it). */
  vsLlama: number;
}

export interface BenchOptions {
  target: string;
  draft: string;
  prompts: number;
  tokens: number;
  threads: number;
  llamaThreads: number;
  llama: boolean;
  onProgress?: (line: string) => void;
}

type Nlc = typeof import('node-llama-cpp');

/** Verification steps behind cumulative metrics (emitted tokens / tokens per step). */
const stepsOf = (m: { tokens: number; tokensPerStep: number }) => (m.tokensPerStep > 0 ? m.tokens / m.tokensPerStep : 0);
type Token = import('node-llama-cpp').Token;

/** The first existing default draft, or an Error that says how to make one. */
export function findDraft(given?: string): string {
  const candidates = given ? [resolve(given)] : SMOLLM2_DRAFTS;
  const found = candidates.find((p) => existsSync(p));
  if (found) return found;
  throw new Error(
    `SmolLM2 draft not found (looked for ${candidates.join(', ')}). Make one with \`npm run train:smollm2-draft\` ` +
      '(writes models/smollm2-draft.gguf), or pass --draft PATH.',
  );
}

/** `n` held-out prompts per domain, as the target's token ids. */
export function domainPrompts(target: Model, n: number, offset = 0): Record<string, number[][]> {
  const all = (JSON.parse(readFileSync(HELDOUT, 'utf8')) as { domains: Record<string, string[]> }).domains;
  const out: Record<string, number[][]> = {};
  for (const d of DOMAINS) {
    out[d.name] = [];
    for (let i = 0; i < n; i++) {
      const src = d.sources[i % d.sources.length]!;
      const list = all[src] ?? [];
      const text = list[(Math.floor(i / d.sources.length) + offset) % list.length];
      if (text === undefined) throw new Error(`no held-out prompts for '${src}' in ${HELDOUT}`);
      out[d.name]!.push(Array.from(target.tokenizer!.encode(text)));
    }
  }
  return out;
}

/** node-llama-cpp on the same two files: one context per configuration, the draft on its own. */
async function openLlama(nlc: Nlc, o: BenchOptions) {
  const llama = await nlc.getLlama({ gpu: false, build: 'never', logLevel: nlc.LlamaLogLevel.error });
  const target = await llama.loadModel({ modelPath: o.target });
  const draft = await llama.loadModel({ modelPath: o.draft });
  const ctxOptions = { contextSize: 1024, threads: o.llamaThreads, batchSize: 512 };
  const contexts: Awaited<ReturnType<typeof target.createContext>>[] = [];
  const seqs = {} as Record<LlamaConfig, import('node-llama-cpp').LlamaContextSequence>;
  const lookup = new nlc.InputLookupTokenPredictor();
  for (const config of LLAMA_CONFIGS) {
    let tokenPredictor: import('node-llama-cpp').TokenPredictor | undefined;
    if (config === 'llama.cpp draft' || config === 'llama.cpp draft g=4') {
      const dctx = await draft.createContext(ctxOptions);
      contexts.push(dctx);
      tokenPredictor = new nlc.DraftSequenceTokenPredictor(dctx.getSequence(), config === 'llama.cpp draft g=4' ? { minTokens: 4, maxTokens: 4, minConfidence: 0 } : {});
    } else if (config === 'llama.cpp lookup') tokenPredictor = lookup;
    const ctx = await target.createContext(ctxOptions);
    contexts.push(ctx);
    seqs[config] = ctx.getSequence({ tokenPredictor });
  }
  return {
    /** Generates exactly maxTokens tokens (past EOS) from a fresh cache; returns the count. */
    async generate(config: LlamaConfig, tokens: number[], maxTokens: number, sampling: SamplingOptions, seed: number): Promise<number> {
      const seq = seqs[config];
      await seq.clearHistory();
      if (config === 'llama.cpp lookup') lookup.updateInputTokens(tokens as Token[]);
      const t = sampling.temperature ?? 0;
      // Plain temperature sampling, as ours: no top-k, top-p or min-p.
      const opts = t > 0 ? { temperature: t, topK: 0, topP: 1, minP: 0, seed: seed + 1 } : { temperature: 0 };
      let n = 0;
      for await (const _ of seq.evaluate(tokens as Token[], { ...opts, yieldEogToken: true })) if (++n >= maxTokens) break;
      return n;
    },
    predictions(config: LlamaConfig) {
      return { ...seqs[config].tokenPredictions };
    },
    async dispose() {
      for (const c of contexts) await c.dispose();
      await draft.dispose();
      await target.dispose();
      await llama.dispose();
    },
  };
}

async function importLlama(): Promise<Nlc | null> {
  try {
    return await import('node-llama-cpp');
  } catch {
    return null;
  }
}

/** Every configuration on every domain and sampling; the rows and notes of the run. */
export async function runSmolBench(o: BenchOptions): Promise<{ rows: Row[]; notes: string[] }> {
  const say = o.onProgress ?? (() => {});
  const notes: string[] = [];
  setThreads(o.threads);
  const target = await loadModel(o.target, { threads: o.threads });
  let draft: Model | undefined;
  let fullHead: Model | undefined;
  const opened: { llama: Awaited<ReturnType<typeof openLlama>> | null } = { llama: null };
  try {
    draft = await loadModel(o.draft, { threads: o.threads });
    const nlc = o.llama ? await importLlama() : null;
    if (o.llama && !nlc) notes.push('node-llama-cpp is not installed (npm install --include=dev): its rows are skipped');
    const llama = (opened.llama = nlc ? await openLlama(nlc, o) : null);
    if (!target.tokenizer) throw new Error(`${o.target} has no tokenizer`);
    if (draft.info.vocabSize !== target.info.vocabSize) throw new Error(`the draft's vocabulary (${draft.info.vocabSize}) is not the target's (${target.info.vocabSize})`);
    const prompts = domainPrompts(target, o.prompts);
    // A draft with a restricted head also runs with its whole head, in the same turns: the previous
    // version of the same weights.
    const restricted = draft.info.headTokens < draft.info.vocabSize;
    if (restricted) {
      fullHead = await draft.withHead(null);
      notes.push(`the draft's head scores ${draft.info.headTokens} of ${draft.info.vocabSize} ids; "(full head)" rows run the same weights with the whole head`);
    }
    // (adaptive+lookup's whole-head run would repeat adaptive's comparison.)
    const withDraft = STRATEGIES.filter((st) => st.strategy.kind !== 'ngram' && st.name !== 'adaptive+lookup');
    const strategies = [...STRATEGIES.map((st) => ({ ...st, model: draft! })), ...(fullHead ? withDraft.map((st) => ({ name: `${st.name}${FULL_HEAD}`, strategy: st.strategy, model: fullHead! })) : [])];
    const ours = ['target only', ...strategies.map((s) => s.name)];
    const configs: string[] = [...ours, ...(llama ? LLAMA_CONFIGS : [])];
    const rows: Row[] = [];
    for (const s of SAMPLINGS) {
      // One decoder per strategy for the whole sampling mode; acceptance is taken per domain from
      // the difference of its cumulative metrics.
      const decs = new Map<string, SpeculativeDecoder>(
        strategies.map((st) => [st.name, createSpeculativeDecoder({ target, draft: st.model, strategy: st.strategy, sampling: s.sampling, maxConcurrent: 1 })]),
      );
      // Warm-up (untimed): caches, thread pools, allocators of both engines.
      const warm = prompts[DOMAINS[0]!.name]![0]!;
      await target.generate({ tokens: warm, maxTokens: 4, sampling: s.sampling, stopTokens: [] });
      for (const d of decs.values()) await d.generate({ tokens: warm, maxTokens: 4, stopTokens: [] });
      if (llama) for (const c of LLAMA_CONFIGS) await llama.generate(c, warm, 4, s.sampling, 0);
      for (const dom of DOMAINS) {
        const ms = new Map<string, number>(configs.map((c) => [c, 0]));
        const toks = new Map<string, number>(configs.map((c) => [c, 0]));
        const before = new Map([...decs].map(([k, d]) => [k, d.metrics()]));
        const llamaBefore = llama ? new Map(LLAMA_CONFIGS.map((c) => [c, llama.predictions(c)])) : null;
        for (const [i, p] of prompts[dom.name]!.entries()) {
          for (let j = 0; j < configs.length; j++) {
            const c = configs[(i + j) % configs.length]!;
            const t0 = performance.now();
            let n: number;
            if (c === 'target only') n = (await target.generate({ tokens: p, maxTokens: o.tokens, sampling: s.sampling, seed: i, stopTokens: [] })).tokens.length;
            else if (decs.has(c)) n = (await decs.get(c)!.generate({ tokens: p, maxTokens: o.tokens, seed: i, stopTokens: [] })).tokens.length;
            else n = await llama!.generate(c as LlamaConfig, p, o.tokens, s.sampling, i);
            ms.set(c, ms.get(c)! + performance.now() - t0);
            toks.set(c, toks.get(c)! + n);
          }
          say(`${s.name} ${dom.name}: prompt ${i + 1}/${o.prompts} done`);
        }
        const tps = (c: string) => (toks.get(c)! * 1000) / ms.get(c)!;
        const base = tps('target only');
        const llamaBase = llama ? tps('llama.cpp') : NaN;
        for (const c of configs) {
          let acceptance = NaN;
          let tokensPerPass = NaN;
          const dec = decs.get(c);
          if (dec) {
            const a = before.get(c)!;
            const b = dec.metrics();
            const drafted = b.drafted - a.drafted;
            acceptance = drafted > 0 ? (b.accepted - a.accepted) / drafted : NaN;
            // Per verification step: the prompt's prefill pass emits nothing and is not counted.
            const steps = Math.round(stepsOf(b) - stepsOf(a));
            tokensPerPass = steps > 0 ? (b.tokens - a.tokens) / steps : NaN;
          } else if (llamaBefore?.has(c as LlamaConfig)) {
            const a = llamaBefore.get(c as LlamaConfig)!;
            const b = llama!.predictions(c as LlamaConfig);
            const checked = b.validated - a.validated + (b.refuted - a.refuted);
            acceptance = checked > 0 ? (b.validated - a.validated) / checked : NaN;
          }
          const row: Row = {
            domain: dom.name,
            sampling: s.name,
            config: c,
            acceptance,
            tokensPerPass,
            alpha: (c === 'chain g=4' || c === `chain g=4${FULL_HEAD}`) && Number.isFinite(tokensPerPass) ? alphaFromTokensPerPass(tokensPerPass, 4) : NaN,
            tokensPerSecond: tps(c),
            speedup: tps(c) / base,
            vsLlama: tps(c) / llamaBase,
          };
          rows.push(row);
        }
        say(`${s.name} ${dom.name}: target ${fmtNum(base)} tok/s; ` + configs.slice(1).map((c) => `${c} ${fmtNum(tps(c) / base)}x`).join(', '));
      }
      for (const d of decs.values()) await d.dispose();
    }
    return { rows, notes };
  } finally {
    await opened.llama?.dispose();
    await Promise.all([target.dispose(), draft?.dispose(), fullHead?.dispose()]);
  }
}

function mean(xs: number[]): number {
  const f = xs.filter(Number.isFinite);
  return f.length ? f.reduce((a, b) => a + b, 0) / f.length : NaN;
}

/** The targets, checked on the rows of this run (on the draft as given, before adaptation). */
export function summarise(rows: Row[]): string[] {
  const lines: string[] = [];
  for (const s of SAMPLINGS.map((x) => x.name)) {
    const mine = rows.filter((r) => r.sampling === s);
    if (!mine.length) continue;
    const avg = (c: string, key: 'speedup' | 'vsLlama' | 'acceptance') => mean(mine.filter((r) => r.config === c).map((r) => r[key]));
    const strategies = STRATEGIES.map((st) => st.name);
    const best = strategies.map((n) => [n, avg(n, 'speedup')] as const).reduce((a, b) => (b[1] > a[1] ? b : a));
    lines.push(`${s}: best strategy on average ${best[0]} ${fmtNum(best[1])}x over target-only (target >= 1.5x after adaptation): ${best[1] >= 1.5 ? 'PASS' : 'MISS'}`);
    const vs = avg(best[0], 'vsLlama');
    if (!Number.isFinite(vs)) continue;
    lines.push(`${s}: ${best[0]} ${fmtNum(vs)}x node-llama-cpp plain decoding (target >= 1.3x): ${vs >= 1.3 ? 'PASS' : 'MISS'}`);
    // Like for like: our best strategy that uses the draft against llama.cpp's draft predictor, and
    // our n-gram lookup against its prompt lookup.
    const drafted = ['chain g=4', 'tree 16', 'adaptive'].map((n) => [n, avg(n, 'vsLlama')] as const).reduce((a, b) => (b[1] > a[1] ? b : a));
    const theirDraft = ['llama.cpp draft', 'llama.cpp draft g=4'].map((n) => [n, avg(n, 'vsLlama')] as const).reduce((a, b) => (b[1] > a[1] ? b : a));
    lines.push(
      `${s}: with the same draft, ${drafted[0]} ${fmtNum(drafted[1])}x vs ${theirDraft[0]} ${fmtNum(theirDraft[1])}x (both over llama.cpp plain; target: ahead): ${drafted[1] > theirDraft[1] ? 'PASS' : 'MISS'}`,
    );
    const lookup = avg('llama.cpp lookup', 'vsLlama');
    lines.push(`${s}: prompt lookup, ngram ${fmtNum(avg('ngram', 'vsLlama'))}x vs llama.cpp lookup ${fmtNum(lookup)}x (both over llama.cpp plain)`);
  }
  for (const s of SAMPLINGS.map((x) => x.name)) {
    // The restricted head against the same weights' whole head, same turns (mean ratio of tokens/s).
    const pairs = ['chain g=4', 'tree 16', 'adaptive'].map((n) => {
      const ratios = DOMAINS.map((d) => {
        const a = rows.find((r) => r.sampling === s && r.domain === d.name && r.config === n);
        const b = rows.find((r) => r.sampling === s && r.domain === d.name && r.config === n + FULL_HEAD);
        return a && b ? a.tokensPerSecond / b.tokensPerSecond : NaN;
      });
      return `${n} ${fmtNum(mean(ratios))}x`;
    });
    if (rows.some((r) => r.sampling === s && r.config.endsWith(FULL_HEAD))) lines.push(`${s}: restricted head over the whole head (same weights, same turns): ${pairs.join(', ')}`);
  }
  return lines;
}

const alphaText = (a: number | undefined) => (a === undefined || !Number.isFinite(a) ? 'n/a' : a.toFixed(2));

export function acceptanceTable(rows: Row[]): string {
  interface A {
    domain: string;
    g: Row | undefined;
    t: Row | undefined;
  }
  const list: A[] = DOMAINS.map((d) => ({
    domain: d.name,
    g: rows.find((r) => r.domain === d.name && r.sampling === 'greedy' && r.config === 'chain g=4'),
    t: rows.find((r) => r.domain === d.name && r.sampling === 'T=0.8' && r.config === 'chain g=4'),
  }));
  return formatTable<A>(
    [
      { header: 'domain', align: 'left', value: (r) => r.domain },
      { header: 'greedy acceptance', value: (r) => fmtNum(r.g?.acceptance) },
      { header: 'tokens/pass (alpha)', value: (r) => `${fmtNum(r.g?.tokensPerPass)} (${alphaText(r.g?.alpha)})` },
      { header: 'T=0.8 acceptance', value: (r) => fmtNum(r.t?.acceptance) },
      { header: 'tokens/pass (alpha)', value: (r) => `${fmtNum(r.t?.tokensPerPass)} (${alphaText(r.t?.alpha)})` },
    ],
    list,
  );
}

export function speedTable(rows: Row[]): string {
  return formatTable<Row>(
    [
      { header: 'domain', align: 'left', value: (r) => r.domain },
      { header: 'sampling', align: 'left', value: (r) => r.sampling },
      { header: 'config', align: 'left', value: (r) => r.config },
      { header: 'acceptance', value: (r) => fmtNum(r.acceptance) },
      { header: 'tok/pass', value: (r) => fmtNum(r.tokensPerPass) },
      { header: 'tokens/s', value: (r) => fmtNum(r.tokensPerSecond) },
      { header: 'vs target-only', value: (r) => `${fmtNum(r.speedup)}x` },
      { header: 'vs llama.cpp', value: (r) => (Number.isFinite(r.vsLlama) ? `${fmtNum(r.vsLlama)}x` : 'n/a') },
    ],
    rows,
  );
}

const USAGE =
  'usage: npx tsx bench/smollm2.ts [--quick] [--prompts N] [--tokens N] [--draft PATH] [--target PATH] [--threads 2] [--llama-threads N] [--no-llama] [--out FILE] [--json-only]';

async function main(): Promise<number> {
  const { flags, values } = parseCommandLine(
    { booleans: ['quick', 'no-llama', 'json-only'], values: ['prompts', 'tokens', 'draft', 'target', 'threads', 'llama-threads', 'out'] },
    USAGE,
  );
  const quick = flags.has('quick');
  const int = (name: string, fallback: number) => {
    const v = Number(values.get(name) ?? fallback);
    if (!Number.isInteger(v) || v <= 0) throw new RangeError(`--${name} must be a positive integer, got '${values.get(name)}'`);
    return v;
  };
  const target = resolve(values.get('target') ?? SMOLLM2_TARGET);
  if (!existsSync(target)) {
    process.stderr.write(`SmolLM2 target not found: ${target} (the benchmark reads ../shared/models/smollm2; pass --target PATH)\n`);
    return 1;
  }
  let draft: string;
  try {
    draft = findDraft(values.get('draft'));
  } catch (e) {
    process.stderr.write(`${(e as Error).message}\n`);
    return 1;
  }
  const o: BenchOptions = {
    target,
    draft,
    prompts: int('prompts', quick ? 1 : 3),
    tokens: int('tokens', quick ? 12 : 32),
    threads: int('threads', 2),
    llamaThreads: int('llama-threads', int('threads', 2)),
    llama: !flags.has('no-llama'),
    onProgress: progress,
  };
  const probe = probeBandwidth();
  const loadBefore = loadavg();
  const started = Date.now();
  const { rows, notes } = await runSmolBench(o);
  const summary = [...summarise(rows), ...notes];
  const data = {
    bench: 'smollm2',
    date: new Date().toISOString(),
    machine: machineFacts(),
    probe,
    loadAverage: { before: loadBefore, after: loadavg() },
    seconds: (Date.now() - started) / 1000,
    target,
    draft,
    threads: o.threads,
    llamaThreads: o.llamaThreads,
    promptsPerDomain: o.prompts,
    tokensPerPrompt: o.tokens,
    rows,
    summary,
  };
  let where: string;
  if (values.has('out')) {
    writeJson(values.get('out')!, data);
    where = values.get('out')!;
  } else where = writeResults('smollm2', data).latest;
  if (!flags.has('json-only')) {
    process.stdout.write(
      `\n${target.split('/').pop()} + ${draft.split('/').pop()}, ${o.threads} threads (llama.cpp ${o.llamaThreads}), ${o.prompts} prompts x ${o.tokens} tokens per domain; ` +
        `read probe ${fmtNum(probe.readGBs)} GB/s; load average ${loadBefore.map((x) => x.toFixed(1)).join(' ')}\n\n` +
        `Held-out acceptance of the draft (chain g = 4):\n\n${acceptanceTable(rows)}\n\nSpeed (same turns):\n\n${speedTable(rows)}\n\n${summary.join('\n')}\nresults: ${where}\n`,
    );
  } else process.stdout.write(JSON.stringify(data, null, 2) + '\n');
  return 0;
}

if (process.argv[1] && resolve(process.argv[1]) === resolve(benchDir, 'smollm2.ts'))
  main().then(
    (code) => process.exit(code),
    (e: unknown) => {
      process.stderr.write(`bench/smollm2: ${e instanceof Error ? e.stack : String(e)}\n`);
      process.exit(1);
    },
  );
