// Checks of option objects and callbacks shared by the public API, with errors that name the argument.

/** `options` itself: undefined, or an object (TypeError naming it otherwise; null would fail later, unnamed). */
export function checkOptions<T extends object>(options: T | undefined, name = 'options'): T | undefined {
  if (options !== undefined && (options === null || typeof options !== 'object')) throw new TypeError(`${name} must be an object`);
  return options;
}

/**
 * Unknown keys of an options object get a TypeError naming the key: a misspelt or snake_case option
 * would otherwise fall back to its default without a word (options built from JSON, as a server's
 * are, get no help from the types). Keys set to undefined are let through. Names starting with '_'
 * are internal and not listed.
 */
export function checkKeys(o: object, allowed: readonly string[], name = 'options'): void {
  for (const k of Object.keys(o)) {
    if (allowed.includes(k) || ownData(o, k) === undefined) continue;
    const camel = k.replace(/_([a-z])/g, (_, c: string) => c.toUpperCase());
    const hint = camel !== k && allowed.includes(camel) ? ` (did you mean ${camel}?)` : '';
    const listed = allowed.filter((a) => !a.startsWith('_')).join(', ');
    throw new TypeError(`${name}.${k} is not an option${hint}; the options are: ${listed}`);
  }
}

/**
 * A lower bound on the tokens of a prompt text, for refusing one that cannot fit a context before
 * it is encoded (a megabyte of text takes the event loop about 90 ms to encode): 0 for texts
 * shorter than twice the context, which could fit whatever the vocabulary, else tk.minTokens.
 */
export function leastTokens(tk: { minTokens(text: string): number }, text: string, context: number): number {
  return text.length < 2 * context ? 0 : tk.minTokens(text);
}

/** Refuses (RangeError) a prompt text that cannot fit a context of `context` tokens, unencoded. */
export function checkPromptFits(tk: { minTokens(text: string): number }, text: string, context: number, name = 'prompt'): void {
  const n = leastTokens(tk, text, context);
  if (n >= context) throw new RangeError(`the ${name} (at least ${n} tokens) does not fit the context of ${context}`);
}

/**
 * o[k] when k is an own data property, else undefined: read without running a getter (the native
 * bindings read options in a set order, and a getter run early could change what they see).
 */
export function ownData(o: object, k: string): unknown {
  const d = Object.getOwnPropertyDescriptor(o, k);
  return d && 'value' in d ? d.value : undefined;
}

/** The keys of sampling options. */
export const samplingKeys = ['temperature', 'topK', 'topP'] as const;

/** The longest delay setTimeout takes (a longer one fires after 1 ms, with a warning). */
export const MAX_TIMER_MS = 2 ** 31 - 1;

/**
 * The error of a call on (or cut short by the disposal of) a disposed object: `code` is
 * 'OSD_DISPOSED' and `disposed` names the object ('decoder', 'model', ...), so callers can tell it
 * from an abort or a bad argument without reading the text.
 */
export function disposedError(what: string): Error {
  return Object.assign(new Error(`the ${what} was disposed`), { code: 'OSD_DISPOSED', disposed: what });
}

/** A value as error messages show it: strings quoted (so '4' is not read as 4), arrays bracketed. */
export function shown(v: unknown): string {
  if (typeof v === 'string') return JSON.stringify(v);
  if (typeof v === 'bigint') return `${v}n`;
  if (Array.isArray(v)) return v.length > 8 ? `an array of ${v.length}` : `[${v.map(shown).join(', ')}]`;
  return String(v);
}

/**
 * An integer option in [min, max]: a TypeError naming it when it is not a number (a string '4'
 * included), a RangeError when it is not an integer in range. `note` follows the range in the message.
 */
export function checkInteger(v: unknown, name: string, min: number, max = Number.MAX_SAFE_INTEGER, note = ''): number {
  if (typeof v !== 'number') throw new TypeError(`${name} must be a number, got ${shown(v)}`);
  if (!Number.isInteger(v) || v < min || v > max) throw new RangeError(`${name} must be an integer ${rangeText(min, max)}${note}, got ${shown(v)}`);
  return v;
}

/** "in [min, max]", or ">= min" when there is no upper bound. */
export function rangeText(min: number, max = Number.MAX_SAFE_INTEGER): string {
  return max === Number.MAX_SAFE_INTEGER ? `>= ${min}` : `in [${min}, ${max}]`;
}

/**
 * Sampling settings given beside `sampling` instead of inside it get a TypeError: ignored, they
 * would turn a request meant to sample into a greedy one without a word.
 */
export function checkMisplacedSampling(options: object): void {
  for (const k of ['temperature', 'topK', 'topP'])
    if ((options as Record<string, unknown>)[k] !== undefined) throw new TypeError(`${k} goes inside sampling: { sampling: { ${k} } }`);
}

/** Checks an optional callback option (TypeError naming it). */
export function checkCallback(fn: unknown, name: string): void {
  if (fn !== undefined && typeof fn !== 'function') throw new TypeError(`${name} must be a function`);
}

/**
 * Sampling options { temperature, topK?, topP? }, checked as the kernels check them (errors name
 * `name`): for options kept and used later, so a bad value fails where it was given.
 */
export function checkSampling(s: unknown, name = 'sampling'): void {
  if (typeof s !== 'object' || s === null) throw new TypeError(`${name} must be an object { temperature, topK?, topP? }`);
  checkKeys(s, samplingKeys, name);
  const { temperature, topK, topP } = s as Record<string, unknown>;
  if (temperature === undefined) throw new TypeError(`${name}.temperature is required`);
  if (typeof temperature !== 'number') throw new TypeError(`${name}.temperature must be a number`);
  if (!(Number.isFinite(temperature) && temperature >= 0)) throw new RangeError(`${name}.temperature must be a finite number >= 0, got ${temperature}`);
  // As the kernels: 1 / T must be a finite float (the smallest normal float, 2^-126).
  const t32 = Math.fround(temperature); // the kernels' float: a positive value that rounds to 0 is refused, not greedy
  if (temperature > 0 && t32 < 2 ** -126) throw new RangeError(`${name}.temperature must be 0 (greedy) or at least 1.1754944e-38, got ${temperature}`);
  if (topK !== undefined) {
    if (typeof topK !== 'number') throw new TypeError(`${name}.topK must be a number`);
    if (!(Number.isInteger(topK) && topK >= 0 && topK <= 2147483647)) throw new RangeError(`${name}.topK must be an integer >= 0, got ${topK}`);
  }
  if (topP !== undefined) {
    if (typeof topP !== 'number') throw new TypeError(`${name}.topP must be a number`);
    // As the kernels, which read it as a float: a positive value that rounds to 0 is refused.
    if (!(Math.fround(topP) > 0 && topP <= 1)) throw new RangeError(`${name}.topP must be in (0, 1] (and not round to 0 as a float), got ${topP}`);
  }
}
