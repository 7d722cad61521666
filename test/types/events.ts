// Compiled (not run) by test/types.test.ts with tsc --strict: the public API's types, events
// included. Each @ts-expect-error line must fail to type-check, or tsc reports the directive unused.
import type { DraftPool, Model, OnlineDecoder, SpeculativeDecoder, StreamChunk } from '../../lib/index.js';

declare const online: OnlineDecoder;
declare const spec: SpeculativeDecoder;
declare const pool: DraftPool;
declare const model: Model;

online.on('update', (e) => {
  const loss: number = e.lossAfter;
  void loss;
});
online.on('rollback', (e) => void e.reason.length);
online.on('update-error', (e) => void e.error.message);
online.on('acceptance', (e) => void e.rate.toFixed(2));
online.on('step', (e) => void (e.accepted <= e.drafted));
spec.on('step', (e) => void e.emitted);
pool.on('update', (e) => void `${e.draft} ${e.update}`);
pool.on('fork', (e) => void e.from);

// @ts-expect-error: an update event has no such field
online.on('update', (e) => e.nonexistentField);
// @ts-expect-error: no such event
online.on('updated', () => {});
// @ts-expect-error: a decoder emits only step events
spec.on('update', () => {});
// @ts-expect-error: a pool's fork event names strings
pool.on('fork', (e: { draft: number }) => e);

export async function streams(): Promise<void> {
  for await (const c of model.stream({ prompt: 'x', maxTokens: 4 })) {
    const chunk: StreamChunk = c;
    void chunk.text;
  }
  const it = pool.stream({ prompt: 'x', maxTokens: 4, label: 'a' });
  let r = await it.next();
  while (!r.done) r = await it.next();
  const served: string = r.value.draft;
  void served;
}
