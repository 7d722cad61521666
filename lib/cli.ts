#!/usr/bin/env node
// The `osd` command line.
import { parseArgs } from 'node:util';
import { rangeText } from './args.js';
import type { Strategy } from './SpeculativeDecoder.js';
import { CLI_OPTIONS, DEFAULT_MAX_CONCURRENT } from './cliOptions.cjs';
import { effectiveThreadPool } from './threadPool.cjs';

/** A bad command line (exit code 2), as opposed to a failure while running (1). */
class UsageError extends Error {}

const STRATEGY_FORMS = 'chain[:G], tree[:NODES], adaptive[:MAX], adaptive+lookup[:MAX] or ngram[:G]';

/** --strategy's value as a Strategy: a kind, and after a colon its size (chain length, tree budget, adaptive's longest chain, lookup length). */
function parseStrategy(spec: string): Strategy {
  const m = /^(chain|tree|adaptive|adaptive\+lookup|ngram)(?::(\d+))?$/.exec(spec);
  if (!m) throw new UsageError(`--strategy must be ${STRATEGY_FORMS}, got '${spec}'`);
  const n = m[2] === undefined ? undefined : Number(m[2]);
  if (n !== undefined && !(n >= 1 && n <= (m[1] === 'tree' ? 256 : 64)))
    throw new UsageError(`--strategy ${m[1]}:N needs N in [1, ${m[1] === 'tree' ? 256 : 64}], got '${spec}'`);
  switch (m[1]) {
    case 'chain':
      return { kind: 'chain', length: n ?? 4 };
    case 'tree':
      return { kind: 'tree', budget: n ?? 16 };
    case 'adaptive':
      return { kind: 'adaptive', maxLength: n ?? 8 };
    case 'adaptive+lookup':
      return { kind: 'adaptive', maxLength: n ?? 8, lookup: true };
    default:
      return { kind: 'ngram', length: n ?? 4 };
  }
}

const HELP = `Usage: osd <command> [options]

Commands:
  version              print the package version and the backends found (default)
  backends             list the compiled backends and whether each is usable here
  generate [prompt]    generate text with a model
      --model PATH         GGUF or llama2.c file (default: the embedded default target)
      --draft PATH         speculative decoding with this draft
      --strategy S         ${STRATEGY_FORMS}
                           (default adaptive with --draft; ngram needs no draft)
      --chat               send the prompt as a user message through the model's chat template
      --system TEXT        with --chat: a system message before it
      --template FILE      with --chat: a Jinja chat template to use instead of the model's own
      --max-tokens N       default 128
      --temperature T      default 0 (greedy); --top-p P, --top-k K, --seed S
      --device D           cpu (default) or cuda: run the models' passes on the GPU (the CUDA build)
  demo                 the main job: online speculative decoding on a stream whose domain shifts
      --target PATH --draft PATH   default: the embedded default pair (e.g. SmolLM2-135M and its draft:
                           --target SmolLM2-135M-Instruct.Q4_1.gguf --draft smollm2-draft.gguf)
      --requests N         requests per phase (default 24; also --requests-per-phase)
      --max-tokens N       tokens per request (default 32)
      --runs LIST          static,online,pool (default all three)
      --strategy S         ${STRATEGY_FORMS} (default chain:4)
      --positions P        what the online updates learn from: mismatch (default: where the draft
                           was corrected, and half the accepted) or all (every served token: the
                           draft then learns even while a strategy decodes without it)
      --lr X --top-k K     learning rate and teacher entries per position of the online updates
                           (default 3e-3 and top-k 32; 1e-3 and 64 for vocabularies of 32768 tokens and more)
      --save-draft PATH    write the online run's adapted draft (GGUF)
      --out DIR            where the plots go (demo.svg, and demo.png where a converter is found; default osd-demo)
      --device D           cpu (default) or cuda: run both models' passes on the GPU
  train-draft [FILES]  build a draft for a target by distilling it on your text (GGUF, shares its tokenizer)
      --target PATH        the target (default: the embedded default target)
      --text PATH          training text: a file, or a folder of them (repeat for more; files may also
                           follow the command, as in corpus/*.txt); each file a document
      --out PATH           the draft to write (required)
      --minutes N          time budget (default 30); --steps N: a budget of optimizer steps (whichever ends first)
      --from PATH          continue training this draft instead of starting a new one (with --layers N:
                           grown to N layers, the new ones starting as no-ops)
      --dim N --layers N --heads N --kv-heads N --ff N
                           a new draft's shape (default 128 wide, 2 layers, 4 heads, 2 key-value heads, ff 384)
      --type T             how the draft's matrices are stored (default F16)
      --lr X --top-k K --seq-len N --seed S
                           peak learning rate (1.5e-3), teacher entries per position (64), window (128), seed (1)
      --checkpoint PATH    save the trainer there every 5 minutes; a later run given it resumes
      --head-tokens N      restrict the draft's LM head to the N ids most frequent in the text: on a
                           large vocabulary the head is most of a draft's cost (default: the whole
                           vocabulary, or --from's head)
  info MODEL           what a model file holds: architecture, sizes, storage types, tokenizer, chat template
  convert IN OUT       write a model (GGUF or llama2.c) as GGUF in another storage type, atomically
      --type T             F32, F16 (default), BF16, Q8_0, Q5_0, Q5_1, Q4_0, Q4_1, IQ4_NL, IQ4_XS,
                           Q2_K, or keep (each matrix as it is); rows that do not fit a type's
                           blocks fall back as llama.cpp's quantiser does (IQ4_NL, else F16)
      --head-tokens N --text PATH
                           restrict a draft's LM head to the N ids most frequent in the text (a
                           file or folder; repeat --text for more): a cheaper draft, still exact
  serve                an OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models, /metrics)
      --target PATH --draft PATH   default: the embedded default pair
      --port N             default 8080 (0 picks a free port)
      --host ADDR          default 127.0.0.1
      --max-concurrent N   generations decoded at once, the rest queue (default ${DEFAULT_MAX_CONCURRENT}); osd gives
                           libuv's thread pool N + 4 threads unless UV_THREADPOOL_SIZE is set
      --no-batching        decode each generation's steps on their own (default: the
                           generations in flight share each pass)
      --model-id NAME      the model name clients send (default: the target's file name)
      --strategy S         ${STRATEGY_FORMS} (default chain:4)
      --static             keep the draft fixed (default: it learns online from the traffic)
      --grace S            on SIGTERM / SIGINT, let requests in flight finish for up to S seconds
                           (default 30); a second signal stops at once
      --device D           cpu (default) or cuda: run both models' passes on the GPU

Options:
  --json         machine-readable output
  -v, --version  the version command
  -h, --help     show this help (also: osd help)
`;

async function main(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    allowPositionals: true,
    options: CLI_OPTIONS,
  });
  const command = values.version ? 'version' : (positionals[0] ?? 'version');
  if (values.help || command === 'help') {
    process.stdout.write(HELP);
    return 0;
  }
  // Each command's own options: another command's option would be ignored silently (--model on
  // serve, which takes --target, served the default pair).
  const own: Record<string, string[]> = {
    version: [],
    backends: [],
    generate: ['model', 'draft', 'strategy', 'chat', 'system', 'template', 'max-tokens', 'temperature', 'top-p', 'top-k', 'seed', 'device'],
    demo: ['target', 'draft', 'requests', 'requests-per-phase', 'max-tokens', 'runs', 'strategy', 'positions', 'lr', 'top-k', 'save-draft', 'out', 'device'],
    serve: ['target', 'draft', 'port', 'host', 'max-concurrent', 'no-batching', 'model-id', 'strategy', 'static', 'grace', 'device'],
    convert: ['type', 'head-tokens', 'text'],
    info: [],
    'train-draft': ['target', 'text', 'out', 'minutes', 'steps', 'from', 'dim', 'layers', 'heads', 'kv-heads', 'ff', 'type', 'lr', 'top-k', 'seq-len', 'seed', 'checkpoint', 'head-tokens'],
  };
  const allowed = own[command];
  if (allowed) {
    for (const key of Object.keys(values))
      if (!['json', 'help', 'version', ...allowed].includes(key))
        throw new UsageError(`--${key} is not an option of '${command}' (osd help lists each command's options)`);
    if (command !== 'generate' && command !== 'convert' && command !== 'info' && command !== 'train-draft' && positionals.length > 1)
      throw new UsageError(`'${command}' takes no arguments, got '${positionals.slice(1).join(' ')}'`);
  }
  const num = (v: string | undefined, name: string, fallback: number): number => {
    if (v === undefined) return fallback;
    // Decimal only: Number('') is 0 and Number('0x10') is 16.
    const n = /^\s*[+-]?(\d+(\.\d*)?|\.\d+)(e[+-]?\d+)?\s*$/i.test(v) ? Number(v) : NaN;
    if (!Number.isFinite(n)) throw new UsageError(`--${name} must be a number, got '${v}'`);
    return n;
  };
  // Integers are checked here, so that the message names the flag (not the API option behind it).
  const int = (v: string | undefined, name: string, fallback: number, min: number, max = Number.MAX_SAFE_INTEGER): number => {
    const n = num(v, name, fallback);
    if (!Number.isInteger(n) || n < min || n > max)
      throw new UsageError(`--${name} must be an integer ${rangeText(min, max)}, got '${v}'`);
    return n;
  };
  const device = values.device ?? 'cpu';
  if (device !== 'cpu' && device !== 'cuda') throw new UsageError(`--device must be cpu or cuda, got '${values.device}'`);
  const osd = await import('./index.js');
  switch (command) {
    case 'version':
    case 'backends': {
      const list = osd.backends();
      const active = osd.activeBackend();
      if (values.json) {
        process.stdout.write(JSON.stringify({ version: osd.version, addon: osd.addonPath, backends: list, active }, null, 2) + '\n');
      } else {
        if (command === 'version') process.stdout.write(`online-specdec ${osd.version}\n`);
        for (const b of list) process.stdout.write(`  ${b.name}: ${b.usable ? 'usable, ' : ''}${b.detail}\n`);
        process.stdout.write(`  kernels run on: ${active.name} (${active.requested}: ${active.reason}; set OSD_BACKEND to change)\n`);
      }
      return 0;
    }
    case 'generate': {
      const { DEFAULT_TARGET } = await import('./demo.js');
      const strategy = values.strategy === undefined ? undefined : parseStrategy(values.strategy);
      if (strategy && strategy.kind !== 'ngram' && !values.draft) throw new UsageError(`--strategy ${values.strategy} needs --draft PATH (only ngram runs without a draft)`);
      const model = await osd.loadModel(values.model ?? DEFAULT_TARGET, { device });
      try {
        const text = positionals.slice(1).join(' ');
        if (!text) throw new UsageError(`give a prompt: osd generate ${values.chat ? '--chat "What is the capital of France?"' : '"Once upon a time"'}`);
        if (!values.chat && (values.system !== undefined || values.template !== undefined)) throw new UsageError('--system and --template go with --chat');
        // A chat prompt goes as token ids: its markup (<|im_start|> ...) is special tokens, not text.
        let input: { prompt: string } | { tokens: Int32Array } = { prompt: text };
        if (values.chat) {
          const { readFileSync } = await import('node:fs');
          let template: string | undefined;
          try {
            template = values.template === undefined ? undefined : readFileSync(values.template, 'utf8');
          } catch (e) {
            throw new Error(`--template: cannot read ${values.template}: ${(e as Error).message}`);
          }
          if (template === undefined && model.chatTemplate === undefined)
            throw new Error(`${values.model ?? DEFAULT_TARGET} has no chat template (tokenizer.chat_template); pass --template FILE`);
          const messages = [...(values.system !== undefined ? [{ role: 'system', content: values.system }] : []), { role: 'user', content: text }];
          input = { tokens: model.applyChatTemplate(messages, { template, tokenize: true }) };
        }
        const sampling = {
          temperature: num(values.temperature, 'temperature', 0),
          topP: num(values['top-p'], 'top-p', 1),
          topK: int(values['top-k'], 'top-k', 0, 0, 2 ** 31 - 1),
        };
        // Checked as the kernels check them (float32), with the flags' names.
        if (!(sampling.temperature === 0 || Math.fround(sampling.temperature) >= 2 ** -126))
          throw new UsageError(`--temperature must be 0 (greedy) or a number >= 1.2e-38, got '${values.temperature}'`);
        if (!(Math.fround(sampling.topP) > 0 && sampling.topP <= 1)) throw new UsageError(`--top-p must be in (0, 1], got '${values['top-p']}'`);
        const maxTokens = int(values['max-tokens'], 'max-tokens', 128, 1);
        const seed = int(values.seed, 'seed', 0, 0);
        const ac = new AbortController();
        process.once('SIGINT', () => ac.abort());
        if (values.draft || strategy) {
          const draft = values.draft ? await osd.loadModel(values.draft, { device }) : undefined;
          const dec = osd.createSpeculativeDecoder({ target: model, draft, strategy: strategy ?? { kind: 'adaptive', maxLength: 8 } });
          if (values.json) {
            // The same fields as without --draft, plus the speculative stats.
            const r = await dec.generate({ ...input, maxTokens, sampling, seed, signal: ac.signal });
            process.stdout.write(JSON.stringify({ text: r.text, tokens: Array.from(r.tokens), stopReason: r.stopReason, stats: r.stats }) + '\n');
          } else {
            for await (const chunk of dec.stream({ ...input, maxTokens, sampling, seed, signal: ac.signal })) process.stdout.write(chunk.text);
            process.stdout.write('\n');
          }
          await dec.dispose();
          await draft?.dispose();
        } else if (values.json) {
          const r = await model.generate({ ...input, maxTokens, sampling, seed, signal: ac.signal });
          process.stdout.write(JSON.stringify({ text: r.text, tokens: Array.from(r.tokens), stopReason: r.stopReason }) + '\n');
        } else {
          for await (const chunk of model.stream({ ...input, maxTokens, sampling, seed, signal: ac.signal })) process.stdout.write(chunk.text);
          process.stdout.write('\n');
        }
      } finally {
        await model.dispose();
      }
      return 0;
    }
    case 'info': {
      const [path, ...rest] = positionals.slice(1);
      if (!path) throw new UsageError('give a model: osd info model.gguf');
      if (rest.length) throw new UsageError(`'info' takes one file, got also '${rest.join(' ')}'`);
      const { statSync } = await import('node:fs');
      const model = await osd.loadModel(path);
      try {
        const i = model.info;
        // The stored type of each tensor, and the architecture's optional parts, from the file itself.
        const tensorTypes: Record<string, number> = {};
        let name: string | undefined;
        let ropeFactors = false;
        let headNorms = false;
        if (i.format === 'gguf') {
          const { readGgufMetadata } = await import('./train/bpe.js');
          const meta = readGgufMetadata(path, { maxArrayLength: 0 });
          for (const t of meta.tensors) tensorTypes[t.type] = (tensorTypes[t.type] ?? 0) + 1;
          ropeFactors = meta.tensors.some((t) => t.name === 'rope_freqs.weight');
          headNorms = meta.tensors.some((t) => t.name.endsWith('.attn_q_norm.weight'));
          if (typeof meta.metadata['general.name'] === 'string') name = meta.metadata['general.name'];
        }
        const tk = model.tokenizer;
        const tokenizer = tk ? { model: tk.model, pre: tk.pre, vocabSize: tk.vocabSize, bos: tk.bos, eos: tk.eos } : null;
        const { path: _path, ...sizes } = i;
        const report = {
          path,
          bytes: statSync(path).size,
          ...(name !== undefined && { name }),
          ...sizes,
          ropeFactors,
          headNorms,
          tensorTypes,
          tokenizer,
          chatTemplate: model.chatTemplate !== undefined,
        };
        if (values.json) {
          process.stdout.write(JSON.stringify(report) + '\n');
        } else {
          const parts = [i.architecture, ...(ropeFactors ? ['RoPE factors (rope_freqs.weight)'] : []), ...(headNorms ? ['query and key head norms'] : [])];
          const types = Object.entries(tensorTypes).map(([t, n]) => `${n} ${t}`).join(', ');
          const lines = [
            `${path}: ${(report.bytes / 1e6).toFixed(1)} MB, ${i.format === 'gguf' ? 'GGUF' : 'llama2.c'}${name !== undefined ? `, "${name}"` : ''}`,
            `  architecture  ${parts.join(', ')}`,
            `  sizes         ${i.layers} layers, embedding ${i.embeddingLength}, ${i.heads} heads / ${i.kvHeads} key-value (head ${i.headDim}), feed-forward ${i.feedForwardLength}`,
            `  context       ${i.contextLength} tokens; RoPE theta ${i.ropeTheta}; RMS eps ${Number(i.rmsEps.toPrecision(6))}; ${i.tiedOutput ? 'output tied to the embeddings' : 'own output matrix'}${i.headTokens < i.vocabSize ? `; head scores ${i.headTokens} of ${i.vocabSize} tokens` : ''}`,
            `  weights       ${i.matrixType === 'mixed' ? 'mixed' : i.matrixType} matrices${types ? ` (tensors: ${types})` : ''}; ${(i.weightBytesPerToken / 1e6).toFixed(1)} MB read per decoded token`,
            `  tokenizer     ${tokenizer ? `${tokenizer.model}${tokenizer.pre ? ` (${tokenizer.pre})` : ''}, ${tokenizer.vocabSize} tokens, BOS ${tokenizer.bos}, EOS ${tokenizer.eos}` : `none (token ids only; vocabulary ${i.vocabSize})`}`,
            `  chat template ${report.chatTemplate ? 'yes' : 'no'}`,
          ];
          process.stdout.write(lines.join('\n') + '\n');
        }
      } finally {
        await model.dispose();
      }
      return 0;
    }
    case 'train-draft': {
      const { readTexts } = await import('./train/texts.js');
      const { DEFAULT_TARGET } = await import('./demo.js');
      if (!values.out) throw new UsageError('give the draft to write: osd train-draft --text notes.txt --out draft.gguf');
      const textPaths = [...(values.text ?? []), ...positionals.slice(1)];
      if (!textPaths.length) throw new UsageError('give training text: --text FILE or --text FOLDER (repeat for more), or files after the command');
      if (values.from !== undefined)
        for (const k of ['dim', 'heads', 'kv-heads', 'ff'] as const)
          if (values[k] !== undefined) throw new UsageError(`--${k} shapes a new draft: --from continues a draft of its own shape (--layers may grow it)`);
      const type = values.type ?? 'F16';
      if (!osd.isStoreType(type)) throw new UsageError(`--type must be one of ${osd.STORE_TYPES.join(', ')}, got '${type}'`);
      const shape: Record<string, number> = {};
      for (const [flag, key] of [['dim', 'embeddingLength'], ['layers', 'layers'], ['heads', 'heads'], ['kv-heads', 'kvHeads'], ['ff', 'feedForwardLength']] as const)
        if (values[flag] !== undefined) shape[key] = int(values[flag], flag, 0, 1);
      const minutes = values.minutes === undefined ? undefined : num(values.minutes, 'minutes', 0);
      if (minutes !== undefined && !(minutes > 0)) throw new UsageError('--minutes must be a number > 0');
      const steps = values.steps === undefined ? undefined : int(values.steps, 'steps', 0, 1);
      const lr = values.lr === undefined ? undefined : num(values.lr, 'lr', 0);
      if (lr !== undefined && !(lr > 0)) throw new UsageError('--lr must be a number > 0');
      const { dirname, resolve } = await import('node:path');
      const { accessSync, constants, existsSync } = await import('node:fs');
      try {
        accessSync(dirname(resolve(values.out)), constants.W_OK);
      } catch {
        throw new Error(`--out: cannot write in ${dirname(resolve(values.out))}`);
      }
      const targetPath = values.target ?? DEFAULT_TARGET;
      for (const path of [targetPath, values.from]) if (path !== undefined && !existsSync(path)) throw new Error(`model not found: ${path}`);
      const texts = readTexts(textPaths);
      const tty = process.stderr.isTTY;
      const ac = new AbortController();
      process.once('SIGINT', () => ac.abort());
      const target = await osd.loadModel(targetPath);
      const vocab = target.info.vocabSize;
      let result: Awaited<ReturnType<typeof osd.trainDraft>>;
      try {
        if (!values.json) process.stderr.write(`osd: ${texts.files} files, ${(texts.bytes / 1e6).toFixed(1)} MB of text; training a draft for ${targetPath}\n`);
        let lastLine = 0;
        result = await osd.trainDraft({
          target,
          out: values.out,
          texts: texts.documents,
          ...(values.from !== undefined && { from: values.from }),
          ...(Object.keys(shape).length > 0 && { shape }),
          type,
          ...(minutes !== undefined && { minutes }),
          ...(steps !== undefined && { steps }),
          ...(lr !== undefined && { lr }),
          ...(values['top-k'] !== undefined && { topK: int(values['top-k'], 'top-k', 0, 1) }),
          ...(values['seq-len'] !== undefined && { seqLen: int(values['seq-len'], 'seq-len', 0, 2) }),
          ...(values.seed !== undefined && { seed: int(values.seed, 'seed', 0, 0, 2 ** 31 - 1) }),
          ...(values.checkpoint !== undefined && { checkpoint: values.checkpoint }),
          ...(values['head-tokens'] !== undefined && { headTokens: int(values['head-tokens'], 'head-tokens', 0, 1) }),
          signal: ac.signal,
          onProgress: (p) => {
            if (values.json) return;
            if (p.message) {
              process.stderr.write(`osd: ${p.message}\n`);
              return;
            }
            const bar = '#'.repeat(Math.round(p.fraction * 24)).padEnd(24, '-');
            const held = p.heldOut ? `, held-out agreement ${p.heldOut.top1.toFixed(3)}` : '';
            const line = `train-draft [${bar}] ${(p.fraction * 100).toFixed(0).padStart(3)}% step ${p.step}, loss ${p.trainLoss.toFixed(3)}, ${p.teacherTokens} teacher tokens${held}`;
            if (tty) process.stderr.write(`\r${line}\x1b[K`);
            else if (Date.now() - lastLine > 30_000 || p.phase === 'save') {
              lastLine = Date.now();
              process.stderr.write(line + '\n');
            }
          },
        });
      } finally {
        await target.dispose();
      }
      if (tty && !values.json) process.stderr.write('\n');
      const first = result.curve[0];
      const last = result.curve[result.curve.length - 1];
      if (values.json) {
        process.stdout.write(JSON.stringify({ ...result, files: texts.files, textBytes: texts.bytes }) + '\n');
      } else {
        const head = result.headTokens < vocab ? `; head of ${result.headTokens} tokens` : '';
        const heldOut = first && last ? `; held-out agreement with the target ${first.top1.toFixed(3)} -> ${last.top1.toFixed(3)}, KL ${first.loss.toFixed(3)} -> ${last.loss.toFixed(3)}` : '';
        process.stdout.write(
          `osd: wrote ${result.path}: ${(result.bytes / 1e6).toFixed(1)} MB, ${result.steps} steps on ${result.teacherTokens} teacher tokens in ${result.seconds < 60 ? `${result.seconds.toFixed(1)} s` : `${(result.seconds / 60).toFixed(1)} min`}${head}${heldOut}${result.aborted ? ' (interrupted: the draft so far)' : ''}\n`,
        );
      }
      return result.aborted ? 130 : 0;
    }
    case 'convert': {
      const [input, output, ...rest] = positionals.slice(1);
      if (!input || !output) throw new UsageError('give the model and the file to write: osd convert model.gguf model-q8.gguf --type Q8_0');
      if (rest.length) throw new UsageError(`'convert' takes two files, got also '${rest.join(' ')}'`);
      const type = values.type ?? 'F16';
      if (type !== 'keep' && !osd.isStoreType(type)) throw new UsageError(`--type must be keep or one of ${osd.STORE_TYPES.join(', ')}, got '${type}'`);
      const headCount = values['head-tokens'] === undefined ? undefined : int(values['head-tokens'], 'head-tokens', 0, 1);
      if ((headCount === undefined) !== (values.text === undefined))
        throw new UsageError('--head-tokens N and --text PATH go together: the head keeps the N ids most frequent in that text');
      const { statSync } = await import('node:fs');
      const t0 = performance.now();
      let model = await osd.loadModel(input);
      let head: number | undefined;
      try {
        if (headCount !== undefined) {
          const tok = model.tokenizer;
          if (!tok) throw new Error(`${input} has no tokenizer: --head-tokens needs one to count the text's ids`);
          const { readTexts } = await import('./train/texts.js');
          const texts = readTexts(values.text!);
          const streams = texts.documents.map((d) => tok.encode(d));
          const restricted = await model.withHead(osd.frequentTokens(streams, headCount, model.info.vocabSize, model.eosTokens));
          await model.dispose();
          model = restricted;
          head = model.info.headTokens;
        }
        await model.save(output, { type });
      } finally {
        await model.dispose();
      }
      const seconds = (performance.now() - t0) / 1000;
      // What each tensor was stored as (rows that do not fit the type's blocks fall back).
      const { readGgufMetadata } = await import('./train/bpe.js');
      const meta = readGgufMetadata(output, { maxArrayLength: 0 });
      const counts: Record<string, number> = {};
      for (const t of meta.tensors) counts[t.type] = (counts[t.type] ?? 0) + 1;
      const bytesIn = statSync(input).size;
      const bytesOut = statSync(output).size;
      if (values.json) {
        process.stdout.write(JSON.stringify({ input, output, type, bytesIn, bytesOut, seconds, tensorTypes: counts, ...(head !== undefined && { headTokens: head }) }) + '\n');
      } else {
        const mb = (b: number) => `${(b / 1e6).toFixed(1)} MB`;
        const types = Object.entries(counts).map(([t, n]) => `${n} ${t}`).join(', ');
        process.stdout.write(`osd: wrote ${output}: ${mb(bytesOut)} (from ${mb(bytesIn)}) in ${seconds.toFixed(1)} s; tensors: ${types}${head !== undefined ? `; head scores ${head} ids` : ''}\n`);
      }
      return 0;
    }
    case 'demo': {
      const { runDemo, formatDemo, writeDemoPlots } = await import('./demo.js');
      const tty = process.stderr.isTTY;
      const runs = values.runs ? (values.runs.split(',') as ('static' | 'online' | 'pool')[]) : undefined;
      for (const r of runs ?? []) if (!['static', 'online', 'pool'].includes(r)) throw new UsageError(`--runs: unknown run '${r}'`);
      if ((values.target === undefined) !== (values.draft === undefined)) throw new UsageError('give both --target and --draft, or neither (the embedded default pair)');
      const { existsSync } = await import('node:fs');
      for (const path of [values.target, values.draft]) if (path !== undefined && !existsSync(path)) throw new Error(`model not found: ${path}`);
      if (values.requests !== undefined && values['requests-per-phase'] !== undefined) throw new UsageError('give --requests or --requests-per-phase, not both');
      const requests = int(values.requests ?? values['requests-per-phase'], values.requests !== undefined ? 'requests' : 'requests-per-phase', 24, 1);
      const strategy = values.strategy === undefined ? undefined : parseStrategy(values.strategy);
      const distill: { lr?: number; topK?: number; positions?: 'all' | 'mismatch' } = {};
      if (values.positions !== undefined) {
        if (values.positions !== 'all' && values.positions !== 'mismatch') throw new UsageError(`--positions must be all or mismatch, got '${values.positions}'`);
        distill.positions = values.positions;
      }
      if (values.lr !== undefined) distill.lr = num(values.lr, 'lr', 0);
      if (values['top-k'] !== undefined) distill.topK = int(values['top-k'], 'top-k', 0, 1);
      if (distill.lr !== undefined && !(distill.lr > 0)) throw new UsageError('--lr must be a number > 0');
      if (values['save-draft'] !== undefined) {
        if (runs && !runs.includes('online')) throw new UsageError('--save-draft saves the online run\'s draft: include online in --runs');
        const { dirname, resolve } = await import('node:path');
        const { accessSync, constants } = await import('node:fs');
        try {
          accessSync(dirname(resolve(values['save-draft'])), constants.W_OK);
        } catch {
          throw new Error(`--save-draft: cannot write in ${dirname(resolve(values['save-draft']))}`);
        }
      }
      // The plots' folder is made now: a path that cannot be one failed only after the whole run.
      const out = values.out ?? 'osd-demo';
      try {
        const { mkdirSync } = await import('node:fs');
        mkdirSync(out, { recursive: true });
      } catch (e) {
        throw new Error(`--out: cannot make the folder ${out}: ${(e as Error).message}`);
      }
      const ac = new AbortController();
      process.once('SIGINT', () => ac.abort());
      const result = await runDemo({
        target: values.target,
        draft: values.draft,
        requests,
        maxTokens: int(values['max-tokens'], 'max-tokens', 32, 1),
        runs,
        distill,
        ...(strategy && { strategy }),
        saveDraft: values['save-draft'],
        device,
        signal: ac.signal,
        onProgress: (line) => {
          if (tty) process.stderr.write(`\r${line}\x1b[K`);
          else if (!values.json) process.stderr.write(line + '\n');
        },
      });
      if (tty) process.stderr.write('\n');
      const plots = writeDemoPlots(result, out);
      if (values.json) {
        process.stdout.write(
          JSON.stringify(
            {
              target: result.target,
              draft: result.draft,
              requestsPerPhase: result.requestsPerPhase,
              maxTokens: result.maxTokens,
              distill: result.distill,
              strategy: result.strategy,
              targetTokensPerSecond: result.targetTokensPerSecond,
              runs: result.runs.map((r) => ({ run: r.run, phases: r.phases, updates: r.updates, rollbacks: r.rollbacks, forgetting: r.forgetting })),
              ...(result.savedDraft ? { savedDraft: result.savedDraft } : {}),
              load: result.load,
              plots,
            },
            null,
            2,
          ) + '\n',
        );
      } else {
        process.stdout.write(formatDemo(result) + '\n');
        process.stdout.write(`plots: ${plots.join(', ')}\n`);
      }
      return 0;
    }
    case 'serve': {
      const { DEFAULT_TARGET, DEFAULT_DRAFT } = await import('./demo.js');
      const { existsSync } = await import('node:fs');
      const http = await import('node:http');
      const { createServer } = await import('./server.js');
      if ((values.target === undefined) !== (values.draft === undefined)) throw new UsageError('give both --target and --draft, or neither (the embedded default pair)');
      const strategy = values.strategy === undefined ? undefined : parseStrategy(values.strategy);
      const targetPath = values.target ?? DEFAULT_TARGET;
      const draftPath = values.draft ?? DEFAULT_DRAFT;
      for (const path of [targetPath, draftPath])
        if (!existsSync(path)) throw new Error(`model not found: ${path}${values.target ? '' : ' (the embedded default pair is missing: pass --target and --draft)'}`);
      const port = int(values.port, 'port', 8080, 0, 65535);
      const host = values.host ?? '127.0.0.1';
      const grace = num(values.grace, 'grace', 30);
      if (!(grace >= 0)) throw new UsageError('--grace must be a number of seconds >= 0');
      const maxConcurrent = int(values['max-concurrent'], 'max-concurrent', DEFAULT_MAX_CONCURRENT, 1, 1024);
      const target = await osd.loadModel(targetPath, { device });
      const draft = await osd.loadModel(draftPath, { device });
      // The osd executable sized libuv's pool before it started (bin.cts). Run otherwise (node
      // dist/cli.js, a UV_THREADPOOL_SIZE of the caller's), a pool too small to batch every
      // generation gets the decoder's OSD_THREADPOOL warning.
      const threadPool = effectiveThreadPool(process.env);
      const handler = createServer({
        target,
        draft,
        online: values.static ? false : {},
        maxConcurrent,
        batching: !values['no-batching'],
        modelId: values['model-id'],
        ...(strategy && { strategy }),
      });
      // What the draft's online learning does, one line each on stderr (a failed update or autosave
      // would otherwise go unseen: serving goes on with the weights in place).
      const dec = handler.decoder;
      if (dec instanceof osd.OnlineDecoder) {
        const log = (line: string) => process.stderr.write(`osd: ${line}\n`);
        dec.on('update', (e) => log(`draft update ${e.update}: loss ${e.lossBefore.toFixed(4)} -> ${e.lossAfter.toFixed(4)} (${e.records} records, ${Math.round(e.durationMs)} ms)`));
        dec.on('rollback', (e) => log(`draft update ${e.update} rolled back: ${e.reason}`));
        dec.on('update-error', (e) => log(`draft update failed: ${e.error.message}`));
      }
      const server = http.createServer(handler);
      // A client may half-close after sending its request (nc -N, some proxies); by default Node ends
      // the socket at that FIN, before the reply is written. Wait and answer (tested; the property is
      // Node's own, not in its typings).
      (server as typeof server & { httpAllowHalfOpen: boolean }).httpAllowHalfOpen = true;
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(port, host, () => resolve());
      });
      const addr = server.address() as import('node:net').AddressInfo;
      const url = `http://${addr.family === 'IPv6' ? `[${addr.address}]` : addr.address}:${addr.port}`;
      process.stdout.write(
        values.json
          ? JSON.stringify({ url: `${url}/v1`, metrics: `${url}/metrics`, model: handler.modelId, target: targetPath, draft: draftPath, online: !values.static, maxConcurrent, threadPool }) + '\n'
          : `osd: serving ${handler.modelId} (draft ${draftPath}, ${values.static ? 'fixed draft' : 'online distillation on'}, ` +
              `up to ${maxConcurrent} generations at once, ${threadPool} pool threads)\n` +
              `osd: OpenAI base URL ${url}/v1   metrics ${url}/metrics   (Ctrl-C stops)\n`,
      );
      await new Promise<void>((resolve) => {
        const stop = (signal: string) => {
          process.off('SIGINT', stop);
          process.off('SIGTERM', stop);
          // A second signal while draining exits at once.
          process.once(signal as NodeJS.Signals, () => process.exit(130));
          if (!values.json) process.stderr.write(`osd: ${signal}: finishing the requests in flight (up to ${grace} s; a second signal stops at once)\n`);
          server.close();
          void handler
            .drain(grace * 1000)
            .then(() => {
              server.closeAllConnections();
              return Promise.all([target.dispose(), draft.dispose()]);
            })
            .then(() => resolve());
        };
        process.on('SIGINT', stop);
        process.on('SIGTERM', stop);
      });
      return 0;
    }
    default:
      process.stderr.write(`osd: unknown command '${command}'\n\n${HELP}`);
      return 2;
  }
}

// A reader that goes away (osd generate ... | head) ends the output, quietly.
process.stdout.on('error', (e: NodeJS.ErrnoException) => {
  if (e.code === 'EPIPE') process.exit(0);
  throw e;
});

// Exit codes: 0 done, 1 failed, 2 a usage error (bad command line), 130 interrupted (Ctrl-C).
main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    if (err instanceof Error && err.name === 'AbortError') {
      process.stderr.write('\nosd: interrupted\n');
      process.exit(130);
    }
    process.stderr.write(`osd: ${err instanceof Error ? err.message : String(err)}\n`);
    const usage = err instanceof UsageError || (err instanceof Error && String((err as NodeJS.ErrnoException).code).startsWith('ERR_PARSE_ARGS'));
    process.exit(usage ? 2 : 1);
  },
);
