// Cuts held-out documents into the demo's prompts (models/demo-prompts.json), so `osd demo` runs on
// a fresh clone without the corpora. Never training data: only the held-out splits are read.
//
//   npx tsx lib/train/demoPrompts.ts [--data data] [--out models/demo-prompts.json] [--per-domain 32] [--chars 240]
//
// The same cut, with more and shorter prompts, is the held-out prompt set of the exactness tests
// and the speculative benchmarks (data/ comes from `npm run prepare:data`):
//
//   npx tsx lib/train/demoPrompts.ts --per-domain 64 --chars 160 --out test/fixtures/heldout-prompts.json
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { ALL_DOMAINS, type Domain } from './corpus.js';

export interface DemoPrompts {
  createdBy: string;
  source: string;
  domains: Partial<Record<Domain, string[]>>;
}

/** Up to `perDomain` prompts of about `chars` characters per domain, spread over the held-out documents. */
export function makeDemoPrompts(dataDir: string, perDomain = 32, chars = 240): DemoPrompts {
  const domains: Partial<Record<Domain, string[]>> = {};
  for (const d of ALL_DOMAINS) {
    let lines: string[];
    try {
      lines = readFileSync(join(dataDir, `${d}.heldout.jsonl`), 'utf8').split('\n').filter(Boolean);
    } catch {
      continue;
    }
    const chunks: string[] = [];
    for (const line of lines) {
      const text = (JSON.parse(line) as { text: string }).text;
      for (let at = 0; at + chars <= text.length && chunks.length < perDomain * 20; at += chars * 3) {
        // Start at a line or word boundary and keep whole words.
        let start = at === 0 ? 0 : text.indexOf(at % 2 ? '\n' : ' ', at) + 1;
        if (start <= 0) start = at;
        let end = text.lastIndexOf(' ', start + chars);
        if (end <= start + chars / 2) end = start + chars;
        const chunk = text.slice(start, end).trim();
        if (chunk.length >= chars / 2) chunks.push(chunk);
      }
    }
    const step = Math.max(1, Math.floor(chunks.length / perDomain));
    domains[d] = chunks.filter((_, i) => i % step === 0).slice(0, perDomain);
  }
  return { createdBy: 'lib/train/demoPrompts.ts', source: 'held-out splits of lib/train/corpus.ts', domains };
}

if (process.argv[1] && import.meta.url === pathToFileURL(resolve(process.argv[1])).href) {
  const { values } = parseArgs({
    options: {
      data: { type: 'string', default: 'data' },
      out: { type: 'string', default: 'models/demo-prompts.json' },
      'per-domain': { type: 'string', default: '32' },
      chars: { type: 'string', default: '240' },
    },
  });
  const prompts = makeDemoPrompts(resolve(values.data!), Number(values['per-domain']), Number(values.chars));
  const out = resolve(values.out!);
  const written = { ...prompts, options: { perDomain: Number(values['per-domain']), chars: Number(values.chars) } };
  writeFileSync(out + '.tmp', JSON.stringify(written, null, 1) + '\n');
  renameSync(out + '.tmp', out);
  for (const [d, p] of Object.entries(prompts.domains)) process.stdout.write(`${d}: ${p.length} prompts\n`);
}
