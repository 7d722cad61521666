/** Throws the signal's reason (an AbortError by default) when it is aborted. */
export function throwIfAborted(signal: AbortSignal | undefined): void {
  if (signal?.aborted) throw abortError(signal);
}

export function abortError(signal: AbortSignal): Error {
  const reason: unknown = signal.reason;
  if (reason instanceof Error) return reason;
  const err = new Error(typeof reason === 'string' ? reason : 'The operation was aborted');
  err.name = 'AbortError';
  return err;
}

/** Checks that `signal` is an AbortSignal or undefined (TypeError naming the argument otherwise). */
export function checkSignal(signal: unknown, name = 'signal'): AbortSignal | undefined {
  if (signal === undefined) return undefined;
  if (!(signal instanceof AbortSignal)) throw new TypeError(`${name} must be an AbortSignal`);
  return signal;
}

// Per source signal: the controllers linked to it, and its one listener.
const links = new WeakMap<AbortSignal, { targets: Set<AbortController>; onAbort: () => void }>();

/**
 * Aborts `to` (with the same reason) when `from` aborts, now or later; returns the function that
 * unlinks them. A signal shared by many requests (a server's shutdown signal) carries one listener
 * however many are linked, and none once all are unlinked: nothing stays attached to it, unlike
 * AbortSignal.any, whose results Node 20 keeps alive as long as a source signal lives.
 */
export function forwardAbort(from: AbortSignal | undefined, to: AbortController): () => void {
  if (!from) return () => {};
  if (from.aborted) {
    to.abort(from.reason);
    return () => {};
  }
  let link = links.get(from);
  if (!link) {
    const targets = new Set<AbortController>();
    const onAbort = () => {
      links.delete(from);
      for (const c of targets) c.abort(from.reason);
    };
    from.addEventListener('abort', onAbort, { once: true });
    link = { targets, onAbort };
    links.set(from, link);
  }
  const { targets, onAbort } = link;
  targets.add(to);
  return () => {
    if (!targets.delete(to) || targets.size > 0) return;
    from.removeEventListener('abort', onAbort);
    if (links.get(from)?.targets === targets) links.delete(from);
  };
}

/**
 * Runs `run(push, signal)` and yields each item it pushes, as it comes; returns what run resolves
 * to, or throws what it rejects with. Leaving the loop early (or `outer` aborting) aborts `signal`;
 * either way the generator ends only once run has settled.
 */
export async function* pushToAsyncIterable<T, R>(
  run: (push: (item: T) => void, signal: AbortSignal) => Promise<R>,
  outer: AbortSignal | undefined,
): AsyncGenerator<T, R, void> {
  const queue: T[] = [];
  let wake: (() => void) | undefined;
  let finished = false;
  let failure: { error: unknown } | undefined;
  let result: R | undefined;
  const inner = new AbortController();
  const unlink = forwardAbort(outer, inner);
  const done = run((item) => {
    queue.push(item);
    wake?.();
  }, inner.signal).then(
    (r) => {
      result = r;
      finished = true;
      wake?.();
    },
    (e: unknown) => {
      failure = { error: e };
      finished = true;
      wake?.();
    },
  );
  try {
    for (;;) {
      while (queue.length) yield queue.shift()!;
      if (finished) break;
      await new Promise<void>((r) => (wake = r));
      wake = undefined;
    }
    if (failure) throw failure.error;
    return result as R;
  } finally {
    if (!finished) inner.abort();
    await done;
    unlink();
  }
}
