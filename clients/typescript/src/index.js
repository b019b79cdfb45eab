// waltap client: subscriptions and persisted streams over Server-Sent Events (read with
// fetch, so headers such as Last-Event-ID and Authorization can be sent), stream
// management and tokens. No dependencies: Node 18+ and browsers. Types: index.d.ts.

/** Every error the client throws: `code` is the server's stable error code. */
export class WaltapError extends Error {
  constructor(code, message, status) {
    super(message);
    this.name = "WaltapError";
    this.code = code;
    this.status = status;
  }
}

export class UnauthorizedError extends WaltapError {
  constructor(message, status = 401) {
    super("unauthorized", message, status);
    this.name = "UnauthorizedError";
  }
}

export class TokenExpiredError extends WaltapError {
  constructor(message, status = 401) {
    super("token_expired", message, status);
    this.name = "TokenExpiredError";
  }
}

/** The stream's cursor is behind what retention deleted: reset it (see `advice`). */
export class StaleCursorError extends WaltapError {
  constructor(message, status = 410, stream = undefined) {
    super("stale_cursor", message, status);
    this.name = "StaleCursorError";
    this.stream = stream;
    this.advice = message;
  }
}

/** Another consumer holds the stream's lease. */
export class StreamBusyError extends WaltapError {
  constructor(message, status = 409) {
    super("stream_busy", message, status);
    this.name = "StreamBusyError";
  }
}

/** A subscription fell behind by more than its queue and was cut off. */
export class LaggedError extends WaltapError {
  constructor(message, status = undefined) {
    super("lagged", message, status);
    this.name = "LaggedError";
  }
}

/** The connection to the server failed or dropped (only thrown where resuming could lose events). */
export class ConnectionError extends WaltapError {
  constructor(message, cause) {
    super("connection", message, undefined);
    this.name = "ConnectionError";
    if (cause !== undefined) this.cause = cause;
  }
}

const CLASSES = {
  unauthorized: UnauthorizedError,
  token_expired: TokenExpiredError,
  stale_cursor: StaleCursorError,
  stream_busy: StreamBusyError,
  lagged: LaggedError,
};

/** The typed error for a server error object `{code, message}`. */
export function errorFrom(body, status, stream) {
  const code = body && typeof body.code === "string" ? body.code : "internal";
  const message = body && typeof body.message === "string" ? body.message : `HTTP ${status}`;
  const Class = CLASSES[code];
  if (Class === StaleCursorError) return new StaleCursorError(message, status ?? 410, stream);
  if (Class) return new Class(message, status);
  return new WaltapError(code, message, status);
}

/** Codes after which connecting again can succeed without the caller doing anything. */
const TRANSIENT = new Set([
  "shutting_down",
  "source_unavailable",
  "source_interrupted",
  "server_busy",
  "too_many_connections",
  "internal",
  "connection",
]);

function isTransient(e) {
  return e instanceof WaltapError && (TRANSIENT.has(e.code) || (e.status !== undefined && e.status >= 500));
}

function aborted(signal) {
  return signal !== undefined && signal !== null && signal.aborted;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (aborted(signal)) return resolve();
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      if (signal) signal.removeEventListener("abort", done);
      resolve();
    }
    if (signal) signal.addEventListener("abort", done, { once: true });
  });
}

/** Server-Sent Events from a fetch body: {event, id, data} per dispatched event. */
export async function* parseSse(body, onBytes = () => {}) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  let event = "";
  let id = null;
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      onBytes();
      buf += decoder.decode(value, { stream: true });
      let nl;
      while ((nl = buf.search(/\r\n|\n|\r/)) >= 0) {
        const line = buf.slice(0, nl);
        // A lone \r at the end of the buffer may be the first half of \r\n.
        if (buf[nl] === "\r" && nl + 1 === buf.length) break;
        buf = buf.slice(nl + (buf.startsWith("\r\n", nl) ? 2 : 1));
        if (line === "") {
          if (data.length > 0) yield { event: event || "message", id, data: data.join("\n") };
          event = "";
          id = null;
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? "" : line.slice(colon + 1);
        if (val.startsWith(" ")) val = val.slice(1);
        if (field === "event") event = val;
        else if (field === "data") data.push(val);
        else if (field === "id") id = val;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

/**
 * A client of one waltap server. Server-side code passes `key` (an API key); browser code
 * passes `token` (minted by server-side code with `createToken`), or a function that
 * returns a fresh one, called again when the token has expired.
 */
export class Waltap {
  constructor(options) {
    if (!options || typeof options.url !== "string") throw new TypeError("Waltap: `url` is required");
    this.url = options.url.replace(/\/+$/, "");
    this.key = options.key;
    this.token = options.token;
    this.int8 = options.int8 ?? "number";
    this.fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
    this.backoff = { initialMs: 250, maxMs: 30_000, ...(options.backoff ?? {}) };
    this.busyTimeoutMs = options.busyTimeoutMs ?? 35_000;
    this.idleTimeoutMs = options.idleTimeoutMs ?? 45_000;
    this.streams = {
      create: (def) => this.#json("POST", "/v1/streams", def),
      list: async () => (await this.#json("GET", "/v1/streams")).streams,
      get: (name) => this.#json("GET", `/v1/streams/${encodeURIComponent(name)}`),
      delete: async (name) => {
        await this.#json("DELETE", `/v1/streams/${encodeURIComponent(name)}`);
      },
      reset: (name, options = {}) =>
        this.#json("POST", `/v1/streams/${encodeURIComponent(name)}/reset`, {
          initialState: Boolean(options.initialState),
        }),
    };
  }

  /** Mints a token for browser code: `{table, filter?}` or `{stream}`, with `ttlSeconds`. */
  createToken(request) {
    return this.#json("POST", "/v1/tokens", request);
  }

  async #tokenValue(refresh) {
    if (typeof this.token === "function") {
      if (refresh || this.currentToken === undefined) this.currentToken = await this.token();
      return this.currentToken;
    }
    return this.token;
  }

  async #target(path, params, refreshToken = false) {
    const url = new URL(this.url + path);
    for (const [k, v] of Object.entries(params)) {
      if (v !== undefined && v !== null && v !== false) url.searchParams.set(k, String(v));
    }
    const headers = {};
    if (this.key !== undefined) headers.Authorization = `Bearer ${this.key}`;
    else {
      const token = await this.#tokenValue(refreshToken);
      if (token !== undefined) url.searchParams.set("token", token);
    }
    return { url: url.toString(), headers };
  }

  async #json(method, path, body, params = {}) {
    const { url, headers } = await this.#target(path, params);
    if (method === "GET") headers.Accept = "application/json";
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let response;
    try {
      response = await this.fetch(url, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      throw new ConnectionError(`cannot reach ${this.url}: ${e.message}`, e);
    }
    const text = await response.text();
    if (!response.ok) throw errorFrom(parseError(text), response.status);
    return text === "" ? undefined : JSON.parse(text);
  }

  /** Opens an event stream; throws the server's typed error when it refuses. */
  async #open(path, params, lastEventId, signal, refreshToken, stream) {
    const { url, headers } = await this.#target(path, params, refreshToken);
    headers.Accept = "text/event-stream";
    if (lastEventId) headers["Last-Event-ID"] = lastEventId;
    let response;
    try {
      response = await this.fetch(url, { headers, signal });
    } catch (e) {
      throw new ConnectionError(`cannot reach ${this.url}: ${e.message}`, e);
    }
    if (!response.ok) {
      const text = await response.text().catch(() => "");
      throw errorFrom(parseError(text), response.status, stream);
    }
    return response;
  }

  /**
   * The frames of one delivery, reconnecting as `policy` allows: `resume()` gives the
   * Last-Event-ID for each connection, `reconnect` whether a dropped connection is opened
   * again (streams) or is an error (subscriptions, which would miss what came meanwhile).
   */
  async *#deliver(path, params, signal, policy) {
    let delay = this.backoff.initialMs;
    let busySince;
    let refreshToken = false;
    let everOpened = false;
    for (;;) {
      if (aborted(signal)) return;
      const connection = new AbortController();
      const stop = () => connection.abort();
      if (signal) signal.addEventListener("abort", stop, { once: true });
      let idle;
      const touch = () => {
        clearTimeout(idle);
        idle = setTimeout(stop, this.idleTimeoutMs);
      };
      let failure;
      try {
        const response = await this.#open(path, params, policy.resume(), connection.signal, refreshToken, policy.stream);
        everOpened = true;
        refreshToken = false;
        busySince = undefined;
        touch();
        for await (const frame of parseSse(response.body, touch)) {
          delay = this.backoff.initialMs;
          if (frame.event === "error") {
            throw errorFrom(parseError(frame.data), undefined, policy.stream);
          }
          const item = JSON.parse(frame.data);
          // The caller's time with the item is not the server's silence.
          clearTimeout(idle);
          yield { frame, item };
          touch();
          if (frame.event === "completed") return;
        }
        // The server ended the stream (it is shutting down).
        failure = new ConnectionError("the server closed the connection");
      } catch (e) {
        failure = e instanceof WaltapError ? e : new ConnectionError(`connection lost: ${e && e.message}`, e);
      } finally {
        clearTimeout(idle);
        if (signal) signal.removeEventListener("abort", stop);
        connection.abort();
      }
      if (aborted(signal)) return;
      if (failure instanceof TokenExpiredError && typeof this.token === "function" && !refreshToken) {
        refreshToken = true;
        continue;
      }
      const busy = failure instanceof StreamBusyError;
      if (busy) {
        busySince ??= Date.now();
        if (Date.now() - busySince >= this.busyTimeoutMs) throw failure;
      } else if (!isTransient(failure) || (everOpened && !policy.reconnect)) {
        throw failure;
      }
      await sleep(delay, signal);
      delay = Math.min(delay * 2, this.backoff.maxMs);
    }
  }

  /**
   * An ephemeral subscription to a table: `initialized`, then (with `initialState`) the
   * current rows and `snapshotComplete`, then changes. At-most-once from now on: a dropped
   * connection ends the iteration with a `ConnectionError` (subscribe again for a fresh
   * start), a slow reader with a `LaggedError`.
   */
  subscribe(options) {
    const params = {
      table: this.key !== undefined ? options.table : undefined,
      filter: this.key !== undefined && options.filter !== undefined ? JSON.stringify(options.filter) : undefined,
      initialState: options.initialState ? "true" : undefined,
      int8: (options.int8 ?? this.int8) === "string" ? "string" : undefined,
    };
    const frames = this.#deliver("/v1/subscribe", params, options.signal, {
      resume: () => undefined,
      reconnect: false,
    });
    return items(frames, () => undefined);
  }

  /**
   * A persisted stream: resumes after the last acknowledged item (or `options.cursor`),
   * reconnecting with backoff; everything not acknowledged is delivered again after a
   * reconnect, nothing acknowledged is. `ev.ack()` acknowledges the item and all before it.
   */
  stream(name, options = {}) {
    const state = { acked: options.cursor ?? null, ackedIndex: -1, delivered: 0 };
    const path = `/v1/streams/${encodeURIComponent(name)}`;
    const params = { int8: (options.int8 ?? this.int8) === "string" ? "string" : undefined };
    const frames = this.#deliver(path, params, options.signal, {
      resume: () => state.acked,
      reconnect: true,
      stream: name,
    });
    const ack = (cursor) => {
      const index = state.delivered++;
      return async () => {
        if (index <= state.ackedIndex) return;
        state.ackedIndex = index;
        state.acked = cursor;
        try {
          await this.#json("POST", `${path}/ack`, { position: cursor });
        } catch (e) {
          // Not taken now (the connection dropped, or its lease is still being released):
          // the next connection sends it as Last-Event-ID, which acknowledges it.
          if (isTransient(e) || e instanceof StreamBusyError) return;
          throw e;
        }
      };
    };
    return items(frames, ack);
  }
}

function parseError(text) {
  try {
    const body = JSON.parse(text);
    return body && (body.error ?? body);
  } catch {
    return { code: "internal", message: text || "the server's answer is not JSON" };
  }
}

/** Items as the caller sees them: the wire object plus `type`, `cursor` and `ack()`. */
async function* items(frames, makeAck) {
  for await (const { frame, item } of frames) {
    item.type = frame.event;
    const cursor = frame.id || null;
    Object.defineProperty(item, "cursor", { value: cursor, enumerable: false });
    const ack = cursor !== null ? makeAck(cursor) : undefined;
    Object.defineProperty(item, "ack", { value: ack ?? (async () => {}), enumerable: false });
    yield item;
  }
}

export default Waltap;
