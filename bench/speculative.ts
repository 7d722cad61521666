// Speculative decoding on the default pair (and on a larger random target): per domain and
// strategy, acceptance, accepted tokens per pass, and wall-clock speedup over target-only decoding
// measured in the same run, at greedy and at temperature 0.8.
//
//   npx tsx bench/speculative.ts [--quick] [--prompts N] [--tokens N] [--big] [--big-only] [--threads N]
//                                [--distill-seconds S] [--json-only] [--domains a,b] [--samplings greedy,T=0.8]
//                                [--strategies 'chain g=2,tree 16'] [--extra '{"name": <Strategy>}']
//
// Prompts: the held-out prompts of test/fixtures/heldout-prompts.json (models/demo-prompts.json
// where the fixture is missing, as in the npm package), the first N of every domain.
// --quick: 2 prompts of 24 tokens per domain, speeches and code only (a smoke test, about a minute).
// --big adds a random-weight target of about 100M parameters (memory-bound, like real models)
// with a small draft distilled from it for a few minutes in the same run; --big-only skips the
// default pair. --domains, --samplings and --strategies keep only the named rows (comma-separated);
// --extra adds named strategies given as JSON (for comparing variants in one run).
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  createSpeculativeDecoder,
  createTrainer,
  loadModel,
  setThreads,
  writeRandomModel,
  type Model,
  type SamplingOptions,
  type Strategy,
} from '../lib/index.js';
import { packageRoot } from '../lib/addon.js';
import { DEFAULT_DRAFT, DEFAULT_PROMPTS, DEFAULT_TARGET, PHASES } from '../lib/demo.js';
import { fmtNum, formatTable, machineFacts, parseArgs, probeBandwidth, progress, writeResults } from './common.js';

const HELDOUT_PROMPTS = join(packageRoot, 'test', 'fixtures', 'heldout-prompts.json');
const { flags, values } = parseArgs(process.argv.slice(2), {
  booleans: ['quick', 'big', 'big-only', 'json-only'],
  values: ['prompts', 'tokens', 'threads', 'distill-seconds', 'domains', 'samplings', 'strategies', 'extra'],
});
const listOf = (name: string) => (values.has(name) ? values.get(name)!.split(',').map((x) => x.trim()) : undefined);
const quick = flags.has('quick');
if (values.has('threads')) setThreads(Number(values.get('threads')));
const nPrompts = Number(values.get('prompts') ?? (quick ? 2 : 6));
const maxTokens = Number(values.get('tokens') ?? (quick ? 24 : 64));

const ALL_STRATEGIES: { name: string; strategy: Strategy }[] = [
  { name: 'chain g=2', strategy: { kind: 'chain', length: 2 } },
  { name: 'chain g=4', strategy: { kind: 'chain', length: 4 } },
  { name: 'chain g=6', strategy: { kind: 'chain', length: 6 } },
  { name: 'tree 16', strategy: { kind: 'tree', budget: 16, maxDepth: 6, branching: 3 } },
  { name: 'adaptive', strategy: { kind: 'adaptive', maxLength: 8 } },
  { name: 'ngram', strategy: { kind: 'ngram', length: 4 } },
  ...Object.entries(JSON.parse(values.get('extra') ?? '{}') as Record<string, Strategy>).map(([name, strategy]) => ({ name, strategy })),
];
// A misspelled filter name would silently measure nothing: name the known ones instead.
function checkNames(flag: string, known: string[]): void {
  for (const n of listOf(flag) ?? []) if (!known.includes(n)) throw new RangeError(`--${flag}: unknown name '${n}' (known: ${known.join(', ')})`);
}
checkNames('strategies', ALL_STRATEGIES.map((s) => s.name));
checkNames('samplings', ['greedy', 'T=0.8']);
checkNames('domains', PHASES.flatMap((p) => p.domains));
const STRATEGIES = ALL_STRATEGIES.filter((s) => !listOf('strategies') || listOf('strategies')!.includes(s.name));
const SAMPLINGS: { name: string; sampling: SamplingOptions }[] = [
  { name: 'greedy', sampling: { temperature: 0 } },
  { name: 'T=0.8', sampling: { temperature: 0.8 } },
].filter((s) => !listOf('samplings') || listOf('samplings')!.includes(s.name));

interface Row {
  pair: string;
  domain: string;
  sampling: string;
  strategy: string;
  acceptance: number;
  acceptedPerPass: number;
  tokensPerSecond: number;
  speedup: number;
}

type Prompt = string | number[];

function request(p: Prompt, seed: number) {
  return { ...(typeof p === 'string' ? { prompt: p } : { tokens: p }), maxTokens, seed, stopTokens: [] as number[] };
}

/**
 * Target-only decoding and every strategy on the same prompts. The configurations take turns per
 * prompt (in an order that rotates with the prompt), so that a change of load on a shared machine
 * hits them all alike; each speedup is a ratio of tokens/s measured that way.
 */
async function measure(pair: string, target: Model, draft: Model, domains: Record<string, Prompt[]>): Promise<Row[]> {
  const rows: Row[] = [];
  for (const [domain, prompts] of Object.entries(domains)) {
    for (const s of SAMPLINGS) {
      const decs = STRATEGIES.map((st) => createSpeculativeDecoder({ target, draft, strategy: st.strategy, sampling: s.sampling, maxConcurrent: 1 }));
      // Warm-up (untimed): caches, thread pool, allocator.
      await target.generate({ ...request(prompts[0]!, 0), maxTokens: 4, sampling: s.sampling });
      const n = STRATEGIES.length + 1;
      const ms = new Array<number>(n).fill(0);
      const tokens = new Array<number>(n).fill(0);
      for (const [i, p] of prompts.entries()) {
        for (let j = 0; j < n; j++) {
          const k = (i + j) % n; // 0 is target-only
          const t0 = performance.now();
          const r = k === 0 ? await target.generate({ ...request(p, i), sampling: s.sampling }) : await decs[k - 1]!.generate(request(p, i));
          ms[k]! += performance.now() - t0;
          tokens[k]! += r.tokens.length;
        }
      }
      const baseTps = (tokens[0]! * 1000) / ms[0]!;
      rows.push({ pair, domain, sampling: s.name, strategy: 'target only', acceptance: NaN, acceptedPerPass: NaN, tokensPerSecond: baseTps, speedup: 1 });
      for (const [k, st] of STRATEGIES.entries()) {
        const m = decs[k]!.metrics();
        await decs[k]!.dispose();
        const tps = (tokens[k + 1]! * 1000) / ms[k + 1]!;
        rows.push({ pair, domain, sampling: s.name, strategy: st.name, acceptance: m.acceptanceRate, acceptedPerPass: m.meanAcceptedLength, tokensPerSecond: tps, speedup: tps / baseTps });
        progress(`${pair} ${domain} ${s.name} ${st.name}: acceptance ${fmtNum(m.acceptanceRate)} speedup ${fmtNum(tps / baseTps)}x`);
      }
    }
  }
  return rows;
}

function summarise(rows: Row[]): string[] {
  const lines: string[] = [];
  const pairs = [...new Set(rows.map((r) => r.pair))];
  for (const pair of pairs) {
    for (const sampling of SAMPLINGS.map((s) => s.name)) {
      const mine = rows.filter((r) => r.pair === pair && r.sampling === sampling);
      const avg = (name: string) => {
        const xs = mine.filter((r) => r.strategy === name).map((r) => r.speedup);
        return xs.reduce((a, b) => a + b, 0) / Math.max(1, xs.length);
      };
      const chains = ['chain g=2', 'chain g=4', 'chain g=6'].map((n) => [n, avg(n)] as const);
      const best = chains.reduce((a, b) => (b[1] > a[1] ? b : a));
      const adaptive = avg('adaptive');
      lines.push(
        `${pair} ${sampling}: adaptive ${fmtNum(adaptive)}x vs best fixed chain (${best[0]}) ${fmtNum(best[1])}x: ${adaptive >= best[1] ? 'PASS' : 'MISS'} (target: adaptive beats the best fixed chain on average)`,
      );
    }
  }
  return lines;
}

async function main(): Promise<void> {
  const probe = probeBandwidth();
  const rows: Row[] = [];
  const notes: string[] = [];
  if (flags.has('big-only')) {
    // the default pair is skipped
  } else if (existsSync(DEFAULT_TARGET) && existsSync(DEFAULT_DRAFT)) {
    const target = await loadModel(DEFAULT_TARGET);
    const draft = await loadModel(DEFAULT_DRAFT);
    const all = (JSON.parse(readFileSync(existsSync(HELDOUT_PROMPTS) ? HELDOUT_PROMPTS : DEFAULT_PROMPTS, 'utf8')) as { domains: Record<string, string[]> }).domains;
    const domains: Record<string, string[]> = {};
    for (const ph of PHASES) for (const d of ph.domains) domains[d] = (all[d] ?? []).slice(0, nPrompts);
    if (quick) for (const d of Object.keys(domains)) if (!['speeches', 'code'].includes(d)) delete domains[d];
    const only = listOf('domains');
    if (only) for (const d of Object.keys(domains)) if (!only.includes(d)) delete domains[d];
    rows.push(...(await measure('default', target, draft, domains)));
    // The draft was trained on general English only: those are the domains it knows.
    for (const sampling of SAMPLINGS.map((x) => x.name)) {
      const known = rows.filter((r) => ['speeches', 'novel', 'definitions'].includes(r.domain) && r.sampling === sampling && r.strategy !== 'target only');
      if (!known.length) continue;
      const mean = (name: string) => {
        const xs = known.filter((r) => r.strategy === name).map((r) => r.speedup);
        return xs.reduce((a, b) => a + b, 0) / xs.length;
      };
      const best = STRATEGIES.map((st) => [st.name, mean(st.name)] as const).reduce((a, b) => (b[1] > a[1] ? b : a));
      const adaptive = mean('adaptive');
      notes.push(
        `default ${sampling}, general-English domains: adaptive ${fmtNum(adaptive)}x, best strategy (${best[0]}) ${fmtNum(best[1])}x over target-only (target >= 1.5x): ${best[1] >= 1.5 ? 'PASS' : 'MISS'}`,
      );
    }
    await Promise.all([target.dispose(), draft.dispose()]);
  } else {
    notes.push('default pair not found (models/default-*.gguf): run npm run train:default');
  }
  if (flags.has('big') || flags.has('big-only')) {
    const dir = mkdtempSync(join(tmpdir(), 'osd-bench-spec-'));
    try {
      const bigPath = join(dir, 'big.gguf');
      progress('writing a ~100M-parameter random target');
      await writeRandomModel(bigPath, { vocabSize: 32000, embeddingLength: 768, layers: 12, heads: 12, kvHeads: 4, feedForwardLength: 2048, contextLength: 1024, seed: 1 });
      const target = await loadModel(bigPath);
      // A small draft distilled from the target's own outputs for a few minutes.
      progress('distilling a draft from it');
      const trainer = await createTrainer({ config: { vocabSize: 32000, embeddingLength: 128, layers: 2, heads: 4, kvHeads: 2, feedForwardLength: 344, contextLength: 1024 }, seed: 2 }, { lr: 2e-3 });
      const T = 32;
      const started = Date.now();
      const distillMs = 1000 * Number(values.get('distill-seconds') ?? (quick ? 20 : 180));
      let steps = 0;
      for (let step = 0; Date.now() - started < distillMs; step++, steps++) {
        const prompt = [1, (step * 7919) % 32000, (step * 104729) % 32000];
        const g = await target.generate({ tokens: prompt, maxTokens: T - 3 + 1, sampling: { temperature: 1 }, seed: step, stopTokens: [] });
        const seq = Int32Array.from([...prompt, ...g.tokens]).subarray(0, T);
        const logits = await target.forward(seq);
        await trainer.step({ tokens: seq, batchSize: 1, seqLen: T, teacherLogits: logits, kind: 'forward-kl' });
      }
      const draft = await trainer.snapshot();
      await trainer.dispose();
      // Embeddings (tied to the output), then per layer: q and o, k and v (4 KV heads of 64), the FFN.
      const params = 32000 * 768 + 12 * (2 * 768 * 768 + 2 * 768 * 256 + 3 * 768 * 2048);
      notes.push(`random-100M: target ${fmtNum(params / 1e6)}M parameters (F32); draft distilled for ${steps} steps of ${T} tokens (${fmtNum((Date.now() - started) / 1000)} s)`);
      const prompts = Array.from({ length: nPrompts }, (_, i) => [1, (i * 31 + 7) % 32000, (i * 977 + 3) % 32000]);
      rows.push(...(await measure('random-100M', target, draft, { random: prompts })));
      await Promise.all([target.dispose(), draft.dispose()]);
    } finally {
      rmSync(dir, { recursive: true, force: true }); // the 100M target is about 400 MB
    }
  }
  const table = formatTable<Row>(
    [
      { header: 'pair', align: 'left', value: (r) => r.pair },
      { header: 'domain', align: 'left', value: (r) => r.domain },
      { header: 'sampling', align: 'left', value: (r) => r.sampling },
      { header: 'strategy', align: 'left', value: (r) => r.strategy },
      { header: 'acceptance', value: (r) => fmtNum(r.acceptance) },
      { header: 'accepted/pass', value: (r) => fmtNum(r.acceptedPerPass) },
      { header: 'tokens/s', value: (r) => fmtNum(r.tokensPerSecond) },
      { header: 'speedup', value: (r) => `${fmtNum(r.speedup)}x` },
    ],
    rows,
  );
  const summary = [...summarise(rows), ...notes];
  const result = { machine: machineFacts(), probe, maxTokens, promptsPerDomain: nPrompts, rows, summary };
  const out = writeResults('speculative', result);
  if (!flags.has('json-only')) {
    process.stdout.write(table + '\n\n' + summary.join('\n') + '\n');
    process.stdout.write(`results: ${out.latest}\n`);
  } else process.stdout.write(JSON.stringify(result, null, 2) + '\n');
}

main().catch((e: unknown) => {
  process.stderr.write(`bench/speculative: ${e instanceof Error ? e.stack : String(e)}\n`);
  process.exit(1);
});
