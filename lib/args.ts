// Checks of option objects and callbacks shared by the public API, with errors that name the argument.

/** `options` itself: undefined, or an object (TypeError naming it otherwise; null would fail later, unnamed). */
export function checkOptions<T extends object>(options: T | undefined, name = 'options'): T | undefined {
  if (options !== undefined && (options === null || typeof options !== 'object')) throw new TypeError(`${name} must be an object`);
  return options;
}

/** Checks an optional callback option (TypeError naming it). */
export function checkCallback(fn: unknown, name: string): void {
  if (fn !== undefined && typeof fn !== 'function') throw new TypeError(`${name} must be a function`);
}
