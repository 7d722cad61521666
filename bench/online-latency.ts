// Inter-token latency of the online decoder while the draft is being distilled in the background,
// against the same decoder serving without learning, measured in the same run (issue 6: p99 during
// updates at most 1.5x the p99 without).
//
//   npx tsx bench/online-latency.ts [--quick] [--rounds N] [--prompts N] [--tokens N] [--threads N]
//                                   [--train-threads N] [--interval N] [--epochs N] [--json-only]
//
// --train-threads N: distill.trainThreads (default 1, training on one thread of its own; 0 shares
// the decoding pool, the setting before this benchmark existed).
//
// Two online decoders serve the same held-out prompts on the default pair, each over its own copy
// of the draft: "static" has learning off; "online" trains after every `interval` requests, so
// that an update is running during most of its requests. Rounds alternate static and online, so
// both see the same machine load. Each request is streamed; a gap is the time between two chunks of
// one stream (a chunk holds the tokens one target pass emitted; the first chunk, which carries the
// prompt's prefill, is not counted). An online gap counts as "during an update" when an update was
// running at any moment of it. Per-token latency spreads a gap over the chunk's tokens.
//
// Reports p50/p90/p99/max per configuration and the ratios online-during-updates / static.
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createOnlineDecoder, loadModel, setThreads, type OnlineDecoder, type Strategy } from '../lib/index.js';
import { packageRoot } from '../lib/addon.js';
import { DEFAULT_DRAFT, DEFAULT_PROMPTS, DEFAULT_TARGET } from '../lib/demo.js';
import { fmtNum, formatTable, machineFacts, parseArgs, progress, writeResults } from './common.js';

const { flags, values } = parseArgs(process.argv.slice(2), {
  booleans: ['quick', 'json-only'],
  values: ['rounds', 'prompts', 'tokens', 'threads', 'train-threads', 'interval', 'epochs'],
});
const quick = flags.has('quick');
if (values.has('threads')) setThreads(Number(values.get('threads')));
const rounds = Number(values.get('rounds') ?? (quick ? 2 : 6));
const promptsPerRound = Number(values.get('prompts') ?? (quick ? 6 : 12));
const maxTokens = Number(values.get('tokens') ?? (quick ? 48 : 96));
const interval = Number(values.get('interval') ?? 2);
const epochs = Number(values.get('epochs') ?? 2);
// Threads for training (distill.trainThreads; the decoder's default is 1, 0 shares the decoding pool).
const trainThreads = values.has('train-threads') ? Number(values.get('train-threads')) : undefined;
const strategy: Strategy = { kind: 'chain', length: 4 };

function quantile(xs: number[], q: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const i = Math.min(s.length - 1, Math.max(0, Math.ceil(q * s.length) - 1));
  return s[i]!;
}

interface Dist {
  n: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
  mean: number;
}

function dist(xs: number[]): Dist {
  return {
    n: xs.length,
    p50: quantile(xs, 0.5),
    p90: quantile(xs, 0.9),
    p99: quantile(xs, 0.99),
    max: xs.length ? Math.max(...xs) : NaN,
    mean: xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : NaN,
  };
}

/** Held-out prompts, domains round-robin: the shifted ones first, where the draft is corrected most (most to train on). */
function loadPrompts(): string[] {
  const fixture = join(packageRoot, 'test', 'fixtures', 'heldout-prompts.json');
  const file = existsSync(fixture) ? fixture : DEFAULT_PROMPTS;
  const domains = (JSON.parse(readFileSync(file, 'utf8')) as { domains: Record<string, string[]> }).domains;
  const order = ['code', 'sql', 'email', 'speeches', 'novel', 'definitions'].filter((d) => domains[d]?.length);
  const out: string[] = [];
  for (let i = 0; out.length < rounds * promptsPerRound; i++) {
    const d = order[i % order.length]!;
    const list = domains[d]!;
    out.push(list[Math.floor(i / order.length) % list.length]!);
  }
  return out;
}

interface Gap {
  ms: number;
  tokens: number;
  duringUpdate: boolean;
}

/** Streams one request and returns its chunk gaps (the first chunk excluded). */
async function streamGaps(dec: OnlineDecoder, prompt: string, busy: () => { running: boolean; since: number }): Promise<Gap[]> {
  const gaps: Gap[] = [];
  let last = -1;
  for await (const chunk of dec.stream({ prompt, maxTokens, stopTokens: [] })) {
    if (chunk.tokens.length === 0) continue;
    const now = performance.now();
    if (last >= 0) {
      const b = busy();
      // An update overlapped this gap if one is running now or one ended after the gap began.
      gaps.push({ ms: now - last, tokens: chunk.tokens.length, duringUpdate: b.running || b.since > last });
    }
    last = now;
  }
  return gaps;
}

async function main(): Promise<void> {
  if (!existsSync(DEFAULT_TARGET) || !existsSync(DEFAULT_DRAFT)) throw new Error('default pair not found (models/default-*.gguf)');
  const target = await loadModel(DEFAULT_TARGET);
  const staticDraft = await loadModel(DEFAULT_DRAFT);
  const onlineDraft = await loadModel(DEFAULT_DRAFT);
  const prompts = loadPrompts();
  const distill = { interval, epochs, lr: 1e-3, positions: 'mismatch' as const, acceptedFraction: 0.25, guardMargin: 1, guardWindow: 1, ...(trainThreads !== undefined ? { trainThreads } : {}) };
  const staticDec = createOnlineDecoder({ target, draft: staticDraft, strategy, distill: { enabled: false } });
  const onlineDec = createOnlineDecoder({ target, draft: onlineDraft, strategy, distill });

  // Update windows of the online decoder.
  let running = false;
  let endedAt = -1;
  let updates = 0;
  let updateMs = 0;
  let updateStartedAt = 0;
  onlineDec.on('update-start', () => {
    running = true;
    updateStartedAt = performance.now();
  });
  const ended = () => {
    running = false;
    endedAt = performance.now();
    updateMs += endedAt - updateStartedAt;
  };
  onlineDec.on('update', () => {
    updates++;
    ended();
  });
  onlineDec.on('rollback', ended);
  onlineDec.on('update-error', (e: { error: Error }) => {
    progress(`update error: ${e.error.message}`);
    ended();
  });
  const busy = () => ({ running, since: endedAt });

  const staticGaps: Gap[] = [];
  const onlineGaps: Gap[] = [];
  let onlineMs = 0;
  // Warm-up: one request each.
  await streamGaps(staticDec, prompts[0]!, () => ({ running: false, since: -1 }));
  await streamGaps(onlineDec, prompts[0]!, busy);
  for (let r = 0; r < rounds; r++) {
    const mine = prompts.slice(r * promptsPerRound, (r + 1) * promptsPerRound);
    for (const p of mine) staticGaps.push(...(await streamGaps(staticDec, p, () => ({ running: false, since: -1 }))));
    const t0 = performance.now();
    for (const p of mine) onlineGaps.push(...(await streamGaps(onlineDec, p, busy)));
    onlineMs += performance.now() - t0;
    progress(`round ${r + 1}/${rounds}: ${staticGaps.length} static gaps, ${onlineGaps.length} online gaps, ${updates} updates`);
  }
  await Promise.all([staticDec.dispose(), onlineDec.dispose()]);
  const onlineMetrics = onlineDec.metrics();
  const staticMetrics = staticDec.metrics();
  await Promise.all([target.dispose(), staticDraft.dispose(), onlineDraft.dispose()]);

  const perToken = (gs: Gap[]) => gs.flatMap((g) => Array.from({ length: g.tokens }, () => g.ms / g.tokens));
  const during = onlineGaps.filter((g) => g.duringUpdate);
  const outside = onlineGaps.filter((g) => !g.duringUpdate);
  const rows = [
    { config: 'static (no learning)', chunk: dist(staticGaps.map((g) => g.ms)), token: dist(perToken(staticGaps)) },
    { config: 'online, during updates', chunk: dist(during.map((g) => g.ms)), token: dist(perToken(during)) },
    { config: 'online, between updates', chunk: dist(outside.map((g) => g.ms)), token: dist(perToken(outside)) },
    { config: 'online, all', chunk: dist(onlineGaps.map((g) => g.ms)), token: dist(perToken(onlineGaps)) },
  ];
  const base = rows[0]!;
  const upd = rows[1]!;
  const ratios = {
    chunkP50: upd.chunk.p50 / base.chunk.p50,
    chunkP99: upd.chunk.p99 / base.chunk.p99,
    tokenP50: upd.token.p50 / base.token.p50,
    tokenP99: upd.token.p99 / base.token.p99,
  };
  const table = formatTable(
    [
      { header: 'configuration', align: 'left', value: (r: (typeof rows)[number]) => r.config },
      { header: 'gaps', value: (r) => String(r.chunk.n) },
      { header: 'gap p50 ms', value: (r) => fmtNum(r.chunk.p50) },
      { header: 'gap p90 ms', value: (r) => fmtNum(r.chunk.p90) },
      { header: 'gap p99 ms', value: (r) => fmtNum(r.chunk.p99) },
      { header: 'gap max ms', value: (r) => fmtNum(r.chunk.max) },
      { header: 'token p50 ms', value: (r) => fmtNum(r.token.p50) },
      { header: 'token p99 ms', value: (r) => fmtNum(r.token.p99) },
    ],
    rows,
  );
  const summary = [
    `p99 gap during updates / p99 without: ${fmtNum(ratios.chunkP99)}x (target <= 1.5x): ${ratios.chunkP99 <= 1.5 ? 'PASS' : 'MISS'}`,
    `p50 gap during updates / p50 without: ${fmtNum(ratios.chunkP50)}x; per-token p99 ratio ${fmtNum(ratios.tokenP99)}x, p50 ratio ${fmtNum(ratios.tokenP50)}x`,
    `online: ${updates} updates, ${fmtNum(updateMs / Math.max(1, updates))} ms each, busy ${fmtNum((100 * updateMs) / Math.max(1, onlineMs))}% of its serving time; ` +
      `acceptance static ${fmtNum(staticMetrics.acceptanceRate)}, online ${fmtNum(onlineMetrics.acceptanceRate)}`,
  ];
  const out = writeResults('online-latency', {
    machine: machineFacts(),
    settings: { rounds, promptsPerRound, maxTokens, strategy, distill, threads: values.get('threads') ?? 'default', trainThreads: trainThreads ?? 'default (1)' },
    rows,
    ratios,
    updates,
    updateMsMean: updateMs / Math.max(1, updates),
    updateBusyFraction: updateMs / Math.max(1, onlineMs),
    acceptance: { static: staticMetrics.acceptanceRate, online: onlineMetrics.acceptanceRate },
    summary,
  });
  if (!flags.has('json-only')) process.stdout.write(`${table}\n\n${summary.join('\n')}\nresults: ${out.latest}\n`);
  else process.stdout.write(JSON.stringify({ rows, ratios, summary }) + '\n');
}

main().catch((e: unknown) => {
  process.stderr.write(`bench/online-latency: ${e instanceof Error ? e.stack : String(e)}\n`);
  process.exit(1);
});
