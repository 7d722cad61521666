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

function compile(template: string): Template {
  let t = cache.get(template);
  if (!t) {
    try {
      t = new Template(template);
    } catch (e) {
      throw new SyntaxError(`the chat template does not parse: ${(e as Error).message}`);
    }
    if (cache.size > 16) cache.clear();
    cache.set(template, t);
  }
  return t;
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
  try {
    return compile(template).render(context);
  } catch (e) {
    if (e instanceof SyntaxError || e instanceof TypeError) throw e;
    // Templates signal bad conversations with raise_exception(...).
    throw new Error(`the chat template failed: ${(e as Error).message}`);
  }
}
