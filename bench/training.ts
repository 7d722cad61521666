// Training speed: tokens/s of the default target's config with the matrix products' GFLOP/s as a
// ratio to a same-run peak-FLOP probe, and the cost of one online distillation step (8 records of
// 128 tokens, sparse top-32 teacher) as a ratio to one target decode step.
//
//   npx tsx bench/training.ts [--quick] [--threads N]
import { existsSync } from 'node:fs';
import { createTrainer, flopsProbe, loadModel, setThreads, type TrainBatch } from '../lib/index.js';
import { DEFAULT_DRAFT, DEFAULT_TARGET } from '../lib/demo.js';
import { decodeMs, DRAFT_CONFIG, perTokenParams, TARGET_CONFIG, XorShift } from '../lib/train/trainDefault.js';
import { fmtNum, formatTable, machineFacts, parseArgs, progress, writeResults } from './common.js';

const { flags, values } = parseArgs(process.argv.slice(2), { booleans: ['quick', 'json-only'], values: ['threads'] });
if (values.has('threads')) setThreads(Number(values.get('threads')));
const quick = flags.has('quick');
const V = 4096;

function ceBatch(rows: number, T: number, rng: XorShift): TrainBatch {
  const tokens = new Int32Array(rows * T).map(() => Math.floor(rng.next() * V));
  const targets = new Int32Array(rows * T).map(() => Math.floor(rng.next() * V));
  return { tokens, targets, batchSize: rows, seqLen: T };
}

async function main(): Promise<void> {
  const peak = flopsProbe({ iterations: 3 }).flopsPerSecond;
  const rng = new XorShift(7);
  const rows: { what: string; value: string; ratio: string }[] = [];
  // 1. Pre-training throughput of the target config.
  const target = { ...TARGET_CONFIG, vocabSize: V };
  const trainer = await createTrainer({ config: target, seed: 1 }, { lr: 1e-3 });
  const B = quick ? 2 : 8;
  const T = 128;
  await trainer.step(ceBatch(B, T, rng)); // warm-up
  const steps = quick ? 2 : 5;
  const t0 = performance.now();
  for (let i = 0; i < steps; i++) await trainer.step(ceBatch(B, T, rng));
  const secs = (performance.now() - t0) / 1000;
  const tps = (steps * B * T) / secs;
  // Forward 2N + backward 4N FLOPs per token for N matrix parameters (attention excluded).
  const flops = 6 * perTokenParams(target) * tps;
  await trainer.dispose();
  rows.push({ what: `train target (${(perTokenParams(target) / 1e6).toFixed(2)}M matrix params), tokens/s`, value: fmtNum(tps), ratio: '' });
  rows.push({ what: 'matrix GFLOP/s vs peak-FLOP probe', value: fmtNum(flops / 1e9), ratio: fmtNum(flops / peak) });
  progress(`training: ${fmtNum(tps)} tokens/s, ${fmtNum(flops / 1e9)} GFLOP/s (${fmtNum(flops / peak)} of peak ${fmtNum(peak / 1e9)})`);

  // 2. One online distillation step on 8 records of 128 tokens, against one target decode step.
  const haveDefault = existsSync(DEFAULT_TARGET) && existsSync(DEFAULT_DRAFT);
  const targetModel = haveDefault ? await loadModel(DEFAULT_TARGET) : undefined;
  const draftTrainer = haveDefault
    ? await createTrainer(await loadModel(DEFAULT_DRAFT), { lr: 1e-4 })
    : await createTrainer({ config: { ...DRAFT_CONFIG, vocabSize: V }, seed: 2 }, { lr: 1e-4 });
  const k = 32;
  const n = 8 * 128;
  const batch: TrainBatch = {
    tokens: new Int32Array(n).map(() => Math.floor(rng.next() * V)),
    batchSize: 8,
    seqLen: 128,
    mask: new Uint8Array(n).map(() => (rng.next() < 0.25 ? 1 : 0)),
    teacher: {
      indices: new Int32Array(n * k).map((_, i) => (i % k) * 97 + (Math.floor(i / k) % 50)),
      probs: new Float32Array(n * k).fill(0.9 / k),
    },
  };
  await draftTrainer.step(batch);
  const d0 = performance.now();
  const reps = quick ? 2 : 5;
  for (let i = 0; i < reps; i++) await draftTrainer.step(batch);
  const stepMs = (performance.now() - d0) / reps;
  await draftTrainer.dispose();
  let decode = NaN;
  if (targetModel) {
    decode = await decodeMs(targetModel);
    await targetModel.dispose();
  }
  rows.push({ what: 'distillation step, 8 x 128 tokens (ms)', value: fmtNum(stepMs), ratio: Number.isFinite(decode) ? `${fmtNum(stepMs / decode)} target decode steps` : 'n/a (no default target)' });
  const table = formatTable(
    [
      { header: 'measure', align: 'left', value: (r: (typeof rows)[number]) => r.what },
      { header: 'value', value: (r: (typeof rows)[number]) => r.value },
      { header: 'ratio', align: 'left', value: (r: (typeof rows)[number]) => r.ratio },
    ],
    rows,
  );
  const result = { machine: machineFacts(), peakFlops: peak, tokensPerSecond: tps, matrixFlops: flops, distillStepMs: stepMs, targetDecodeMs: decode, rows };
  const out = writeResults('training', result);
  if (!flags.has('json-only')) process.stdout.write(`${table}\nresults: ${out.latest}\n`);
  else process.stdout.write(JSON.stringify(result, null, 2) + '\n');
}

main().catch((e: unknown) => {
  process.stderr.write(`bench/training: ${e instanceof Error ? e.stack : String(e)}\n`);
  process.exit(1);
});
