// Trains the project's own default model pair from scratch (npm run train:default):
//
//   npx tsx lib/train/trainDefault.ts [--data data] [--out models] [--target-minutes 60]
//                                     [--draft-minutes 10] [--distill-minutes 0] [--seed 1] [--quick]
//                                     [--distill-only] [--distill-lr 1e-3] [--distill-temperature 1]
//                                     [--distill-loss forward-kl]
//
// - the data and the byte-level BPE tokenizer come from lib/train/prepareData.ts (run if missing);
// - the target (about 5.4M parameters) trains on every domain;
// - the draft (about 0.35M parameters, under a tenth of the target's per-token FLOPs) trains on the
//   general-English domains only (speeches, novel, definitions), so it is weak on code, SQL and
//   email: the gap online distillation has to close;
// - optionally, the target is then distilled into the draft (--distill-minutes N; off by default,
//   and the committed pair is not distilled: see the README's default model pair) on the same
//   general-English training text only: forward KL to the target's full logits at temperature 1,
//   which raises the draft's acceptance on English; the draft still never sees code, SQL or email;
//   --distill-only runs just this phase on the pair already in --out (15 minutes unless
//   --distill-minutes says otherwise; the target and the rest of report.json are kept), with the
//   per-domain acceptance before and after in the report;
// - both are written as GGUF (tokenizer included) with a report of held-out loss per domain.
// Training checkpoints go to <out>/.checkpoints and a run can be resumed with --resume.
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { loadModel, type Model } from '../Model.js';
import { createTrainer, loadTrainerCheckpoint, type Trainer, type TrainBatch } from '../Trainer.js';
import type { DistillLossKind } from '../kernels.js';
import { writeLlamaInit, XorShift, type LlamaShape } from './llamaInit.js';
import { GENERAL_DOMAINS, ALL_DOMAINS, type Domain } from './corpus.js';
import { prepareData } from './prepareData.js';

/** The shape of each model of the default pair. */
export type PairConfig = LlamaShape;

export const TARGET_CONFIG: Omit<PairConfig, 'vocabSize'> = {
  embeddingLength: 256,
  layers: 6,
  heads: 8,
  kvHeads: 4,
  feedForwardLength: 688,
  contextLength: 512,
};

export const DRAFT_CONFIG: Omit<PairConfig, 'vocabSize'> = {
  embeddingLength: 64,
  layers: 2,
  heads: 4,
  kvHeads: 2,
  feedForwardLength: 172,
  contextLength: 512,
};

/** The draft's distillation phase (--distill-only): minutes, peak lr, loss temperature (1: the target's own distribution) and loss. */
export const DISTILL_DEFAULTS = { minutes: 15, lr: 1e-3, temperature: 1, loss: 'forward-kl' as DistillLossKind };

/** Matrix parameters touched per token (embedding row excluded): a FLOP proxy for per-token cost. */
export function perTokenParams(c: PairConfig): number {
  const hd = c.embeddingLength / c.heads;
  const layer =
    2 * c.embeddingLength * c.embeddingLength + 2 * c.embeddingLength * c.kvHeads * hd + 3 * c.embeddingLength * c.feedForwardLength;
  return c.layers * layer + c.vocabSize * c.embeddingLength;
}

/** Token shards of one split, one Uint16Array per domain. */
export function loadShards(dataDir: string, domains: readonly Domain[], split: 'train' | 'heldout'): Map<Domain, Uint16Array> {
  const out = new Map<Domain, Uint16Array>();
  for (const d of domains) {
    const file = join(dataDir, `${d}.${split}.u16`);
    if (!existsSync(file)) continue;
    const buf = readFileSync(file);
    out.set(d, new Uint16Array(buf.buffer, buf.byteOffset, buf.byteLength / 2));
  }
  return out;
}

export { XorShift } from './llamaInit.js';

/** A next-token batch of `rows` random windows of seqLen + 1 tokens, domains chosen uniformly. */
export function sampleBatch(shards: Map<Domain, Uint16Array>, rows: number, seqLen: number, rng: XorShift): TrainBatch {
  const domains = [...shards.keys()];
  const tokens = new Int32Array(rows * seqLen);
  const targets = new Int32Array(rows * seqLen);
  for (let r = 0; r < rows; r++) {
    const shard = shards.get(domains[Math.floor(rng.next() * domains.length)]!)!;
    const start = Math.floor(rng.next() * (shard.length - seqLen - 1));
    for (let t = 0; t < seqLen; t++) {
      tokens[r * seqLen + t] = shard[start + t]!;
      targets[r * seqLen + t] = shard[start + t + 1]!;
    }
  }
  return { tokens, targets, batchSize: rows, seqLen };
}

/** Held-out windows of one domain, evenly spaced (deterministic). */
export function heldOutBatches(shard: Uint16Array, windows: number, seqLen: number, rows = 8): TrainBatch[] {
  const batches: TrainBatch[] = [];
  const n = Math.min(windows, Math.floor((shard.length - 1) / seqLen));
  const stride = Math.floor((shard.length - seqLen - 1) / Math.max(1, n));
  for (let w0 = 0; w0 < n; w0 += rows) {
    const r = Math.min(rows, n - w0);
    const tokens = new Int32Array(r * seqLen);
    const targets = new Int32Array(r * seqLen);
    for (let i = 0; i < r; i++) {
      const start = (w0 + i) * stride;
      for (let t = 0; t < seqLen; t++) {
        tokens[i * seqLen + t] = shard[start + t]!;
        targets[i * seqLen + t] = shard[start + t + 1]!;
      }
    }
    batches.push({ tokens, targets, batchSize: r, seqLen });
  }
  return batches;
}

/** Writes a randomly initialised llama GGUF carrying the tokenizer (std 0.02, residual projections scaled down). */
export function writeInitialModel(path: string, c: PairConfig, tokenizerPath: string, seed: number): void {
  writeLlamaInit(path, c, { name: 'online-specdec default model', tokenizerPath, seed });
}

/** A one-line progress bar with loss, tokens/s and ETA, redrawn in place on a terminal. */
export class ProgressBar {
  #last = 0;
  constructor(
    readonly label: string,
    readonly stream: NodeJS.WriteStream = process.stderr,
  ) {}
  update(fraction: number, fields: string, force = false): void {
    const now = Date.now();
    if (!force && now - this.#last < 250) return;
    this.#last = now;
    const width = 24;
    const filled = Math.round(Math.min(1, Math.max(0, fraction)) * width);
    const line = `${this.label} [${'#'.repeat(filled)}${'-'.repeat(width - filled)}] ${(fraction * 100).toFixed(0).padStart(3)}% ${fields}`;
    if (this.stream.isTTY) this.stream.write(`\r${line}\x1b[K`);
    else if (force || now % 15000 < 260) this.stream.write(line + '\n');
  }
  done(fields: string): void {
    this.update(1, fields, true);
    if (this.stream.isTTY) this.stream.write('\n');
  }
}

function formatTime(s: number): string {
  const m = Math.floor(s / 60);
  return `${m}:${String(Math.floor(s % 60)).padStart(2, '0')}`;
}

export interface TrainRunOptions {
  name: string;
  config: PairConfig;
  domains: readonly Domain[];
  minutes: number;
  seed: number;
  dataDir: string;
  outDir: string;
  tokenizerPath: string;
  resume: boolean;
  rows: number;
  seqLen: number;
  lr: number;
}

/** <outDir>/.checkpoints, created if missing. */
function checkpointDir(outDir: string): string {
  const dir = join(outDir, '.checkpoints');
  mkdirSync(dir, { recursive: true });
  return dir;
}

/** The training shards of `domains`; an error when there are none. */
function trainShards(dataDir: string, domains: readonly Domain[]): Map<Domain, Uint16Array> {
  const shards = loadShards(dataDir, domains, 'train');
  if (shards.size === 0) throw new Error(`no training shards for ${domains.join(', ')} in ${dataDir}`);
  return shards;
}

/** Trains one model for a time budget (cosine schedule sized from the measured step time). */
export async function trainOne(o: TrainRunOptions): Promise<Model> {
  const ckptDir = checkpointDir(o.outDir);
  const ckpt = join(ckptDir, `${o.name}.ckpt.gguf`);
  const shards = trainShards(o.dataDir, o.domains);
  let trainer: Trainer;
  if (o.resume && existsSync(ckpt)) {
    trainer = await loadTrainerCheckpoint(ckpt);
  } else {
    const init = join(ckptDir, `${o.name}.init.gguf`);
    writeInitialModel(init, o.config, o.tokenizerPath, o.seed);
    const initModel = await loadModel(init);
    trainer = await createTrainer(initModel, { lr: o.lr, warmupSteps: 30, schedule: 'cosine', totalSteps: 1_000_000, minLr: o.lr / 10, weightDecay: 0.01, clipNorm: 1 });
    await initModel.dispose();
  }
  const rng = new XorShift(o.seed * 7919 + trainer.steps);
  await trainForBudget(trainer, {
    label: o.name.padEnd(6),
    lossName: 'loss',
    minutes: o.minutes,
    tokensPerStep: o.rows * o.seqLen,
    checkpoint: ckpt,
    nextBatch: async () => sampleBatch(shards, o.rows, o.seqLen, rng),
  });
  const model = await trainer.snapshot();
  await trainer.dispose();
  return model;
}

interface BudgetRun {
  label: string;
  lossName: string;
  minutes: number;
  tokensPerStep: number;
  /** Saved every five minutes and at the end. */
  checkpoint: string;
  nextBatch: () => Promise<TrainBatch>;
}

/**
 * Steps the trainer until the time budget is spent, with a progress bar. The cosine schedule is
 * sized to the budget once the step time is known (after five steps of this run).
 */
async function trainForBudget(trainer: Trainer, o: BudgetRun): Promise<{ steps: number; tokens: number; minutes: number; loss: number }> {
  const bar = new ProgressBar(o.label);
  const started = Date.now();
  const budgetMs = o.minutes * 60_000;
  let lossEma = NaN;
  let steps = 0;
  let lastSave = Date.now();
  for (;;) {
    const elapsed = Date.now() - started;
    if (elapsed >= budgetMs) break;
    const r = await trainer.step(await o.nextBatch());
    steps++;
    lossEma = Number.isNaN(lossEma) ? r.loss : 0.95 * lossEma + 0.05 * r.loss;
    if (steps === 5) {
      const perStep = (Date.now() - started) / steps;
      trainer.configure({ totalSteps: trainer.steps + Math.max(10, Math.floor((budgetMs - (Date.now() - started)) / perStep)) });
    }
    const secs = (Date.now() - started) / 1000;
    bar.update(elapsed / budgetMs, `step ${r.step} ${o.lossName} ${lossEma.toFixed(3)} lr ${r.lr.toExponential(1)} ${((steps * o.tokensPerStep) / secs).toFixed(0)} tok/s ETA ${formatTime(Math.max(0, (budgetMs - elapsed) / 1000))}`);
    if (Date.now() - lastSave > 5 * 60_000) {
      await trainer.save(o.checkpoint);
      lastSave = Date.now();
    }
  }
  await trainer.save(o.checkpoint);
  const minutes = (Date.now() - started) / 60000;
  const tokens = steps * o.tokensPerStep;
  bar.done(`steps ${steps} ${o.lossName} ${lossEma.toFixed(3)} ${(tokens / (minutes * 60)).toFixed(0)} tok/s`);
  return { steps, tokens, minutes, loss: lossEma };
}

// ---- distilling the target into the draft ---------------------------------------------------------

/** The target's dense logits as the teacher of `b` (forward KL at `temperature` by default). */
export async function withTeacher(target: Model, b: TrainBatch, temperature = 1, kind: DistillLossKind = 'forward-kl'): Promise<TrainBatch> {
  const V = target.info.vocabSize;
  const T = b.seqLen;
  const teacherLogits = new Float32Array(b.batchSize * T * V);
  for (let r = 0; r < b.batchSize; r++) teacherLogits.set(await target.forward(b.tokens.subarray(r * T, (r + 1) * T)), r * T * V);
  return { tokens: b.tokens, batchSize: b.batchSize, seqLen: T, kind, teacherLogits, temperature };
}

export interface DistillRunOptions {
  target: Model;
  /** The draft to start from (its weights are copied; the model itself is left as it is). */
  draft: Model;
  domains: readonly Domain[];
  minutes: number;
  seed: number;
  dataDir: string;
  outDir: string;
  rows: number;
  seqLen: number;
  lr: number;
  /** Temperature of both distributions in the loss (1: match the target's own distribution). */
  temperature: number;
  loss: DistillLossKind;
}

export interface DistillRunResult {
  model: Model;
  steps: number;
  teacherTokens: number;
  minutes: number;
  finalLoss: number;
}

/**
 * Distils the target into the draft for a time budget: random windows of the given domains' train
 * shards, the target's dense logits as the teacher, cosine schedule sized from the measured step time.
 */
export async function distillDraft(o: DistillRunOptions): Promise<DistillRunResult> {
  const ckptDir = checkpointDir(o.outDir);
  const shards = trainShards(o.dataDir, o.domains);
  const trainer = await createTrainer(o.draft, { lr: o.lr, warmupSteps: 20, schedule: 'cosine', totalSteps: 1_000_000, minLr: o.lr / 10, weightDecay: 0.01, clipNorm: 1 });
  const rng = new XorShift(o.seed * 104729 + 17);
  const run = await trainForBudget(trainer, {
    label: 'distil',
    lossName: 'KL',
    minutes: o.minutes,
    tokensPerStep: o.rows * o.seqLen,
    checkpoint: join(ckptDir, 'draft-distill.ckpt.gguf'),
    nextBatch: () => withTeacher(o.target, sampleBatch(shards, o.rows, o.seqLen, rng), o.temperature, o.loss),
  });
  const model = await trainer.snapshot();
  await trainer.dispose();
  return { model, steps: run.steps, teacherTokens: run.tokens, minutes: run.minutes, finalLoss: run.loss };
}

/** Per-token acceptance of a draft against the target, teacher-forced on held-out text. */
export interface Agreement {
  positions: number;
  /** Greedy: how often the draft's argmax is the target's argmax. */
  greedy: number;
  /** Sampled at T = 0.8 and T = 1: the mean of sum_x min(p_T(x), q_T(x)), the chance a drafted token is accepted. */
  t08: number;
  t1: number;
}

function softmaxAt(logits: Float32Array, base: number, V: number, invT: number, out: Float64Array): number {
  let mx = -Infinity;
  let arg = 0;
  for (let j = 0; j < V; j++)
    if (logits[base + j]! > mx) {
      mx = logits[base + j]!;
      arg = j;
    }
  let z = 0;
  for (let j = 0; j < V; j++) z += out[j] = Math.exp((logits[base + j]! - mx) * invT);
  for (let j = 0; j < V; j++) out[j]! /= z;
  return arg;
}

/** Agreement of `draft` with `target` per domain, on evenly spaced held-out windows. */
export async function heldOutAgreement(target: Model, draft: Model, dataDir: string, seqLen: number, windows: number): Promise<Record<string, Agreement>> {
  const V = target.info.vocabSize;
  const p = new Float64Array(V);
  const q = new Float64Array(V);
  const out: Record<string, Agreement> = {};
  for (const [domain, shard] of loadShards(dataDir, ALL_DOMAINS, 'heldout')) {
    const a = { positions: 0, greedy: 0, t08: 0, t1: 0 };
    for (const b of heldOutBatches(shard, windows, seqLen)) {
      for (let r = 0; r < b.batchSize; r++) {
        const tokens = b.tokens.subarray(r * seqLen, (r + 1) * seqLen);
        const tl = await target.forward(tokens);
        const dl = await draft.forward(tokens);
        for (let t = 0; t < seqLen; t++) {
          a.positions++;
          for (const [invT, key] of [[1, 't1'], [1 / 0.8, 't08']] as const) {
            const ta = softmaxAt(tl, t * V, V, invT, p);
            const da = softmaxAt(dl, t * V, V, invT, q);
            if (invT === 1 && ta === da) a.greedy++;
            let s = 0;
            for (let j = 0; j < V; j++) s += Math.min(p[j]!, q[j]!);
            a[key] += s;
          }
        }
      }
    }
    out[domain] = { positions: a.positions, greedy: a.greedy / a.positions, t08: a.t08 / a.positions, t1: a.t1 / a.positions };
  }
  return out;
}

/** Mean held-out cross-entropy per domain. */
export async function heldOutLoss(model: Model, dataDir: string, seqLen: number, windows: number): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  const trainer = await createTrainer(model);
  try {
    for (const [domain, shard] of loadShards(dataDir, ALL_DOMAINS, 'heldout')) {
      let sum = 0;
      let count = 0;
      for (const b of heldOutBatches(shard, windows, seqLen)) {
        sum += (await trainer.evalLoss(b)) * b.batchSize;
        count += b.batchSize;
      }
      out[domain] = sum / Math.max(1, count);
    }
  } finally {
    await trainer.dispose();
  }
  return out;
}

/** Median time of one single-token decode step after a short prompt. */
export async function decodeMs(model: Model, steps = 48): Promise<number> {
  const seq = model.createSequence();
  try {
    await seq.evaluate([1, 2, 3, 4]);
    const times: number[] = [];
    for (let i = 0; i < steps; i++) {
      const t0 = performance.now();
      await seq.evaluate([(i * 31) % 200]);
      times.push(performance.now() - t0);
    }
    times.sort((a, b) => a - b);
    return times[Math.floor(times.length / 2)]!;
  } finally {
    await seq.dispose();
  }
}

interface DistillReport {
  date: string;
  minutes: number;
  steps: number;
  teacherTokens: number;
  rows: number;
  seqLen: number;
  lr: number;
  temperature: number;
  loss: DistillLossKind;
  finalLoss: number;
  domains: readonly Domain[];
  agreementWindows: number;
  agreementBefore: Record<string, Agreement>;
  agreementAfter: Record<string, Agreement>;
}

interface PairReport {
  createdBy: string;
  date: string;
  minutes: number;
  tokenizer: { vocabSize: number };
  target: { file: string; config: PairConfig; parameters: number; domains: readonly Domain[]; heldOutLoss: Record<string, number> };
  draft: { file: string; config: PairConfig; parameters: number; domains: readonly Domain[]; heldOutLoss: Record<string, number>; distill?: DistillReport };
  cost: { perTokenParamsRatio: number; decodeMsTarget: number; decodeMsDraft: number; decodeTimeRatio: number };
}

/** models/REPORT.md from the report. */
export function reportMarkdown(report: PairReport): string {
  const { target, draft } = report;
  const d = draft.distill;
  const rows = ALL_DOMAINS.filter((x) => x in target.heldOutLoss).map(
    (x) => `| ${x} | ${target.heldOutLoss[x]!.toFixed(3)} | ${draft.heldOutLoss[x]!.toFixed(3)} | ${(draft.heldOutLoss[x]! - target.heldOutLoss[x]!).toFixed(3)} |`,
  );
  const md = [
    '# Default model pair: training report',
    '',
    `Produced by \`npm run train:default\` (lib/train/trainDefault.ts) on ${report.date.slice(0, 10)} in ${report.minutes.toFixed(0)} minutes.`,
    '',
    `- Tokenizer: byte-level BPE, ${report.tokenizer.vocabSize} tokens, trained by lib/train/bpe.ts on all six domains.`,
    `- Target: ${JSON.stringify(target.config)}, trained on all domains.`,
    `- Draft: ${JSON.stringify(draft.config)}, trained on general English only (speeches, novel, definitions)` +
      (d
        ? `, then distilled from the target on the same general-English training text (${d.date.slice(0, 10)}, ${d.minutes.toFixed(1)} minutes: ${d.steps} AdamW steps of ${d.rows} x ${d.seqLen} tokens, ${d.loss} to the target's full logits at temperature ${d.temperature}, peak lr ${d.lr}, cosine decay). Code, SQL and email stay unseen by the draft.`
        : '.'),
    `- Per-token cost, draft / target: ${report.cost.perTokenParamsRatio.toFixed(3)} in matrix parameters (FLOPs), ${report.cost.decodeTimeRatio.toFixed(3)} in measured decode time on the machine that trained them.`,
    '',
    'Held-out cross-entropy (nats per token) per domain:',
    '',
    '| domain | target | draft | draft - target |',
    '| --- | --- | --- | --- |',
    ...rows,
    '',
  ];
  if (d) {
    const f = (x?: number) => (typeof x === 'number' ? x.toFixed(3) : '-');
    md.push(
      `Per-token acceptance of the draft before and after the distillation, teacher-forced on held-out text (${d.agreementWindows} windows of ${d.seqLen} tokens per domain): greedy is how often the draft's argmax is the target's; T = 0.8 and T = 1 are the mean of sum_x min(p_T(x), q_T(x)), the chance that a sampled draft token is accepted.`,
      '',
      '| domain | greedy before | greedy after | T=0.8 before | T=0.8 after | T=1 before | T=1 after |',
      '| --- | --- | --- | --- | --- | --- | --- |',
      ...ALL_DOMAINS.filter((x) => x in d.agreementAfter).map((x) => {
        const b = d.agreementBefore[x];
        const a = d.agreementAfter[x];
        return `| ${x} | ${f(b?.greedy)} | ${f(a?.greedy)} | ${f(b?.t08)} | ${f(a?.t08)} | ${f(b?.t1)} | ${f(a?.t1)} |`;
      }),
      '',
    );
  }
  return md.join('\n');
}

/** The first held-out document of a general-English domain must encode to the shard's tokens. */
function checkTokenizer(model: Model, dataDir: string): void {
  const domain = GENERAL_DOMAINS[0];
  const first = readFileSync(join(dataDir, `${domain}.heldout.jsonl`), 'utf8').split('\n', 1)[0]!;
  const ids = model.tokenizer!.encode((JSON.parse(first) as { text: string }).text.slice(0, 2000), { addBos: false });
  const shard = loadShards(dataDir, [domain], 'heldout').get(domain)!;
  const n = Math.min(64, ids.length - 1); // the cut may split the last token
  for (let i = 0; i < n; i++)
    if (shard[1 + i] !== ids[i]) throw new Error(`the data in ${dataDir} was tokenized with another tokenizer than the models' (token ${i} of ${domain}.heldout differs)`);
}

async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      data: { type: 'string', default: 'data' },
      out: { type: 'string', default: 'models' },
      'target-minutes': { type: 'string', default: '60' },
      'draft-minutes': { type: 'string', default: '10' },
      'distill-minutes': { type: 'string' },
      'distill-only': { type: 'boolean', default: false },
      'distill-lr': { type: 'string', default: String(DISTILL_DEFAULTS.lr) },
      'distill-temperature': { type: 'string', default: String(DISTILL_DEFAULTS.temperature) },
      'distill-loss': { type: 'string', default: DISTILL_DEFAULTS.loss },
      seed: { type: 'string', default: '1' },
      resume: { type: 'boolean', default: false },
      quick: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(readFileSync(new URL(import.meta.url), 'utf8').split('\nimport ')[0]!.replace(/^\/\/ ?/gm, '') + '\n');
    return 0;
  }
  const dataDir = resolve(values.data!);
  const outDir = resolve(values.out!);
  const quick = values.quick!;
  const distillOnly = values['distill-only']!;
  // Off in a full training run unless asked for; --distill-only runs the phase for its default time.
  const distillMinutes = quick
    ? 0.1
    : values['distill-minutes'] !== undefined
      ? Number(values['distill-minutes'])
      : distillOnly
        ? DISTILL_DEFAULTS.minutes
        : 0;
  const distillLoss = values['distill-loss'] as DistillLossKind;
  if (!['forward-kl', 'reverse-kl', 'jsd', 'tvd'].includes(distillLoss)) throw new RangeError(`--distill-loss must be forward-kl, reverse-kl, jsd or tvd, got ${distillLoss}`);
  if (!(distillMinutes >= 0)) throw new RangeError(`--distill-minutes must be a number >= 0, got ${values['distill-minutes']}`);
  if (distillOnly && !(distillMinutes > 0)) throw new RangeError('--distill-only needs --distill-minutes > 0');
  mkdirSync(outDir, { recursive: true });
  if (!existsSync(join(dataDir, 'manifest.json'))) {
    process.stderr.write(`preparing data in ${dataDir}\n`);
    await prepareData({ out: dataDir });
  }
  const manifest = JSON.parse(readFileSync(join(dataDir, 'manifest.json'), 'utf8')) as { tokenizer: { vocabSize: number } };
  const tokenizerPath = join(dataDir, 'tokenizer.gguf');
  const vocabSize = manifest.tokenizer.vocabSize;
  const seed = Number(values.seed);
  const target = { ...TARGET_CONFIG, vocabSize };
  const draft = { ...DRAFT_CONFIG, vocabSize };
  const seqLen = quick ? 32 : 128;
  const common = { seed, dataDir, outDir, tokenizerPath, resume: values.resume!, rows: quick ? 2 : 8, seqLen };
  const windows = quick ? 8 : 96;
  const targetPath = join(outDir, 'default-target.gguf');
  const draftPath = join(outDir, 'default-draft.gguf');
  const reportPath = join(outDir, 'report.json');
  const t0 = Date.now();
  let report: PairReport;
  let targetModel: Model;
  let draftModel: Model;
  if (distillOnly) {
    // Only the distillation, on the pair already in <out>: the target and the rest of the report stay.
    if (!existsSync(targetPath) || !existsSync(draftPath) || !existsSync(reportPath)) throw new Error(`--distill-only needs ${targetPath}, ${draftPath} and ${reportPath}`);
    report = JSON.parse(readFileSync(reportPath, 'utf8')) as PairReport;
    targetModel = await loadModel(targetPath);
    draftModel = await loadModel(draftPath);
    checkTokenizer(targetModel, dataDir);
  } else {
    draftModel = await trainOne({ ...common, name: 'draft', config: draft, domains: GENERAL_DOMAINS, minutes: quick ? 0.1 : Number(values['draft-minutes']), lr: 3e-3 });
    targetModel = await trainOne({ ...common, name: 'target', config: target, domains: ALL_DOMAINS, minutes: quick ? 0.1 : Number(values['target-minutes']), lr: 1.5e-3 });
    await targetModel.save(targetPath);
    process.stderr.write('evaluating held-out loss per domain\n');
    const targetLoss = await heldOutLoss(targetModel, dataDir, seqLen, windows);
    const tMs = await decodeMs(targetModel);
    const dMs = await decodeMs(draftModel);
    report = {
      createdBy: 'lib/train/trainDefault.ts',
      date: new Date().toISOString(),
      minutes: 0,
      tokenizer: { vocabSize },
      target: { file: 'default-target.gguf', config: target, parameters: perTokenParams(target), domains: ALL_DOMAINS, heldOutLoss: targetLoss },
      draft: { file: 'default-draft.gguf', config: draft, parameters: perTokenParams(draft), domains: GENERAL_DOMAINS, heldOutLoss: {} },
      cost: { perTokenParamsRatio: perTokenParams(draft) / perTokenParams(target), decodeMsTarget: tMs, decodeMsDraft: dMs, decodeTimeRatio: dMs / tMs },
    };
  }
  delete report.draft.distill;
  if (distillMinutes > 0) {
    // Distil the target into the draft on general English only: the shifted domains stay unknown.
    const agreementWindows = quick ? 4 : 24;
    process.stderr.write('measuring held-out acceptance before the distillation\n');
    const agreementBefore = await heldOutAgreement(targetModel, draftModel, dataDir, seqLen, agreementWindows);
    const temperature = Number(values['distill-temperature']);
    const lr = Number(values['distill-lr']);
    const r = await distillDraft({ ...common, target: targetModel, draft: draftModel, domains: GENERAL_DOMAINS, minutes: distillMinutes, lr, temperature, loss: distillLoss });
    await draftModel.dispose();
    draftModel = r.model;
    process.stderr.write('measuring held-out acceptance after the distillation\n');
    const agreementAfter = await heldOutAgreement(targetModel, draftModel, dataDir, seqLen, agreementWindows);
    report.draft.distill = {
      date: new Date().toISOString(),
      minutes: r.minutes,
      steps: r.steps,
      teacherTokens: r.teacherTokens,
      rows: common.rows,
      seqLen,
      lr,
      temperature,
      loss: distillLoss,
      finalLoss: r.finalLoss,
      domains: GENERAL_DOMAINS,
      agreementWindows,
      agreementBefore,
      agreementAfter,
    };
    for (const x of ALL_DOMAINS)
      if (agreementAfter[x])
        process.stderr.write(`  ${x.padEnd(11)} greedy ${agreementBefore[x]!.greedy.toFixed(3)} -> ${agreementAfter[x].greedy.toFixed(3)}, T=0.8 ${agreementBefore[x]!.t08.toFixed(3)} -> ${agreementAfter[x].t08.toFixed(3)}\n`);
  }
  await draftModel.save(draftPath);
  process.stderr.write('evaluating the draft\'s held-out loss per domain\n');
  report.draft.heldOutLoss = await heldOutLoss(draftModel, dataDir, seqLen, windows);
  if (!distillOnly) {
    report.date = new Date().toISOString();
    report.minutes = (Date.now() - t0) / 60000;
  }
  const tmp = join(outDir, 'report.json.tmp');
  writeFileSync(tmp, JSON.stringify(report, null, 2) + '\n');
  renameSync(tmp, reportPath);
  const md = reportMarkdown(report);
  writeFileSync(join(outDir, 'REPORT.md'), md);
  process.stdout.write(md);
  await Promise.all([targetModel.dispose(), draftModel.dispose()]);
  return 0;
}

if (process.argv[1] && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err: unknown) => {
      process.stderr.write(`train:default: ${err instanceof Error ? err.stack ?? err.message : String(err)}\n`);
      process.exit(1);
    },
  );
}
