// The training corpora (lib/train/corpus.ts): every domain loads from its npm package or from the
// machine, the split is deterministic and disjoint, and the cap samples without moving documents
// between the splits. Small caps keep this fast; prepareData reads everything.
import { describe, expect, it } from 'vitest';
import {
  ALL_DOMAINS,
  CorpusUnavailableError,
  GENERAL_DOMAINS,
  SHIFTED_DOMAINS,
  emailText,
  htmlToText,
  isHeldOut,
  loadCorpora,
  loadDomain,
  pythonStdlibPath,
  wordnetDefinitions,
  type Domain,
  type DomainCorpus,
} from '../lib/train/corpus.js';

// The npm datasets are devDependencies and must load; code and SQL come from the machine
// (python3 and PostgreSQL, present on this project's machines) and are skipped, with a warning,
// where missing.
const NPM_DOMAINS: Domain[] = ['speeches', 'novel', 'definitions', 'email'];

const CAP = 0.2;
const first = loadCorpora(ALL_DOMAINS, { capMB: CAP });
for (const m of first.missing) console.warn(`corpus test: ${m.reason}`);
const byDomain = new Map<Domain, DomainCorpus>(first.corpora.map((c) => [c.domain, c]));

describe('corpora', () => {
  it('groups the domains', () => {
    expect([...GENERAL_DOMAINS]).toEqual(['speeches', 'novel', 'definitions']);
    expect([...SHIFTED_DOMAINS]).toEqual(['code', 'sql', 'email']);
  });

  it('loads every npm domain, and code where python3 exists', () => {
    for (const d of NPM_DOMAINS) expect(byDomain.has(d), d).toBe(true);
    if (pythonStdlibPath()) expect(byDomain.has('code')).toBe(true);
    for (const c of first.corpora) {
      expect(c.train.length, c.domain).toBeGreaterThan(0);
      expect(c.heldOut.length, c.domain).toBeGreaterThan(0);
      expect(c.trainBytes + c.heldOutBytes, c.domain).toBeGreaterThan(0.1e6);
      // The cap stops reading once reached: at most one file beyond it (a SQL file can give
      // several ~8 kB chunks; the largest, information_schema.sql, is 115 kB).
      const largest = Math.max(...[...c.train, ...c.heldOut].map((d) => Buffer.byteLength(d.text)));
      expect(c.trainBytes + c.heldOutBytes, c.domain).toBeLessThan(CAP * 1e6 + Math.max(largest, 150_000));
      for (const d of [...c.train, ...c.heldOut]) {
        expect(d.domain).toBe(c.domain);
        expect(d.text.length).toBeGreaterThan(0);
        expect(d.text).not.toMatch(/\r|\u0000/);
      }
    }
  });

  it('has the expected kind of text in each domain', () => {
    const sample = (d: Domain) => byDomain.get(d)?.train.map((x) => x.text).join('\n') ?? '';
    expect(sample('speeches')).toMatch(/Congress/);
    expect(sample('novel')).toMatch(/whale/i);
    expect(sample('definitions')).toMatch(/^[^\n]+ \((noun|verb|adjective|adverb)\): /m);
    expect(sample('email')).toMatch(/^Subject: /m);
    if (byDomain.has('code')) expect(sample('code')).toMatch(/^(def|class|import) /m);
    if (byDomain.has('sql')) expect(sample('sql')).toMatch(/\b(CREATE|SELECT|FUNCTION)\b/);
  });

  it('is deterministic and sorted by id', () => {
    const again = loadCorpora(ALL_DOMAINS, { capMB: CAP });
    expect(again.corpora.map((c) => [c.domain, c.train.map((d) => d.id), c.heldOut.map((d) => d.id)])).toEqual(
      first.corpora.map((c) => [c.domain, c.train.map((d) => d.id), c.heldOut.map((d) => d.id)]),
    );
    for (const c of first.corpora) {
      const ids = c.train.map((d) => d.id);
      expect(ids, c.domain).toEqual([...ids].sort());
    }
  });

  it('keeps held-out disjoint from train, by id and by text', () => {
    for (const c of first.corpora) {
      const trainIds = new Set(c.train.map((d) => d.id));
      const trainTexts = new Set(c.train.map((d) => d.text));
      for (const d of c.heldOut) {
        expect(trainIds.has(d.id), `${c.domain}/${d.id}`).toBe(false);
        expect(trainTexts.has(d.text), `${c.domain}/${d.id}`).toBe(false);
      }
    }
  });

  it('splits by a hash of the id, independent of the cap', () => {
    const bigger = loadDomain('speeches', { capMB: 2 });
    const small = byDomain.get('speeches')!;
    for (const d of small.train) expect(isHeldOut('speeches', d.id)).toBe(false);
    for (const d of small.heldOut) expect(isHeldOut('speeches', d.id)).toBe(true);
    const heldBig = new Set(bigger.heldOut.map((d) => d.id));
    for (const d of small.heldOut) expect(heldBig.has(d.id)).toBe(true);
    for (const d of small.train) expect(heldBig.has(d.id)).toBe(false);
    // About 5% of the ids are held out.
    let held = 0;
    for (let i = 0; i < 20000; i++) if (isHeldOut('code', `x/${i}.py`)) held++;
    expect(held / 20000).toBeGreaterThan(0.04);
    expect(held / 20000).toBeLessThan(0.06);
  });

  it('loads a whole small domain, with about 5% held out', () => {
    const novel = loadDomain('novel');
    expect(novel.cappedOut).toBe(0);
    expect(novel.train.length + novel.heldOut.length).toBe(138); // 135 chapters, etymology, extracts, epilogue
    expect(novel.train.some((d) => d.id === 'chapter_001') || novel.heldOut.some((d) => d.id === 'chapter_001')).toBe(true);
    expect(novel.heldOut.length).toBeGreaterThanOrEqual(3);
    expect(novel.heldOut.length).toBeLessThanOrEqual(14);
  });

  it('rejects bad options and reports missing sources', () => {
    expect(() => loadDomain('poetry' as Domain)).toThrow(RangeError);
    expect(() => loadDomain('novel', { capMB: 0 })).toThrow(/capMB/);
    const saved = process.env.OSD_SQL_DIRS;
    process.env.OSD_SQL_DIRS = '/nonexistent-dir';
    try {
      expect(() => loadDomain('sql')).toThrow(CorpusUnavailableError);
      expect(loadCorpora(['sql']).missing[0]?.reason).toMatch(/no \.sql files/);
    } finally {
      if (saved === undefined) delete process.env.OSD_SQL_DIRS;
      else process.env.OSD_SQL_DIRS = saved;
    }
  });
});

describe('corpus parsers', () => {
  it('turns WordNet synset lines into definitions', () => {
    const line =
      '00002312 00 a 02 abaxial 0 dorsal(a) 4 002 ;c 06047178 n 0000 ! 00002527 a 0101 | facing away from the axis of an organ; "the abaxial surface"  ';
    expect(wordnetDefinitions(`  1 licence header  \n${line}\n`, 'adjective')).toEqual([
      'abaxial, dorsal (adjective): facing away from the axis of an organ; "the abaxial surface"',
    ]);
  });

  it('keeps subjects and text parts of mail, decodes them, and drops binary attachments', () => {
    const raw = [
      'From: a@b.c',
      'Subject: =?iso-8859-1?Q?Caf=E9?= news',
      'Content-Type: multipart/mixed; boundary="XX"',
      '',
      'preamble',
      '--XX',
      'Content-Type: text/plain; charset=iso-8859-1',
      'Content-Transfer-Encoding: quoted-printable',
      '',
      'Hello caf=E9 world, this is the body of the mess=',
      'age.',
      '--XX',
      'Content-Type: image/gif',
      'Content-Transfer-Encoding: base64',
      '',
      'R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==',
      '--XX',
      'Content-Type: text/html',
      '',
      '<html><body><p>Second &amp; <b>bold</b> part</p><script>x()</script></body></html>',
      '--XX--',
      '',
    ].join('\r\n');
    expect(emailText(Buffer.from(raw, 'latin1'))).toBe(
      'Subject: Café news\n\nHello café world, this is the body of the message.\n\n\nSecond & bold part',
    );
    expect(htmlToText('a<br>b&nbsp;c &#233; &#x41;')).toBe('a\nb c é A');
    expect(emailText(Buffer.from('Subject: x\n\nshort'))).toBe('');
  });
});
