// Prepares the training data of the default model pair:
//
//   npx tsx lib/train/prepareData.ts --out <dir> [--vocab 4096] [--cap-mb 16] [--bpe-mb 6]
//                                    [--domains speeches,novel,...] [--quiet]
//
// Loads every domain's corpus (lib/train/corpus.ts), trains the byte-level BPE tokenizer on a
// balanced sample of the train splits (at most --bpe-mb MB per domain), and writes into <dir>:
//
//   tokenizer.gguf                 vocabulary-only GGUF (tokenizer.ggml.*), for loadTokenizer()
//   <domain>.train.jsonl           one {"id", "text"} document per line
//   <domain>.heldout.jsonl
//   <domain>.train.u16             token ids, uint16 little-endian: <|endoftext|> before every
//   <domain>.heldout.u16           document and once at the end (EOT d1 EOT d2 ... EOT)
//   manifest.json                  sizes, token counts, bytes per token, timings, sources
//
// A domain whose source is missing on this machine (no python3, no PostgreSQL) is reported and
// skipped. Everything is deterministic for a given machine and options.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { Tokenizer, loadTokenizer } from '../Tokenizer.js';
import { PreTokenCounter, trainBpe, writeTokenizerGguf, type PreTokenizerName } from './bpe.js';
import { ALL_DOMAINS, loadCorpora, type Document, type Domain, type DomainCorpus } from './corpus.js';

export interface PrepareDataOptions {
  out: string;
  vocabSize?: number;
  /** Cap per domain (MB), train and held-out together. Default 16. */
  capMB?: number;
  /** Per-domain MB of train text that the tokenizer is trained on. Default 6. */
  bpeMB?: number;
  domains?: readonly Domain[];
  pre?: PreTokenizerName;
  /** Progress lines go here (default: stderr); null for silence. */
  log?: ((line: string) => void) | null;
}

export interface SplitStats {
  docs: number;
  bytes: number;
  tokens: number;
  bytesPerToken: number;
}

export interface PrepareDataManifest {
  createdBy: string;
  options: { vocabSize: number; capMB: number; bpeMB: number; pre: PreTokenizerName };
  tokenizer: {
    file: string;
    vocabSize: number;
    merges: number;
    pre: string;
    bos: number;
    eos: number;
    pad: number;
    addBos: boolean;
    trainBytes: number;
    uniqueWords: number;
    countSeconds: number;
    mergeSeconds: number;
  };
  tokenFormat: string;
  domains: Record<string, { source: string; files: Record<string, string>; train: SplitStats; heldOut: SplitStats }>;
  missing: Array<{ domain: string; reason: string }>;
  seconds: number;
}

function utf8Length(s: string): number {
  return Buffer.byteLength(s, 'utf8');
}

function mb(n: number): string {
  return (n / 1e6).toFixed(2);
}

/** Encodes documents as EOT d1 EOT d2 ... EOT into uint16 ids. */
function encodeShard(tok: Tokenizer, docs: Document[]): { ids: Uint16Array; tokens: number } {
  const eot = tok.eos;
  const parts: Int32Array[] = [];
  let total = 1;
  let textTokens = 0;
  for (const d of docs) {
    const ids = tok.encode(d.text, { addBos: false });
    parts.push(ids);
    total += ids.length + 1;
    textTokens += ids.length;
  }
  const out = new Uint16Array(total);
  let at = 0;
  for (const ids of parts) {
    out[at++] = eot;
    out.set(ids, at);
    at += ids.length;
  }
  out[at++] = eot;
  return { ids: out, tokens: textTokens };
}

function toLittleEndianBytes(a: Uint16Array): Buffer {
  const buf = Buffer.alloc(a.length * 2);
  for (let i = 0; i < a.length; i++) buf.writeUInt16LE(a[i]!, 2 * i);
  return buf;
}

export async function prepareData(options: PrepareDataOptions): Promise<PrepareDataManifest> {
  const { vocabSize = 4096, capMB = 16, bpeMB = 6, domains = ALL_DOMAINS, pre = 'smollm' } = options;
  const log = options.log === undefined ? (l: string) => process.stderr.write(`${l}\n`) : options.log;
  const out = resolve(options.out);
  if (vocabSize > 65536) throw new RangeError(`vocabSize must be <= 65536 for uint16 token files, got ${vocabSize}`);
  mkdirSync(out, { recursive: true });
  const t0 = performance.now();
  const since = (): string => `${((performance.now() - t0) / 1000).toFixed(1)}s`;

  log?.(`[prepare] loading ${domains.length} domains (cap ${capMB} MB each)...`);
  const { corpora, missing } = loadCorpora(domains, { capMB });
  for (const m of missing) log?.(`[prepare] skipping ${m.domain}: ${m.reason}`);
  for (const c of corpora)
    log?.(
      `[prepare] ${c.domain.padEnd(11)} ${String(c.train.length).padStart(5)} train docs ${mb(c.trainBytes).padStart(6)} MB, ` +
        `${String(c.heldOut.length).padStart(4)} held-out ${mb(c.heldOutBytes).padStart(5)} MB  (${c.source})`,
    );
  if (corpora.length === 0) throw new Error('no corpus is available');

  // Tokenizer: a balanced sample of each domain's train split, in document order.
  const tCount = performance.now();
  const counter = new PreTokenCounter(pre);
  for (const c of corpora) {
    let bytes = 0;
    for (const d of c.train) {
      if (bytes >= bpeMB * 1e6) break;
      counter.add(d.text);
      bytes += utf8Length(d.text);
    }
  }
  const countSeconds = (performance.now() - tCount) / 1000;
  log?.(`[prepare] BPE: ${mb(counter.totalBytes)} MB, ${counter.counts.size} unique pre-tokens, counted in ${countSeconds.toFixed(1)}s`);
  const trained = trainBpe(counter, {
    vocabSize,
    onProgress: (p) => log?.(`[prepare] BPE merges ${p.merges}, vocab ${p.vocab}/${p.target}, top pair count ${p.topCount} (${since()})`),
    progressEvery: 512,
  });
  log?.(`[prepare] BPE: ${trained.merges} merges in ${trained.mergeSeconds.toFixed(1)}s${trained.stoppedEarly ? ' (stopped early: no pair occurs twice)' : ''}`);

  const ggufPath = join(out, 'tokenizer.gguf');
  writeTokenizerGguf(ggufPath, trained.vocab, { name: 'online-specdec default tokenizer' });
  const tok = await loadTokenizer(ggufPath); // the file as every consumer will read it

  const manifest: PrepareDataManifest = {
    createdBy: 'lib/train/prepareData.ts',
    options: { vocabSize, capMB, bpeMB, pre },
    tokenizer: {
      file: 'tokenizer.gguf',
      vocabSize: tok.vocabSize,
      merges: trained.merges,
      pre: tok.pre,
      bos: tok.bos,
      eos: tok.eos,
      pad: tok.pad,
      addBos: tok.addBos,
      trainBytes: counter.totalBytes,
      uniqueWords: trained.uniqueWords,
      countSeconds,
      mergeSeconds: trained.mergeSeconds,
    },
    tokenFormat: 'uint16 little-endian token ids; <|endoftext|> (bos = eos) before every document and once at the end',
    domains: {},
    missing,
    seconds: 0,
  };

  const writeSplit = (c: DomainCorpus, split: 'train' | 'heldout', docs: Document[]): SplitStats & { files: string[] } => {
    const jsonl = `${c.domain}.${split}.jsonl`;
    const u16 = `${c.domain}.${split}.u16`;
    writeFileSync(join(out, jsonl), docs.map((d) => JSON.stringify({ id: d.id, text: d.text })).join('\n') + (docs.length ? '\n' : ''));
    const { ids, tokens } = encodeShard(tok, docs);
    writeFileSync(join(out, u16), toLittleEndianBytes(ids));
    const bytes = docs.reduce((n, d) => n + utf8Length(d.text), 0);
    return { docs: docs.length, bytes, tokens, bytesPerToken: tokens ? bytes / tokens : 0, files: [jsonl, u16] };
  };

  for (const c of corpora) {
    const train = writeSplit(c, 'train', c.train);
    const held = writeSplit(c, 'heldout', c.heldOut);
    const strip = ({ files: _f, ...s }: SplitStats & { files: string[] }): SplitStats => s;
    manifest.domains[c.domain] = {
      source: c.source,
      files: { trainText: train.files[0]!, trainTokens: train.files[1]!, heldOutText: held.files[0]!, heldOutTokens: held.files[1]! },
      train: strip(train),
      heldOut: strip(held),
    };
    log?.(
      `[prepare] ${c.domain.padEnd(11)} tokens: train ${String(train.tokens).padStart(9)}, held-out ${String(held.tokens).padStart(8)}; ` +
        `bytes/token ${train.bytesPerToken.toFixed(2)} train, ${held.bytesPerToken.toFixed(2)} held-out (${since()})`,
    );
  }
  manifest.seconds = (performance.now() - t0) / 1000;
  writeFileSync(join(out, 'manifest.json'), `${JSON.stringify(manifest, null, 2)}\n`);
  log?.(`[prepare] wrote ${out} in ${since()}`);
  return manifest;
}

function usage(): string {
  return (
    'usage: npx tsx lib/train/prepareData.ts --out <dir> [--vocab 4096] [--cap-mb 16] [--bpe-mb 6]\n' +
    `                                       [--domains ${ALL_DOMAINS.join(',')}] [--pre smollm|gpt2] [--quiet]`
  );
}

async function main(argv: string[]): Promise<number> {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        out: { type: 'string' },
        vocab: { type: 'string' },
        'cap-mb': { type: 'string' },
        'bpe-mb': { type: 'string' },
        domains: { type: 'string' },
        pre: { type: 'string' },
        quiet: { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
      strict: true,
    }));
  } catch (e) {
    process.stderr.write(`${(e as Error).message}\n${usage()}\n`);
    return 2;
  }
  if (values.help) {
    process.stdout.write(`${usage()}\n`);
    return 0;
  }
  if (!values.out) {
    process.stderr.write(`--out is required\n${usage()}\n`);
    return 2;
  }
  const num = (name: string, v: string | undefined): number | undefined => {
    if (v === undefined) return undefined;
    const n = Number(v);
    if (!Number.isFinite(n) || n <= 0) throw new RangeError(`--${name} must be a positive number, got ${v}`);
    return n;
  };
  const domains = values.domains?.split(',').map((d) => d.trim()) as Domain[] | undefined;
  for (const d of domains ?? [])
    if (!(ALL_DOMAINS as readonly string[]).includes(d)) {
      process.stderr.write(`--domains: unknown domain '${d}' (known: ${ALL_DOMAINS.join(', ')})\n`);
      return 2;
    }
  const pre = values.pre as PreTokenizerName | undefined;
  if (pre !== undefined && pre !== 'smollm' && pre !== 'gpt2') {
    process.stderr.write(`--pre must be smollm or gpt2, got ${pre}\n`);
    return 2;
  }
  await prepareData({
    out: values.out,
    vocabSize: num('vocab', values.vocab),
    capMB: num('cap-mb', values['cap-mb']),
    bpeMB: num('bpe-mb', values['bpe-mb']),
    domains,
    pre,
    log: values.quiet ? null : undefined,
  });
  return 0;
}

if (process.argv[1] && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  main(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
    },
    (e: unknown) => {
      process.stderr.write(`prepareData: ${(e as Error).stack ?? String(e)}\n`);
      process.exitCode = 1;
    },
  );
}
