// Chat templates: renders a model's own Jinja chat template (the GGUF key tokenizer.chat_template)
// with @huggingface/jinja, the engine that Node's LLM libraries use, with the variables Hugging Face's
// apply_chat_template passes (messages, add_generation_prompt, bos_token, eos_token, tools, ...).
import { Template } from '@huggingface/jinja';

export interface ChatMessage {
  /** "system", "user", "assistant", "tool", ... (whatever the template knows). */
  role: string;
  content: string;
  /** Any other fields a template reads (name, tool_calls, ...). */
  [key: string]: unknown;
}

export interface ApplyChatTemplateOptions {
  /** Append the prompt that opens the assistant's turn. Default true. */
  addGenerationPrompt?: boolean;
  /** Texts of the BOS and EOS tokens, for templates that print them. Default ''. */
  bosToken?: string;
  eosToken?: string;
  /** Tool definitions, for templates that render them. */
  tools?: unknown[];
  /** Further variables for the template (for example enable_thinking). */
  variables?: Record<string, unknown>;
}

const cache = new Map<string, Template>();

// A template comes with the model file, so it is input like any other: the engine's own range()
// would build range(10 ** 9) as a billion-element array and take the process down (out of memory)
// before any error. Calls go to a bounded range instead, which also caps the values that one render
// may draw from range() in all (nested loops over ranges are the only way a template can loop
// without data to loop over). The rendered text is capped too.
const MAX_TEMPLATE_RANGE = 1 << 20;
const MAX_TEMPLATE_OUTPUT = 1 << 24;
const RANGE = '__osd_bounded_range';

/** Renames every reference to range (not an attribute named range) to the bounded one. */
function boundRange(node: unknown, parent: unknown = null, key = ''): void {
  if (node === null || typeof node !== 'object') return;
  if (Array.isArray(node)) {
    for (const n of node) boundRange(n, parent, key);
    return;
  }
  const n = node as { type?: unknown; value?: unknown };
  const memberProperty =
    key === 'property' && (parent as { type?: unknown; computed?: unknown } | null)?.type === 'MemberExpression' && !(parent as { computed?: unknown }).computed;
  if (n.type === 'Identifier' && n.value === 'range' && !memberProperty) n.value = RANGE;
  for (const [k, v] of Object.entries(n)) if (v !== null && typeof v === 'object') boundRange(v, n, k);
}

function compile(template: string): Template {
  let t = cache.get(template);
  if (!t) {
    try {
      t = new Template(template);
    } catch (e) {
      throw new SyntaxError(`the chat template does not parse: ${(e as Error).message}`);
    }
    boundRange(t.parsed);
    if (cache.size > 16) cache.clear();
    cache.set(template, t);
  }
  return t;
}

/** Python's range(start, stop, step) with a budget of values for one render. */
function boundedRange(budget: { left: number }) {
  return (start: unknown, stop?: unknown, step: unknown = 1): number[] => {
    if (stop === undefined || stop === null) [start, stop] = [0, start];
    for (const v of [start, stop, step])
      if (typeof v !== 'number' || !Number.isInteger(v)) throw new Error(`range() takes integers, got ${String(v)}`);
    const [a, b, c] = [start as number, stop as number, step as number];
    if (c === 0) throw new RangeError('range() step must not be zero');
    const count = Math.max(0, Math.ceil((b - a) / c));
    if (count > budget.left)
      throw new RangeError(`the template asked range() for more than ${MAX_TEMPLATE_RANGE} values in one rendering`);
    budget.left -= count;
    return Array.from({ length: count }, (_, i) => a + i * c);
  };
}

/** Renders `messages` with a Jinja chat template, as Hugging Face's apply_chat_template does. */
export function applyChatTemplate(
  template: string,
  messages: readonly ChatMessage[],
  options: ApplyChatTemplateOptions = {},
): string {
  if (typeof template !== 'string' || template.length === 0) throw new TypeError('template must be a non-empty string');
  if (!Array.isArray(messages)) throw new TypeError('messages must be an array of { role, content }');
  messages.forEach((m, i) => {
    if (m === null || typeof m !== 'object') throw new TypeError(`messages[${i}] must be an object { role, content }`);
    if (typeof m.role !== 'string' || m.role.length === 0) throw new TypeError(`messages[${i}].role must be a non-empty string`);
    if (typeof m.content !== 'string') throw new TypeError(`messages[${i}].content must be a string`);
  });
  if (options === null || typeof options !== 'object') throw new TypeError('options must be an object');
  const { addGenerationPrompt = true, bosToken = '', eosToken = '', tools, variables = {} } = options;
  if (typeof addGenerationPrompt !== 'boolean') throw new TypeError('options.addGenerationPrompt must be a boolean');
  if (typeof bosToken !== 'string') throw new TypeError('options.bosToken must be a string');
  if (typeof eosToken !== 'string') throw new TypeError('options.eosToken must be a string');
  if (tools !== undefined && !Array.isArray(tools)) throw new TypeError('options.tools must be an array');
  if (variables === null || typeof variables !== 'object') throw new TypeError('options.variables must be an object');
  const context: Record<string, unknown> = {
    ...variables,
    messages: messages.map((m) => ({ ...m })),
    add_generation_prompt: addGenerationPrompt,
    bos_token: bosToken,
    eos_token: eosToken,
  };
  if (tools !== undefined) context.tools = tools;
  context[RANGE] = boundedRange({ left: MAX_TEMPLATE_RANGE });
  let text: string;
  try {
    text = compile(template).render(context);
  } catch (e) {
    if (e instanceof SyntaxError || e instanceof TypeError) throw e;
    // Templates signal bad conversations with raise_exception(...); a runaway template ends in a
    // RangeError (range() over budget, a string past V8's limit, a recursion too deep).
    throw new Error(`the chat template failed: ${(e as Error).message}`);
  }
  if (text.length > MAX_TEMPLATE_OUTPUT)
    throw new Error(`the chat template failed: it rendered ${text.length} characters, more than ${MAX_TEMPLATE_OUTPUT}`);
  return text;
}
