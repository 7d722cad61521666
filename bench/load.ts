// Load test of the OpenAI-compatible server on loopback, bounded in time.
//
//   npx tsx bench/load.ts [--seconds 60] [--concurrency 16] [--max-tokens 64] [--target PATH --draft PATH]
//                         [--static] [--max-concurrent N] [--temperature T] [--url http://127.0.0.1:PORT]
//
// Starts `osd serve` (lib/cli.ts) on 127.0.0.1 with a free port in a child process (the embedded
// default pair unless --target/--draft; online distillation on unless --static), then runs
// --concurrency client loops for --seconds: each streams one /v1/completions request at a time
// (stream: true, include_usage) with its own fetch client and starts the next as soon as one ends.
// Requests started before the deadline run to completion. With --url it drives a server that is
// already running (loopback addresses only; RSS is then not sampled).
//
// Reports (table on stdout, JSON in bench/results/load-<timestamp>.json and load-latest.json):
// - time to first token (TTFT): request sent -> first event carrying text;
// - inter-token latency (ITL): the gap between consecutive text events of a stream (one event carries
//   every token a verification step accepted), and TPOT: (last - first event) / (tokens - 1) per request;
// - errors (non-200, network errors, error events, streams without [DONE]): must be 0;
// - the server's resident memory (/proc/PID/status VmRSS), sampled every 500 ms: at the start of
//   the load, after warm-up (the first 10% of the run, when the distiller's trainer exists), at the
//   end, and the maximum. "flat": the median over the last quarter of the run is within 5% of the
//   median over the second quarter (after warm-up). The JSON keeps the series, with the server's
//   draft-update count every 2 s (distillation updates allocate the trainer's working memory);
// - throughput, and the server's own /metrics (acceptance rate, mean accepted length, draft updates).
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { benchDir, fmtNum, formatTable, machineFacts, parseCommandLine, progress, writeResults, type Column } from './common.js';
import { threadPoolSize } from '../lib/threadPool.cjs';

const USAGE =
  'usage: npx tsx bench/load.ts [--seconds 60] [--concurrency 16] [--max-tokens 64] [--target PATH --draft PATH] [--static] [--max-concurrent N] [--temperature T] [--url URL]';

const root = join(benchDir, '..');
const args = parseCommandLine(
  { booleans: ['static'], values: ['seconds', 'concurrency', 'max-tokens', 'target', 'draft', 'max-concurrent', 'temperature', 'url'] },
  USAGE,
);
const num = (name: string, fallback: number, min: number, max: number): number => {
  const v = args.values.get(name);
  if (v === undefined) return fallback;
  const n = Number(v);
  if (!Number.isFinite(n) || n < min || n > max) throw new RangeError(`--${name} must be a number in [${min}, ${max}]`);
  return n;
};
const seconds = num('seconds', 60, 1, 600);
const concurrency = Math.round(num('concurrency', 16, 1, 256));
const maxTokens = Math.round(num('max-tokens', 64, 1, 4096));
const temperature = num('temperature', 0.7, 0, 2);

// ---------------------------------------------------------------- prompts

function loadPrompts(): string[] {
  const path = join(root, 'models', 'demo-prompts.json');
  if (existsSync(path)) {
    const domains = (JSON.parse(readFileSync(path, 'utf8')) as { domains: Record<string, string[]> }).domains;
    // Interleave the domains; keep prompts short enough to leave room for max_tokens in a 512 context.
    const lists = Object.values(domains);
    const out: string[] = [];
    for (let i = 0; out.length < 256 && lists.some((l) => i < l.length); i++) for (const l of lists) if (i < l.length) out.push(l[i]!.slice(0, 240));
    if (out.length) return out;
  }
  return ['The history of the city', 'SELECT name FROM users WHERE', 'def parse(text):', 'Dear team, thank you for', 'Once upon a time'];
}

// ---------------------------------------------------------------- the server

function isLoopback(url: URL): boolean {
  return ['127.0.0.1', 'localhost', '[::1]', '::1'].includes(url.hostname) || /^127\./.test(url.hostname);
}

async function startServer(): Promise<{ url: string; child: ChildProcess; target: string; draft: string }> {
  const cli = ['--import', 'tsx', join(root, 'lib', 'cli.ts'), 'serve', '--port', '0', '--host', '127.0.0.1', '--json'];
  const target = args.values.get('target');
  const draft = args.values.get('draft');
  if ((target === undefined) !== (draft === undefined)) throw new TypeError('give both --target and --draft, or neither');
  if (target) cli.push('--target', target, '--draft', draft!);
  if (args.flags.has('static')) cli.push('--static');
  if (args.values.has('max-concurrent')) cli.push('--max-concurrent', args.values.get('max-concurrent')!);
  // The pool `osd serve` gets from the osd executable (tsx's loader starts it before cli.ts runs).
  const pool = threadPoolSize(cli.slice(cli.indexOf('serve')), process.env);
  const env = pool === undefined ? process.env : { ...process.env, UV_THREADPOOL_SIZE: String(pool) };
  const child = spawn(process.execPath, cli, { cwd: root, env, stdio: ['ignore', 'pipe', 'inherit'] });
  const lines = createInterface({ input: child.stdout! });
  const info = await new Promise<{ url: string; target: string; draft: string }>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('the server did not start within 60 s')), 60_000);
    child.once('exit', (code) => reject(new Error(`the server exited with code ${code} before it was ready`)));
    lines.once('line', (line) => {
      clearTimeout(timer);
      try {
        resolve(JSON.parse(line) as { url: string; target: string; draft: string });
      } catch {
        reject(new Error(`unexpected first line from osd serve: ${line}`));
      }
    });
  });
  return { url: info.url.replace(/\/v1$/, ''), child, target: info.target, draft: info.draft };
}

function rssBytes(pid: number): number | null {
  try {
    const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) * 1024 : null;
  } catch {
    return null;
  }
}

// ---------------------------------------------------------------- one streamed request

interface RequestResult {
  ok: boolean;
  error?: string;
  ttftMs?: number;
  gapsMs: number[];
  tpotMs?: number;
  tokens: number;
  durationMs: number;
}

async function streamOne(base: string, model: string, prompt: string, seed: number): Promise<RequestResult> {
  const t0 = performance.now();
  const gapsMs: number[] = [];
  let first: number | undefined;
  let last: number | undefined;
  let tokens = 0;
  let done = false;
  try {
    const res = await fetch(`${base}/v1/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model, prompt, max_tokens: maxTokens, temperature, top_p: 0.95, seed, stream: true, stream_options: { include_usage: true } }),
    });
    if (res.status !== 200) return { ok: false, error: `HTTP ${res.status}: ${(await res.text()).slice(0, 200)}`, gapsMs, tokens, durationMs: performance.now() - t0 };
    const decoder = new TextDecoder();
    let buf = '';
    for await (const part of res.body as unknown as AsyncIterable<Uint8Array>) {
      buf += decoder.decode(part, { stream: true });
      let cut: number;
      while ((cut = buf.indexOf('\n\n')) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        if (!event.startsWith('data: ')) continue;
        const data = event.slice(6);
        if (data === '[DONE]') {
          done = true;
          continue;
        }
        const msg = JSON.parse(data) as { error?: { message: string }; choices?: { text?: string }[]; usage?: { completion_tokens: number } };
        if (msg.error) return { ok: false, error: `error event: ${msg.error.message}`, gapsMs, tokens, durationMs: performance.now() - t0 };
        if (msg.usage) tokens = msg.usage.completion_tokens;
        if (msg.choices?.[0]?.text) {
          const now = performance.now();
          if (first === undefined) first = now;
          else gapsMs.push(now - last!);
          last = now;
        }
      }
    }
  } catch (e) {
    return { ok: false, error: `network: ${(e as Error).message}`, gapsMs, tokens, durationMs: performance.now() - t0 };
  }
  if (!done) return { ok: false, error: 'the stream ended without [DONE]', gapsMs, tokens, durationMs: performance.now() - t0 };
  return {
    ok: true,
    ttftMs: first === undefined ? undefined : first - t0,
    gapsMs,
    tpotMs: first !== undefined && tokens > 1 ? (last! - first) / (tokens - 1) : undefined,
    tokens,
    durationMs: performance.now() - t0,
  };
}

// ---------------------------------------------------------------- statistics

function quantile(xs: number[], q: number): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const pos = (s.length - 1) * q;
  const lo = Math.floor(pos);
  const hi = Math.ceil(pos);
  return s[lo]! + (s[hi]! - s[lo]!) * (pos - lo);
}

function summary(xs: number[]) {
  return { n: xs.length, p50: quantile(xs, 0.5), p90: quantile(xs, 0.9), p99: quantile(xs, 0.99), mean: xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : NaN, max: xs.length ? Math.max(...xs) : NaN };
}

function metricValue(text: string, name: string): number | null {
  const line = text.split('\n').find((l) => l.startsWith(name + ' ') || (l.startsWith(name + '{') && !l.startsWith('#')));
  return line ? Number(line.slice(line.lastIndexOf(' ') + 1)) : null;
}

// ---------------------------------------------------------------- main

async function main(): Promise<void> {
  let server: Awaited<ReturnType<typeof startServer>> | undefined;
  let base: string;
  if (args.values.has('url')) {
    const u = new URL(args.values.get('url')!);
    if (!isLoopback(u)) throw new Error(`--url must be a loopback address, got ${u.hostname}`);
    base = u.origin;
  } else {
    progress('starting osd serve on 127.0.0.1 ...');
    server = await startServer();
    base = server.url;
  }
  const stopServer = async (): Promise<number | null> => {
    if (!server || server.child.exitCode !== null) return server?.child.exitCode ?? null;
    const exited = new Promise<number | null>((r) => server!.child.once('exit', (code) => r(code)));
    server.child.kill('SIGTERM');
    const timeout = setTimeout(() => server!.child.kill('SIGKILL'), 15_000);
    const code = await exited;
    clearTimeout(timeout);
    return code;
  };
  try {
    const models = (await (await fetch(`${base}/v1/models`)).json()) as { data: { id: string }[] };
    const model = models.data[0]!.id;
    const prompts = loadPrompts();
    progress(`server ${base}, model ${model}; ${concurrency} streams for ${seconds} s, max_tokens ${maxTokens}, temperature ${temperature}`);
    // Warm-up: one request, so that the first measured requests do not pay for lazy initialisation.
    const warm = await streamOne(base, model, prompts[0]!, 1);
    if (!warm.ok) throw new Error(`warm-up request failed: ${warm.error}`);

    const pid = server?.child.pid;
    const rss: { t: number; bytes: number }[] = [];
    const updatesSeries: [number, number | null][] = [];
    const t0 = performance.now();
    const sampleRss = () => {
      const b = pid ? rssBytes(pid) : null;
      if (b !== null) rss.push({ t: (performance.now() - t0) / 1000, bytes: b });
    };
    sampleRss();
    const rssTimer = setInterval(sampleRss, 500);
    const updatesTimer = setInterval(() => {
      const t = Math.round((performance.now() - t0) / 100) / 10;
      fetch(`${base}/metrics`)
        .then((r) => r.text())
        .then((text) => updatesSeries.push([t, metricValue(text, 'osd_draft_updates_total')]))
        .catch(() => undefined);
    }, 2000);
    const deadline = t0 + seconds * 1000;
    const results: RequestResult[] = [];
    let next = 0;
    let lastReport = t0;
    const worker = async (w: number) => {
      while (performance.now() < deadline) {
        const i = next++;
        results.push(await streamOne(base, model, prompts[i % prompts.length]!, 1000 + i));
        if (performance.now() - lastReport > 5000) {
          lastReport = performance.now();
          progress(`  ${((lastReport - t0) / 1000).toFixed(0)} s: ${results.length} requests, ${results.filter((r) => !r.ok).length} errors`);
        }
        void w;
      }
    };
    await Promise.all(Array.from({ length: concurrency }, (_, w) => worker(w)));
    const wall = (performance.now() - t0) / 1000;
    sampleRss();
    clearInterval(rssTimer);
    clearInterval(updatesTimer);
    const metricsText = await (await fetch(`${base}/metrics`)).text();

    const ok = results.filter((r) => r.ok);
    const errors = results.filter((r) => !r.ok);
    const ttft = summary(ok.flatMap((r) => (r.ttftMs === undefined ? [] : [r.ttftMs])));
    const itl = summary(ok.flatMap((r) => r.gapsMs));
    const tpot = summary(ok.flatMap((r) => (r.tpotMs === undefined ? [] : [r.tpotMs])));
    const tokens = ok.reduce((a, r) => a + r.tokens, 0);
    const warmAt = Math.max(1, seconds * 0.1);
    const warmSample = rss.find((s) => s.t >= warmAt) ?? rss[0];
    const mib = (b: number | undefined) => (b === undefined ? null : Math.round((b / 2 ** 20) * 10) / 10);
    const between = (from: number, to: number) => rss.filter((s) => s.t >= from * wall && s.t < to * wall).map((s) => s.bytes);
    const q2 = quantile(between(0.25, 0.5), 0.5);
    const q4 = quantile(between(0.75, 1.01), 0.5);
    const rssReport = rss.length
      ? {
          startMiB: mib(rss[0]!.bytes),
          afterWarmupMiB: mib(warmSample!.bytes),
          endMiB: mib(rss[rss.length - 1]!.bytes),
          maxMiB: mib(Math.max(...rss.map((s) => s.bytes))),
          medianSecondQuarterMiB: mib(q2),
          medianLastQuarterMiB: mib(q4),
          samples: rss.length,
          flat: q4 <= 1.05 * q2,
        }
      : null;
    const exitCode = await stopServer();
    server = undefined;

    const result = {
      config: { seconds, concurrency, maxTokens, temperature, topP: 0.95, server: args.values.has('url') ? base : 'osd serve (child process)', static: args.flags.has('static'), maxConcurrent: args.values.get('max-concurrent') ?? 'default' },
      machine: machineFacts(),
      model,
      wallSeconds: wall,
      requests: results.length,
      completed: ok.length,
      errors: errors.length,
      errorSamples: [...new Set(errors.map((e) => e.error))].slice(0, 5),
      completionTokens: tokens,
      tokensPerSecond: tokens / wall,
      requestsPerSecond: ok.length / wall,
      ttftMs: ttft,
      itlMs: itl,
      tpotMs: tpot,
      rss: rssReport,
      rssSeries: rss.map((s) => [Math.round(s.t * 10) / 10, mib(s.bytes)]),
      draftUpdatesSeries: updatesSeries,
      server: {
        acceptanceRate: metricValue(metricsText, 'osd_draft_acceptance_rate'),
        meanAcceptedLength: metricValue(metricsText, 'osd_mean_accepted_length'),
        draftUpdates: metricValue(metricsText, 'osd_draft_updates_total'),
        draftRollbacks: metricValue(metricsText, 'osd_draft_rollbacks_total'),
        disconnects: metricValue(metricsText, 'osd_client_disconnects_total'),
        targetPassMs: (metricValue(metricsText, 'osd_pass_duration_seconds{model="target"}') ?? NaN) * 1000,
        draftPassMs: (metricValue(metricsText, 'osd_pass_duration_seconds{model="draft"}') ?? NaN) * 1000,
        exitCodeOnSigterm: exitCode,
      },
    };
    const paths = writeResults('load', result);

    type Row = { what: string; n: string; p50: string; p99: string; mean: string };
    const row = (what: string, s: ReturnType<typeof summary>): Row => ({ what, n: String(s.n), p50: fmtNum(s.p50), p99: fmtNum(s.p99), mean: fmtNum(s.mean) });
    const cols: Column<Row>[] = [
      { header: 'latency (ms)', align: 'left', value: (r) => r.what },
      { header: 'n', value: (r) => r.n },
      { header: 'p50', value: (r) => r.p50 },
      { header: 'p99', value: (r) => r.p99 },
      { header: 'mean', value: (r) => r.mean },
    ];
    console.log(`\nload test: ${concurrency} concurrent streams, ${wall.toFixed(1)} s, max_tokens ${maxTokens}, model ${model}`);
    console.log(formatTable(cols, [row('time to first token', ttft), row('inter-token (per event)', itl), row('time per output token', tpot)]));
    console.log(
      `\nrequests ${results.length} (completed ${ok.length}), errors ${errors.length}${errors.length ? ' <- MUST BE 0: ' + result.errorSamples.join('; ') : ''}` +
        `\nthroughput ${fmtNum(result.tokensPerSecond)} tokens/s, ${fmtNum(result.requestsPerSecond)} requests/s`,
    );
    if (rssReport)
      console.log(
        `server RSS (MiB): start ${rssReport.startMiB}, after warm-up ${rssReport.afterWarmupMiB}, end ${rssReport.endMiB}, max ${rssReport.maxMiB}; ` +
          `median 2nd quarter ${rssReport.medianSecondQuarterMiB}, last quarter ${rssReport.medianLastQuarterMiB} -> ${rssReport.flat ? 'flat' : 'NOT FLAT'}`,
      );
    console.log(
      `server: acceptance ${fmtNum(result.server.acceptanceRate)}, mean accepted length ${fmtNum(result.server.meanAcceptedLength)}, draft updates ${result.server.draftUpdates}, rollbacks ${result.server.draftRollbacks}, target pass ${fmtNum(result.server.targetPassMs)} ms, draft pass ${fmtNum(result.server.draftPassMs)} ms, exit on SIGTERM ${exitCode ?? 'n/a'}`,
    );
    console.log(`results: ${paths.latest}`);
    process.exitCode = errors.length === 0 ? 0 : 1;
  } finally {
    await stopServer();
  }
}

main().catch((e: unknown) => {
  console.error(`bench/load: ${e instanceof Error ? e.message : String(e)}`);
  process.exit(1);
});
