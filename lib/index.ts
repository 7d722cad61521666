export {
  verifyChain,
  verifyChainBatch,
  verifyTree,
  distillLoss,
  adamwStep,
  globalNorm,
  backends,
  setThreads,
  bandwidthProbe,
} from './kernels.js';
export type {
  SamplingOptions,
  Seed,
  BackendInfo,
  VerifyChainOptions,
  VerifyChainResult,
  VerifyChainBatchOptions,
  VerifyChainBatchResult,
  VerifyTreeOptions,
  VerifyTreeResult,
  TreeChildrenMode,
  DistillLossKind,
  DistillLossOptions,
  DistillLossResult,
  SparseTeacher,
  AdamWOptions,
} from './kernels.js';
export { version } from './version.js';
export { addonPath } from './addon.js';
