// Requests in flight sharing each pass (the decoder's `batching`): tokens per second of c concurrent
// requests with batching on and off, taking turns in the same run, beside target-only decoding of
// one stream and the read probe. Every request's tokens must be the same either way (checked here
// too; the tests check it bit for bit).
//
//   npx tsx bench/batching.ts [--quick] [--tokens N] [--rounds R] [--concurrency 1,2,4,8]
//                             [--samplings greedy,T=0.8] [--pairs default,smollm2,big]
//                             [--target PATH --draft PATH] [--threads N] [--json-only]
//
// --pairs (default: default): the default pair; smollm2, SmolLM2-135M Q4_1 with its draft (as
// bench/smollm2.ts finds it); big, a random 210M-parameter Q4_0 target (memory-bound, as larger
// models are) with a random draft (acceptance near 0: it measures the passes, not the draft).
// --target and --draft run that pair instead.
// Chain g = 4, as the server's default.
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chainBatchStats, createSpeculativeDecoder, loadModel, setThreads, writeRandomModel, type Model, type SamplingOptions } from '../lib/index.js';
import { DEFAULT_DRAFT, DEFAULT_PROMPTS, DEFAULT_TARGET } from '../lib/demo.js';
import { fmtNum, formatTable, machineFacts, parseArgs, probeBandwidth, progress, writeResults } from './common.js';
import { SMOLLM2_TARGET, findDraft } from './smollm2.js';

const { flags, values } = parseArgs(process.argv.slice(2), {
  booleans: ['quick', 'json-only'],
  values: ['tokens', 'rounds', 'concurrency', 'samplings', 'pairs', 'target', 'draft', 'threads'],
});
const quick = flags.has('quick');
if (values.has('threads')) setThreads(Number(values.get('threads')));
const maxTokens = Number(values.get('tokens') ?? (quick ? 24 : 64));
const rounds = Number(values.get('rounds') ?? (quick ? 2 : 4)); // requests per client, per turn
const concurrency = (values.get('concurrency') ?? (quick ? '1,4' : '1,2,4,8')).split(',').map(Number);
for (const c of concurrency) if (!Number.isInteger(c) || c < 1) throw new RangeError(`--concurrency: ${c} is not a positive integer`);
const ALL_SAMPLINGS: { name: string; sampling: SamplingOptions }[] = [
  { name: 'greedy', sampling: { temperature: 0 } },
  { name: 'T=0.8', sampling: { temperature: 0.8 } },
];
const wanted = values.get('samplings')?.split(',');
for (const n of wanted ?? []) if (!ALL_SAMPLINGS.some((s) => s.name === n)) throw new RangeError(`--samplings: unknown name '${n}' (known: greedy, T=0.8)`);
const SAMPLINGS = ALL_SAMPLINGS.filter((s) => !wanted || wanted.includes(s.name));
if ((values.has('target') || values.has('draft')) && !(values.has('target') && values.has('draft'))) throw new RangeError('--target and --draft go together');

const pairNames = (values.get('pairs') ?? 'default').split(',');
for (const n of pairNames) if (!['default', 'smollm2', 'big'].includes(n)) throw new RangeError(`--pairs: unknown pair '${n}' (known: default, smollm2, big)`);
const pairs: { name: string; target: string; draft: string }[] = [];
let tmp: string | undefined;
if (values.has('target')) pairs.push({ name: 'given', target: values.get('target')!, draft: values.get('draft')! });
else {
  if (pairNames.includes('default')) pairs.push({ name: 'default pair', target: DEFAULT_TARGET, draft: DEFAULT_DRAFT });
  if (pairNames.includes('smollm2')) {
    if (!existsSync(SMOLLM2_TARGET)) throw new Error(`--pairs smollm2 needs ${SMOLLM2_TARGET}`);
    pairs.push({ name: 'SmolLM2-135M Q4_1', target: SMOLLM2_TARGET, draft: findDraft() });
  }
  if (pairNames.includes('big')) {
    tmp = mkdtempSync(join(tmpdir(), 'osd-bench-batching-'));
    progress('writing a random 210M-parameter Q4_0 target and a random draft');
    const big = { target: join(tmp, 'target.gguf'), draft: join(tmp, 'draft.gguf') };
    await writeRandomModel(big.target, { vocabSize: 32000, embeddingLength: 1024, layers: 16, heads: 16, kvHeads: 4, feedForwardLength: 2816, contextLength: 1024, type: 'Q4_0', seed: 1 });
    await writeRandomModel(big.draft, { vocabSize: 32000, embeddingLength: 256, layers: 2, heads: 4, kvHeads: 2, feedForwardLength: 704, contextLength: 1024, type: 'F16', seed: 2 });
    pairs.push({ name: 'random 210M Q4_0', ...big });
  }
}

const prompts: string[] = Object.values((JSON.parse(readFileSync(DEFAULT_PROMPTS, 'utf8')) as { domains: Record<string, string[]> }).domains).flat();

interface Row {
  pair: string;
  sampling: string;
  concurrency: number;
  /** Tokens per second over all requests, batching off and on (the same turns). */
  off: number;
  on: number;
  /** on / off. */
  gain: number;
  /** Target-only decoding of one stream, tokens per second (same prompts). */
  targetOnly: number;
  /** on / targetOnly: what batched speculation serves against one plain stream. */
  onOverTargetOnly: number;
  /** Requests per batched step, mean. */
  meanBatch: number;
  /** Every request's tokens were the same with batching on and off. */
  identical: boolean;
}

async function measure(pairName: string, target: Model, draft: Model): Promise<Row[]> {
  const rows: Row[] = [];
  // Text prompts where the target has a tokenizer; 16 token ids per request where it has none.
  const prompt = (k: number) => (target.tokenizer ? { prompt: prompts[k % prompts.length]! } : { tokens: Array.from({ length: 16 }, (_, i) => (1 + k * 7919 + i * 104729) % target.info.vocabSize) });
  for (const s of SAMPLINGS) {
    const request = (k: number) => ({ ...prompt(k), maxTokens, sampling: s.sampling, seed: 1 + k, stopTokens: [] as number[] });
    // Target-only decoding, one stream: the same prompts as concurrency 1 takes.
    await target.generate({ ...request(0), maxTokens: 4 });
    let plainMs = 0;
    let plainTokens = 0;
    for (let k = 0; k < rounds; k++) {
      const t0 = performance.now();
      plainTokens += (await target.generate(request(k))).tokens.length;
      plainMs += performance.now() - t0;
    }
    const targetOnly = (1000 * plainTokens) / plainMs;
    for (const c of concurrency) {
      const decs = [false, true].map((batching) => createSpeculativeDecoder({ target, draft, strategy: { kind: 'chain', length: 4 }, maxConcurrent: c, batching }));
      await Promise.all(decs.map((d) => d.generate({ ...request(0), maxTokens: 4 })));
      const ms = [0, 0];
      const tokens = [0, 0];
      const outputs: string[][] = [[], []];
      let steps = 0;
      let runs = 0;
      // Each mode serves rounds * c requests with c clients, each starting its next request when
      // one ends (as a loaded server sees them); off and on take turns, twice each.
      const total = rounds * c;
      for (const mode of [0, 1, 1, 0]) {
        const before = chainBatchStats();
        const t0 = performance.now();
        let next = 0;
        await Promise.all(
          Array.from({ length: c }, async () => {
            for (let k = next++; k < total; k = next++) {
              const x = await decs[mode]!.generate(request(k));
              tokens[mode]! += x.tokens.length;
              outputs[mode]![k] = Array.from(x.tokens).join(',');
            }
          }),
        );
        ms[mode]! += performance.now() - t0;
        const after = chainBatchStats();
        if (mode === 1) (steps += after.steps - before.steps), (runs += after.runs - before.runs);
      }
      await Promise.all(decs.map((d) => d.dispose()));
      const off = (1000 * tokens[0]!) / ms[0]!;
      const on = (1000 * tokens[1]!) / ms[1]!;
      rows.push({
        pair: pairName,
        sampling: s.name,
        concurrency: c,
        off,
        on,
        gain: on / off,
        targetOnly,
        onOverTargetOnly: on / targetOnly,
        meanBatch: steps ? runs / steps : 0,
        identical: outputs[0]!.every((o, i) => o === outputs[1]![i]),
      });
      progress(`${pairName} ${s.name} c=${c}: off ${fmtNum(off)} tok/s, on ${fmtNum(on)} tok/s (x${fmtNum(on / off)}), mean batch ${fmtNum(steps ? runs / steps : 0)}`);
    }
  }
  return rows;
}

const probeStart = probeBandwidth();
const rows: Row[] = [];
for (const p of pairs) {
  const [target, draft] = await Promise.all([loadModel(p.target), loadModel(p.draft)]);
  rows.push(...(await measure(p.name, target, draft)));
  await Promise.all([target.dispose(), draft.dispose()]);
}
const probeEnd = probeBandwidth();
if (tmp) rmSync(tmp, { recursive: true, force: true });
const readProbe = Math.max(probeStart.readGBs, probeEnd.readGBs);

const table = formatTable<Row>(
  [
    { header: 'pair', align: 'left', value: (r) => r.pair },
    { header: 'sampling', align: 'left', value: (r) => r.sampling },
    { header: 'requests', value: (r) => String(r.concurrency) },
    { header: 'tok/s off', value: (r) => fmtNum(r.off) },
    { header: 'tok/s on', value: (r) => fmtNum(r.on) },
    { header: 'on/off', value: (r) => `${fmtNum(r.gain)}x` },
    { header: 'on / target-only 1 stream', value: (r) => `${fmtNum(r.onOverTargetOnly)}x` },
    { header: 'mean batch', value: (r) => fmtNum(r.meanBatch) },
    { header: 'same tokens', value: (r) => (r.identical ? 'yes' : 'NO') },
  ],
  rows,
);
const result = {
  bench: 'batching',
  machine: machineFacts(),
  settings: { maxTokens, rounds, concurrency, samplings: SAMPLINGS.map((s) => s.name), strategy: 'chain g=4', pairs },
  probe: { readGBps: readProbe, start: probeStart, end: probeEnd },
  rows,
};
const files = writeResults('batching', result);
if (flags.has('json-only')) process.stdout.write(JSON.stringify(result, null, 2) + '\n');
else {
  process.stdout.write(`read probe ${fmtNum(readProbe)} GB/s; chain g=4, ${maxTokens} tokens per request, ${rounds} rounds\n\n${table}\n`);
  if (rows.some((r) => !r.identical)) process.stdout.write('\nNOT IDENTICAL: some request gave other tokens with batching on\n');
  process.stdout.write(`\nJSON: ${files.latest}\n`);
}
