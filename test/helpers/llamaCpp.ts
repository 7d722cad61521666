// What the tests that compare with llama.cpp share: the SmolLM2 file in ../shared and node-llama-cpp,
// loaded when installed (a missing devDependency skips those comparisons, saying which).
import { resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

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
