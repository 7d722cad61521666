// Online learning on SmolLM2-135M's code traffic with a restricted-head draft against the same
// weights with the whole head, in the same run: how many updates run, how long each takes, and
// what acceptance they buy on prompts the draft has served and on prompts it has not.
//
//   npx tsx bench/smollm2-online.ts [--draft PATH] [--target PATH] [--prompts 32] [--again 16]
//                                   [--tokens 32] [--threads 2] [--json-only] [--quick]
//
// The stream: the demo's code prompts 1..N ("first time"), then prompts 1..again ("again"); greedy,
// chain g = 4, the demo's learning settings for this vocabulary (demoDistill: lr 1e-3, top-64
// teacher, 4 epochs, an update every 4 requests), training off the decoding thread. Each prompt is
// served by both decoders and by the target alone, the order rotating per prompt, so the speedups
// are ratios of the same turns. The draft must have a restricted head (`osd train-draft
// --head-tokens`, or the committed models/smollm2-draft.gguf); the whole-head decoder runs
// draft.withHead(null).
import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { createOnlineDecoder, loadModel, setThreads, type OnlineDecoder, type UpdateEvent } from '../lib/index.js';
import { demoDistill } from '../lib/demo.js';
import { findDraft } from './smollm2.js';
import { fmtNum, formatTable, machineFacts, median, parseCommandLine, progress, writeResults } from './common.js';

const root = resolve(import.meta.dirname, '..');
const USAGE = 'usage: npx tsx bench/smollm2-online.ts [--draft PATH] [--target PATH] [--prompts 32] [--again 16] [--tokens 32] [--threads 2] [--json-only] [--quick]';

const { flags, values } = parseCommandLine({ booleans: ['quick', 'json-only'], values: ['draft', 'target', 'prompts', 'again', 'tokens', 'threads'] }, USAGE);
const quick = flags.has('quick');
const count = (name: string, fallback: number) => {
  const v = Number(values.get(name) ?? fallback);
  if (!Number.isInteger(v) || v < 1) {
    process.stderr.write(`--${name} must be an integer >= 1\n${USAGE}\n`);
    process.exit(2);
  }
  return v;
};
const nPrompts = count('prompts', quick ? 4 : 32);
const nAgain = Math.min(nPrompts, count('again', quick ? 2 : 16));
const maxTokens = count('tokens', quick ? 8 : 32);
const threads = count('threads', 2);
const targetPath = resolve(values.get('target') ?? join(root, '../shared/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'));
if (!existsSync(targetPath)) {
  process.stderr.write(`target not found: ${targetPath} (pass --target)\n`);
  process.exit(1);
}
let draftPath: string;
try {
  draftPath = findDraft(values.get('draft'));
} catch (e) {
  process.stderr.write(`${(e as Error).message}\n`);
  process.exit(1);
}

setThreads(threads);
const target = await loadModel(targetPath);
const restricted = await loadModel(draftPath);
if (restricted.info.headTokens === restricted.info.vocabSize) {
  process.stderr.write(`${draftPath}: its head scores the whole vocabulary; give a draft with a restricted head (osd train-draft --head-tokens N)\n`);
  process.exit(1);
}
const whole = await restricted.withHead(null);
const tok = target.tokenizer!;
const code = (JSON.parse(readFileSync(join(root, 'models/demo-prompts.json'), 'utf8')) as { domains: Record<string, string[]> }).domains.code!;
const stream = [...code.slice(0, nPrompts).map((p, i) => ({ text: p, segment: i < nAgain ? 'first' : 'unseen' })), ...code.slice(0, nAgain).map((p) => ({ text: p, segment: 'again' }))];
const distill = demoDistill(target.info.vocabSize);

interface Run {
  name: string;
  headTokens: number;
  dec: OnlineDecoder;
  updates: UpdateEvent[];
  rollbacks: number;
  acceptance: Record<string, number[]>;
  seconds: Record<string, number[]>;
}
const runs: Run[] = [restricted, whole].map((draft, i) => {
  const dec = createOnlineDecoder({ target, draft, strategy: { kind: 'chain', length: 4 }, distill, maxConcurrent: 1 });
  const run: Run = { name: i === 0 ? 'restricted head' : 'whole head', headTokens: draft.info.headTokens, dec, updates: [], rollbacks: 0, acceptance: {}, seconds: {} };
  dec.on('update', (e: UpdateEvent) => run.updates.push(e));
  dec.on('rollback', () => run.rollbacks++);
  dec.on('update-error', (e: { error: Error }) => progress(`${run.name}: update error: ${e.error.message}`));
  return run;
});
const targetSeconds: Record<string, number[]> = {};
const push = (m: Record<string, number[]>, k: string, v: number) => (m[k] ??= []).push(v);

// Warm-up (untimed).
const warm = Array.from(tok.encode(code[0]!.slice(0, 200)));
await target.generate({ tokens: warm, maxTokens: 4, stopTokens: [] });
const t0All = performance.now();
for (const [i, item] of stream.entries()) {
  const tokens = Array.from(tok.encode(item.text.slice(0, 600)));
  const order = ['target', ...runs.map((r) => r.name)];
  for (let j = 0; j < order.length; j++) {
    const who = order[(i + j) % order.length]!;
    const t0 = performance.now();
    if (who === 'target') {
      await target.generate({ tokens, maxTokens, stopTokens: [] });
      push(targetSeconds, item.segment, (performance.now() - t0) / 1000);
    } else {
      const run = runs.find((r) => r.name === who)!;
      const r = await run.dec.generate({ tokens, maxTokens, stopTokens: [] });
      push(run.seconds, item.segment, (performance.now() - t0) / 1000);
      push(run.acceptance, item.segment, r.stats.acceptanceRate);
    }
  }
  if (!flags.has('json-only')) progress(`request ${i + 1}/${stream.length} (${item.segment}): ${runs.map((r) => `${r.name} ${r.updates.length} updates`).join(', ')}`);
}
const wallSeconds = (performance.now() - t0All) / 1000;
for (const r of runs) await r.dec.dispose();

const mean = (xs: number[] = []) => (xs.length ? xs.reduce((a, b) => a + b, 0) / xs.length : NaN);
const sum = (xs: number[] = []) => xs.reduce((a, b) => a + b, 0);
const segments = ['first', 'unseen', 'again'].filter((s) => targetSeconds[s]);
const rows = runs.map((r) => ({
  run: r.name,
  headTokens: r.headTokens,
  updates: r.updates.length,
  rollbacks: r.rollbacks,
  updateMsMedian: median(r.updates.map((u) => u.durationMs)),
  updateMsPerPosition: median(r.updates.map((u) => u.durationMs / Math.max(1, u.positions * u.steps))),
  acceptance: Object.fromEntries(segments.map((s) => [s, mean(r.acceptance[s])])),
  // Same turns: the target alone's time over this run's time, per segment.
  speedup: Object.fromEntries(segments.map((s) => [s, sum(targetSeconds[s]) / sum(r.seconds[s])])),
}));
const summary = [
  `update time, restricted over whole head (medians): ${fmtNum(rows[0]!.updateMsMedian / rows[1]!.updateMsMedian)}x; per position and step ${fmtNum(rows[0]!.updateMsPerPosition / rows[1]!.updateMsPerPosition)}x`,
  `updates run: ${rows[0]!.updates} restricted, ${rows[1]!.updates} whole head (${stream.length} requests)`,
  ...segments.map((s) => `${s}: acceptance ${fmtNum(rows[0]!.acceptance[s])} restricted vs ${fmtNum(rows[1]!.acceptance[s])} whole; speedup over target-only ${fmtNum(rows[0]!.speedup[s])}x vs ${fmtNum(rows[1]!.speedup[s])}x`),
];
const out = writeResults('smollm2-online', {
  machine: machineFacts(),
  target: targetPath,
  draft: draftPath,
  settings: { prompts: nPrompts, again: nAgain, tokens: maxTokens, threads, distill, strategy: { kind: 'chain', length: 4 } },
  wallSeconds,
  rows,
  updates: Object.fromEntries(runs.map((r) => [r.name, r.updates])),
  summary,
});
if (!flags.has('json-only')) {
  process.stdout.write(
    `\n${targetPath.split('/').pop()} + ${draftPath.split('/').pop()}: ${stream.length} code requests of ${maxTokens} greedy tokens, chain g = 4, ${threads} threads\n\n` +
      formatTable<(typeof rows)[number]>(
        [
          { header: 'run', align: 'left', value: (r) => r.run },
          { header: 'head ids', value: (r) => String(r.headTokens) },
          { header: 'updates', value: (r) => `${r.updates} (${r.rollbacks} rolled back)` },
          { header: 'update ms (median)', value: (r) => fmtNum(r.updateMsMedian, 0) },
          ...segments.map((s) => ({ header: `acceptance ${s}`, value: (r: (typeof rows)[number]) => fmtNum(r.acceptance[s]) })),
          ...segments.map((s) => ({ header: `speedup ${s}`, value: (r: (typeof rows)[number]) => `${fmtNum(r.speedup[s])}x` })),
        ],
        rows,
      ) +
      `\n\n${summary.join('\n')}\nresults: ${out.latest}\n`,
  );
}
await Promise.all([target.dispose(), restricted.dispose(), whole.dispose()]);
