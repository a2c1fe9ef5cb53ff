// Types of /duplex.js, the browser client of duplex.

/** An error the server answered with, with its stable code (`not_found`, `permission_denied`, …). */
export declare class DuplexError extends Error {
  readonly code: string;
  readonly status?: number;
  constructor(code: string, message?: string, status?: number);
}

/** A record: the server's fields and yours. */
export interface DuplexRecord {
  id: string;
  created: string;
  updated: string;
  version: number;
  [field: string]: unknown;
}

export interface Page {
  items: DuplexRecord[];
  next: string | null;
}

export interface ListOptions {
  limit?: number;
  sort?: "created" | "-created" | "updated" | "-updated";
  cursor?: string;
  /** Equality filters on top-level fields. */
  filter?: Record<string, string | number | boolean>;
}

export interface WriteOptions {
  /** Only if the record is still at this version (If-Match). */
  ifVersion?: number;
}

export declare class Records {
  create(fields: object): Promise<DuplexRecord>;
  get(id: string): Promise<DuplexRecord>;
  list(options?: ListOptions): Promise<Page>;
  all(options?: ListOptions): AsyncGenerator<DuplexRecord>;
  /** Creates the record with this id, or replaces it when it exists. */
  upsert(id: string, fields: object): Promise<DuplexRecord>;
  update(id: string, fields: object, options?: WriteOptions): Promise<DuplexRecord>;
  patch(id: string, patch: object, options?: WriteOptions): Promise<DuplexRecord>;
  delete(id: string, options?: WriteOptions): Promise<void>;
}

export interface Message {
  channel: string;
  offset: number;
  epoch: string;
  /** JSON data, or the bytes of a binary publication. */
  data: unknown | Uint8Array;
}

export interface PresenceEntry {
  client: string;
  user: string | null;
  meta: unknown;
}

export interface Gap {
  /** `epoch_changed`, `history_trimmed`, `offset_ahead`, … */
  reason: string;
  /** The last offset delivered before. */
  lastSeen: number;
  /** The offset the stream resumes after, in `epoch`: 0 when a new epoch follows whole. */
  resumedAt: number;
  epoch: string;
}

export interface Handlers {
  onMessage?(message: Message): void;
  onJoin?(who: PresenceEntry): void;
  onLeave?(who: PresenceEntry): void;
  /** Publications were missed and could not be replayed. */
  onGap?(gap: Gap): void;
  /** After a reconnect, what was missed was replayed (`missed` publications). */
  onRecover?(recovered: { missed: number; lastSeen: number; offset: number; epoch: string }): void;
  /** The subscription ended for good (refused, ended by the server with `unsubscribed` after a
   * refresh narrowed the token, or the server said not to reconnect). */
  onEnd?(code: string): void;
}

export declare class Subscription {
  readonly channel: string;
  /** The last offset delivered. */
  readonly offset: number;
  readonly epoch: string | null;
  unsubscribe(): void;
}

export interface DuplexOptions {
  /** A connection token (JWT). */
  token?: string;
  /** What presence shows for this client (unless the token has its own). */
  meta?: unknown;
  /** "auto" (WebSocket, else SSE), "websocket" or "sse". */
  transport?: "auto" | "websocket" | "sse";
  /** Reconnect backoff bounds, in milliseconds (default 100 and 10000). */
  minBackoff?: number;
  maxBackoff?: number;
}

export type Status = "idle" | "connecting" | "open" | "reconnecting" | "closed";

export declare class Duplex {
  constructor(url?: string, options?: DuplexOptions);
  /** The server's id of the current socket connection. */
  readonly clientId: string | null;
  readonly status: Status;
  /** "websocket" or "sse" once decided; "auto" before. */
  readonly transport: "auto" | "websocket" | "sse";
  records(collection: string): Records;
  connect(): Promise<void>;
  /** `options.since`: start after this position (from `history`), replaying what came since. */
  subscribe(
    channel: string,
    handlers?: Handlers | ((message: Message) => void),
    options?: { since?: { offset: number; epoch: string } },
  ): Promise<Subscription>;
  /** With `idempotencyKey`, a retry within 2 minutes answers the first publication's
   * position (`replayed: true`) instead of publishing again. */
  publish(
    channel: string,
    data: unknown,
    options?: { idempotencyKey?: string },
  ): Promise<{ offset: number; epoch: string; replayed?: boolean }>;
  /** Bytes, in a binary frame, to a namespace with `binary` on. */
  publishBytes(channel: string, bytes: Uint8Array | ArrayBuffer): Promise<{ offset: number; epoch: string }>;
  presence(channel: string): Promise<PresenceEntry[]>;
  history(channel: string, options?: { since?: number; limit?: number }): Promise<unknown>;
  /** Calls the application's backend (the server's `rpc` hook); rejects with a DuplexError
   * carrying the backend's code. */
  rpc(method: string, data?: unknown): Promise<unknown>;
  /** A fresh token for the same user; what it no longer allows ends with `onEnd`. */
  refresh(token: string): Promise<{ expires_at: number }>;
  /** Answers the server's requests; throw a DuplexError to answer with its code. */
  onRequest(handler: (data: unknown) => unknown | Promise<unknown>): void;
  onStatus(listener: (status: Status) => void): () => void;
  close(): void;
}
