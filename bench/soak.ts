// Memory over a long run: what a server embedding the package sees after thousands of requests.
// An online decoder on the default pair serves a stream of requests (the demo's prompts, every
// domain in turn; greedy and T = 0.8; generate() and streams; some aborted mid-request, some streams
// left early) with `concurrency` in flight, while the draft keeps learning (an update every
// `interval` requests). Every `every` requests it samples process.memoryUsage() after a full GC:
// resident set, JavaScript heap, external and ArrayBuffer memory, and the updates applied so far.
//
//   node --expose-gc --import tsx bench/soak.ts [--quick] [--requests N] [--tokens N] [--every N]
//                                               [--concurrency N] [--interval N] [--json-only]
//   npm run bench:soak [-- options]
//
// Reports the samples and each measure's growth per 1,000 requests (the least-squares slope after
// the first sample). It never fails on a result: a leak shows as steady growth.
import { readFileSync } from 'node:fs';
import { createOnlineDecoder, loadModel, type SamplingOptions } from '../lib/index.js';
import { DEFAULT_DRAFT, DEFAULT_PROMPTS, DEFAULT_TARGET } from '../lib/demo.js';
import { fmtNum, formatTable, machineFacts, parseCommandLine, progress, writeResults } from './common.js';

const USAGE = `usage: node --expose-gc --import tsx bench/soak.ts [options]
  --quick           300 requests, a sample every 50 (a smoke test)
  --requests N      requests in all (default 3000)
  --tokens N        most tokens per request (default 48)
  --every N         requests between samples (default 250)
  --concurrency N   requests in flight (default 4)
  --interval N      requests between draft updates (default 4)
  --json-only       print only the result JSON on stdout`;

const args = parseCommandLine({ booleans: ['quick', 'json-only'], values: ['requests', 'tokens', 'every', 'concurrency', 'interval'] }, USAGE);
const quick = args.flags.has('quick');
function intArg(name: string, fallback: number): number {
  const v = args.values.get(name);
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1) {
    process.stderr.write(`--${name} must be an integer >= 1, got '${v}'\n${USAGE}\n`);
    process.exit(2);
  }
  return n;
}
const REQUESTS = intArg('requests', quick ? 300 : 3000);
const TOKENS = intArg('tokens', 48);
const EVERY = intArg('every', quick ? 50 : 250);
const CONCURRENCY = intArg('concurrency', 4);
const INTERVAL = intArg('interval', 4);
const gc = (globalThis as { gc?: () => void }).gc;
if (!gc) progress('note: run with node --expose-gc (npm run bench:soak does) for samples after a full GC; sampling without it');

interface Sample {
  requests: number;
  seconds: number;
  rssMiB: number;
  heapUsedMiB: number;
  externalMiB: number;
  arrayBuffersMiB: number;
  updates: number;
  rollbacks: number;
}

const MiB = 2 ** 20;
const domains = (JSON.parse(readFileSync(DEFAULT_PROMPTS, 'utf8')) as { domains: Record<string, string[]> }).domains;
const prompts = Object.values(domains).flat();

const target = await loadModel(DEFAULT_TARGET);
const draft = await loadModel(DEFAULT_DRAFT);
const dec = createOnlineDecoder({
  target,
  draft,
  strategy: { kind: 'chain', length: 4 },
  maxConcurrent: CONCURRENCY,
  distill: { interval: INTERVAL, lr: 3e-3 },
});
let updates = 0;
let rollbacks = 0;
dec.on('update', () => updates++);
dec.on('rollback', () => rollbacks++);

const samples: Sample[] = [];
const started = performance.now();
let aborted = 0;
let left = 0;
function sample(requests: number): void {
  gc?.();
  const m = process.memoryUsage();
  const s: Sample = {
    requests,
    seconds: (performance.now() - started) / 1000,
    rssMiB: m.rss / MiB,
    heapUsedMiB: m.heapUsed / MiB,
    externalMiB: m.external / MiB,
    arrayBuffersMiB: m.arrayBuffers / MiB,
    updates,
    rollbacks,
  };
  samples.push(s);
  progress(`${requests} requests, ${s.seconds.toFixed(0)} s: rss ${s.rssMiB.toFixed(1)} MiB, heap ${s.heapUsedMiB.toFixed(1)} MiB, updates ${updates}`);
}

/** Request i: its prompt, sampling and way of being served. */
async function serve(i: number): Promise<void> {
  const sampling: SamplingOptions = i % 2 ? { temperature: 0.8 } : { temperature: 0 };
  const prompt = prompts[i % prompts.length]!;
  const ac = new AbortController();
  try {
    if (i % 3 === 0) {
      // A stream, every ninth one left after its third chunk (as a client that goes away).
      let chunks = 0;
      for await (const _ of dec.stream({ prompt, maxTokens: TOKENS, sampling, seed: i, signal: ac.signal })) {
        if (i % 9 === 0 && ++chunks === 3) {
          left++;
          break;
        }
      }
    } else {
      if (i % 7 === 0) setTimeout(() => ac.abort(), 2);
      await dec.generate({ prompt, maxTokens: TOKENS, sampling, seed: i, signal: ac.signal });
    }
  } catch (e) {
    if ((e as Error).name !== 'AbortError') throw e;
    aborted++;
  }
}

let next = 0;
let done = 0;
async function worker(): Promise<void> {
  while (next < REQUESTS) {
    const i = next++;
    await serve(i);
    done++;
    if (done % EVERY === 0) sample(done);
  }
}
await Promise.all(Array.from({ length: CONCURRENCY }, worker));
if (done % EVERY !== 0) sample(done);
await dec.dispose();
await draft.dispose();
await target.dispose();

// Growth per 1,000 requests: the least-squares slope over the samples after the first (the run
// warming up), which the allocator's ups and downs move less than two end points would.
const fit = samples.length > 2 ? samples.slice(1) : samples;
const first = fit[0]!;
const last = samples[samples.length - 1]!;
function per1k(k: keyof Sample): number {
  const n = fit.length;
  if (n < 2) return NaN;
  const mx = fit.reduce((a, s) => a + s.requests, 0) / n;
  const my = fit.reduce((a, s) => a + s[k], 0) / n;
  const sxy = fit.reduce((a, s) => a + (s.requests - mx) * (s[k] - my), 0);
  const sxx = fit.reduce((a, s) => a + (s.requests - mx) ** 2, 0);
  return (sxy / sxx) * 1000;
}
const growth = {
  fromRequests: first.requests,
  rssMiBPer1kRequests: per1k('rssMiB'),
  heapUsedMiBPer1kRequests: per1k('heapUsedMiB'),
  externalMiBPer1kRequests: per1k('externalMiB'),
  arrayBuffersMiBPer1kRequests: per1k('arrayBuffersMiB'),
};
const result = {
  bench: 'soak',
  machine: machineFacts(),
  settings: { requests: REQUESTS, tokens: TOKENS, every: EVERY, concurrency: CONCURRENCY, interval: INTERVAL, gc: gc !== undefined },
  aborted,
  left,
  samples,
  growth,
  decoder: dec.metrics(),
};
const written = writeResults('soak', result);
if (args.flags.has('json-only')) {
  process.stdout.write(JSON.stringify(result) + '\n');
} else {
  process.stdout.write(
    formatTable<Sample>(
      [
        { header: 'requests', value: (s) => String(s.requests) },
        { header: 's', value: (s) => s.seconds.toFixed(0) },
        { header: 'rss MiB', value: (s) => s.rssMiB.toFixed(1) },
        { header: 'heap MiB', value: (s) => s.heapUsedMiB.toFixed(1) },
        { header: 'external MiB', value: (s) => s.externalMiB.toFixed(1) },
        { header: 'ArrayBuffers MiB', value: (s) => s.arrayBuffersMiB.toFixed(1) },
        { header: 'updates', value: (s) => String(s.updates) },
        { header: 'rollbacks', value: (s) => String(s.rollbacks) },
      ],
      samples,
    ) + '\n',
  );
  process.stdout.write(
    `\n${done} requests (${aborted} aborted, ${left} streams left early), ${updates} draft updates (${rollbacks} rolled back) in ${last.seconds.toFixed(0)} s\n` +
      `growth per 1,000 requests (slope from request ${growth.fromRequests} on): rss ${fmtNum(growth.rssMiBPer1kRequests)} MiB, heap ${fmtNum(growth.heapUsedMiBPer1kRequests)} MiB, ` +
      `external ${fmtNum(growth.externalMiBPer1kRequests)} MiB, ArrayBuffers ${fmtNum(growth.arrayBuffersMiBPer1kRequests)} MiB\n` +
      `results: ${written.stamped}\n`,
  );
}
