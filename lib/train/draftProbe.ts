// Probes drafts for SmolLM2-135M cut out of the target itself (no training, or a closed-form fit):
//
//   npx tsx lib/train/draftProbe.ts [--target <gguf>] [--work data/smollm2] [--out data/probe]
//       [--layers 1,2,3,4,6] [--heads 2048,4096,8192,16384] [--seq-len 128] [--windows 8]
//       [--fit-windows 64] [--phase all|cost|agree|train|coverage] [--train-layers 3] [--train-init cut|lens] [--minutes 15] [--lr 3e-4] [--no-lens] [--lens-layers 2,3,4] [--q41-layers 3,4,30] [--threads 0] [--quick]
//
// - Early exit: the target's first k blocks + its output norm + its tied (Q8_0) head, written as a
//   GGUF whose tensors are copied byte for byte (lib/train/ggufRewrite.ts).
// - Restricted head: the N most frequent tokens of the general-English training text (SmolLM2's
//   tokenizer; control tokens always in), the draft's argmax / softmax taken over that subset only.
// - Lens: an early exit whose head is E A, with A (576 x 576) the least-squares map from the draft's
//   normed hidden state to the target's (the "tuned lens", fitted in closed form on training text).
// - cost: single-token decode time of each (k, head rows, head type) against the target, interleaved
//   in one run; the heads are restricted by gathering rows (vocabulary-less GGUFs).
// - agree: on held-out windows per domain, teacher-forced: top-1 agreement (draft argmax = target
//   argmax), target argmax in the draft's top 4, expected sampled acceptance sum min(p, q) at T = 1,
//   for the full head and each restricted head; and the coverage of the target's argmax by each subset.
// - train (not in all): the existing trainer on the whole early exit (it cannot freeze tensors), forward
//   KL to the target's top-64 on general English, with held-out top-1 agreement (full and restricted
//   heads) every few minutes: how fast agreement rises from the pretrained cut.
// - coverage (not in all): the same coverage with the subset counted over all four domains' training text.
// Writes <out>/draft-probe.json and prints Markdown tables.
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { loadModel, type Model } from '../Model.js';
import { readGgufMetadata } from './bpe.js';
import { ALL_DOMAINS, GENERAL_DOMAINS } from './corpus.js';
import { dequantizeRows, kvString, kvU32, readGgufLayout, readTensorBytes, writeGgufRaw, type GgufFile, type OutTensor } from './ggufRewrite.js';
import { XorShift } from './llamaInit.js';
import { teacherBatch } from './draft.js';
import { DEFAULT_TARGET, medianDecodeMs, tokenizeDomains } from './smollm2Draft.js';
import { createTrainer } from '../Trainer.js';

const log = (line: string) => process.stderr.write(`[draft-probe] ${line}\n`);
const T_F32 = 0;
const T_Q4_1 = 3;

// ---- writing cut-down GGUFs ---------------------------------------------------------------------------

export interface CutOptions {
  layers: number;
  /** Keep only these vocabulary rows of the tied head (and embedding); drops the tokenizer. */
  rows?: Int32Array;
  /** Re-store the tied head as Q4_1 (default: as stored). */
  headQ4_1?: boolean;
  /** An untied output.weight [vocab x dim] in F32. */
  output?: Float32Array;
  /** Replace the output norm's gain. */
  outputNorm?: Float32Array;
}

/** Writes the target's first `layers` blocks with its norm and head (see CutOptions). */
export function writeCut(src: GgufFile, path: string, o: CutOptions): void {
  const emb = src.tensors.find((t) => t.name === 'token_embd.weight')!;
  const dim = emb.dims[0]!;
  const vocab = o.rows ? o.rows.length : emb.dims[1]!;
  const arch = src.kvs.find((kv) => kv.key === 'general.architecture');
  // The architecture's own keys (llama.*, qwen2.*, qwen3.*): the string after its 12-byte header.
  const prefix = arch ? `${arch.raw.subarray(12).toString('utf8')}.` : 'llama.';
  const kvs = src.kvs
    .filter((kv) => !(o.rows && kv.key.startsWith('tokenizer.')))
    .map((kv) => {
      if (kv.key === `${prefix}block_count`) return { key: kv.key, raw: kvU32(o.layers) };
      if (kv.key === `${prefix}vocab_size`) return { key: kv.key, raw: kvU32(vocab) };
      if (kv.key === 'general.name') return { key: kv.key, raw: kvString(`early exit ${o.layers}${o.rows ? ` head ${vocab}` : ''}`) };
      return kv;
    });
  const tensors: OutTensor[] = [];
  let embBytes = readTensorBytes(src, emb.name, o.rows);
  let embType = emb.type;
  if (o.headQ4_1) {
    embBytes = quantizeQ4_1(dequantizeRows(embBytes, emb.type, dim));
    embType = T_Q4_1;
  }
  tensors.push({ name: emb.name, dims: [dim, vocab], type: embType, data: embBytes });
  const f32 = (a: Float32Array) => Buffer.from(a.buffer, a.byteOffset, a.byteLength);
  tensors.push({ name: 'output_norm.weight', dims: [dim], type: T_F32, data: o.outputNorm ? f32(o.outputNorm) : readTensorBytes(src, 'output_norm.weight') });
  if (o.output) tensors.push({ name: 'output.weight', dims: [dim, vocab], type: T_F32, data: f32(o.output) });
  for (const t of src.tensors) {
    const m = /^blk\.(\d+)\./.exec(t.name);
    // The kept blocks, and the RoPE factors every block shares (Llama 3.1 and later).
    if ((m && Number(m[1]) < o.layers) || t.name === 'rope_freqs.weight')
      tensors.push({ name: t.name, dims: t.dims, type: t.type, data: readTensorBytes(src, t.name) });
  }
  writeGgufRaw(path, kvs, tensors, src.alignment);
}

/** Q4_1 blocks of 32 (f16 scale, f16 min, 16 bytes of nibbles), as llama.cpp's reference quantiser. */
export function quantizeQ4_1(x: Float32Array): Buffer {
  const nb = x.length / 32;
  const out = Buffer.alloc(nb * 20);
  const h = new Float32Array(1);
  const hi = new Uint32Array(h.buffer);
  const toHalf = (v: number): number => {
    // Round to nearest even; normal range only (the scales here are far from the limits).
    h[0] = v;
    const b = hi[0]!;
    const s = (b >>> 16) & 0x8000;
    const e = ((b >>> 23) & 0xff) - 127 + 15;
    if (e <= 0) return s;
    if (e >= 31) return s | 0x7c00;
    const rest = b & 0x1fff;
    let r = s | (e << 10) | ((b >>> 13) & 0x3ff);
    if (rest > 0x1000 || (rest === 0x1000 && r & 1)) r++;
    return r;
  };
  const fromHalf = (u: number): number => {
    const e = (u >> 10) & 0x1f;
    const f = u & 0x3ff;
    const s = u & 0x8000 ? -1 : 1;
    return e === 0 ? s * f * 2 ** -24 : s * (1 + f / 1024) * 2 ** (e - 15);
  };
  for (let b = 0; b < nb; b++) {
    let mn = Infinity;
    let mx = -Infinity;
    for (let j = 0; j < 32; j++) {
      const v = x[32 * b + j]!;
      if (v < mn) mn = v;
      if (v > mx) mx = v;
    }
    const d = (mx - mn) / 15;
    const id = d ? 1 / d : 0;
    const dh = toHalf(d);
    const mh = toHalf(mn);
    out.writeUInt16LE(dh, 20 * b);
    out.writeUInt16LE(mh, 20 * b + 2);
    const m = fromHalf(mh);
    for (let j = 0; j < 16; j++) {
      const q0 = Math.min(15, Math.max(0, Math.round((x[32 * b + j]! - m) * id)));
      const q1 = Math.min(15, Math.max(0, Math.round((x[32 * b + j + 16]! - m) * id)));
      out[20 * b + 4 + j] = q0 | (q1 << 4);
    }
  }
  return out;
}

// ---- token frequencies --------------------------------------------------------------------------------

/** Token ids by rank: control tokens first, then by count in `shards` (ties by id). */
export function rankTokens(shards: Uint16Array[], vocab: number, control: number[]): Int32Array {
  const count = new Float64Array(vocab);
  for (const s of shards) for (let i = 0; i < s.length; i++) count[s[i]!]!++;
  for (const c of control) count[c] = Infinity;
  const ids = Array.from({ length: vocab }, (_, i) => i);
  ids.sort((a, b) => count[b]! - count[a]! || a - b);
  return Int32Array.from(ids);
}

// ---- agreement statistics ------------------------------------------------------------------------------

interface Acc {
  n: number;
  top1: number;
  top4: number;
  sampled: number;
  /** Per restricted head: argmax over the subset = target argmax; sum min(p, q_S). */
  subTop1: number[];
  subSampled: number[];
}

const newAcc = (nHeads: number): Acc => ({ n: 0, top1: 0, top4: 0, sampled: 0, subTop1: new Array(nHeads).fill(0), subSampled: new Array(nHeads).fill(0) });

/** Softmax of one row into `out` (T = 1). */
function softmaxRow(logits: Float32Array, base: number, V: number, out: Float64Array): void {
  let mx = -Infinity;
  for (let j = 0; j < V; j++) if (logits[base + j]! > mx) mx = logits[base + j]!;
  let z = 0;
  for (let j = 0; j < V; j++) {
    const e = Math.exp(logits[base + j]! - mx);
    out[j] = e;
    z += e;
  }
  for (let j = 0; j < V; j++) out[j] = out[j]! / z;
}

function argmaxRow(logits: Float32Array, base: number, V: number): number {
  let best = 0;
  for (let j = 1; j < V; j++) if (logits[base + j]! > logits[base + best]!) best = j;
  return best;
}

/** Adds one row's statistics (target probabilities p, target argmax t) for draft logits q. */
function accumulate(acc: Acc, q: Float32Array, base: number, V: number, p: Float64Array, t: number, rank: Int32Array, heads: number[], qp: Float64Array): void {
  acc.n++;
  const a = argmaxRow(q, base, V);
  if (a === t) acc.top1++;
  // Top 4: count logits above the target token's.
  const lt = q[base + t]!;
  let above = 0;
  for (let j = 0; j < V && above < 4; j++) if (q[base + j]! > lt || (q[base + j] === lt && j < t)) above++;
  if (above < 4) acc.top4++;
  softmaxRow(q, base, V, qp);
  let s = 0;
  for (let j = 0; j < V; j++) s += Math.min(p[j]!, qp[j]!);
  acc.sampled += s;
  // Nested subsets in rank order: a running argmax and running mass.
  let bestId = -1;
  let bestV = -Infinity;
  let mass = 0;
  let h = 0;
  const maxN = heads[heads.length - 1]!;
  const massAt: number[] = [];
  for (let i = 0; i < maxN; i++) {
    const id = rank[i]!;
    const v = q[base + id]!;
    if (v > bestV || (v === bestV && id < bestId)) {
      bestV = v;
      bestId = id;
    }
    mass += qp[id]!;
    if (i + 1 === heads[h]) {
      if (bestId === t) acc.subTop1[h]!++;
      massAt.push(mass);
      h++;
    }
  }
  // sum over S of min(p, q / Z_S), accumulated per nested boundary.
  h = 0;
  const partial = new Float64Array(heads.length);
  for (let i = 0; i < maxN; i++) {
    const id = rank[i]!;
    for (let k = h; k < heads.length; k++) partial[k]! += Math.min(p[id]!, qp[id]! / massAt[k]!);
    if (i + 1 === heads[h]) h++;
  }
  for (let k = 0; k < heads.length; k++) acc.subSampled[k]! += partial[k]!;
}

// ---- the lens fit --------------------------------------------------------------------------------------

/** Solves (X^T X + lambda I) A^T = X^T Y for A [d x d], given the Gram matrices (row-major, d x d). */
function solveLens(xtx: Float64Array, xty: Float64Array, d: number, lambda: number): Float64Array {
  const L = Float64Array.from(xtx);
  let tr = 0;
  for (let i = 0; i < d; i++) tr += L[i * d + i]!;
  for (let i = 0; i < d; i++) L[i * d + i]! += (lambda * tr) / d;
  // Cholesky, lower triangle in place.
  for (let j = 0; j < d; j++) {
    let s = L[j * d + j]!;
    for (let k = 0; k < j; k++) s -= L[j * d + k]! ** 2;
    const r = Math.sqrt(s);
    L[j * d + j] = r;
    for (let i = j + 1; i < d; i++) {
      let t = L[i * d + j]!;
      for (let k = 0; k < j; k++) t -= L[i * d + k]! * L[j * d + k]!;
      L[i * d + j] = t / r;
    }
  }
  // B = X^T Y [d x d]; solve L L^T At = B column by column. At = A^T, so A[j][i] = At[i][j].
  const A = new Float64Array(d * d);
  const col = new Float64Array(d);
  for (let c = 0; c < d; c++) {
    for (let i = 0; i < d; i++) {
      let t = xty[i * d + c]!;
      for (let k = 0; k < i; k++) t -= L[i * d + k]! * col[k]!;
      col[i] = t / L[i * d + i]!;
    }
    for (let i = d - 1; i >= 0; i--) {
      let t = col[i]!;
      for (let k = i + 1; k < d; k++) t -= L[k * d + i]! * col[k]!;
      col[i] = t / L[i * d + i]!;
    }
    for (let i = 0; i < d; i++) A[c * d + i] = col[i]!;
  }
  return A;
}

const LENS_LAMBDA = 1e-4;

/**
 * Fits A per early exit k: least squares from the exit's g * normed hidden state to the full target's,
 * on `windows` random windows of the training shards. The hidden states come from probe GGUFs with an
 * identity head (logits 0..D-1).
 */
async function fitLenses(target: Model, src: GgufFile, lensLayers: number[], shards: Uint16Array[], seqLen: number, skip: number, windows: number, tmp: string): Promise<{ A: Float64Array[]; positions: number }> {
  const V = target.info.vocabSize;
  const D = target.info.embeddingLength;
  const ident = new Float32Array(V * D);
  for (let i = 0; i < D; i++) ident[i * D + i] = 1;
  const probes: Model[] = [];
  for (const k of [...lensLayers, target.info.layers]) {
    const p = join(tmp, `probe${k}.gguf`);
    writeCut(src, p, { layers: k, output: ident });
    probes.push(await loadModel(p));
  }
  const rng = new XorShift(7);
  const xtx = lensLayers.map(() => new Float64Array(D * D));
  const xty = lensLayers.map(() => new Float64Array(D * D));
  const t0 = Date.now();
  let positions = 0;
  for (let w = 0; w < windows; w++) {
    const s = shards[Math.floor(rng.next() * shards.length)]!;
    const start = Math.floor(rng.next() * (s.length - seqLen - 1));
    const toks = Int32Array.from(s.subarray(start, start + seqLen));
    const hs = [];
    for (const m of probes) hs.push(await m.forward(toks));
    const y = hs[hs.length - 1]!;
    for (let li = 0; li < lensLayers.length; li++) {
      const x = hs[li]!;
      const G = xtx[li]!;
      const B = xty[li]!;
      for (let t = skip; t < seqLen; t++) {
        const b = t * V;
        for (let i = 0; i < D; i++) {
          const xi = x[b + i]!;
          const gi = i * D;
          for (let j = i; j < D; j++) G[gi + j]! += xi * x[b + j]!;
          for (let j = 0; j < D; j++) B[gi + j]! += xi * y[b + j]!;
        }
      }
    }
    positions += seqLen - skip;
    if (w % 8 === 7) log(`lens fit: ${w + 1}/${windows} windows (${((Date.now() - t0) / 1000).toFixed(0)} s)`);
  }
  await Promise.all(probes.map((m) => m.dispose()));
  const A = lensLayers.map((_, li) => {
    const G = xtx[li]!;
    for (let i = 0; i < D; i++) for (let j = 0; j < i; j++) G[i * D + j] = G[j * D + i]!;
    return solveLens(G, xty[li]!, D, LENS_LAMBDA);
  });
  return { A, positions };
}

/** The head E A [V x D] (rows outside `rows` stay 0); the gain stays in the output norm. */
function lensHead(E: Float32Array, A: Float64Array, D: number, rows: ArrayLike<number>): Float32Array {
  const H = new Float32Array(E.length);
  const Af = Float32Array.from(A);
  const row = new Float64Array(D);
  for (let r = 0; r < rows.length; r++) {
    const v = rows[r]!;
    row.fill(0);
    const eb = v * D;
    for (let j = 0; j < D; j++) {
      const e = E[eb + j]!;
      const ab = j * D;
      for (let i = 0; i < D; i++) row[i]! += e * Af[ab + i]!;
    }
    for (let i = 0; i < D; i++) H[eb + i] = row[i]!;
  }
  return H;
}

// ---- main ----------------------------------------------------------------------------------------------

interface CostRow {
  layers: number;
  headRows: number;
  headType: string;
  weightMB: number;
  ms: number;
  c: number;
}

async function measureCosts(target: Model, src: GgufFile, rank: Int32Array, layers: number[], heads: number[], dir: string, rounds: number, steps: number): Promise<{ targetMs: number; rows: CostRow[] }> {
  const V = target.info.vocabSize;
  const specs: Array<{ layers: number; headRows: number; q41: boolean }> = [];
  for (const k of layers) {
    for (const n of [V, ...[...heads].reverse()]) specs.push({ layers: k, headRows: n, q41: false });
    for (const n of heads.filter((n) => n === 4096 || n === 8192)) specs.push({ layers: k, headRows: n, q41: true });
  }
  const models: Model[] = [];
  for (const [i, s] of specs.entries()) {
    const p = join(dir, `cost${i}.gguf`);
    writeCut(src, p, { layers: s.layers, rows: rank.subarray(0, s.headRows), headQ4_1: s.q41 });
    models.push(await loadModel(p));
  }
  const [targetMs = NaN, ...ms] = await medianDecodeMs([target, ...models], rounds, steps);
  const rows = specs.map((s, i) => ({
    layers: s.layers,
    headRows: s.headRows,
    headType: s.q41 ? 'Q4_1' : 'Q8_0',
    weightMB: models[i]!.info.weightBytesPerToken / 1e6,
    ms: ms[i]!,
    c: ms[i]! / targetMs,
  }));
  await Promise.all(models.map((m) => m.dispose()));
  return { targetMs, rows };
}

function windowsOf(shard: Uint16Array, n: number, seqLen: number): Int32Array[] {
  const m = Math.min(n, Math.floor((shard.length - 1) / seqLen));
  const stride = Math.floor((shard.length - seqLen - 1) / Math.max(1, m));
  const out: Int32Array[] = [];
  for (let w = 0; w < m; w++) out.push(Int32Array.from(shard.subarray(w * stride, w * stride + seqLen)));
  return out;
}

async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      target: { type: 'string' },
      work: { type: 'string', default: 'data/smollm2' },
      out: { type: 'string', default: 'data/probe' },
      layers: { type: 'string', default: '1,2,3,4,6' },
      heads: { type: 'string', default: '2048,4096,8192,16384' },
      'seq-len': { type: 'string', default: '128' },
      windows: { type: 'string', default: '8' },
      'fit-windows': { type: 'string', default: '64' },
      skip: { type: 'string', default: '8' },
      phase: { type: 'string', default: 'all' },
      'no-lens': { type: 'boolean', default: false },
      'q41-layers': { type: 'string', default: '3,4,30' },
      'lens-layers': { type: 'string', default: '2,3,4' },
      'train-layers': { type: 'string', default: '3' },
      'train-init': { type: 'string', default: 'cut' },
      minutes: { type: 'string', default: '15' },
      lr: { type: 'string', default: '3e-4' },
      threads: { type: 'string', default: '0' },
      quick: { type: 'boolean', default: false },
    },
  });
  const quick = values.quick!;
  const targetPath = resolve(values.target ?? join(process.cwd(), '..', DEFAULT_TARGET));
  if (!existsSync(targetPath)) throw new Error(`the target ${targetPath} is missing (pass --target <SmolLM2 GGUF>)`);
  const outDir = resolve(values.out!);
  const tmp = join(outDir, 'tmp');
  mkdirSync(tmp, { recursive: true });
  const layers = values.layers!.split(',').map(Number);
  const heads = values.heads!.split(',').map(Number).sort((a, b) => a - b);
  const seqLen = quick ? 48 : Number(values['seq-len']);
  const nWin = quick ? 1 : Number(values.windows);
  const skip = Number(values.skip);
  const phase = values.phase!;
  const reportPath = join(outDir, 'draft-probe.json');
  const report: Record<string, unknown> = existsSync(reportPath) ? JSON.parse(readFileSync(reportPath, 'utf8')) : {};

  const target = await loadModel(targetPath, { threads: Number(values.threads) });
  const V = target.info.vocabSize;
  const D = target.info.embeddingLength;
  const src = readGgufLayout(targetPath);
  const data = tokenizeDomains(target.tokenizer!, resolve(values.work!), 4);
  const meta = readGgufMetadata(targetPath, { maxArrayLength: 1 << 20 });
  const types = meta.metadata['tokenizer.ggml.token_type'] as number[];
  const control = types.flatMap((t, i) => (t === 3 ? [i] : []));
  const trainShards = GENERAL_DOMAINS.map((d) => data.get(`${d}.train`)!).filter(Boolean);
  const rank = rankTokens(trainShards, V, control);
  const trainTokens = trainShards.reduce((a, s) => a + s.length, 0);
  log(`ranked ${V} tokens over ${trainTokens} training tokens (${control.length} control tokens first)`);
  // Coverage of the training text itself.
  const inTop = new Uint32Array(V).fill(V);
  rank.forEach((id, i) => (inTop[id] = i));
  report.frequencies = { trainTokens, control: control.length, trainCoverage: heads.map((n) => trainShards.reduce((a, s) => a + s.reduce((b, t) => b + (inTop[t]! < n ? 1 : 0), 0), 0) / trainTokens) };

  if (phase === 'all' || phase === 'cost') {
    log('cost: single-token decode, interleaved with the target');
    const cost = await measureCosts(target, src, rank, layers, heads, tmp, quick ? 2 : 6, quick ? 4 : 12);
    report.cost = cost;
    process.stdout.write(`\nTarget ${cost.targetMs.toFixed(2)} ms/token (${(target.info.weightBytesPerToken / 1e6).toFixed(1)} MB/token)\n\n| layers | head rows | head type | weight MB/token | ms/token | c |\n| --- | --- | --- | --- | --- | --- |\n`);
    for (const r of cost.rows) process.stdout.write(`| ${r.layers} | ${r.headRows} | ${r.headType} | ${r.weightMB.toFixed(1)} | ${r.ms.toFixed(2)} | ${r.c.toFixed(3)} |\n`);
    writeFileSync(reportPath, JSON.stringify(report, null, 2));
  }

  if (phase === 'all' || phase === 'agree') {
    const embT = src.tensors.find((t) => t.name === 'token_embd.weight')!;
    // Variants: early exit k (tied head as stored), and the lens on top of it.
    const variants: Array<{ name: string; layers: number; lens: boolean; q41?: boolean; model?: Model }> = [];
    for (const k of layers) variants.push({ name: `exit ${k}`, layers: k, lens: false });
    // The head re-stored as Q4_1 (the whole target's, and two early exits).
    for (const k of values['q41-layers']!.split(',').filter(Boolean).map(Number)) variants.push({ name: `exit ${k} (Q4_1 head)`, layers: k, lens: false, q41: true });
    const lensLayers = values['no-lens'] ? [] : values['lens-layers']!.split(',').filter(Boolean).map(Number);
    for (const k of lensLayers) variants.push({ name: `exit ${k} + lens`, layers: k, lens: true });
    for (const [i, v] of variants.entries())
      if (!v.lens) {
        const p = join(tmp, `exit${i}.gguf`);
        writeCut(src, p, { layers: v.layers, headQ4_1: v.q41 });
        v.model = await loadModel(p);
      }

    if (lensLayers.length) {
      const t0 = Date.now();
      const fit = await fitLenses(target, src, lensLayers, trainShards, seqLen, skip, quick ? 2 : Number(values['fit-windows']), tmp);
      const E = dequantizeRows(readTensorBytes(src, embT.name), embT.type, D);
      report.lens = { fitPositions: fit.positions, lambda: LENS_LAMBDA, domains: GENERAL_DOMAINS };
      for (const [li, k] of lensLayers.entries()) {
        // Only the rows of the largest restricted head (the others stay 0: judged with restricted heads only).
        const p = join(tmp, `lens${k}.gguf`);
        writeCut(src, p, { layers: k, output: lensHead(E, fit.A[li]!, D, rank.subarray(0, heads[heads.length - 1]!)) });
        variants.find((v) => v.lens && v.layers === k)!.model = await loadModel(p);
        log(`lens ${k}: fitted on ${fit.positions} positions, head written (${((Date.now() - t0) / 1000).toFixed(0)} s)`);
      }
    }

    // Held-out agreement per domain.
    const acc = new Map<string, Acc[]>();
    const coverage = new Map<string, { n: number; hit: number[] }>();
    const p = new Float64Array(V);
    const qp = new Float64Array(V);
    const t0 = Date.now();
    for (const d of ALL_DOMAINS) {
      const shard = data.get(`${d}.heldout`);
      if (!shard) continue;
      const n = GENERAL_DOMAINS.includes(d as (typeof GENERAL_DOMAINS)[number]) ? nWin : 2 * nWin;
      const accs = variants.map(() => newAcc(heads.length));
      const cov = { n: 0, hit: heads.map(() => 0) };
      for (const toks of windowsOf(shard, n, seqLen)) {
        const pl = await target.forward(toks);
        const ql = [];
        for (const v of variants) ql.push(await v.model!.forward(toks));
        for (let t = skip; t < seqLen; t++) {
          const b = t * V;
          const tt = argmaxRow(pl, b, V);
          softmaxRow(pl, b, V, p);
          cov.n++;
          heads.forEach((h, i) => (cov.hit[i]! += inTop[tt]! < h ? 1 : 0));
          for (const [vi] of variants.entries()) accumulate(accs[vi]!, ql[vi]!, b, V, p, tt, rank, heads, qp);
        }
      }
      acc.set(d, accs);
      coverage.set(d, cov);
      log(`${d}: ${cov.n} positions (${((Date.now() - t0) / 1000).toFixed(0)} s)`);
    }
    await Promise.all(variants.map((v) => v.model!.dispose()));
    // Domains reported: English (the three general sources pooled), code, sql, email.
    const groups: Array<[string, string[]]> = [['English', [...GENERAL_DOMAINS]], ['code', ['code']], ['SQL', ['sql']], ['email', ['email']]];
    const agreement = variants.map((v, vi) => ({
      name: v.name,
      layers: v.layers,
      lens: v.lens,
      domains: Object.fromEntries(
        groups.map(([g, ds]) => {
          const a = ds.map((d) => acc.get(d)?.[vi]).filter((x): x is Acc => !!x);
          const n = a.reduce((s, x) => s + x.n, 0);
          const sum = (f: (x: Acc) => number) => a.reduce((s, x) => s + f(x), 0) / Math.max(1, n);
          return [g, { n, top1: sum((x) => x.top1), top4: sum((x) => x.top4), sampled: sum((x) => x.sampled), subTop1: heads.map((_, i) => sum((x) => x.subTop1[i]!)), subSampled: heads.map((_, i) => sum((x) => x.subSampled[i]!)) }];
        }),
      ),
    }));
    const cov = Object.fromEntries(
      groups.map(([g, ds]) => {
        const c = ds.map((d) => coverage.get(d)).filter((x): x is { n: number; hit: number[] } => !!x);
        const n = c.reduce((s, x) => s + x.n, 0);
        return [g, { n, coverage: heads.map((_, i) => c.reduce((s, x) => s + x.hit[i]!, 0) / Math.max(1, n)) }];
      }),
    );
    report.heads = heads;
    report.coverage = cov;
    report.agreement = agreement;
    report.eval = { seqLen, skip, windowsEnglishPerSource: nWin, windowsOther: 2 * nWin };
    writeFileSync(reportPath, JSON.stringify(report, null, 2));
    const f = (x: number) => x.toFixed(3);
    process.stdout.write(`\n## Coverage of the target's argmax by the top-N tokens\n\n| domain | positions | ${heads.map((h) => `N=${h}`).join(' | ')} |\n| --- | --- | ${heads.map(() => '---').join(' | ')} |\n`);
    for (const [g, c] of Object.entries(cov)) process.stdout.write(`| ${g} | ${c.n} | ${c.coverage.map(f).join(' | ')} |\n`);
    const heads2 = ['full', ...heads.map(String)];
    process.stdout.write(`\n## Held-out agreement: top-1 (draft argmax = target argmax) and T=1 acceptance sum min(p, q)\n\n| candidate | head | ${groups.map((g) => `${g[0]} top-1 | ${g[0]} T=1`).join(' | ')} |\n| --- | --- | ${groups.map(() => '--- | ---').join(' | ')} |\n`);
    for (const a of agreement)
      for (const [hi, h] of heads2.entries()) {
        if (a.lens && hi === 0) continue;
        const cells = groups.map(([g]) => {
          const x = a.domains[g]!;
          return hi === 0 ? `${f(x.top1)} | ${f(x.sampled)}` : `${f(x.subTop1[hi - 1]!)} | ${f(x.subSampled[hi - 1]!)}`;
        });
        process.stdout.write(`| ${a.name} | ${h} | ${cells.join(' | ')} |\n`);
      }
  }

  if (phase === 'coverage') {
    // Coverage of the target's argmax when the subset is counted over general English only, or over
    // every domain's training text (English, code, SQL, email).
    const allShards = ALL_DOMAINS.map((d) => data.get(`${d}.train`)).filter((x): x is Uint16Array => !!x);
    const ranks = { english: rank, all: rankTokens(allShards, V, control) };
    const pos = { english: new Uint32Array(V), all: new Uint32Array(V) };
    for (const key of ['english', 'all'] as const) ranks[key].forEach((id, i) => (pos[key][id] = i));
    const groups: Array<[string, string[]]> = [['English', [...GENERAL_DOMAINS]], ['code', ['code']], ['SQL', ['sql']], ['email', ['email']]];
    const out: Record<string, { n: number; english: number[]; all: number[] }> = {};
    for (const [g, ds] of groups)
      for (const d of ds) {
        const shard = data.get(`${d}.heldout`);
        if (!shard) continue;
        const r = (out[g] ??= { n: 0, english: heads.map(() => 0), all: heads.map(() => 0) });
        for (const toks of windowsOf(shard, g === 'English' ? nWin : 2 * nWin, seqLen)) {
          const l = await target.forward(toks);
          for (let t = skip; t < seqLen; t++) {
            const top = argmaxRow(l, t * V, V);
            r.n++;
            heads.forEach((h, i) => {
              if (pos.english[top]! < h) r.english[i]!++;
              if (pos.all[top]! < h) r.all[i]!++;
            });
          }
        }
      }
    report.coverageByRanking = { heads, groups: out };
    writeFileSync(reportPath, JSON.stringify(report, null, 2));
    process.stdout.write(`\n## Coverage of the target's argmax: subset counted over English only / over all four domains\n\n| domain | positions | ${heads.map((h) => `N=${h}`).join(' | ')} |\n| --- | --- | ${heads.map(() => '---').join(' | ')} |\n`);
    for (const [g, r] of Object.entries(out)) process.stdout.write(`| ${g} | ${r.n} | ${heads.map((_, i) => `${(r.english[i]! / r.n).toFixed(3)} / ${(r.all[i]! / r.n).toFixed(3)}`).join(' | ')} |\n`);
  }

  if (phase === 'train') {
    const k = Number(values['train-layers']);
    const budgetMs = (quick ? 0.3 : Number(values.minutes)) * 60_000;
    const lr = Number(values.lr);
    const rows = quick ? 2 : 8;
    const topK = 64;
    const p0 = join(tmp, `train${k}.gguf`);
    const fromLens = values['train-init'] === 'lens';
    if (fromLens) {
      // Start from the lens: an untied head E A over the whole vocabulary.
      const fit = await fitLenses(target, src, [k], trainShards, seqLen, skip, quick ? 2 : Number(values['fit-windows']), tmp);
      const embT = src.tensors.find((t) => t.name === 'token_embd.weight')!;
      const E = dequantizeRows(readTensorBytes(src, embT.name), embT.type, D);
      writeCut(src, p0, { layers: k, output: lensHead(E, fit.A[0]!, D, Int32Array.from({ length: V }, (_, i) => i)) });
      log(`train: lens head written`);
    } else writeCut(src, p0, { layers: k });
    const init = await loadModel(p0);
    const trainer = await createTrainer(init, { lr, warmupSteps: 10, schedule: 'cosine', totalSteps: 1_000_000, minLr: lr / 10, weightDecay: 0, clipNorm: 1, headChunk: 256 });
    // Held-out set: the target's argmax per position, per domain group.
    const evalSets: Array<{ group: string; toks: Int32Array; top: Int32Array }> = [];
    const groups: Array<[string, string[]]> = [['English', [...GENERAL_DOMAINS]], ['code', ['code']], ['SQL', ['sql']], ['email', ['email']]];
    for (const [g, ds] of groups)
      for (const d of ds) {
        const shard = data.get(`${d}.heldout`);
        if (!shard) continue;
        for (const toks of windowsOf(shard, quick ? 1 : g === 'English' ? 3 : 6, seqLen)) {
          const l = await target.forward(toks);
          const top = new Int32Array(seqLen);
          for (let t = 0; t < seqLen; t++) top[t] = argmaxRow(l, t * V, V);
          evalSets.push({ group: g, toks, top });
        }
      }
    const evalNow = async (m: Model) => {
      const res: Record<string, { n: number; top1: number; sub: number[] }> = {};
      for (const e of evalSets) {
        const r = (res[e.group] ??= { n: 0, top1: 0, sub: heads.map(() => 0) });
        const l = await m.forward(e.toks);
        for (let t = skip; t < seqLen; t++) {
          const b = t * V;
          r.n++;
          if (argmaxRow(l, b, V) === e.top[t]) r.top1++;
          let best = -1;
          let bv = -Infinity;
          let h = 0;
          for (let i = 0; i < heads[heads.length - 1]!; i++) {
            const id = rank[i]!;
            if (l[b + id]! > bv) {
              bv = l[b + id]!;
              best = id;
            }
            if (i + 1 === heads[h]) {
              if (best === e.top[t]) r.sub[h]!++;
              h++;
            }
          }
        }
      }
      return Object.fromEntries(Object.entries(res).map(([g, r]) => [g, { n: r.n, top1: r.top1 / r.n, sub: r.sub.map((x) => x / r.n) }]));
    };
    const curve: Array<{ step: number; tokens: number; minutes: number; loss: number; heldOut: Record<string, { n: number; top1: number; sub: number[] }> }> = [];
    const rng = new XorShift(11);
    const started = Date.now();
    let tokens = 0;
    let lossEma = NaN;
    let lastEval = 0;
    const record = async () => {
      lastEval = Date.now();
      const snap = await trainer.snapshot();
      const heldOut = await evalNow(snap);
      await snap.dispose();
      curve.push({ step: trainer.steps, tokens, minutes: (Date.now() - started) / 60000, loss: lossEma, heldOut });
      log(`train: step ${trainer.steps}, ${tokens} teacher tokens, KL ${lossEma.toFixed(3)}: ${Object.entries(heldOut).map(([g, r]) => `${g} ${r.top1.toFixed(3)} (N=${heads[1]} ${r.sub[1]!.toFixed(3)})`).join(', ')}`);
    };
    await record();
    let sized = false;
    while (Date.now() - started < budgetMs) {
      const toks = new Int32Array(rows * seqLen);
      for (let r = 0; r < rows; r++) {
        const s = trainShards[Math.floor(rng.next() * trainShards.length)]!;
        const st = Math.floor(rng.next() * (s.length - seqLen - 1));
        for (let t = 0; t < seqLen; t++) toks[r * seqLen + t] = s[st + t]!;
      }
      const tb = await teacherBatch(target, toks, rows, seqLen, topK);
      tokens += rows * seqLen;
      for (let rep = 0; rep < 2; rep++) {
        const r = await trainer.step({ tokens: toks, batchSize: rows, seqLen, kind: 'forward-kl', teacher: { indices: tb.indices, probs: tb.probs, residual: tb.residual } });
        lossEma = Number.isNaN(lossEma) ? r.loss : 0.9 * lossEma + 0.1 * r.loss;
      }
      if (!sized && trainer.steps >= 6) {
        const per = (Date.now() - started) / trainer.steps;
        trainer.configure({ totalSteps: trainer.steps + Math.max(10, Math.floor((budgetMs - (Date.now() - started)) / per)) });
        sized = true;
      }
      if (Date.now() - lastEval > (quick ? 5_000 : budgetMs / 5)) await record();
    }
    if (curve[curve.length - 1]!.step !== trainer.steps) await record();
    report[`train_${k}_${fromLens ? 'lens' : 'cut'}`] = { layers: k, init: fromLens ? 'lens' : 'cut', lr, rows, seqLen, topK, replay: 2, curve, heads };
    writeFileSync(reportPath, JSON.stringify(report, null, 2));
    process.stdout.write(`\n## Training the whole early exit ${k}${fromLens ? ' from the lens (untied head E A)' : ''} (forward KL to the target's top-${topK}, general English)\n\n| step | teacher tokens | minutes | KL | ${groups.map(([g]) => `${g} full / N=${heads[1]}`).join(' | ')} |\n| --- | --- | --- | --- | ${groups.map(() => '---').join(' | ')} |\n`);
    for (const c of curve) process.stdout.write(`| ${c.step} | ${c.tokens} | ${c.minutes.toFixed(1)} | ${c.loss.toFixed(3)} | ${groups.map(([g]) => (c.heldOut[g] ? `${c.heldOut[g].top1.toFixed(3)} / ${c.heldOut[g].sub[1]!.toFixed(3)}` : '-')).join(' | ')} |\n`);
    await Promise.all([trainer.dispose(), init.dispose()]);
  }
  await target.dispose();
  rmSync(tmp, { recursive: true, force: true });
  return 0;
}

if (process.argv[1] && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err: unknown) => {
      process.stderr.write(`draft-probe: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
      process.exit(1);
    },
  );
}
