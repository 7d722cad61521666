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
  flopsProbe,
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
export { selectBackend, activeBackend } from './backend.js';
export type { BackendName, BackendSelection } from './backend.js';
export { version } from './version.js';
/** The embedded default model pair (what `osd demo` and `osd serve` use): absolute paths. */
export { DEFAULT_TARGET as defaultTargetPath, DEFAULT_DRAFT as defaultDraftPath } from './demo.js';
export { addonPath } from './addon.js';
export { loadModel, writeRandomModel, Model, Sequence, STORE_TYPES, isStoreType, chainBatchStats } from './Model.js';
export type {
  ModelInfo,
  RandomModelConfig,
  StoreType,
  LoadModelOptions,
  ModelDevice,
  GenerateOptions,
  GenerateResult,
  StopReason,
  EvaluateOptions,
  DraftOptions,
  DraftResult,
  ChainStepOptions,
  ChainStepResult,
  ChainRunOptions,
  ChainRunResult,
  ChatTemplateOptions,
  KvType,
} from './Model.js';
export type { ChatMessage, ApplyChatTemplateOptions } from './chatTemplate.js';
export { Tokenizer, TokenStreamDecoder, TokenType, loadTokenizer } from './Tokenizer.js';
export type { VocabData, EncodeOptions, DecodeOptions, StreamDecoderOptions, TokenIds } from './Tokenizer.js';
export { createSpeculativeDecoder, SpeculativeDecoder, expectedSpeedup, bestLength, bestLengthByPosition, ngramLookup, sampledTreeShape } from './SpeculativeDecoder.js';
export type {
  Strategy,
  SpeculativeDecoderOptions,
  TreeChildren,
  TreeCosts,
  SpeculativeGenerateOptions,
  SpeculativeResult,
  RequestStats,
  StreamChunk,
  StepEvent,
  SpeculativeDecoderEvents,
  VerifiedStep,
  WeightSwap,
} from './SpeculativeDecoder.js';
export { createTrainer, loadTrainerCheckpoint, setTrainThreads, Trainer } from './Trainer.js';
export type { TrainerOptions, TrainBatch, TrainStepResult, NewModelConfig } from './Trainer.js';
export { copyModel, createOnlineDecoder, OnlineDecoder, teacherTopK } from './OnlineDecoder.js';
export type {
  AcceptanceEvent,
  OnlineDecoderEvents,
  OnlineDecoderOptions,
  OnlineDistillOptions,
  OnlineMetrics,
  RollbackEvent,
  UpdateErrorEvent,
  UpdateEvent,
  UpdateStartEvent,
} from './OnlineDecoder.js';
export { trainDraft, frequentTokens, DEFAULT_DRAFT_SHAPE } from './train/draft.js';
export type { DraftShape, HeldOutPoint, TrainDraftOptions, TrainDraftProgress, TrainDraftResult } from './train/draft.js';
export { createDraftPool, DraftPool, draftCheckpointPath } from './DraftPool.js';
export type { DraftPoolEvents, DraftPoolOptions, PoolGenerateOptions, PoolResult, Router, RouteRequest } from './DraftPool.js';
export { createServer } from './server.js';
export type * from './server.js';
