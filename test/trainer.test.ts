// The training API: steps off the event loop, loss going down, snapshots swapped into a running
// model, checkpoints that resume exactly, and bad input.
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createTrainer, loadModel, loadTrainerCheckpoint, setTrainThreads, writeRandomModel, type TrainBatch } from '../lib/index.js';
import { tempDir } from './helpers/tmp.js';

const config = { vocabSize: 53, embeddingLength: 32, layers: 2, heads: 4, kvHeads: 2, feedForwardLength: 64, contextLength: 64 };

function fixedBatch(): TrainBatch {
  const B = 2;
  const T = 12;
  const tokens = new Int32Array(B * T).map((_, i) => (i * 7 + 3) % 53);
  const targets = new Int32Array(B * T).map((_, i) => (i * 7 + 10) % 53);
  return { tokens, targets, batchSize: B, seqLen: T };
}

describe('Trainer', () => {
  it('overfits a fixed batch, off the event loop', async () => {
    await using trainer = await createTrainer({ config, seed: 1 }, { lr: 1e-2 });
    expect(trainer.parameterCount).toBeGreaterThan(0);
    const batch = fixedBatch();
    let ticks = 0;
    const timer = setInterval(() => ticks++, 0);
    const first = await trainer.step(batch);
    let last = first;
    for (let i = 0; i < 60; i++) last = await trainer.step(batch);
    clearInterval(timer);
    expect(first.applied).toBe(true);
    expect(last.loss).toBeLessThan(first.loss * 0.3);
    expect(trainer.steps).toBe(61);
    expect(ticks).toBeGreaterThan(0);
  });

  it('snapshots swap into a running model between requests', async () => {
    const dir = tempDir('osd-trainer-');
    await writeRandomModel(join(dir, 'm.gguf'), { ...config, seed: 5 });
    await using model = await loadModel(join(dir, 'm.gguf'));
    await using trainer = await createTrainer(model, { lr: 1e-2 });
    const before = await model.forward([1, 2, 3]);
    // A sequence that started before the swap keeps its weights.
    const seq = model.createSequence();
    await seq.evaluate([1, 2]);
    for (let i = 0; i < 5; i++) await trainer.step(fixedBatch());
    const snap = await trainer.snapshot();
    model.setWeights(snap);
    const after = await model.forward([1, 2, 3]);
    expect(Array.from(after)).toEqual(Array.from(await snap.forward([1, 2, 3])));
    expect(Array.from(after)).not.toEqual(Array.from(before));
    const old = await seq.evaluate([3]);
    expect(Array.from(old)).toEqual(Array.from(before.subarray(2 * 53)));
    await seq.dispose();
    await snap.dispose();
    const other = await createTrainer({ config: { ...config, layers: 1 }, seed: 2 });
    const wrong = await other.snapshot();
    expect(() => model.setWeights(wrong)).toThrow(/shape/);
    await Promise.all([other.dispose(), wrong.dispose()]);
    // Same shape, other settings: model.info would have gone stale (it kept context 64 while new
    // sequences got 8).
    for (const change of [{ contextLength: 8 }, { ropeTheta: 1e6 }]) {
      await using t = await createTrainer({ config: { ...config, ...change }, seed: 2 });
      await using w = await t.snapshot();
      expect(() => model.setWeights(w), JSON.stringify(change)).toThrow(/other settings/);
    }
    expect(model.info.contextLength).toBe(64);
  });

  it('a batch in which no position counts takes no step (momentum and weight decay moved the weights)', async () => {
    await using trainer = await createTrainer({ config, seed: 4 }, { lr: 1e-2, weightDecay: 0.1 });
    await trainer.step(fixedBatch()); // moments that would carry the weights on
    const before = await trainer.snapshot();
    const none = { ...fixedBatch(), targets: new Int32Array(24).fill(-1) };
    const r = await trainer.step(none);
    expect(r).toMatchObject({ applied: false, loss: 0, gradNorm: 0, step: 1 });
    expect(trainer.steps).toBe(1);
    const after = await trainer.snapshot();
    expect(Array.from(await after.forward([1, 2, 3]))).toEqual(Array.from(await before.forward([1, 2, 3])));
    // A distillation batch with every row masked, likewise.
    const V = config.vocabSize;
    const masked = { tokens: fixedBatch().tokens, batchSize: 2, seqLen: 12, teacherLogits: new Float32Array(24 * V), mask: new Uint8Array(24) };
    expect(await trainer.step(masked)).toMatchObject({ applied: false, step: 1 });
    await Promise.all([before.dispose(), after.dispose()]);
  });

  it('a checkpoint with damaged moments or weights is refused at load (a NaN moment ruined every later step)', async () => {
    const { readGgufLayout } = await import('../lib/train/ggufRewrite.js');
    const { openSync, writeSync, closeSync, copyFileSync } = await import('node:fs');
    const dir = tempDir('osd-ckpt-bad-');
    await using a = await createTrainer({ config, seed: 3 });
    await a.step(fixedBatch());
    const good = join(dir, 'good.ckpt');
    await a.save(good);
    const layout = readGgufLayout(good);
    const at = (prefix: string) => layout.tensors.find((t) => t.name.startsWith(prefix))!;
    for (const [tensor, value] of [
      [at('osd.adam_v.'), NaN],
      [at('osd.adam_v.'), -1],
      [at('osd.adam_m.'), Infinity],
      [at('token_embd'), NaN],
    ] as const) {
      const path = join(dir, 'bad.ckpt');
      copyFileSync(good, path);
      const fd = openSync(path, 'r+');
      writeSync(fd, Buffer.from(Float32Array.of(value).buffer), 0, 4, tensor.fileOffset + 4 * 3);
      closeSync(fd);
      await expect(loadTrainerCheckpoint(path), `${tensor.name} = ${value}`).rejects.toThrow(
        expect.objectContaining({ code: 'OSD_IO', message: expect.stringMatching(/not finite|holds/) }),
      );
    }
    await (await loadTrainerCheckpoint(good)).dispose();
    // Settings out of range are refused too: a head chunk of 2^40 rows would be allocated.
    const { writeGgufRaw, readTensorBytes } = await import('../lib/train/ggufRewrite.js');
    const kvs = layout.kvs.map((kv) => {
      if (kv.key !== 'osd.train.head_chunk') return kv;
      const raw = Buffer.from(kv.raw);
      if (raw.length === 12) raw.writeBigInt64LE(1n << 40n, 4);
      else raw.writeUInt32LE(0x80000000, 4);
      return { key: kv.key, raw };
    });
    const tensors = layout.tensors.map((t) => ({ name: t.name, dims: t.dims, type: t.type, data: Buffer.from(readTensorBytes(layout, t.name)) }));
    writeGgufRaw(join(dir, 'chunk.ckpt'), kvs, tensors, layout.alignment);
    await expect(loadTrainerCheckpoint(join(dir, 'chunk.ckpt'))).rejects.toThrow(/headChunk must be in \[1, 1048576\]/);
  });

  it('configure applies from the next step without waiting for a running one, and checks its options', async () => {
    // A step of a few hundred milliseconds: configure took the trainer's lock and so held the event
    // loop for all of it.
    const big = { vocabSize: 512, embeddingLength: 128, layers: 2, heads: 4, feedForwardLength: 256, contextLength: 256 };
    await using trainer = await createTrainer({ config: big, seed: 1 }, { lr: 1e-3 });
    const B = 8, T = 256;
    const batch = { tokens: new Int32Array(B * T).map((_, i) => (i * 7) % 512), targets: new Int32Array(B * T).map((_, i) => (i * 11) % 512), batchSize: B, seqLen: T };
    await trainer.step(batch); // warm-up
    const t0 = performance.now();
    const first = trainer.step(batch);
    await new Promise((r) => setTimeout(r, 5)); // the step is running on its worker
    const c0 = performance.now();
    trainer.configure({ lr: 2e-4 });
    const configureMs = performance.now() - c0;
    const r1 = await first;
    const stepMs = performance.now() - t0;
    const r2 = await trainer.step(batch);
    // The running step keeps its settings (one not started yet when configure ran takes the new ones).
    expect([1e-3, 2e-4].some((lr) => Math.abs(r1.lr - lr) < 1e-6 * lr)).toBe(true);
    expect(r2.lr).toBeCloseTo(2e-4, 9);
    expect(configureMs).toBeLessThan(stepMs / 4);
    // Settings are checked where they are given; a misspelt key was ignored.
    expect(() => trainer.configure({ lr: -1 })).toThrow(/lr/);
    expect(() => trainer.configure({ learning_rate: 1 } as never)).toThrow(/^options\.learning_rate is not an option/);
    expect(() => trainer.configure(null as never)).toThrow(TypeError);
    expect((await trainer.step(batch)).lr).toBeCloseTo(2e-4, 9);
    await expect(createTrainer({ config: { ...config, kv_heads: 2 } } as never)).rejects.toThrow(/^source\.config\.kv_heads is not an option \(did you mean kvHeads\?\)/);
    await expect(createTrainer({ config, sed: 1 } as never)).rejects.toThrow(/^source\.sed is not an option/);
  });

  it('a checkpoint resumes with identical losses', async () => {
    const dir = tempDir('osd-ckpt-');
    const a = await createTrainer({ config, seed: 3 }, { lr: 5e-3, schedule: 'cosine', totalSteps: 20, warmupSteps: 2 });
    for (let i = 0; i < 3; i++) await a.step(fixedBatch());
    await a.save(join(dir, 't.ckpt'));
    const b = await loadTrainerCheckpoint(join(dir, 't.ckpt'));
    for (let i = 0; i < 3; i++) {
      const ra = await a.step(fixedBatch());
      const rb = await b.step(fixedBatch());
      expect(rb).toEqual(ra);
    }
    await Promise.all([a.dispose(), b.dispose()]);
  });

  it("a resumed checkpoint's snapshots keep the source model's tokenizer", async () => {
    const dir = tempDir('osd-ckpt-tk-');
    await using source = await loadModel(join(import.meta.dirname, '../models/default-draft.gguf'));
    const a = await createTrainer(source, { lr: 1e-3 });
    await a.save(join(dir, 'd.ckpt'));
    await a.dispose();
    await using b = await loadTrainerCheckpoint(join(dir, 'd.ckpt'));
    await using snap = await b.snapshot();
    expect(snap.tokenizer).toBeDefined();
    expect(Array.from(snap.tokenizer!.encode('Call me Ishmael.'))).toEqual(Array.from(source.tokenizer!.encode('Call me Ishmael.')));
    expect(snap.chatTemplate).toBe(source.chatTemplate);
    expect((await snap.generate({ prompt: 'Once', maxTokens: 3 })).tokens.length).toBe(3);
  });

  it('distills toward a sparse teacher at masked positions', async () => {
    await using trainer = await createTrainer({ config, seed: 4 }, { lr: 1e-2 });
    const b = fixedBatch();
    const n = b.batchSize * b.seqLen;
    const indices = new Int32Array(n * 2).map((_, i) => (i % 2 === 0 ? 5 : 9));
    const probs = new Float32Array(n * 2).map((_, i) => (i % 2 === 0 ? 0.7 : 0.2));
    const mask = new Uint8Array(n).map((_, i) => (i % 3 === 0 ? 1 : 0));
    const batch: TrainBatch = { tokens: b.tokens, batchSize: b.batchSize, seqLen: b.seqLen, teacher: { indices, probs }, mask };
    const first = await trainer.evalLoss(batch);
    for (let i = 0; i < 30; i++) await trainer.step(batch);
    expect(await trainer.evalLoss(batch)).toBeLessThan(first * 0.5);
  });

  it('trains the same on its own thread pool as on the shared one (setTrainThreads)', async () => {
    const run = async () => {
      await using t = await createTrainer({ config: { ...config, vocabSize: 300, embeddingLength: 64 }, seed: 9 }, { lr: 1e-2 });
      const batch = { ...fixedBatch(), targets: fixedBatch().targets!.map((x) => (x * 5) % 300) };
      const losses: number[] = [];
      for (let i = 0; i < 4; i++) losses.push((await t.step(batch)).loss);
      return losses;
    };
    try {
      expect(setTrainThreads(0)).toBe(0);
      const shared = await run();
      expect(setTrainThreads(1)).toBe(1);
      const one = await run();
      expect(setTrainThreads(3)).toBe(3);
      const three = await run();
      expect(one).toEqual(shared);
      expect(three).toEqual(shared);
    } finally {
      setTrainThreads(0);
    }
    expect(() => setTrainThreads(-1)).toThrow(RangeError);
    expect(() => setTrainThreads(1.5)).toThrow(/threads/);
    expect(() => setTrainThreads('2' as never)).toThrow(new TypeError('threads must be a number, got "2"'));
  });

  it('rejects bad input with errors naming the argument', async () => {
    await using trainer = await createTrainer({ config, seed: 1 });
    await expect(trainer.step({ ...fixedBatch(), seqLen: 5 })).rejects.toThrow(/batch.tokens has length/);
    await expect(trainer.step({ tokens: new Int32Array(24), batchSize: 2, seqLen: 12 })).rejects.toThrow(/targets|teacher/);
    const bad = fixedBatch();
    bad.tokens[3] = 99;
    await expect(trainer.step(bad)).rejects.toThrow(/tokens\[3\]/);
    await expect(createTrainer({ config: { ...config, heads: 3 } })).rejects.toThrow(/multiple/);
    await expect(createTrainer({ config, seed: 1 }, { lr: -1 })).rejects.toThrow(/lr/);
    // A learning rate float32 rounds to 0 trained nothing, silently; one past its range became Infinity.
    await expect(createTrainer({ config, seed: 1 }, { lr: 1e-50 })).rejects.toThrow(new RangeError('lr is 1e-50, which a 32-bit float cannot hold (it would be 0)'));
    await expect(createTrainer({ config, seed: 1 }, { eps: 1e300 })).rejects.toThrow(/^eps is 1e\+300, which a 32-bit float cannot hold/);
    // A RoPE base <= 0 trained to NaN losses.
    await expect(createTrainer({ config: { ...config, ropeTheta: -1 } })).rejects.toThrow(new RangeError('config.ropeTheta must be a finite number > 0, got -1'));
    await expect(loadTrainerCheckpoint('/nonexistent.ckpt')).rejects.toThrow(/nonexistent/);
    // Rejections, as for every promise the trainer returns. An ambiguous batch: the teacher was
    // ignored silently, and so was a mask with targets; so are loss settings with targets.
    await expect(trainer.step({ ...fixedBatch(), teacherLogits: new Float32Array(24 * 53) })).rejects.toThrow(
      new TypeError('batch: give either targets (cross-entropy) or a teacher (teacherLogits or teacher), not both'),
    );
    await expect(trainer.evalLoss({ ...fixedBatch(), mask: new Uint8Array(24).fill(1) })).rejects.toThrow(/^batch\.mask goes with a teacher/);
    await expect(trainer.step({ ...fixedBatch(), kind: 'reverse-kl' })).rejects.toThrow(new TypeError('batch.kind goes with a teacher (distillation); targets train on cross-entropy'));
    await expect(trainer.evalLoss({ ...fixedBatch(), temperature: 2 })).rejects.toThrow(/^batch\.temperature goes with a teacher/);
    // A misspelt key was ignored: here the sparse teacher, so the batch trained on nothing it named.
    await expect(trainer.step({ ...fixedBatch(), targets: undefined, teachr: {} } as never)).rejects.toThrow(
      /^batch\.teachr is not an option; the options are: tokens, batchSize, seqLen, targets, kind, teacherLogits, teacher, mask, temperature, beta$/,
    );
    await expect(trainer.evalLoss({ ...fixedBatch(), seq_len: 12 } as never)).rejects.toThrow(/batch\.seq_len is not an option \(did you mean seqLen\?\)/);
    await trainer.dispose();
    await expect(trainer.step(fixedBatch())).rejects.toThrow(/disposed/);
    await trainer.dispose();  // twice is fine
  });

  it('dispose waits for a queued step; the native trainer is freed by a promise (on a worker thread)', async () => {
    const { addon } = await import('../lib/addon.js');
    const native = await (addon as unknown as { createTrainer(s: unknown, o: object): Promise<{ dispose(): unknown; steps: number }> }).createTrainer({ config, seed: 1 }, {});
    const freeing = native.dispose();
    expect(freeing).toBeInstanceOf(Promise);  // it returned undefined, having freed the trainer in the call
    await freeing;
    const trainer = await createTrainer({ config, seed: 1 });
    const step = trainer.step(fixedBatch());
    const disposing = trainer.dispose();
    expect(disposing).toBeInstanceOf(Promise);
    expect((await step).loss).toBeGreaterThan(0);
    await disposing;
    await expect(trainer.step(fixedBatch())).rejects.toThrow(/disposed/);
  });
});
