// Shared helpers for the tsx benchmarks in bench/: timing (process.hrtime.bigint, warm-up, median
// of adaptive repeats), the same-run memory-bandwidth probe, machine facts, fast random inputs,
// JSON results under bench/results/ and a compact table printer.
//
// Benchmarks report; they never assert. Every throughput is shown next to a ratio measured in the
// same process (see DESIGN.md, "Benchmarks"), because absolute times mean little on shared machines.
import { mkdirSync, readFileSync, writeFileSync, existsSync } from 'node:fs';
import { cpus, totalmem } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { bandwidthProbe, flopsProbe, setThreads } from '../lib/kernels.js';
import { addonPath } from '../lib/addon.js';

export const benchDir = dirname(fileURLToPath(import.meta.url));
export const resultsDir = join(benchDir, 'results');

// ---------------------------------------------------------------- command line

export interface ArgSpec {
  /** Flags without a value, e.g. --quick. */
  booleans: string[];
  /** Flags that take a value, e.g. --threads 2 or --threads=2. */
  values: string[];
}

export function parseArgs(argv: string[], spec: ArgSpec): { flags: Set<string>; values: Map<string, string> } {
  const flags = new Set<string>();
  const values = new Map<string, string>();
  for (let i = 0; i < argv.length; ++i) {
    const a = argv[i]!;
    if (!a.startsWith('--')) throw new Error(`unexpected argument '${a}'`);
    const eq = a.indexOf('=');
    const name = (eq >= 0 ? a.slice(2, eq) : a.slice(2));
    if (spec.booleans.includes(name)) {
      if (eq >= 0) throw new Error(`--${name} takes no value`);
      flags.add(name);
    } else if (spec.values.includes(name)) {
      const v = eq >= 0 ? a.slice(eq + 1) : argv[++i];
      if (v === undefined) throw new Error(`--${name} needs a value`);
      values.set(name, v);
    } else {
      const known = [...spec.booleans, ...spec.values].map((f) => `--${f}`).join(', ');
      throw new Error(`unknown flag '${a}' (known: ${known})`);
    }
  }
  return { flags, values };
}

/**
 * A script's command line: parseArgs with `--help` added, which prints the usage and exits 0; a bad
 * flag prints the error and the usage and exits 2.
 */
export function parseCommandLine(spec: ArgSpec, usage: string): { flags: Set<string>; values: Map<string, string> } {
  let args: ReturnType<typeof parseArgs>;
  try {
    args = parseArgs(process.argv.slice(2), { booleans: [...spec.booleans, 'help'], values: spec.values });
  } catch (e) {
    process.stderr.write(`${(e as Error).message}\n${usage}\n`);
    process.exit(2);
  }
  if (args.flags.has('help')) {
    process.stdout.write(usage + '\n');
    process.exit(0);
  }
  return args;
}

// ---------------------------------------------------------------- timing

export function nowNs(): bigint {
  return process.hrtime.bigint();
}

export function median(xs: number[]): number {
  if (xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m]! : 0.5 * (s[m - 1]! + s[m]!);
}

export interface TimingOptions {
  /** Warm-up: at least this many calls, and until warmupMs have passed. */
  warmupCalls?: number;
  warmupMs?: number;
  /**
   * Timed phase: at least minCalls calls, and until budgetMs have passed (at most maxCalls).
   * When the first warm-up call alone takes longer than budgetMs, one timed call is made; when it
   * takes longer than 4 x budgetMs, it is the only call and its time is reported.
   */
  minCalls?: number;
  budgetMs?: number;
  maxCalls?: number;
}

export interface Timing {
  /** Median time of one call, in microseconds. */
  medianUs: number;
  /** Fastest and slowest timed call, in microseconds. */
  minUs: number;
  maxUs: number;
  calls: number;
}

/**
 * Times `fn` call by call: a warm-up, then calls until the budget is spent; returns the median.
 * `fn` gets a running call index (warm-up included) so callers can rotate inputs and seeds.
 */
export function timeCalls(fn: (i: number) => void, o: TimingOptions = {}): Timing {
  const warmupCalls = o.warmupCalls ?? 1;
  const warmupNs = BigInt(Math.round((o.warmupMs ?? 20) * 1e6));
  const minCalls = o.minCalls ?? 5;
  const budgetNs = BigInt(Math.round((o.budgetMs ?? 150) * 1e6));
  const maxCalls = o.maxCalls ?? 100_000;
  let i = 0;
  const w0 = nowNs();
  let first = -1n;
  while (i < warmupCalls || nowNs() - w0 < warmupNs) {
    fn(i++);
    if (first < 0n) first = nowNs() - w0;
  }
  // A call slower than the whole budget is timed once more and no further; one slower than four
  // budgets is not repeated at all (the warm-up call is the measurement). Such calls are long
  // enough to average out jitter, and the full run has to stay within a few minutes.
  if (first > 4n * budgetNs) {
    const us = Number(first) / 1e3;
    return { medianUs: us, minUs: us, maxUs: us, calls: 1 };
  }
  const needCalls = first > budgetNs ? 1 : minCalls;
  const samples: number[] = [];
  const t0 = nowNs();
  while (samples.length < maxCalls && (samples.length < needCalls || nowNs() - t0 < budgetNs)) {
    const a = nowNs();
    fn(i++);
    samples.push(Number(nowNs() - a) / 1e3);
  }
  return {
    medianUs: median(samples),
    minUs: Math.min(...samples),
    maxUs: Math.max(...samples),
    calls: samples.length,
  };
}

// ---------------------------------------------------------------- bandwidth probe

export interface ProbeResult {
  readGBs: number;
  copyGBs: number;
  threads: number;
  bytes: number;
  iterations: number;
}

/**
 * The native same-process probe (native/core/bandwidth.cpp): a streaming sum ("read") and a memcpy
 * ("copy", read + write bytes) over `bytes` on the CPU backend's thread pool, best of `iterations`.
 */
export function probeBandwidth(bytes = 256 * 2 ** 20, iterations = 5): ProbeResult {
  const r = bandwidthProbe({ bytes, iterations });
  return { readGBs: r.readBytesPerSecond / 1e9, copyGBs: r.copyBytesPerSecond / 1e9, threads: r.threads, bytes, iterations };
}

/**
 * How much compute the pool's threads really add: FMA chains on every thread of the pool against
 * one thread, best of 3 each. A virtual machine's logical CPUs can share a physical core for a
 * while; compute-bound kernels then read low against a bandwidth probe that the sharing does not
 * slow. (It does not explain every low run here: in the host states whose read probe rose to
 * 55-72 GB/s this probe still scaled x2, while a 10 us two-thread kernel call ran no faster than
 * one thread; see README, "The kernels on the CPU".)
 */
export interface ComputeProbe {
  threads: number;
  oneThreadGflops: number;
  poolGflops: number;
  /** poolGflops / oneThreadGflops: about `threads` when every thread has a core of its own. */
  scaling: number;
}

export function probeCompute(threads: number): ComputeProbe {
  setThreads(1);
  const one = flopsProbe({ iterations: 3 }).flopsPerSecond;
  setThreads(threads);
  const pool = flopsProbe({ iterations: 3 }).flopsPerSecond;
  return { threads, oneThreadGflops: one / 1e9, poolGflops: pool / 1e9, scaling: pool / one };
}

// ---------------------------------------------------------------- machine facts

export interface MachineFacts {
  cpuModel: string;
  logicalCpus: number;
  cpuFlags: string[];
  l3Cache: string | null;
  totalMemGB: number;
  node: string;
  platform: string;
  addonPath: string;
}

export function machineFacts(): MachineFacts {
  let cpuModel = cpus()[0]?.model ?? 'unknown';
  let cpuFlags: string[] = [];
  let l3Cache: string | null = null;
  try {
    const info = readFileSync('/proc/cpuinfo', 'utf8');
    cpuModel = /^model name\s*:\s*(.*)$/m.exec(info)?.[1]?.trim() ?? cpuModel;
    const flags = /^flags\s*:\s*(.*)$/m.exec(info)?.[1]?.split(/\s+/) ?? [];
    cpuFlags = flags.filter((f) => /^(avx2|fma|f16c|avx512f|avx512bw|avx512_bf16|avx_vnni|amx_tile)$/.test(f));
  } catch {
    // not Linux: keep os.cpus()
  }
  try {
    l3Cache = readFileSync('/sys/devices/system/cpu/cpu0/cache/index3/size', 'utf8').trim();
  } catch {
    l3Cache = null;
  }
  return {
    cpuModel,
    logicalCpus: cpus().length,
    cpuFlags,
    l3Cache,
    totalMemGB: Math.round((totalmem() / 2 ** 30) * 10) / 10,
    node: process.version,
    platform: `${process.platform}-${process.arch}`,
    addonPath,
  };
}

// ---------------------------------------------------------------- random inputs

/** xorshift128+ in two uint32 halves: cheap, deterministic, good enough for benchmark inputs. */
export class XorShift {
  private s0: number;
  private s1: number;
  private s2: number;
  private s3: number;
  constructor(seed: number) {
    // splitmix-style scrambling of the seed into four nonzero words
    let x = (seed ^ 0x9e3779b9) >>> 0;
    const next = () => {
      x = (x + 0x6d2b79f5) >>> 0;
      let t = Math.imul(x ^ (x >>> 15), 1 | x);
      t ^= t + Math.imul(t ^ (t >>> 7), 61 | t);
      return (t ^ (t >>> 14)) >>> 0 || 1;
    };
    this.s0 = next();
    this.s1 = next();
    this.s2 = next();
    this.s3 = next();
  }
  /** xorshift128 (Marsaglia), uint32. */
  nextU32(): number {
    const t = this.s0 ^ (this.s0 << 11);
    this.s0 = this.s1;
    this.s1 = this.s2;
    this.s2 = this.s3;
    this.s3 = (this.s3 ^ (this.s3 >>> 19) ^ (t ^ (t >>> 8))) >>> 0;
    return this.s3;
  }
  /** Uniform in (0, 1). */
  uniform(): number {
    return (this.nextU32() + 0.5) / 4294967296;
  }
  /** Integer in [0, n). */
  below(n: number): number {
    return Math.floor(this.uniform() * n);
  }
}

/** Fills `out` with N(0, sigma^2) by Box-Muller. ~10 ns per value; use it for a bank, then copy. */
export function fillNormal(out: Float32Array, sigma: number, rng: XorShift): void {
  const n = out.length;
  let i = 0;
  for (; i + 1 < n; i += 2) {
    const r = sigma * Math.sqrt(-2 * Math.log(rng.uniform()));
    const th = 2 * Math.PI * rng.uniform();
    out[i] = r * Math.cos(th);
    out[i + 1] = r * Math.sin(th);
  }
  if (i < n) out[i] = sigma * Math.sqrt(-2 * Math.log(rng.uniform())) * Math.cos(2 * Math.PI * rng.uniform());
}

// ---------------------------------------------------------------- results

export function timestamp(d = new Date()): string {
  return d.toISOString().replace(/[:.]/g, '-');
}

/** Writes bench/results/<name>-<timestamp>.json and bench/results/<name>-latest.json; returns both paths. */
export function writeResults(name: string, data: unknown): { stamped: string; latest: string } {
  mkdirSync(resultsDir, { recursive: true });
  const text = JSON.stringify(data, null, 2) + '\n';
  const stamped = join(resultsDir, `${name}-${timestamp()}.json`);
  const latest = join(resultsDir, `${name}-latest.json`);
  writeFileSync(stamped, text);
  writeFileSync(latest, text);
  return { stamped, latest };
}

export function readJsonIfExists<T>(path: string): T | null {
  if (!existsSync(path)) return null;
  try {
    return JSON.parse(readFileSync(path, 'utf8')) as T;
  } catch (e) {
    process.stderr.write(`warning: ignoring unreadable ${path}: ${(e as Error).message}\n`);
    return null;
  }
}

export function writeJson(path: string, data: unknown): void {
  mkdirSync(dirname(resolve(path)), { recursive: true });
  writeFileSync(path, JSON.stringify(data, null, 2) + '\n');
}

// ---------------------------------------------------------------- printing

export interface Column<R> {
  header: string;
  /** Right-align (numbers) unless 'left'. */
  align?: 'left' | 'right';
  value: (r: R) => string;
}

/** Formats rows as a fixed-width table: one header line, one rule, one line per row. */
export function formatTable<R>(columns: Column<R>[], rows: R[]): string {
  const cells = rows.map((r) => columns.map((c) => c.value(r)));
  const widths = columns.map((c, i) => Math.max(c.header.length, ...cells.map((row) => row[i]!.length)));
  const fmt = (vals: string[]) =>
    vals
      .map((v, i) => (columns[i]!.align === 'left' ? v.padEnd(widths[i]!) : v.padStart(widths[i]!)))
      .join('  ')
      .trimEnd();
  return [fmt(columns.map((c) => c.header)), widths.map((w) => '-'.repeat(w)).join('  '), ...cells.map(fmt)].join('\n');
}

/** Significant-figure formatting for table cells: 3 figures, no exponent for everyday ranges. */
export function fmtNum(x: number | null | undefined, digits = 3): string {
  if (x === null || x === undefined || !Number.isFinite(x)) return 'n/a';
  if (x === 0) return '0';
  const a = Math.abs(x);
  if (a >= 10 ** digits) return x.toFixed(0);
  const decimals = Math.max(0, digits - 1 - Math.floor(Math.log10(a)));
  return x.toFixed(Math.min(decimals, 6));
}

/** Progress to stderr, so that stdout stays clean for --json-only. */
export function progress(msg: string): void {
  process.stderr.write(msg + '\n');
}
