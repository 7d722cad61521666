// The shape of the native addon as loaded from build/ or prebuilds/. The public API in kernels.ts
// wraps these with documentation; the addon itself checks every argument.

export interface SamplingOptions {
  /** 0 means greedy (argmax, ties to the lowest id). Must be finite and >= 0. */
  temperature: number;
  /** Keep the k most likely tokens; 0 or omitted means off. */
  topK?: number;
  /** Keep the smallest set of most likely tokens whose mass reaches topP, in (0, 1]; 1 means off. */
  topP?: number;
}

export type Seed = number | bigint;

export interface BackendInfo {
  name: string;
  compiled: boolean;
  usable: boolean;
  detail: string;
}

export type BackendName = 'cpu' | 'cuda' | 'auto';

export interface BackendSelection {
  /** The backend the kernels now run on. */
  name: 'cpu' | 'cuda';
  /** What was asked for, after the OSD_BACKEND override. */
  requested: BackendName;
  /** Why this backend: for 'auto' on a machine without a GPU, e.g. "cuda not compiled into this addon ...". */
  reason: string;
}

export interface NativeAddon {
  /** Positional: lib/kernels.ts reads the options; the emitted tokens go to out[0..acceptedCount]. */
  verifyChain(
    targetLogits: unknown,
    draftLogits: unknown,
    draftTokens: unknown,
    vocabSize: unknown,
    sampling: unknown,
    temperature: unknown,
    topK: unknown,
    topP: unknown,
    seed: unknown,
    stream: unknown,
    fault: unknown,
    out: Int32Array,
  ): number;
  verifyChainBatch(o: object): { acceptedCounts: Int32Array; tokens: Int32Array; offsets: Int32Array };
  verifyTree(o: object): { path: Int32Array; tokens: Int32Array };
  /** Positional, as verifyChain; returns the loss (the gradient goes to gradOut or freshGrad). */
  distillLoss(
    kind: unknown,
    studentLogits: unknown,
    teacherLogits: unknown,
    teacher: unknown,
    teacherIndices: unknown,
    teacherProbs: unknown,
    teacherResidual: unknown,
    vocabSize: unknown,
    temperature: unknown,
    beta: unknown,
    mask: unknown,
    computeGrad: unknown,
    gradOut: unknown,
    freshGrad: Float32Array | undefined,
  ): number;
  adamwStep(o: object): void;
  globalNorm(values: Float32Array): number;
  teacherTopK(logits: Float32Array, vocabSize: number, k: number): { ids: Int32Array; probs: Float32Array; residual: Float32Array };
  bandwidthProbe(o?: object): { readBytesPerSecond: number; copyBytesPerSecond: number; threads: number };
  setThreads(threads: number): number;
  backends(): BackendInfo[];
  selectBackend(name: string): BackendSelection;
  activeBackend(): BackendSelection;
  [key: string]: unknown;
}
