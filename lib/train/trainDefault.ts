// Trains the project's own default model pair from scratch (npm run train:default):
//
//   npx tsx lib/train/trainDefault.ts [--data data] [--out models] [--target-minutes 60]
//                                     [--draft-minutes 10] [--seed 1] [--quick]
//
// - the data and the byte-level BPE tokenizer come from lib/train/prepareData.ts (run if missing);
// - the target (about 5.4M parameters) trains on every domain;
// - the draft (about 0.35M parameters, under a tenth of the target's per-token FLOPs) trains on the
//   general-English domains only (speeches, novel, definitions), so it is weak on code, SQL and
//   email: the gap online distillation has to close;
// - both are written as GGUF (tokenizer included) with a report of held-out loss per domain.
// Training checkpoints go to <out>/.checkpoints and a run can be resumed with --resume.
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { loadModel, type Model } from '../Model.js';
import { createTrainer, loadTrainerCheckpoint, type Trainer, type TrainBatch } from '../Trainer.js';
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

/** Trains one model for a time budget (cosine schedule sized from the measured step time). */
export async function trainOne(o: TrainRunOptions): Promise<Model> {
  const ckptDir = join(o.outDir, '.checkpoints');
  mkdirSync(ckptDir, { recursive: true });
  const ckpt = join(ckptDir, `${o.name}.ckpt.gguf`);
  const shards = loadShards(o.dataDir, o.domains, 'train');
  if (shards.size === 0) throw new Error(`no training shards for ${o.domains.join(', ')} in ${o.dataDir}`);
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
  const bar = new ProgressBar(o.name.padEnd(6));
  const started = Date.now();
  const budgetMs = o.minutes * 60_000;
  let lossEma = NaN;
  let tokens = 0;
  let sized = false;
  let lastSave = Date.now();
  for (;;) {
    const elapsed = Date.now() - started;
    if (elapsed >= budgetMs) break;
    const r = await trainer.step(sampleBatch(shards, o.rows, o.seqLen, rng));
    tokens += o.rows * o.seqLen;
    lossEma = Number.isNaN(lossEma) ? r.loss : 0.95 * lossEma + 0.05 * r.loss;
    // Size the cosine schedule to the time budget once the step time is known.
    if (!sized && r.step >= 5) {
      const perStep = (Date.now() - started) / 5;
      trainer.configure({ totalSteps: trainer.steps + Math.max(10, Math.floor((budgetMs - (Date.now() - started)) / perStep)) });
      sized = true;
    }
    const secs = (Date.now() - started) / 1000;
    bar.update(elapsed / budgetMs, `step ${r.step} loss ${lossEma.toFixed(3)} lr ${r.lr.toExponential(1)} ${(tokens / secs).toFixed(0)} tok/s ETA ${formatTime(Math.max(0, (budgetMs - elapsed) / 1000))}`);
    if (Date.now() - lastSave > 5 * 60_000) {
      await trainer.save(ckpt);
      lastSave = Date.now();
    }
  }
  await trainer.save(ckpt);
  bar.done(`steps ${trainer.steps} loss ${lossEma.toFixed(3)} ${(tokens / ((Date.now() - started) / 1000)).toFixed(0)} tok/s`);
  const model = await trainer.snapshot();
  await trainer.dispose();
  return model;
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

async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      data: { type: 'string', default: 'data' },
      out: { type: 'string', default: 'models' },
      'target-minutes': { type: 'string', default: '60' },
      'draft-minutes': { type: 'string', default: '10' },
      seed: { type: 'string', default: '1' },
      resume: { type: 'boolean', default: false },
      quick: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write('Usage: npx tsx lib/train/trainDefault.ts [--data data] [--out models] [--target-minutes 60] [--draft-minutes 10] [--seed 1] [--resume] [--quick]\n');
    return 0;
  }
  const dataDir = resolve(values.data!);
  const outDir = resolve(values.out!);
  const quick = values.quick!;
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
  const t0 = Date.now();
  const draftModel = await trainOne({ ...common, name: 'draft', config: draft, domains: GENERAL_DOMAINS, minutes: quick ? 0.1 : Number(values['draft-minutes']), lr: 3e-3 });
  const targetModel = await trainOne({ ...common, name: 'target', config: target, domains: ALL_DOMAINS, minutes: quick ? 0.1 : Number(values['target-minutes']), lr: 1.5e-3 });
  const targetPath = join(outDir, 'default-target.gguf');
  const draftPath = join(outDir, 'default-draft.gguf');
  await targetModel.save(targetPath);
  await draftModel.save(draftPath);
  process.stderr.write('evaluating held-out loss per domain\n');
  const windows = quick ? 8 : 96;
  const targetLoss = await heldOutLoss(targetModel, dataDir, seqLen, windows);
  const draftLoss = await heldOutLoss(draftModel, dataDir, seqLen, windows);
  const tMs = await decodeMs(targetModel);
  const dMs = await decodeMs(draftModel);
  const report = {
    createdBy: 'lib/train/trainDefault.ts',
    date: new Date().toISOString(),
    minutes: (Date.now() - t0) / 60000,
    tokenizer: { vocabSize },
    target: { file: 'default-target.gguf', config: target, parameters: perTokenParams(target) + target.vocabSize * 0, domains: ALL_DOMAINS, heldOutLoss: targetLoss },
    draft: { file: 'default-draft.gguf', config: draft, parameters: perTokenParams(draft), domains: GENERAL_DOMAINS, heldOutLoss: draftLoss },
    cost: {
      perTokenParamsRatio: perTokenParams(draft) / perTokenParams(target),
      decodeMsTarget: tMs,
      decodeMsDraft: dMs,
      decodeTimeRatio: dMs / tMs,
    },
  };
  const tmp = join(outDir, 'report.json.tmp');
  writeFileSync(tmp, JSON.stringify(report, null, 2) + '\n');
  renameSync(tmp, join(outDir, 'report.json'));
  const rows = ALL_DOMAINS.filter((d) => d in targetLoss).map(
    (d) => `| ${d} | ${targetLoss[d]!.toFixed(3)} | ${draftLoss[d]!.toFixed(3)} | ${(draftLoss[d]! - targetLoss[d]!).toFixed(3)} |`,
  );
  const md = [
    '# Default model pair: training report',
    '',
    `Produced by \`npm run train:default\` (lib/train/trainDefault.ts) on ${report.date.slice(0, 10)} in ${report.minutes.toFixed(0)} minutes.`,
    '',
    `- Tokenizer: byte-level BPE, ${vocabSize} tokens, trained by lib/train/bpe.ts on all six domains.`,
    `- Target: ${JSON.stringify(target)}, trained on all domains.`,
    `- Draft: ${JSON.stringify(draft)}, trained on general English only (speeches, novel, definitions).`,
    `- Per-token cost, draft / target: ${report.cost.perTokenParamsRatio.toFixed(3)} in matrix parameters (FLOPs), ${report.cost.decodeTimeRatio.toFixed(3)} in measured decode time on the machine that trained them.`,
    '',
    'Held-out cross-entropy (nats per token) per domain:',
    '',
    '| domain | target | draft | draft - target |',
    '| --- | --- | --- | --- |',
    ...rows,
    '',
  ].join('\n');
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
