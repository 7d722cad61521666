// Disposal, timers and argument errors at the edges of the public API: a second dispose() waits for
// the first, promise-returning calls reject instead of throwing, delays beyond setTimeout's range
// neither spin nor fire early.
import http from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  copyModel,
  createDraftPool,
  createOnlineDecoder,
  createServer,
  createSpeculativeDecoder,
  createTrainer,
  defaultDraftPath,
  defaultTargetPath,
  loadModel,
  type Model,
} from '../lib/index.js';

let target: Model;
let draft: Model;

beforeAll(async () => {
  target = await loadModel(defaultTargetPath);
  draft = await loadModel(defaultDraftPath);
});
afterAll(async () => {
  await draft?.dispose();
  await target?.dispose();
});

/** TimeoutOverflowWarnings emitted while fn runs. */
async function overflowWarnings(fn: () => Promise<void>): Promise<number> {
  let n = 0;
  const on = (w: Error) => void (w.name === 'TimeoutOverflowWarning' && n++);
  process.on('warning', on);
  try {
    await fn();
    await new Promise((r) => setImmediate(r)); // warnings are emitted on the next tick
  } finally {
    process.off('warning', on);
  }
  return n;
}

describe('a second dispose() waits for the first', () => {
  const order = async (d: { dispose(): Promise<void> }, running: Promise<unknown>) => {
    const seen: string[] = [];
    running.then(() => seen.push('request'), () => seen.push('request'));
    const first = d.dispose().then(() => seen.push('first'));
    await d.dispose();
    seen.push('second');
    await first;
    return seen;
  };

  it('SpeculativeDecoder', async () => {
    const dec = createSpeculativeDecoder({ target, draft });
    const running = dec.generate({ prompt: 'Once upon a time', maxTokens: 300, stopTokens: [] });
    // The second call used to resolve at once, before the running request had stopped.
    expect(await order(dec, running)).toEqual(['request', 'first', 'second']);
  });

  it('OnlineDecoder', async () => {
    const d = await copyModel(draft);
    const dec = createOnlineDecoder({ target, draft: d, distill: { interval: 1000 } });
    const running = dec.generate({ prompt: 'Once upon a time', maxTokens: 300, stopTokens: [] });
    expect(await order(dec, running)).toEqual(['request', 'first', 'second']);
    await d.dispose();
  });

  it('DraftPool', async () => {
    const d = await copyModel(draft);
    const pool = createDraftPool({ target, drafts: { a: d } });
    const running = pool.generate({ prompt: 'Once upon a time', maxTokens: 300, stopTokens: [], label: 'a' });
    expect(await order(pool, running)).toEqual(['request', 'first', 'second']);
    await expect(pool.updateNow()).rejects.toMatchObject({ code: 'OSD_DISPOSED', message: 'the pool was disposed' });
    await d.dispose();
  });

  it('Trainer: work queued before dispose() runs, work after it is refused', async () => {
    const trainer = await createTrainer(draft);
    const tokens = new Int32Array(2 * 8).map((_, i) => (i * 37) % 4000);
    const batch = { tokens, targets: tokens.map((t) => (t + 1) % 4000), batchSize: 2, seqLen: 8 };
    const seen: string[] = [];
    const step = trainer.step(batch).then(() => seen.push('step'));
    const first = trainer.dispose().then(() => seen.push('first'));
    await expect(trainer.step(batch)).rejects.toMatchObject({ code: 'OSD_DISPOSED' });
    await trainer.dispose();
    seen.push('second');
    await Promise.all([step, first]);
    expect(seen).toEqual(['step', 'first', 'second']);
  });
});

describe('calls that return promises reject, never throw', () => {
  it('Trainer.step, evalLoss and save, on bad arguments and after dispose', async () => {
    const trainer = await createTrainer(draft);
    const tokens = new Int32Array(8).fill(5);
    const batch = { tokens, targets: tokens, batchSize: 1, seqLen: 8 };
    // Each call returns a promise (a synchronous throw would escape .catch and crash a server).
    const bad = [
      () => trainer.save(''),
      () => trainer.step({ ...batch, foo: 1 } as never),
      () => trainer.evalLoss({ ...batch, kind: 'jsd' }),  // a loss setting without a teacher
    ];
    for (const call of bad) {
      let p: Promise<unknown> | undefined;
      expect(() => (p = call())).not.toThrow();
      await expect(p).rejects.toBeInstanceOf(TypeError);
    }
    await trainer.dispose();
    for (const call of [() => trainer.step(batch), () => trainer.evalLoss(batch), () => trainer.save('x.ckpt')]) {
      let p: Promise<unknown> | undefined;
      expect(() => (p = call())).not.toThrow();
      await expect(p).rejects.toMatchObject({ code: 'OSD_DISPOSED', message: 'the trainer was disposed' });
    }
  });
});

describe('delays beyond setTimeout range', () => {
  it('distill.maxAgeMs of Infinity or a month neither spins nor trains early', async () => {
    for (const maxAgeMs of [Infinity, 2.6e9]) {
      const d = await copyModel(draft);
      const dec = createOnlineDecoder({ target, draft: d, distill: { maxAgeMs, interval: 1000, positions: 'all' } });
      let updates = 0;
      dec.on('update-start', () => void updates++);
      const warnings = await overflowWarnings(async () => {
        await dec.generate({ prompt: 'Once upon a time', maxTokens: 16 });
        // The timer was clamped to 1 ms and re-armed for ever: about 850 warnings a second.
        await new Promise((r) => setTimeout(r, 300));
      });
      expect(warnings).toBe(0);
      expect(updates).toBe(0);
      expect(dec.metrics().bufferedRecords).toBe(1);
      await dec.dispose();
      await d.dispose();
    }
  });

  it('drain(Infinity) lets a running request finish', async () => {
    const handler = createServer({ target, draft, online: false });
    const server = http.createServer(handler);
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    try {
      const { port } = server.address() as { port: number };
      const body = JSON.stringify({ model: handler.modelId, prompt: 'Once upon a time', max_tokens: 300 });
      const reply = fetch(`http://127.0.0.1:${port}/v1/completions`, { method: 'POST', headers: { 'content-type': 'application/json' }, body });
      while (handler.active === 0) await new Promise((r) => setTimeout(r, 1));
      // It used to abort the request at once (a timer of Infinity fires after 1 ms).
      const warnings = await overflowWarnings(() => handler.drain(Infinity));
      const res = await reply;
      expect(res.status).toBe(200);
      expect(((await res.json()) as { choices: { text: string }[] }).choices[0]!.text.length).toBeGreaterThan(0);
      expect(warnings).toBe(0);
    } finally {
      server.close();
    }
  });
});

describe('argument errors name the argument', () => {
  it('a decoder request with a string stream is a TypeError', async () => {
    const dec = createSpeculativeDecoder({ target, draft });
    await expect(dec.generate({ prompt: 'Hi', maxTokens: 4, stream: '1' as never })).rejects.toThrow(new TypeError('stream must be a number or a bigint, got string'));
    await dec.dispose();
  });

  it('Sequence.truncate names n and the sequence length', async () => {
    const seq = target.createSequence();
    await seq.evaluate([1, 2, 3]);
    expect(() => seq.truncate(-1)).toThrow(new RangeError("n must be an integer in [0, 3] (the sequence's length), got -1"));
    expect(() => seq.truncate(4)).toThrow(RangeError);
    expect(() => seq.truncate('1' as never)).toThrow(new TypeError('n must be a number, got string'));
    seq.truncate(1);
    expect(seq.length).toBe(1);
    await seq.dispose();
  });

  it('Tokenizer.minTokens takes a string', () => {
    const tk = target.tokenizer!;
    expect(() => tk.minTokens(null as never)).toThrow(new TypeError('text must be a string, got null'));
    expect(() => tk.minTokens(5 as never)).toThrow(new TypeError('text must be a string, got number'));
  });

  it('a pool refuses one Model under two names while it learns', async () => {
    const d = await copyModel(draft);
    expect(() => createDraftPool({ target, drafts: { x: d, y: d } })).toThrow(
      new RangeError('drafts.y is the same Model as drafts.x: each draft learns in place, so give each its own (copyModel)'),
    );
    // Without learning, sharing is harmless.
    const pool = createDraftPool({ target, drafts: { x: d, y: d }, distill: { enabled: false } });
    await pool.dispose();
    await d.dispose();
  });
});
