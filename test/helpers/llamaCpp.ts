// What the tests that compare with llama.cpp share: the SmolLM2 file in ../shared and node-llama-cpp,
// loaded when installed (a missing devDependency skips those comparisons, saying which).
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { expect } from 'vitest';
import type { Model } from '../../lib/index.js';

export type Nlc = typeof import('node-llama-cpp');

export const repoRoot = fileURLToPath(new URL('../..', import.meta.url));
export const SMOLLM2 = resolve(repoRoot, '../shared/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf');

/** node-llama-cpp, or null with a warning that names what is skipped. */
export async function importNodeLlamaCpp(skipped: string): Promise<Nlc | null> {
  try {
    return await import('node-llama-cpp');
  } catch {
    console.warn(`skip: node-llama-cpp is not installed; ${skipped}`);
    return null;
  }
}

type LlamaModel = import('node-llama-cpp').LlamaModel;

/**
 * Greedy continuations of each prompt in llama.cpp (one thread) and in this engine: they must agree
 * until llama.cpp stops, or differ first at a near-tie of this engine's logits (margin below
 * `nearTie`, and this engine's token its argmax). Returns the tokens agreed over all prompts.
 */
export async function agreeGreedy(
  lm: LlamaModel,
  ours: Model,
  prompts: string[],
  o: { tokens: number; nearTie: number; special?: boolean; contextSize?: number },
): Promise<number> {
  const V = ours.info.vocabSize;
  // One llama.cpp thread: its spinning thread pool stalls badly when the cores are oversubscribed
  // (as on shared CI machines), and the results do not depend on it.
  const ctx = await lm.createContext({ contextSize: o.contextSize ?? 512, threads: 1 });
  let agreed = 0;
  try {
    for (const p of prompts) {
      const toks = Array.from(ours.tokenizer!.encode(p, { special: o.special ?? false }));
      const seq = ctx.getSequence();
      const theirs: number[] = [];
      for await (const t of seq.evaluate(toks as never, { temperature: 0 })) {
        theirs.push(t);
        if (theirs.length >= o.tokens) break;
      }
      seq.dispose();
      const mine = Array.from((await ours.generate({ tokens: toks, maxTokens: o.tokens, stopTokens: [] })).tokens);
      let k = 0;
      while (k < theirs.length && mine[k] === theirs[k]) k++;
      agreed += k;
      if (k === theirs.length) continue; // agreed until llama.cpp stopped (EOS) or the token count
      const logits = await ours.forward([...toks, ...mine.slice(0, k)]);
      const row = logits.subarray((toks.length + k - 1) * V, (toks.length + k) * V);
      expect(row[mine[k]!]! - row[theirs[k]!]!, `${JSON.stringify(p)}: token ${k} is ${mine[k]} here and ${theirs[k]} in llama.cpp`).toBeLessThan(o.nearTie);
      let best = 0;
      for (let j = 1; j < V; j++) if (row[j]! > row[best]!) best = j;
      expect(best).toBe(mine[k]);
    }
  } finally {
    await ctx.dispose();
  }
  return agreed;
}
