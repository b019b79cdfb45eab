/**
 * waltap client: typed change events from Postgres, over `waltap serve`.
 *
 * ```ts
 * import { Waltap } from "waltap";
 * const client = new Waltap({ url: "http://127.0.0.1:7373", key: process.env.WALTAP_KEY });
 * for await (const ev of client.stream<Order>("billing")) {
 *   if (ev.type === "change") console.log(ev.action, ev.after ?? ev.created);
 *   await ev.ack();
 * }
 * ```
 */

/** A row as delivered: column name -> JSON value (see `waltap types` for typed rows). */
export type Row = Record<string, unknown>;

/** How `int8` values arrive: JSON numbers (default) or decimal strings (exact beyond 2^53). */
export type Int8Form = "number" | "string";

export interface ClientOptions {
  /** The server's base URL, e.g. `http://127.0.0.1:7373`. */
  url: string;
  /** An API key (server-side code only: never ship a key to a browser). */
  key?: string;
  /**
   * A token from `createToken` (browser code), or a function returning a fresh one: it is
   * called for the first connection and again whenever the server says `token_expired`.
   */
  token?: string | (() => string | Promise<string>);
  /** Default `int8` form for subscriptions and streams. */
  int8?: Int8Form;
  /** A fetch implementation (default: `globalThis.fetch`). */
  fetch?: typeof fetch;
  /** Reconnect delays: doubling from `initialMs` (250) up to `maxMs` (30,000). */
  backoff?: { initialMs?: number; maxMs?: number };
  /**
   * How long `stream_busy` is retried before `StreamBusyError` is thrown (default 35,000
   * ms: longer than the server's 30 s lease, so the lease of a consumer that died expires).
   */
  busyTimeoutMs?: number;
  /**
   * Silence after which a connection is taken as dead and opened again (default 45,000
   * ms; the server sends a keepalive every 15 s).
   */
  idleTimeoutMs?: number;
}

/** What every item has: the SSE event name as `type`, its cursor, and `ack()`. */
interface ItemBase {
  /** The cursor after this item (a position, or `snapshot-<seq>`), or null for markers. */
  readonly cursor: string | null;
  /**
   * Acknowledges this item and every one before it (streams; a no-op on subscriptions and
   * on items without a cursor). Never acknowledges ahead of what was delivered. An ack the
   * server cannot take at once (the connection just dropped) is sent with the next
   * connection (`Last-Event-ID`).
   */
  ack(): Promise<void>;
}

export interface Tx {
  id: number;
  commitLsn: string;
  committedAt: string;
  index: number;
  total?: number;
  last: boolean;
  annotations?: unknown;
}

interface ChangeBase<R> extends ItemBase {
  type: "change";
  /** A ULID derived from the change: the same change always has the same id. */
  id: string;
  /** Orders all events; fixed width, so string order is event order. */
  position: string;
  schema: string;
  table: string;
  identity: "default" | "full" | "index" | "nothing";
  tx: Tx;
  /** With `"transitions": true` in the filter. */
  transition?: "appear" | "disappear" | "update";
}

export interface CreateEvent<R> extends ChangeBase<R> {
  action: "create";
  created: R;
}

export interface UpdateEvent<R> extends ChangeBase<R> {
  action: "update";
  /** The old row (REPLICA IDENTITY FULL), only the old key (key changed), or null. */
  before: Partial<R> | null;
  after: R;
  /** With REPLICA IDENTITY FULL: the columns that differ. */
  changed?: string[];
  /** Unchanged TOAST columns left out of `after`. */
  unchanged?: string[];
}

export interface DeleteEvent<R> extends ChangeBase<R> {
  action: "delete";
  /** The whole row (REPLICA IDENTITY FULL) or its key columns. */
  deleted: Partial<R>;
}

export interface TruncateEvent<R> extends ChangeBase<R> {
  action: "truncate";
}

/** A change to a row. */
export type ChangeEvent<R = Row> = CreateEvent<R> | UpdateEvent<R> | DeleteEvent<R> | TruncateEvent<R>;

/** A row of the initial state. */
export interface SnapshotRow<R = Row> extends ItemBase {
  type: "snapshot";
  action: "snapshot";
  schema: string;
  table: string;
  row: R;
  /** On streams: the row's sequence number (its cursor is `snapshot-<seq>`). */
  seq?: number;
}

/** Live from here: changes after `position` follow. */
export interface Initialized extends ItemBase {
  type: "initialized";
  position: string;
}

/** The initial state is complete: the changes that follow are exactly those after it. */
export interface SnapshotComplete extends ItemBase {
  type: "snapshotComplete";
  position: string;
}

/** The last item of a subscription that follows one row by its primary key. */
export interface Completed extends ItemBase {
  type: "completed";
  reason: "deleted" | "notFound";
  position: string;
}

/** The table's columns changed: the changes that follow have these columns. A
 * subscription whose filter names a dropped or retyped column ends with the error
 * `schema_changed` instead (docs/event-format.md, "Schema changes"). */
export interface SchemaChange extends ItemBase {
  type: "schemaChange";
  schema: string;
  table: string;
  columns: Array<{ name: string; typeOid: number; key: boolean }>;
}

/** What a subscription or a stream yields. */
export type Item<R = Row> = ChangeEvent<R> | SnapshotRow<R> | Initialized | SnapshotComplete | Completed | SchemaChange;
/** Another name for `Item`: `Event<Order>` reads well in handlers. */
export type Event<R = Row> = Item<R>;

export interface SubscribeOptions {
  /** `table` or `schema.table` (ignored with a token, which names its table). */
  table?: string;
  /** A filter (README, "Filters and subscriptions"); ignored with a token. */
  filter?: unknown;
  /** First the matching rows, then `snapshotComplete`, then changes. */
  initialState?: boolean;
  int8?: Int8Form;
  /** Aborting ends the iteration cleanly (no error) and closes the connection. */
  signal?: AbortSignal;
}

export interface StreamOptions {
  /** Resume after this cursor (acknowledging everything up to it) instead of the stream's own cursor. */
  cursor?: string;
  int8?: Int8Form;
  /** Aborting ends the iteration cleanly (no error) and closes the connection. */
  signal?: AbortSignal;
}

export interface StreamDefinition {
  name: string;
  table: string;
  filter?: unknown;
  /** Start with the current rows, then the changes after them. */
  initialState?: boolean;
  /** Deliver the changes after this position (e.g. after `waltap export`). */
  from?: string;
}

/** A stream as the server describes it. */
export interface StreamInfo {
  name: string;
  tables: string[];
  [field: string]: unknown;
}

export type TokenRequest =
  | { table: string; filter?: unknown; ttlSeconds?: number }
  | { stream: string; position?: string; ttlSeconds?: number };

export interface Token {
  token: string;
  /** Unix seconds. */
  expiresAt: number;
}

export interface StreamManagement {
  create(definition: StreamDefinition): Promise<StreamInfo>;
  list(): Promise<StreamInfo[]>;
  get(name: string): Promise<StreamInfo>;
  delete(name: string): Promise<void>;
  /** Moves the cursor to the log's head (after `StaleCursorError`); with `initialState` the stream starts over with the current rows. */
  reset(name: string, options?: { initialState?: boolean }): Promise<StreamInfo>;
}

export declare class Waltap {
  constructor(options: ClientOptions);
  readonly url: string;
  /** Create, list, describe, delete and reset streams (needs a key). */
  readonly streams: StreamManagement;
  /** Mints a token for browser code (needs a key). */
  createToken(request: TokenRequest): Promise<Token>;
  /**
   * An ephemeral subscription, at-most-once from now on. A dropped connection ends the
   * iteration with `ConnectionError`, a slow reader with `LaggedError`.
   */
  subscribe<R = Row>(options: SubscribeOptions): AsyncIterable<Item<R>>;
  /**
   * A persisted stream, at-least-once: resumes after the last acknowledged item,
   * reconnecting with backoff. Throws `StaleCursorError`, `StreamBusyError` (after
   * `busyTimeoutMs`), `UnauthorizedError`, `TokenExpiredError`.
   */
  stream<R = Row>(name: string, options?: StreamOptions): AsyncIterable<Item<R>>;
}
export default Waltap;

/** Every error the client throws; `code` is the server's stable error code. */
export declare class WaltapError extends Error {
  readonly code: string;
  /** The HTTP status, when the error came as a response. */
  readonly status: number | undefined;
  constructor(code: string, message: string, status?: number);
}
export declare class UnauthorizedError extends WaltapError {
  readonly code: "unauthorized";
}
export declare class TokenExpiredError extends WaltapError {
  readonly code: "token_expired";
}
export declare class StaleCursorError extends WaltapError {
  readonly code: "stale_cursor";
  /** The stream's name. */
  readonly stream: string | undefined;
  /** What to do: reset the stream (`client.streams.reset(name, { initialState: true })`). */
  readonly advice: string;
}
export declare class StreamBusyError extends WaltapError {
  readonly code: "stream_busy";
}
export declare class LaggedError extends WaltapError {
  readonly code: "lagged";
}
export declare class ConnectionError extends WaltapError {
  readonly code: "connection";
}
/** The typed error for a server error object `{code, message}`. */
export declare function errorFrom(
  body: { code?: string; message?: string } | undefined,
  status?: number,
  stream?: string,
): WaltapError;
/** Server-Sent Events from a response body. */
export declare function parseSse(
  body: ReadableStream<Uint8Array>,
  onBytes?: () => void,
): AsyncGenerator<{ event: string; id: string | null; data: string }>;
