// Kernel benchmark: verifyChain / verifyChainBatch, verifyTree and distillLoss on the CPU backend,
// reported as effective GB/s and as a ratio to the memory-bandwidth probe run in the same process.
//
//   npx tsx bench/kernels.ts [--quick] [--json-only] [--threads N] [--save-baseline] [--hot]
//                            [--budget-ms MS] [--rotate-mb MB] [--fresh-grad]
//
// Definitions (also written into the JSON under "definitions"; see bench/README.md):
// - Effective bytes are the logits an op must touch once, as float32:
//   verify chain  = batch * ((g + 1) + g) * V * 4      (target rows + draft rows)
//   verify tree   = (n + 1) * V * 4 * (2, or 1 with deterministic children, which read no draft)
//   distill loss  = 3 * N * V * 4 with N = batch * g  (student read + teacher read + grad written)
// - GB/s = effective bytes / median time per call. "xProbe" divides by the READ probe (streaming sum
//   on the same thread pool, best of the probes run at the start and the end of this run).
// - Inputs rotate through a working set of --rotate-mb (default 512 MiB), so consecutive calls read
//   logits that are not in the caches; --hot reuses one input (cache-resident when it fits).
// - distillLoss writes its gradient into one caller-owned gradOut buffer per config, as a training
//   loop does; --fresh-grad lets every call allocate a new gradient instead (page faults included).
import { join } from 'node:path';
import {
  verifyChain,
  verifyChainBatch,
  verifyTree,
  distillLoss,
  setThreads,
  type SamplingOptions,
  type TreeChildrenMode,
  type DistillLossKind,
} from '../lib/kernels.js';
import {
  XorShift,
  fillNormal,
  fmtNum,
  formatTable,
  machineFacts,
  nowNs,
  parseCommandLine,
  probeBandwidth,
  probeCompute,
  progress,
  readJsonIfExists,
  resultsDir,
  timeCalls,
  writeJson,
  writeResults,
  type Column,
  type ComputeProbe,
  type ProbeResult,
} from './common.js';

// ---------------------------------------------------------------- options

const USAGE = `usage: npx tsx bench/kernels.ts [options]
  --quick           small subset (smoke test, a few seconds; numbers not comparable with a full run)
  --json-only       print only the result JSON on stdout (progress still goes to stderr)
  --threads N       CPU thread-pool size (setThreads; 0 = all cores); default: all cores
  --save-baseline   also write bench/results/kernels-baseline.json (the "vs previous version" reference)
  --hot             reuse one input per config (cache-resident) instead of rotating through memory
  --budget-ms MS    timed budget per config after warm-up (default 150, quick 40)
  --rotate-mb MB    working set the inputs rotate through (default 512, quick 64)
  --fresh-grad      distillLoss allocates a new gradient per call instead of reusing gradOut`;

const args = parseCommandLine(
  { booleans: ['quick', 'json-only', 'save-baseline', 'hot', 'fresh-grad'], values: ['threads', 'budget-ms', 'rotate-mb'] },
  USAGE,
);
const QUICK = args.flags.has('quick');
const JSON_ONLY = args.flags.has('json-only');
const HOT = args.flags.has('hot');
const SAVE_BASELINE = args.flags.has('save-baseline');
const FRESH_GRAD = args.flags.has('fresh-grad');

function numArg(name: string, dflt: number, min: number): number {
  const v = args.values.get(name);
  if (v === undefined) return dflt;
  const x = Number(v);
  if (!Number.isFinite(x) || x < min) {
    process.stderr.write(`--${name} must be a number >= ${min}, got '${v}'\n`);
    process.exit(2);
  }
  return x;
}
const BUDGET_MS = numArg('budget-ms', QUICK ? 40 : 150, 1);
const ROTATE_BYTES = numArg('rotate-mb', QUICK ? 64 : 512, 1) * 2 ** 20;
const THREADS_ARG = args.values.has('threads') ? numArg('threads', 0, 0) : null;

const TARGET_RATIO = 0.5; // the issue's target: >= 0.5 of the read probe (temperature-only, forward KL)
const NOISE_SIGMA = 1.5; // draft logits = target logits + N(0, NOISE_SIGMA^2): partial acceptance
const LOGIT_SIGMA = 3; // target logits ~ N(0, 3^2)

const VOCABS = QUICK ? [32000] : [32000, 128256];
const GS = QUICK ? [1, 8] : [1, 4, 8];
const BATCHES = QUICK ? [1, 16] : [1, 16, 64];
const SAMPLINGS: { name: string; s: SamplingOptions; target: boolean }[] = [
  { name: 'temperature', s: { temperature: 1 }, target: true },
  { name: 'topK=50', s: { temperature: 1, topK: 50 }, target: false },
  ...(QUICK ? [] : [{ name: 'topP=0.9', s: { temperature: 1, topP: 0.9 }, target: false }]),
];
/** (g, batch) pairs at which the informational losses (reverse KL, JSD, TVD) run: slower than forward KL. */
const INFO_LOSS_GRID: [number, number][] = [
  [1, 1],
  [8, 1],
  [8, 16],
];
const LOSSES: { kind: DistillLossKind; target: boolean }[] = QUICK
  ? [{ kind: 'forward-kl', target: true }]
  : [
      { kind: 'forward-kl', target: true },
      { kind: 'reverse-kl', target: false },
      { kind: 'jsd', target: false },
      { kind: 'tvd', target: false },
    ];
const TREE_MODES: TreeChildrenMode[] = QUICK
  ? ['sampled-with-replacement']
  : ['sampled-with-replacement', 'sampled-without-replacement', 'deterministic'];
/** Children per node at each depth: 4 + 12 + 24 + 24 = 64 nodes, depth 4. */
const TREE_BRANCHING = [4, 3, 2, 1];

const timing = { warmupCalls: 1, warmupMs: QUICK ? 5 : 20, minCalls: 3, budgetMs: BUDGET_MS };

// ---------------------------------------------------------------- result rows

type Op = 'verifyChain' | 'verifyChainBatch' | 'verifyTree' | 'distillLoss';

interface Row {
  key: string;
  op: Op;
  V: number;
  g: number | null;
  batch: number;
  /** Sampling config, loss kind, or tree children mode. */
  kind: string;
  usPerCall: number;
  minUs: number;
  calls: number;
  bytes: number;
  gbps: number;
  xProbe: number;
  /** 'PASS' / 'MISS' against TARGET_RATIO for the target rows, null for the others. */
  target: 'PASS' | 'MISS' | null;
  /** Mean accepted draft tokens per sequence (chains) or accepted path length (trees). */
  meanAccepted: number | null;
  /** verifyTree only: time per call / time of one verifyChain with g = 8, batch 1, same V. */
  xChainG8: number | null;
  /** GB/s / baseline GB/s for the same key; null when there is no baseline. */
  xBaseline: number | null;
  /** The same, after dividing each side by its own run's read probe. */
  xBaselineProbeNormalised: number | null;
  rotatingSlots: number;
  /** CPU seconds per wall second while this config was timed (see lastCpuPerWall). */
  cpuPerWall: number;
}

const rows: Row[] = [];

/**
 * CPU seconds the process ran per wall second during the last timed config (2 = both pool threads
 * busy throughout). On a shared machine it shows how much of the two cores a run actually got:
 * GB/s / cpuPerWall estimates the throughput per core-second, which contention does not dilute.
 */
let lastCpuPerWall = Number.NaN;
function timeCallsCpu(fn: (i: number) => void, o: Parameters<typeof timeCalls>[1]): ReturnType<typeof timeCalls> {
  const c0 = process.cpuUsage();
  const w0 = nowNs();
  const tm = timeCalls(fn, o);
  const c = process.cpuUsage(c0);
  lastCpuPerWall = ((c.user + c.system) * 1e3) / Number(nowNs() - w0);
  return tm;
}
let probeRead = 0; // GB/s denominator, set after the first probe

function addRow(
  r: Omit<Row, 'key' | 'gbps' | 'xProbe' | 'target' | 'xBaseline' | 'xBaselineProbeNormalised' | 'cpuPerWall'> & { isTarget: boolean },
): Row {
  const gbps = r.bytes / (r.usPerCall * 1e3);
  const { isTarget, ...rest } = r;
  const row: Row = {
    ...rest,
    key: `${r.op}|V=${r.V}|g=${r.g ?? '-'}|batch=${r.batch}|${r.kind}`,
    gbps,
    xProbe: gbps / probeRead,
    target: isTarget ? (gbps / probeRead >= TARGET_RATIO ? 'PASS' : 'MISS') : null,
    xBaseline: null,
    xBaselineProbeNormalised: null,
    cpuPerWall: lastCpuPerWall,
  };
  rows.push(row);
  progress(
    `  ${row.op} V=${row.V} g=${row.g ?? '-'} batch=${row.batch} ${row.kind}: ${fmtNum(row.usPerCall)} us, ` +
      `${fmtNum(row.gbps)} GB/s, x${fmtNum(row.xProbe, 2)} probe` +
      (row.meanAccepted !== null ? `, accepted ${fmtNum(row.meanAccepted)}` : '') +
      `, cpu/wall ${row.cpuPerWall.toFixed(2)}`,
  );
  return row;
}

// ---------------------------------------------------------------- inputs

// A bank of N(0, 3^2) values; rows are copied from random offsets (one memcpy per row), and draft
// rows add N(0, 1.5^2) noise read from another random offset. Generating the bank is the only
// Box-Muller work; filling hundreds of MB is then a copy plus one multiply-add per value.
const BANK_LEN = (QUICK ? 1 : 4) * 2 ** 20;
const rng = new XorShift(12345);
const bank = new Float32Array(BANK_LEN + 128256);
fillNormal(bank, LOGIT_SIGMA, rng);
const NOISE_SCALE = NOISE_SIGMA / LOGIT_SIGMA;

function fillTargetRow(dst: Float32Array, V: number): number {
  const off = rng.below(BANK_LEN);
  dst.set(bank.subarray(off, off + V));
  return off;
}

function fillDraftRow(dst: Float32Array, target: Float32Array, V: number): void {
  const off = rng.below(BANK_LEN);
  for (let j = 0; j < V; ++j) dst[j] = target[j]! + NOISE_SCALE * bank[off + j]!;
}

/** Number of input copies a config rotates through: enough to cover ROTATE_BYTES. */
function slotsFor(bytesPerCall: number): number {
  return HOT ? 1 : Math.max(1, Math.floor(ROTATE_BYTES / bytesPerCall));
}

const TREE_N = TREE_BRANCHING.reduce((acc, b) => ({ level: acc.level * b, n: acc.n + acc.level * b }), { level: 1, n: 0 }).n;

// Pool sizes: the largest layout over every config, allocated once and reused for every V.
function chainLayout(V: number, g: number, B: number) {
  const slots = slotsFor(B * (2 * g + 1) * V * 4);
  return { slots, tRows: slots * B * (g + 1), dRows: slots * B * g };
}
function pairedRowsFor(V: number): number {
  // Paired layout: draft row k = target row k + noise. Serves distillLoss (N rows per call, any N)
  // and verifyTree ((n + 1) rows per call).
  const maxN = Math.max(...BATCHES) * Math.max(...GS);
  return Math.max(maxN, TREE_N + 1, HOT ? 0 : Math.ceil(ROTATE_BYTES / (2 * V * 4)));
}
let poolT = 0,
  poolD = 0;
for (const V of VOCABS) {
  for (const g of GS)
    for (const B of BATCHES) {
      const l = chainLayout(V, g, B);
      poolT = Math.max(poolT, l.tRows * V);
      poolD = Math.max(poolD, l.dRows * V);
    }
  poolT = Math.max(poolT, pairedRowsFor(V) * V);
  poolD = Math.max(poolD, pairedRowsFor(V) * V);
}

// ---------------------------------------------------------------- run

const facts = machineFacts();
const threads = THREADS_ARG !== null ? setThreads(THREADS_ARG) : setThreads(0);
progress(`kernels bench: ${facts.cpuModel}, ${facts.logicalCpus} logical CPUs, pool ${threads} threads, node ${facts.node}`);
progress(`allocating ${fmtNum(((poolT + poolD) * 4) / 2 ** 20)} MiB of logits pools`);
const targetPool = new Float32Array(poolT);
const draftPool = new Float32Array(poolD);

/** 256 MiB: above this machine class's L3 (DESIGN.md: 260 MB reported, shared). --quick uses 128 MiB. */
const PROBE_BYTES = (QUICK ? 128 : 256) * 2 ** 20;
const probes: ProbeResult[] = [];
const computeProbes: ComputeProbe[] = [];
function runProbe(when: string): void {
  const p = probeBandwidth(PROBE_BYTES, QUICK ? 3 : 5);
  probes.push(p);
  progress(`bandwidth probe (${when}): read ${fmtNum(p.readGBs)} GB/s, copy ${fmtNum(p.copyGBs)} GB/s, ${p.threads} threads`);
  const c = probeCompute(threads);
  computeProbes.push(c);
  progress(`compute probe (${when}): ${threads} threads x${c.scaling.toFixed(2)} of one thread (${fmtNum(c.poolGflops)} / ${fmtNum(c.oneThreadGflops)} GFLOP/s)`);
}
runProbe('start');
probeRead = probes[0]!.readGBs;
const t0 = Date.now();

/**
 * Samples one token per row of `logits` (rows x V) from the warped distribution: natively for
 * temperature and top-k (`verifyChainBatch` with zero-length drafts emits one sample per row), in JS
 * for top-p, whose reference warp (a sort of a large candidate set) would dominate the run.
 */
function sampleRows(logits: Float32Array, nRows: number, V: number, s: SamplingOptions, seed: number): Int32Array {
  if (nRows === 0) return new Int32Array(0);
  if (s.topP !== undefined && s.topP < 1 && !s.topK) {
    const out = new Int32Array(nRows);
    const r = new XorShift(seed);
    for (let k = 0; k < nRows; ++k) out[k] = sampleTopP(logits.subarray(k * V, (k + 1) * V), s.topP, s.temperature, r.uniform());
    return out;
  }
  const r = verifyChainBatch({
    targetLogits: logits.subarray(0, nRows * V),
    draftLogits: new Float32Array(0),
    draftTokens: new Int32Array(0),
    draftLengths: new Int32Array(nRows),
    vocabSize: V,
    sampling: s,
    seed,
  });
  return r.tokens; // one emitted token per zero-length sequence
}

let fillMs = 0; // time spent generating inputs (reported, not part of any timing)
const TOPP_BINS = 1024;
const TOPP_BIN_WIDTH = 0.05; // in units of (max - logit) / T
let toppW = new Float64Array(0);
const toppMass = new Float64Array(TOPP_BINS);
let toppBins = new Uint16Array(0);

/**
 * One sample from the top-p nucleus of a row (temperature T): the smallest set of most likely
 * tokens whose mass reaches p (ties to the lower id), found with a histogram of (max - logit) / T
 * and a sort of the one boundary bin; then inverse CDF over the nucleus in id order.
 */
function sampleTopP(row: Float32Array, p: number, T: number, u: number): number {
  const V = row.length;
  if (toppW.length < V) {
    toppW = new Float64Array(V);
    toppBins = new Uint16Array(V);
  }
  const w = toppW,
    bin = toppBins;
  let m = -Infinity;
  for (let j = 0; j < V; ++j) m = row[j]! > m ? row[j]! : m;
  toppMass.fill(0);
  let z = 0;
  for (let j = 0; j < V; ++j) {
    const d = (m - row[j]!) / T;
    const e = Math.exp(-d);
    w[j] = e;
    z += e;
    const b = Math.min(TOPP_BINS - 1, Math.floor(d / TOPP_BIN_WIDTH));
    bin[j] = b;
    toppMass[b]! += e;
  }
  const target = p * z;
  let cum = 0,
    boundary = TOPP_BINS - 1;
  for (let b = 0; b < TOPP_BINS; ++b) {
    if (cum + toppMass[b]! >= target) {
      boundary = b;
      break;
    }
    cum += toppMass[b]!;
  }
  const cand: number[] = [];
  for (let j = 0; j < V; ++j) if (bin[j] === boundary) cand.push(j);
  cand.sort((a, b) => w[b]! - w[a]! || a - b);
  const inCut = new Set<number>();
  let mass = cum;
  for (const j of cand) {
    inCut.add(j);
    mass += w[j]!;
    if (mass >= target) break;
  }
  let acc = 0,
    last = 0;
  const t = u * mass;
  for (let j = 0; j < V; ++j) {
    if (bin[j]! > boundary || (bin[j] === boundary && !inCut.has(j))) continue;
    acc += w[j]!;
    last = j;
    if (acc > t) return j;
  }
  return last;
}

const chainG8Us = new Map<number, number>(); // V -> us of verifyChain g=8, batch 1, temperature

function benchChains(V: number): void {
  for (const g of GS)
    for (const B of BATCHES) {
      const { slots, dRows } = chainLayout(V, g, B);
      const f0 = Date.now();
      // Fill: sequence q owns target rows q(g+1)..q(g+1)+g and draft rows qg..qg+g-1 (draft i ~ target i).
      for (let q = 0; q < slots * B; ++q)
        for (let i = 0; i <= g; ++i) {
          const t = targetPool.subarray((q * (g + 1) + i) * V, (q * (g + 1) + i + 1) * V);
          fillTargetRow(t, V);
          if (i < g) fillDraftRow(draftPool.subarray((q * g + i) * V, (q * g + i + 1) * V), t, V);
        }
      fillMs += Date.now() - f0;
      const bytes = B * (2 * g + 1) * V * 4;
      const tPer = B * (g + 1) * V,
        dPer = B * g * V;
      for (const samp of SAMPLINGS) {
        // Draft tokens are sampled per slot, and only for the slots this config will reach: a slow
        // kernel (top-p on the reference path) would otherwise spend minutes sampling inputs.
        const tokens = new Int32Array(dRows);
        const rowsPerSlot = B * g;
        let sampledSlots = 0;
        const sampleSlots = (upTo: number) => {
          const s0 = Date.now();
          if (upTo > sampledSlots) {
            const from = sampledSlots * rowsPerSlot;
            const view = draftPool.subarray(from * V, upTo * rowsPerSlot * V);
            tokens.set(sampleRows(view, (upTo - sampledSlots) * rowsPerSlot, V, samp.s, 777 + sampledSlots), from);
            sampledSlots = upTo;
          }
          fillMs += Date.now() - s0;
        };
        let acceptedSum = 0,
          seqs = 0,
          useSlots = 1;
        let call: (i: number, s: number) => void;
        if (B === 1) {
          call = (i, s) => {
            const r = verifyChain({
              targetLogits: targetPool.subarray(s * tPer, (s + 1) * tPer),
              draftLogits: draftPool.subarray(s * dPer, (s + 1) * dPer),
              draftTokens: tokens.subarray(s * g, (s + 1) * g),
              vocabSize: V,
              sampling: samp.s,
              seed: i,
            });
            acceptedSum += r.acceptedCount;
            seqs += 1;
          };
        } else {
          const lengths = new Int32Array(B).fill(g);
          call = (i, s) => {
            const r = verifyChainBatch({
              targetLogits: targetPool.subarray(s * tPer, (s + 1) * tPer),
              draftLogits: draftPool.subarray(s * dPer, (s + 1) * dPer),
              draftTokens: tokens.subarray(s * B * g, (s + 1) * B * g),
              draftLengths: lengths,
              vocabSize: V,
              sampling: samp.s,
              seed: i,
            });
            for (const a of r.acceptedCounts) acceptedSum += a;
            seqs += B;
          };
        }
        // One untimed call on slot 0 sizes the rotation: enough slots for the calls the budget allows.
        sampleSlots(1);
        const e0 = nowNs();
        call(1_000_000, 0);
        const estUs = Number(nowNs() - e0) / 1e3;
        // timeCalls makes one or two calls when a call outlasts the budget, else about (warm-up + budget) / call.
        const expectedCalls =
          estUs > BUDGET_MS * 1e3 ? 2 : Math.ceil(((timing.warmupMs + BUDGET_MS) * 1e3) / Math.max(estUs, 1)) + 2;
        useSlots = Math.min(slots, expectedCalls);
        sampleSlots(useSlots);
        acceptedSum = 0;
        seqs = 0;
        const fn = (i: number) => call(i, i % useSlots);
        const tm = timeCallsCpu(fn, timing);
        if (g === 8 && B === 1 && samp.name === 'temperature') chainG8Us.set(V, tm.medianUs);
        addRow({
          op: B === 1 ? 'verifyChain' : 'verifyChainBatch',
          V,
          g,
          batch: B,
          kind: samp.name,
          usPerCall: tm.medianUs,
          minUs: tm.minUs,
          calls: tm.calls,
          bytes,
          meanAccepted: acceptedSum / seqs,
          xChainG8: null,
          rotatingSlots: useSlots,
          isTarget: samp.target,
        });
      }
    }
}

/** Paired fill: draft row k = target row k + noise, for k < nRows. */
function fillPaired(V: number, nRows: number): void {
  const f0 = Date.now();
  for (let k = 0; k < nRows; ++k) {
    const t = targetPool.subarray(k * V, (k + 1) * V);
    fillTargetRow(t, V);
    fillDraftRow(draftPool.subarray(k * V, (k + 1) * V), t, V);
  }
  fillMs += Date.now() - f0;
}

function benchDistill(V: number, pairedRows: number): void {
  for (const g of GS)
    for (const B of BATCHES) {
      const N = B * g;
      const slots = Math.max(1, Math.min(slotsFor(3 * N * V * 4), Math.floor(pairedRows / N)));
      const info = INFO_LOSS_GRID.some(([gg, bb]) => gg === g && bb === B);
      // Times distillLoss on rotating student rows (slot s), the teacher as `teacher(s)` gives it.
      const time = (kind: DistillLossKind, label: string, teacher: (s: number) => object, bytes: number, isTarget: boolean) => {
        const gradOut = FRESH_GRAD ? undefined : new Float32Array(N * V);
        const tm = timeCallsCpu((i: number) => {
          const s = i % slots;
          distillLoss({
            kind,
            studentLogits: draftPool.subarray(s * N * V, (s + 1) * N * V),
            ...teacher(s),
            vocabSize: V,
            ...(gradOut ? { gradOut } : {}),
          });
        }, timing);
        addRow({
          op: 'distillLoss',
          V,
          g,
          batch: B,
          kind: label,
          usPerCall: tm.medianUs,
          minUs: tm.minUs,
          calls: tm.calls,
          bytes,
          meanAccepted: null,
          xChainG8: null,
          rotatingSlots: slots,
          isTarget,
        });
      };
      for (const loss of LOSSES) {
        if (!loss.target && !info) continue;
        time(loss.kind, loss.kind, (s) => ({ teacherLogits: targetPool.subarray(s * N * V, (s + 1) * N * V) }), 3 * N * V * 4, loss.target);
      }
      if (info) {
        // The online buffer's teacher: top-32 ids and probabilities per row (forward KL, informational).
        const K = 32;
        const indices = new Int32Array(N * K).map((_, i) => ((i % K) * 997 + Math.floor(i / K) * 31) % V);
        const probs = new Float32Array(N * K).fill(0.9 / K);
        time('forward-kl', 'forward-kl, top-32 teacher', () => ({ teacher: { indices, probs } }), 2 * N * V * 4 + N * K * 8, false);
      }
    }
}

/** Parents of the fixed 64-node tree, breadth first (so parents[i] < i). */
function treeParents(): Int32Array {
  const parents: number[] = [];
  let level = [-1];
  for (const b of TREE_BRANCHING) {
    const next: number[] = [];
    for (const p of level)
      for (let c = 0; c < b; ++c) {
        parents.push(p);
        next.push(parents.length - 1);
      }
    level = next;
  }
  return Int32Array.from(parents);
}

/** Child tokens for every node, drawn from the draft row of its parent the way `mode` says. */
function treeTokens(parents: Int32Array, draft: Float32Array, V: number, r: XorShift): Record<TreeChildrenMode, Int32Array> {
  const n = parents.length;
  const out = {
    'sampled-with-replacement': new Int32Array(n),
    'sampled-without-replacement': new Int32Array(n),
    deterministic: new Int32Array(n),
  };
  const p = new Float64Array(V);
  for (let row = 0; row <= n; ++row) {
    const kids: number[] = [];
    for (let i = 0; i < n; ++i) if (parents[i]! + 1 === row) kids.push(i);
    if (kids.length === 0) continue;
    const l = draft.subarray(row * V, (row + 1) * V);
    let max = -Infinity;
    for (let j = 0; j < V; ++j) max = l[j]! > max ? l[j]! : max;
    let z = 0;
    for (let j = 0; j < V; ++j) z += p[j] = Math.exp(l[j]! - max);
    const draw = (mass: number, skip: Set<number>) => {
      let u = r.uniform() * mass,
        last = 0;
      for (let j = 0; j < V; ++j) {
        if (skip.has(j)) continue;
        last = j;
        if ((u -= p[j]!) < 0) return j;
      }
      return last;
    };
    const none = new Set<number>();
    for (const c of kids) out['sampled-with-replacement'][c] = draw(z, none);
    const taken = new Set<number>();
    let mass = z;
    for (const c of kids) {
      const t = draw(mass, taken);
      taken.add(t);
      mass -= p[t]!;
      out['sampled-without-replacement'][c] = t;
    }
    // Deterministic: the top-k of q, best first.
    const top: number[] = [];
    for (let j = 0; j < V; ++j) {
      if (top.length < kids.length || p[j]! > p[top[top.length - 1]!]!) {
        top.push(j);
        top.sort((a, b) => p[b]! - p[a]! || a - b);
        if (top.length > kids.length) top.pop();
      }
    }
    kids.forEach((c, k) => (out.deterministic[c] = top[k]!));
  }
  return out;
}

function benchTree(V: number, pairedRows: number): void {
  const parents = treeParents();
  const n = parents.length;
  const per = (n + 1) * V;
  const slots = Math.max(1, Math.min(slotsFor(2 * per * 4), Math.floor(pairedRows / (n + 1))));
  const tr = new XorShift(99);
  const toks = Array.from({ length: slots }, (_, s) => treeTokens(parents, draftPool.subarray(s * per, (s + 1) * per), V, tr));
  const sampling = { temperature: 1 };
  for (const mode of TREE_MODES) {
    let pathSum = 0,
      calls = 0;
    const tm = timeCallsCpu((i) => {
      const s = i % slots;
      const r = verifyTree({
        parents,
        tokens: toks[s]![mode],
        targetLogits: targetPool.subarray(s * per, (s + 1) * per),
        draftLogits: draftPool.subarray(s * per, (s + 1) * per),
        vocabSize: V,
        sampling,
        seed: i,
        children: mode,
      });
      pathSum += r.path.length;
      calls += 1;
    }, timing);
    const ref = chainG8Us.get(V);
    addRow({
      op: 'verifyTree',
      V,
      g: null,
      batch: 1,
      kind: mode,
      usPerCall: tm.medianUs,
      minUs: tm.minUs,
      calls: tm.calls,
      bytes: (mode === 'deterministic' ? 1 : 2) * per * 4,
      meanAccepted: pathSum / calls,
      xChainG8: ref !== undefined ? tm.medianUs / ref : null,
      rotatingSlots: slots,
      isTarget: false,
    });
  }
}

for (const V of VOCABS) {
  progress(`V=${V}: verify chains`);
  benchChains(V); // first, so verifyTree can report its ratio to the g = 8 chain
  const pairedRows = pairedRowsFor(V);
  fillPaired(V, pairedRows);
  progress(`V=${V}: verify tree (${TREE_N} nodes, depth ${TREE_BRANCHING.length})`);
  benchTree(V, pairedRows);
  progress(`V=${V}: distillation losses`);
  benchDistill(V, pairedRows);
}
const benchSeconds = (Date.now() - t0) / 1e3;
runProbe('end');
// The denominator is the best read probe of the run (start or end): a slow probe cannot inflate ratios.
const bestRead = Math.max(...probes.map((p) => p.readGBs));
for (const r of rows) {
  r.xProbe = r.gbps / bestRead;
  if (r.target !== null) r.target = r.xProbe >= TARGET_RATIO ? 'PASS' : 'MISS';
}

// ---------------------------------------------------------------- baseline

interface ResultFile {
  machine: ReturnType<typeof machineFacts>;
  probe: { readGBs: number };
  rows: Row[];
}
const baselinePath = join(resultsDir, 'kernels-baseline.json');
const baseline = readJsonIfExists<ResultFile>(baselinePath);
if (baseline) {
  const byKey = new Map(baseline.rows.map((r) => [r.key, r]));
  for (const r of rows) {
    const b = byKey.get(r.key);
    if (!b || !(b.gbps > 0)) continue;
    r.xBaseline = r.gbps / b.gbps;
    r.xBaselineProbeNormalised = r.xProbe / (b.gbps / baseline.probe.readGBs);
  }
}

// ---------------------------------------------------------------- output

const result = {
  bench: 'kernels',
  date: new Date().toISOString(),
  quick: QUICK,
  hot: HOT,
  freshGrad: FRESH_GRAD,
  machine: facts,
  threads,
  probe: {
    readGBs: bestRead,
    denominator: `read (streaming sum on the CPU thread pool, ${PROBE_BYTES / 2 ** 20} MiB, best of the start and end probes)`,
    runs: probes,
  },
  compute: {
    definition: 'FMA chains on the whole pool / on one thread (start and end of the run): about the thread count when each thread has a core',
    runs: computeProbes,
  },
  targetRatio: TARGET_RATIO,
  definitions: {
    bytes: {
      verifyChain: 'batch * ((g + 1) + g) * V * 4: every target row and every draft row read once (float32)',
      verifyTree: '(n + 1) * V * 4 * 2 (target + draft rows); deterministic children read no draft: * 1',
      distillLoss:
        '3 * N * V * 4 with N = batch * g rows: student read + teacher read + gradient written (reverse-kl, jsd ' +
        'and tvd run only at (g, batch) = ' + INFO_LOSS_GRID.map(([g, b]) => `(${g}, ${b})`).join(', ') + '); ' +
        'with a top-32 teacher (forward KL, at the same cells) 2 * N * V * 4 + N * 32 * 8: student read, gradient ' +
        'written, ids and probabilities read',
    },
    gbps: 'effective bytes / median time per call (1 GB = 1e9 bytes)',
    xProbe: 'GB/s / probe.readGBs',
    target: `PASS when xProbe >= ${TARGET_RATIO}; only temperature-only verification and forward-KL rows are targets`,
    xBaseline: 'GB/s / GB/s of the same key in bench/results/kernels-baseline.json (> 1 is faster); n/a without one',
    xChainG8: 'verifyTree time per call / verifyChain time (g = 8, batch 1, temperature 1, same V)',
    cpuPerWall:
      'process CPU seconds per wall second while the config was timed (2 = both pool threads busy throughout); ' +
      'well below 2 means other tenants held the cores, and GB/s / cpuPerWall estimates the rate per core-second',
    inputs:
      `target logits ~ N(0, ${LOGIT_SIGMA}^2); draft logits = target + N(0, ${NOISE_SIGMA}^2); draft tokens sampled ` +
      'from the warped draft rows (so acceptance is partial); seeds change every call; inputs rotate through ' +
      `${HOT ? 'one slot (--hot)' : `${ROTATE_BYTES / 2 ** 20} MiB`} so calls read uncached logits`,
    tree: `${TREE_N} nodes, branching ${TREE_BRANCHING.join('x')} by depth, temperature 1; children drawn from q as each mode says`,
    timing:
      `per config: warm-up >= ${timing.warmupMs} ms, then calls for >= ${BUDGET_MS} ms (>= ${timing.minCalls} calls); ` +
      `median. A first call slower than the budget is timed once more; one slower than 4x the budget is reported as is`,
  },
  benchSeconds,
  inputFillSeconds: fillMs / 1e3,
  rows,
};

const written = writeResults('kernels', result);
if (SAVE_BASELINE) writeJson(baselinePath, result);

if (JSON_ONLY) {
  process.stdout.write(JSON.stringify(result, null, 2) + '\n');
} else {
  const cols: Column<Row>[] = [
    { header: 'op', align: 'left', value: (r) => r.op },
    { header: 'V', value: (r) => String(r.V) },
    { header: 'g', value: (r) => (r.g === null ? `n=${TREE_N}` : String(r.g)) },
    { header: 'batch', value: (r) => String(r.batch) },
    { header: 'kind', align: 'left', value: (r) => r.kind },
    { header: 'us/call', value: (r) => fmtNum(r.usPerCall) },
    { header: 'GB/s', value: (r) => fmtNum(r.gbps) },
    { header: 'xProbe', value: (r) => r.xProbe.toFixed(3) },
    { header: '>=0.5', align: 'left', value: (r) => r.target ?? '-' },
    { header: 'cpu/wall', value: (r) => r.cpuPerWall.toFixed(2) },
    { header: 'xBase', value: (r) => (r.xBaseline === null ? 'n/a' : r.xBaseline.toFixed(2)) },
    { header: 'accepted', value: (r) => (r.meanAccepted === null ? '-' : r.meanAccepted.toFixed(2)) },
    { header: 'xChainG8', value: (r) => (r.xChainG8 === null ? '-' : r.xChainG8.toFixed(2)) },
    { header: 'calls', value: (r) => String(r.calls) },
  ];
  const lines = [
    `machine: ${facts.cpuModel}; ${facts.logicalCpus} logical CPUs [${facts.cpuFlags.join(' ')}]; L3 ${facts.l3Cache ?? '?'}; ` +
      `${facts.totalMemGB} GB RAM; node ${facts.node} ${facts.platform}`,
    `pool threads: ${threads}; addon: ${facts.addonPath}`,
    `probe: ` +
      probes.map((p, i) => `${i === 0 ? 'start' : 'end'} read ${fmtNum(p.readGBs)} / copy ${fmtNum(p.copyGBs)} GB/s`).join('; ') +
      `; xProbe divides by the best READ probe, ${fmtNum(bestRead)} GB/s`,
    `compute: ${threads} threads x` + computeProbes.map((c) => c.scaling.toFixed(2)).join(' (start) / x') + ' (end) of one thread',
    `inputs: ${HOT ? 'hot (one slot per config)' : `rotating through ${ROTATE_BYTES / 2 ** 20} MiB`}; ` +
      `logits N(0,${LOGIT_SIGMA}^2), draft = target + N(0,${NOISE_SIGMA}^2); bytes: chain B(2g+1)V*4, tree 2(n+1)V*4, distill 3NV*4 (N=B*g)`,
    `baseline: ${baseline ? baselinePath : 'none (xBase n/a); --save-baseline writes one'}`,
    '',
    formatTable(cols, rows),
    '',
  ];
  const targets = rows.filter((r) => r.target !== null);
  const pass = targets.filter((r) => r.target === 'PASS').length;
  lines.push(`target rows (temperature-only verification, forward KL) at >= ${TARGET_RATIO} x read probe: ${pass}/${targets.length} PASS`);
  const minScaling = Math.min(...computeProbes.map((c) => c.scaling));
  if (threads > 1 && minScaling < 0.75 * threads)
    lines.push(
      `note: the ${threads} threads computed only x${minScaling.toFixed(2)} of one thread at a probe of this run ` +
        '(logical CPUs sharing a physical core): the exp-bound cells (batch 1, g = 1) read low against the read probe then',
    );
  lines.push(`bench time ${benchSeconds.toFixed(1)} s (input generation ${(fillMs / 1e3).toFixed(1)} s); results: ${written.stamped}` + (SAVE_BASELINE ? `; baseline: ${baselinePath}` : ''));
  process.stdout.write(lines.join('\n') + '\n');
}
