// Builds a draft for SmolLM2-135M by distillation (npm run train:smollm2-draft):
//
//   npx tsx lib/train/smollm2Draft.ts [--target <gguf>] [--out models] [--work data/smollm2]
//       [--phase all|cost|init|train|eval|report] [--minutes 60] [--dim 128] [--layers 2] [--ff 384]
//       [--heads 4] [--kv-heads 2] [--rows 8] [--seq-len 128] [--top-k 64] [--replay 3]
//       [--lr 1.5e-3] [--prompts 6] [--max-tokens 48] [--threads 2] [--type F16] [--from <gguf>] [--resume]
//       [--head-tokens N] [--domains speeches,novel,definitions] [--quick]
//
// - cost: times single-token decode of candidate draft shapes (random weights, F16) against the
//   target in the same run and prints the ratio c = draft ms / target ms.
// - init: a narrow llama with tied embeddings, initialised from the truncated SVD of the target's
//   token embeddings (the top-`dim` right singular vectors of E: E' = E Q); layers random.
// - train: the target's own logits are the teacher (top-k + residual, forward KL), on general
//   English only (speeches, novel, definitions) tokenized with SmolLM2's tokenizer; code, SQL and
//   email stay unknown to the draft. Each teacher batch is trained on once fresh and replayed
//   `replay - 1` times from an in-memory buffer (the teacher costs ~7x a draft step).
//   --domains trains on other domains' text instead (any of speeches, novel, definitions, code, sql,
//   email; the held-out curve is the first's): `--from` a draft `--domains code` specialises it,
//   and the eval then also measures the --from draft, before and after side by side.
//   Checkpoints (atomic) go to <work>/checkpoints; --resume continues from the last one, and
//   --from <gguf> starts from that draft instead of the init (a new optimizer and schedule; with
//   more --layers than it has, it grows blocks that start as no-ops).
//   The loop itself is the package's trainDraft (lib/train/draft.ts, `osd train-draft`).
//   --head-tokens N restricts the draft's head to the N ids most frequent over all six domains'
//   training text (code, SQL and email included, so that online learning there has the ids it
//   needs): the 49,152-row head is most of the draft's cost. Held-out KL is then taken over the
//   head's ids (the teacher renormalised there), so it is not comparable with a full head's.
// - eval: held-out acceptance per domain with createSpeculativeDecoder (chain g = 4, greedy and
//   T = 0.8), written with the cost and the training curve to <out>/smollm2-draft.report.json and
//   .md. The draft is <out>/smollm2-draft.gguf, its matrices stored as --type (F16 by default;
//   Q8_0 halves the bytes a draft token reads, see the cost phase).
// - report: rewrites the .md from the .json (each phase keeps the other phases' sections).
// Progress: a bar redrawn in place on a terminal, a line every 15 s otherwise.
import { existsSync, mkdirSync, readFileSync, renameSync, statSync, writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { loadModel, writeRandomModel, type Model, type StoreType } from '../Model.js';
import { createSpeculativeDecoder } from '../SpeculativeDecoder.js';
import type { Tokenizer } from '../Tokenizer.js';
import { ALL_DOMAINS, GENERAL_DOMAINS, loadCorpora, type Domain } from './corpus.js';
import { DEFAULT_DRAFT_SHAPE, frequentTokens, heldOutWindows, trainDraft, writeDraftInit, type DraftShape } from './draft.js';
import { readGgufLayout } from './ggufRewrite.js';
import { ProgressBar } from './trainDefault.js';

export const DEFAULT_TARGET = 'shared/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf';

export const DRAFT_SHAPE: DraftShape = { ...DEFAULT_DRAFT_SHAPE, contextLength: 2048 };

const log = (line: string) => process.stderr.write(`[smollm2-draft] ${line}\n`);

// ---- cost -----------------------------------------------------------------------------------------

export interface CostRow {
  name: string;
  shape: DraftShape;
  type: StoreType;
  weightBytesPerToken: number;
  decodeMs: number;
  c: number;
}

/** Candidate shapes: narrow llamas with the full 49,152-token head, and the target's width with 2 of its layers. */
export const COST_CANDIDATES: Array<{ name: string; shape: DraftShape; type: StoreType }> = [
  { name: 'd64 L2', shape: { embeddingLength: 64, layers: 2, heads: 2, kvHeads: 1, feedForwardLength: 192, contextLength: 2048 }, type: 'F16' },
  { name: 'd128 L2', shape: DRAFT_SHAPE, type: 'F16' },
  { name: 'd128 L2 (F32)', shape: DRAFT_SHAPE, type: 'F32' },
  { name: 'd128 L2 (Q8_0)', shape: DRAFT_SHAPE, type: 'Q8_0' },
  { name: 'd128 L4', shape: { ...DRAFT_SHAPE, layers: 4 }, type: 'F16' },
  { name: 'd128 L4 (Q8_0)', shape: { ...DRAFT_SHAPE, layers: 4 }, type: 'Q8_0' },
  { name: 'd192 L2', shape: { embeddingLength: 192, layers: 2, heads: 6, kvHeads: 2, feedForwardLength: 512, contextLength: 2048 }, type: 'F16' },
  { name: 'd256 L2', shape: { embeddingLength: 256, layers: 2, heads: 8, kvHeads: 4, feedForwardLength: 688, contextLength: 2048 }, type: 'F16' },
  { name: 'd256 L2 (Q8_0)', shape: { embeddingLength: 256, layers: 2, heads: 8, kvHeads: 4, feedForwardLength: 704, contextLength: 2048 }, type: 'Q8_0' },
  { name: 'd576 L2 (target width)', shape: { embeddingLength: 576, layers: 2, heads: 9, kvHeads: 3, feedForwardLength: 1536, contextLength: 2048 }, type: 'F16' },
];

/**
 * Median single-token decode time of each model, in interleaved rounds (each model decodes `steps`
 * tokens per round, in turn), so a change of load hits them alike.
 */
export async function medianDecodeMs(models: Model[], rounds: number, steps: number): Promise<number[]> {
  const times: number[][] = models.map(() => []);
  const seqs = models.map((m) => m.createSequence({ contextSize: 512 }));
  try {
    for (const s of seqs) await s.evaluate([1, 2, 3, 4]);
    for (let r = 0; r < rounds; r++)
      for (const [i, s] of seqs.entries()) {
        if (s.length + steps >= 512) s.truncate(4);
        for (let k = 0; k < steps; k++) {
          const t0 = performance.now();
          await s.evaluate([(r * 131 + k * 31 + 7) % 2000]);
          times[i]!.push(performance.now() - t0);
        }
      }
  } finally {
    for (const s of seqs) await s.dispose();
  }
  return times.map((a) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)]!);
}

/** Decode-time ratio of each candidate to the target, timed in interleaved rounds in one run. */
export async function measureCost(target: Model, candidates = COST_CANDIDATES, rounds = 6, stepsPerRound = 12): Promise<{ targetMs: number; rows: CostRow[] }> {
  const dir = mkdtempSync(join(tmpdir(), 'osd-smoldraft-cost-'));
  const V = target.info.vocabSize;
  const models: Model[] = [];
  try {
    for (const [i, c] of candidates.entries()) {
      const p = join(dir, `c${i}.gguf`);
      await writeRandomModel(p, { ...c.shape, vocabSize: V, type: c.type, seed: i + 1 });
      models.push(await loadModel(p));
    }
    const [targetMs = NaN, ...ms] = await medianDecodeMs([target, ...models], rounds, stepsPerRound);
    const rows = candidates.map((c, i) => ({
      name: c.name,
      shape: c.shape,
      type: c.type,
      weightBytesPerToken: models[i]!.info.weightBytesPerToken,
      decodeMs: ms[i]!,
      c: ms[i]! / targetMs,
    }));
    return { targetMs, rows };
  } finally {
    await Promise.all(models.map((m) => m.dispose()));
    rmSync(dir, { recursive: true, force: true });
  }
}

// ---- data -----------------------------------------------------------------------------------------

/** Token ids of every domain's splits with the target's tokenizer: <|endoftext|> before each document. Cached in `work`. */
export function tokenizeDomains(tok: Tokenizer, work: string, capMB: number, domains: readonly Domain[] = ALL_DOMAINS): Map<string, Uint16Array> {
  const out = new Map<string, Uint16Array>();
  const missing = domains.filter((d) => !existsSync(join(work, `${d}.train.u16`)) || !existsSync(join(work, `${d}.heldout.u16`)));
  if (missing.length) {
    const eot = Math.max(0, tok.findToken('<|endoftext|>'));
    const { corpora, missing: absent } = loadCorpora(missing, { capMB });
    for (const m of absent) log(`skipping ${m.domain}: ${m.reason}`);
    for (const c of corpora) {
      for (const [split, docs] of [['train', c.train], ['heldout', c.heldOut]] as const) {
        const parts: number[] = [];
        for (const d of docs) {
          parts.push(eot);
          for (const t of tok.encode(d.text, { addBos: false })) parts.push(t);
        }
        parts.push(eot);
        const ids = Uint16Array.from(parts);
        const file = join(work, `${c.domain}.${split}.u16`);
        writeFileSync(file + '.tmp', ids);
        renameSync(file + '.tmp', file);
        log(`tokenized ${c.domain} ${split}: ${docs.length} docs, ${ids.length} tokens`);
      }
    }
  }
  for (const d of domains)
    for (const split of ['train', 'heldout'])
      if (existsSync(join(work, `${d}.${split}.u16`))) {
        const b = readFileSync(join(work, `${d}.${split}.u16`));
        out.set(`${d}.${split}`, new Uint16Array(b.buffer, b.byteOffset, b.byteLength / 2));
      }
  return out;
}

// ---- acceptance -----------------------------------------------------------------------------------

export interface AcceptanceRow {
  domain: string;
  prompts: number;
  /** acceptance = accepted / drafted; firstToken = how often the first drafted token was accepted. */
  greedy: { acceptance: number; tokensPerStep: number; firstToken?: number };
  sampled: { acceptance: number; tokensPerStep: number; firstToken?: number };
}

/** Held-out acceptance of `draft` against `target` per domain: chain g = 4, greedy and T = 0.8. */
export async function measureAcceptance(target: Model, draft: Model, heldOut: Map<string, Uint16Array>, prompts: number, promptLen: number, maxTokens: number, onRow?: (r: AcceptanceRow) => void): Promise<AcceptanceRow[]> {
  const dec = createSpeculativeDecoder({ target, draft, strategy: { kind: 'chain', length: 4 }, maxConcurrent: 1 });
  const rows: AcceptanceRow[] = [];
  for (const [domain, shard] of heldOut) {
    const acc = { greedy: { d: 0, a: 0, tok: 0, steps: 0, first: 0 }, sampled: { d: 0, a: 0, tok: 0, steps: 0, first: 0 } };
    const windows = heldOutWindows(shard, prompts, promptLen);
    const n = windows.length / promptLen;
    for (let i = 0; i < n; i++) {
      const tokens = windows.subarray(i * promptLen, (i + 1) * promptLen);
      for (const mode of ['greedy', 'sampled'] as const) {
        const r = await dec.generate({ tokens, maxTokens, sampling: { temperature: mode === 'greedy' ? 0 : 0.8 }, seed: 1, stream: i, stopTokens: [] });
        const s = acc[mode];
        s.d += r.stats.drafted;
        s.a += r.stats.accepted;
        s.tok += r.stats.tokens;
        s.steps += r.stats.targetPasses;
        s.first += (r.stats.acceptanceByPosition[0] ?? 0) * r.stats.targetPasses;
      }
    }
    const row: AcceptanceRow = {
      domain,
      prompts: n,
      greedy: { acceptance: acc.greedy.a / Math.max(1, acc.greedy.d), tokensPerStep: acc.greedy.tok / Math.max(1, acc.greedy.steps), firstToken: acc.greedy.first / Math.max(1, acc.greedy.steps) },
      sampled: { acceptance: acc.sampled.a / Math.max(1, acc.sampled.d), tokensPerStep: acc.sampled.tok / Math.max(1, acc.sampled.steps), firstToken: acc.sampled.first / Math.max(1, acc.sampled.steps) },
    };
    rows.push(row);
    onRow?.(row);
  }
  await dec.dispose?.();
  return rows;
}

// ---- main -----------------------------------------------------------------------------------------

function writeJsonAtomic(path: string, value: unknown): void {
  writeFileSync(path + '.tmp', JSON.stringify(value, null, 2) + '\n');
  renameSync(path + '.tmp', path);
}

interface CurvePoint {
  step: number;
  tokens: number;
  minutes: number;
  trainLoss: number;
  heldOutLoss: number;
  heldOutTop1: number;
}

const LABEL: Record<string, string> = { speeches: 'English (speeches)', novel: 'English (novel)', definitions: 'English (definitions)', code: 'code', sql: 'SQL', email: 'email' };
const label = LABEL;

interface DraftReport {
  target: string;
  shape: DraftShape;
  cost?: { targetMs: number; rows: CostRow[] };
  curve?: CurvePoint[];
  training?: {
    teacherTokens: number;
    steps: number;
    replay: number;
    rows: number;
    seqLen: number;
    topK: number;
    lr: number;
    minutes: number;
    teacherSeconds: number;
    trainSeconds: number;
    /** The draft this run continued (--from), and that draft's own training when its report is beside it. */
    from?: string;
    previous?: PreviousTraining;
    /** Ids the draft's head scores (--head-tokens; absent or 49,152: the whole vocabulary). */
    headTokens?: number;
    /** The domains trained on (--domains; absent in older reports: the general English ones). */
    domains?: string[];
  };
  acceptance?: Record<string, AcceptanceRow[]>;
  file?: { path: string; bytes: number; type?: StoreType };
}

/** The per-token acceptance a with (1 - a^(g+1)) / (1 - a) = tokens per target pass (bisection). */
export function alphaFromTokensPerPass(tokensPerPass: number, g: number): number {
  const tpp = (a: number) => (a >= 1 ? g + 1 : (1 - a ** (g + 1)) / (1 - a));
  let lo = 0;
  let hi = 1;
  for (let i = 0; i < 60; i++) {
    const mid = (lo + hi) / 2;
    if (tpp(mid) < tokensPerPass) lo = mid;
    else hi = mid;
  }
  return (lo + hi) / 2;
}

/** What the --from draft's own report says of its training (its .report.json beside it). */
interface PreviousTraining {
  shape: DraftShape;
  teacherTokens: number;
  minutes: number;
  steps: number;
  heldOutTop1?: number;
}

function previousTraining(from: string): PreviousTraining | undefined {
  const path = from.replace(/\.gguf$/, '') + '.report.json';
  if (!existsSync(path)) return undefined;
  const r = JSON.parse(readFileSync(path, 'utf8')) as DraftReport;
  if (!r.training) return undefined;
  const last = r.curve?.[r.curve.length - 1];
  const prev = r.training.previous;
  // A chain of continued runs adds up.
  return {
    shape: r.shape,
    teacherTokens: r.training.teacherTokens + (prev?.teacherTokens ?? 0),
    minutes: r.training.minutes + (prev?.minutes ?? 0),
    steps: r.training.steps + (prev?.steps ?? 0),
    ...(last && { heldOutTop1: last.heldOutTop1 }),
  };
}

/** The Markdown report: cost table, training run, acceptance per domain. */
export function reportMarkdown(r: DraftReport): string {
  const f = (x?: number | null, digits = 3) => (typeof x !== 'number' || Number.isNaN(x) ? '-' : x.toFixed(digits));
  const md = ['# SmolLM2-135M draft: report', '', `Produced by \`npm run train:smollm2-draft\` (lib/train/smollm2Draft.ts) for ${r.target}.`, ''];
  md.push(`Draft: llama, ${JSON.stringify(r.shape)}, tied embeddings initialised from the truncated SVD of the target's, ${r.training?.headTokens && r.training.headTokens < 49152 ? `its head restricted to the ${r.training.headTokens} ids most frequent in all six domains' training text (the held-out KL below is over those ids)` : 'full 49,152-token vocabulary'}${r.file ? `, ${r.file.type ?? 'F16'} matrices, ${(r.file.bytes / 1e6).toFixed(1)} MB` : ''}.`, '');
  if (r.cost) {
    md.push(`## Cost: single-token decode time, draft / target (random weights of each shape, same run; target ${f(r.cost.targetMs, 2)} ms)`, '');
    md.push('| candidate | type | weight MB/token | ms/token | c |', '| --- | --- | --- | --- | --- |');
    for (const c of r.cost.rows) md.push(`| ${c.name} | ${c.type} | ${(c.weightBytesPerToken / 1e6).toFixed(1)} | ${f(c.decodeMs, 2)} | ${f(c.c)} |`);
    md.push('');
  }
  if (r.training) {
    const t = r.training;
    md.push('## Training', '');
    if (t.from) {
      const p = t.previous;
      md.push(
        `Continued from \`${t.from}\`${p ? ` (${JSON.stringify(p.shape)}, trained on ${p.teacherTokens} teacher tokens in ${f(p.minutes, 1)} minutes, ${p.steps} steps${p.heldOutTop1 !== undefined ? `, held-out top-1 agreement ${f(p.heldOutTop1)}` : ''})` : ''}${r.shape.layers > (p?.shape.layers ?? r.shape.layers) ? `, grown to ${r.shape.layers} layers (the new blocks start as no-ops)` : ''}, with a new optimizer and schedule:`,
        '',
      );
    }
    const trained = t.domains ?? GENERAL_DOMAINS;
    const general = trained.length === GENERAL_DOMAINS.length && GENERAL_DOMAINS.every((d) => trained.includes(d));
    md.push(`${t.teacherTokens} teacher tokens of ${general ? 'general English (speeches, novel, definitions)' : trained.map((d) => LABEL[d] ?? d).join(', ')} in ${f(t.minutes, 1)} minutes: ${t.steps} AdamW steps of ${t.rows} x ${t.seqLen} tokens (each teacher batch trained on ${t.replay} times), forward KL to the target's top-${t.topK} probabilities plus the residual mass, peak lr ${t.lr}, cosine decay. Time in the teacher (target forward) ${f(t.teacherSeconds, 0)} s, in draft steps ${f(t.trainSeconds, 0)} s.`, '');
  }
  if (r.curve?.length) {
    md.push('| step | teacher tokens | minutes | train KL (EMA) | held-out KL | held-out top-1 agreement |', '| --- | --- | --- | --- | --- | --- |');
    for (const p of r.curve) md.push(`| ${p.step} | ${p.tokens} | ${f(p.minutes, 1)} | ${f(p.trainLoss)} | ${f(p.heldOutLoss)} | ${f(p.heldOutTop1)} |`);
    md.push('');
  }
  if (r.acceptance) {
    md.push('## Held-out acceptance (createSpeculativeDecoder, chain g = 4, 64-token prompts from held-out text)', '');
    md.push(
      'Acceptance here is accepted / drafted over the chain of 4 (the decoder\'s acceptanceRate); alpha is the per-token acceptance that gives the measured tokens per target pass under independence, (1 - alpha^5) / (1 - alpha).',
      '',
    );
    // Columns for each draft measured: the init, the --from draft (a continued run), the trained one.
    const drafts = (['init', 'from', 'trained'] as const).filter((k) => r.acceptance![k]);
    const name = { init: 'init', from: '--from', trained: 'trained' };
    md.push(
      `| domain | ${drafts.map((k) => `${name[k]} greedy | ${name[k]} T=0.8`).join(' | ')} | trained tokens/pass greedy (alpha) | trained tokens/pass T=0.8 (alpha) |`,
      `| --- | ${drafts.map(() => '--- | ---').join(' | ')} | --- | --- |`,
    );
    const domains = [...new Set(drafts.flatMap((k) => r.acceptance![k]!.map((x) => x.domain)))];
    for (const d of domains) {
      const t = r.acceptance.trained?.find((x) => x.domain === d);
      const tps = (x?: { tokensPerStep: number }) => (x ? `${f(x.tokensPerStep, 2)} (${f(alphaFromTokensPerPass(x.tokensPerStep, 4), 2)})` : '-');
      const cells = drafts.map((k) => {
        const x = r.acceptance![k]!.find((y) => y.domain === d);
        return `${f(x?.greedy.acceptance)} | ${f(x?.sampled.acceptance)}`;
      });
      md.push(`| ${LABEL[d] ?? d} | ${cells.join(' | ')} | ${tps(t?.greedy)} | ${tps(t?.sampled)} |`);
    }
    md.push('');
  }
  return md.join('\n');
}

/** The --domains list: comma-separated domain names, each known, none twice. */
export function parseDomains(list: string): Domain[] {
  const names = list.split(',').map((d) => d.trim());
  for (const [i, d] of names.entries()) {
    if (!(ALL_DOMAINS as readonly string[]).includes(d)) throw new RangeError(`--domains must list domains among ${ALL_DOMAINS.join(', ')}, got ${d ? `'${d}'` : 'an empty name'}`);
    if (names.indexOf(d) !== i) throw new RangeError(`--domains names ${d} twice`);
  }
  return names as Domain[];
}

async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      target: { type: 'string' },
      out: { type: 'string', default: 'models' },
      work: { type: 'string', default: 'data/smollm2' },
      phase: { type: 'string', default: 'all' },
      minutes: { type: 'string', default: '60' },
      dim: { type: 'string', default: String(DRAFT_SHAPE.embeddingLength) },
      layers: { type: 'string', default: String(DRAFT_SHAPE.layers) },
      ff: { type: 'string', default: String(DRAFT_SHAPE.feedForwardLength) },
      heads: { type: 'string', default: String(DRAFT_SHAPE.heads) },
      'kv-heads': { type: 'string', default: String(DRAFT_SHAPE.kvHeads) },
      rows: { type: 'string', default: '8' },
      'seq-len': { type: 'string', default: '128' },
      'top-k': { type: 'string', default: '64' },
      replay: { type: 'string', default: '3' },
      lr: { type: 'string', default: '1.5e-3' },
      'cap-mb': { type: 'string', default: '4' },
      type: { type: 'string', default: 'F16' },
      prompts: { type: 'string', default: '6' },
      'max-tokens': { type: 'string', default: '48' },
      threads: { type: 'string', default: '0' },
      seed: { type: 'string', default: '1' },
      from: { type: 'string' },
      'head-tokens': { type: 'string' },
      domains: { type: 'string', default: GENERAL_DOMAINS.join(',') },
      resume: { type: 'boolean', default: false },
      quick: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h' },
    },
  });
  if (values.help) {
    process.stdout.write(readFileSync(new URL(import.meta.url), 'utf8').split('\nimport ')[0]!.replace(/^\/\/ ?/gm, '') + '\n');
    return 0;
  }
  const quick = values.quick!;
  const phase = values.phase!;
  const draftType = values.type as StoreType;
  if (!['F32', 'F16', 'BF16', 'Q8_0', 'Q5_0', 'Q5_1', 'Q4_0', 'Q4_1'].includes(draftType)) throw new RangeError(`--type must be F32, F16, BF16, Q8_0, Q5_0, Q5_1, Q4_0 or Q4_1, got ${draftType}`);
  const targetPath = resolve(values.target ?? join(process.cwd(), '..', DEFAULT_TARGET));
  if (!existsSync(targetPath)) throw new Error(`the target ${targetPath} is missing (pass --target <SmolLM2 GGUF>)`);
  const trainDomains = parseDomains(values.domains!);
  const outDir = resolve(values.out!);
  const work = resolve(values.work!);
  const ckptDir = join(work, 'checkpoints');
  mkdirSync(ckptDir, { recursive: true });
  mkdirSync(outDir, { recursive: true });
  const shape: DraftShape = {
    embeddingLength: Number(values.dim),
    layers: Number(values.layers),
    heads: Number(values.heads),
    kvHeads: Number(values['kv-heads']),
    feedForwardLength: Number(values.ff),
    contextLength: DRAFT_SHAPE.contextLength,
  };
  const seed = Number(values.seed);
  const target = await loadModel(targetPath, { threads: Number(values.threads) });
  const tok = target.tokenizer!;
  const reportPath = join(outDir, 'smollm2-draft.report.json');
  // Each phase replaces its own section of the report and keeps the others.
  const report: Record<string, unknown> = existsSync(reportPath) ? JSON.parse(readFileSync(reportPath, 'utf8')) : {};
  report.createdBy = 'lib/train/smollm2Draft.ts';
  report.target = targetPath.split('/').slice(-2).join('/');
  // The shape the options give, until a draft exists: then the draft's own (a grown one has more layers).
  report.shape = shape;

  if (phase === 'all' || phase === 'cost') {
    log('cost: timing single-token decode of candidate shapes against the target (same run)');
    const cost = await measureCost(target, COST_CANDIDATES, quick ? 2 : 6, quick ? 4 : 12);
    report.cost = cost;
    process.stdout.write(`\nTarget decode ${cost.targetMs.toFixed(2)} ms/token (median, same run)\n\n| candidate | type | weight MB/token | ms/token | c = draft/target |\n| --- | --- | --- | --- | --- |\n`);
    for (const r of cost.rows) process.stdout.write(`| ${r.name} | ${r.type} | ${(r.weightBytesPerToken / 1e6).toFixed(1)} | ${r.decodeMs.toFixed(2)} | ${r.c.toFixed(3)} |\n`);
    process.stdout.write('\n');
    writeJsonAtomic(reportPath, report);
  }

  const initPath = join(ckptDir, 'draft.init.gguf');
  if (phase === 'all' || phase === 'init' || (phase === 'train' && !existsSync(initPath) && !values.from)) {
    await writeDraftInit(initPath, target, shape, seed, log);
    log(`init: wrote ${initPath}`);
  }

  const draftPath = join(outDir, 'smollm2-draft.gguf');
  const ckpt = join(ckptDir, 'draft.ckpt.gguf');
  if (phase === 'all' || phase === 'train') {
    const data = tokenizeDomains(tok, work, Number(values['cap-mb']));
    const shards = trainDomains.map((d) => data.get(`${d}.train`)).filter((s): s is Uint16Array => !!s);
    if (shards.length === 0) throw new Error(`no training text for ${trainDomains.join(', ')}`);
    const seqLen = quick ? 32 : Number(values['seq-len']);
    const replay = Math.max(1, Number(values.replay));
    const lr = Number(values.lr);
    if (!values.resume) rmSync(ckpt, { force: true });
    else if (existsSync(ckpt)) log('resuming from the last checkpoint');
    const curve: CurvePoint[] = (values.resume && Array.isArray(report.curve) ? report.curve : []) as CurvePoint[];
    if (!values.resume) delete report.acceptance;
    const prevTokens = curve.length ? curve[curve.length - 1]!.tokens : 0;
    const prevMinutes = curve.length ? curve[curve.length - 1]!.minutes : 0;
    const bar = new ProgressBar('draft ');
    let lastLine = 0;
    // --from with more --layers than that draft has grows it (the new blocks start as no-ops).
    let grow: number | undefined;
    if (values.from) {
      const count = readGgufLayout(values.from).kvs.find((e) => e.key === 'llama.block_count');
      if (count && Number(values.layers) > count.raw.readUInt32LE(4)) grow = Number(values.layers);
    }
    const headCount = values['head-tokens'] === undefined ? undefined : Number(values['head-tokens']);
    if (headCount !== undefined && !(Number.isInteger(headCount) && headCount >= 1)) throw new RangeError(`--head-tokens must be an integer >= 1, got ${values['head-tokens']}`);
    const headTokens = headCount === undefined ? undefined : frequentTokens(ALL_DOMAINS.map((d) => data.get(`${d}.train`)).filter((x): x is Uint16Array => !!x), headCount, target.info.vocabSize, target.eosTokens);
    const r = await trainDraft({
      target,
      out: draftPath,
      ...(headTokens && !(values.resume && existsSync(ckpt)) && { headTokens }),
      ...(grow !== undefined && !(values.resume && existsSync(ckpt)) && { shape: { layers: grow } }),
      tokens: shards,
      heldOut: data.get(`${trainDomains[0]}.heldout`) ?? shards[0]!,
      // A resumed run continues its checkpoint as it is.
      ...(!(values.resume && existsSync(ckpt)) && { from: values.from ?? initPath }),
      type: draftType,
      minutes: quick ? 0.3 : Number(values.minutes),
      lr,
      topK: Number(values['top-k']),
      rows: quick ? 2 : Number(values.rows),
      seqLen,
      replay,
      seed,
      checkpoint: ckpt,
      evalMinutes: quick ? 5 / 60 : 5,
      onProgress: (p) => {
        if (p.message) return log(p.message);
        const fields = `step ${p.step} KL ${p.trainLoss.toFixed(3)} teacher ${p.teacherTokensPerSecond.toFixed(0)} tok/s train ${p.trainTokensPerSecond.toFixed(0)} tok/s${p.heldOut ? ` held-out top-1 ${p.heldOut.top1.toFixed(3)}` : ''}`;
        if (process.stderr.isTTY) bar.update(p.fraction, fields);
        else if (Date.now() - lastLine > 60_000) {
          lastLine = Date.now();
          log(`${(100 * p.fraction).toFixed(0)}% ${fields}`);
        }
      },
    });
    bar.done(`steps ${r.steps} teacher tokens ${r.teacherTokens}`);
    for (const c of r.curve) curve.push({ step: c.step, tokens: prevTokens + c.teacherTokens, minutes: prevMinutes + c.minutes, trainLoss: c.trainLoss, heldOutLoss: c.loss, heldOutTop1: c.top1 });
    report.curve = curve;
    report.shape = r.shape;
    report.training = { teacherTokens: prevTokens + r.teacherTokens, steps: r.steps, replay, rows: quick ? 2 : Number(values.rows), seqLen, topK: Number(values['top-k']), lr, minutes: prevMinutes + r.seconds / 60, teacherSeconds: r.teacherSeconds, trainSeconds: r.trainSeconds, domains: trainDomains, headTokens: r.headTokens, ...(values.from ? { from: values.from } : {}) };
    log(`wrote ${draftPath} (${(r.bytes / 1e6).toFixed(1)} MB)`);
    writeJsonAtomic(reportPath, report);
  }

  if (phase === 'all' || phase === 'eval') {
    const data = tokenizeDomains(tok, work, Number(values['cap-mb']));
    const heldOut = new Map<string, Uint16Array>();
    for (const d of ALL_DOMAINS) if (data.has(`${d}.heldout`)) heldOut.set(d, data.get(`${d}.heldout`)!);
    const evalOne = async (path: string, name: string) => {
      const draft = await loadModel(path);
      log(`eval: ${name}: acceptance per domain (chain g = 4, greedy and T = 0.8)`);
      const rows = await measureAcceptance(target, draft, heldOut, quick ? 1 : Number(values.prompts), quick ? 16 : 64, quick ? 8 : Number(values['max-tokens']), (r) =>
        log(`  ${label[r.domain] ?? r.domain}: greedy ${r.greedy.acceptance.toFixed(3)}, T=0.8 ${r.sampled.acceptance.toFixed(3)}`),
      );
      await draft.dispose();
      return rows;
    };
    const acceptance: Record<string, AcceptanceRow[]> = {};
    if (existsSync(initPath)) acceptance.init = await evalOne(initPath, 'initial draft (SVD embeddings, random layers)');
    if (values.from) acceptance.from = await evalOne(resolve(values.from), `the --from draft (${values.from})`);
    if (existsSync(draftPath)) acceptance.trained = await evalOne(draftPath, 'trained draft');
    report.acceptance = acceptance;
    if (existsSync(draftPath)) report.file = { path: 'smollm2-draft.gguf', bytes: statSync(draftPath).size, type: draftType };
    writeJsonAtomic(reportPath, report);
  }
  const tr = (report as unknown as DraftReport).training;
  if (tr?.from && !tr.previous) {
    const p = previousTraining(tr.from);
    if (p) tr.previous = p;
    writeJsonAtomic(reportPath, report);
  }
  if (phase === 'all' || phase === 'eval' || phase === 'report') {
    if (existsSync(draftPath)) {
      const d = await loadModel(draftPath);
      const i = d.info;
      report.shape = { embeddingLength: i.embeddingLength, layers: i.layers, heads: i.heads, kvHeads: i.kvHeads, feedForwardLength: i.feedForwardLength, contextLength: i.contextLength };
      await d.dispose();
      writeJsonAtomic(reportPath, report);
    }
    const md = reportMarkdown(report as unknown as DraftReport);
    writeFileSync(join(outDir, 'smollm2-draft.report.md.tmp'), md);
    renameSync(join(outDir, 'smollm2-draft.report.md.tmp'), join(outDir, 'smollm2-draft.report.md'));
    process.stdout.write(md);
  }
  await target.dispose();
  return 0;
}

if (process.argv[1] && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err: unknown) => {
      process.stderr.write(`train:smollm2-draft: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}\n`);
      process.exit(1);
    },
  );
}
