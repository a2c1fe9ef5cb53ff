// duplex.js: the browser client of duplex, served by the server at /duplex.js (types at
// /duplex.d.ts). No dependencies.
//
//   import { Duplex } from "/duplex.js";
//   const duplex = new Duplex();                        // this page's server
//   const post = await duplex.records("posts").create({ title: "hi" });
//   duplex.subscribe("chat:lobby", { onMessage: (m) => console.log(m.offset, m.data) });
//   await duplex.publish("chat:lobby", { text: "hello" });
//
// Channels travel over a WebSocket that reconnects with exponential backoff and jitter and
// resubscribes `since` the last offset each subscription delivered, so nothing is missed or seen
// twice; when the server cannot replay the past, `onGap` says so. Where WebSocket is not
// available (or never connects), subscriptions fall back to Server-Sent Events.

/** An error the server answered with (HTTP problem or socket `error`), with its stable code. */
export class DuplexError extends Error {
  constructor(code, message, status) {
    super(message || code);
    this.name = "DuplexError";
    this.code = code;
    this.status = status;
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function problem(response) {
  let body = {};
  try {
    body = await response.json();
  } catch (_) {
    /* not JSON */
  }
  return new DuplexError(body.code || "http_error", body.detail || response.statusText, response.status);
}

/** The records of one collection, over fetch. */
class Records {
  constructor(duplex, collection) {
    this.duplex = duplex;
    this.collection = collection;
  }

  path(id) {
    const base = `/api/collections/${encodeURIComponent(this.collection)}/records`;
    return id === undefined ? base : `${base}/${encodeURIComponent(id)}`;
  }

  create(fields) {
    return this.duplex.fetchJson(this.path(), { method: "POST", json: fields });
  }

  get(id) {
    return this.duplex.fetchJson(this.path(id));
  }

  list({ limit, sort, cursor, filter } = {}) {
    const query = new URLSearchParams();
    if (limit !== undefined) query.set("limit", String(limit));
    if (sort) query.set("sort", sort);
    if (cursor) query.set("cursor", cursor);
    for (const [field, value] of Object.entries(filter || {})) query.set(`filter.${field}`, String(value));
    const q = query.toString();
    return this.duplex.fetchJson(q ? `${this.path()}?${q}` : this.path());
  }

  /** Every record, page after page. */
  async *all(options = {}) {
    let cursor = options.cursor;
    do {
      const page = await this.list({ ...options, cursor });
      yield* page.items;
      cursor = page.next;
    } while (cursor);
  }

  /** Creates the record with this id, or replaces it when it exists (PUT with
   * If-None-Match: *, then a plain PUT when it was there already). */
  async upsert(id, fields) {
    for (;;) {
      try {
        return await this.duplex.fetchJson(this.path(id), { method: "PUT", json: fields, headers: { "if-none-match": "*" } });
      } catch (error) {
        if (error.code !== "precondition_failed" && error.code !== "conflict") throw error;
      }
      try {
        return await this.duplex.fetchJson(this.path(id), { method: "PUT", json: fields });
      } catch (error) {
        // Deleted meanwhile: create it again.
        if (error.code !== "not_found") throw error;
      }
    }
  }

  update(id, fields, { ifVersion } = {}) {
    return this.duplex.fetchJson(this.path(id), { method: "PUT", json: fields, ifVersion });
  }

  patch(id, patch, { ifVersion } = {}) {
    return this.duplex.fetchJson(this.path(id), {
      method: "PATCH",
      json: patch,
      ifVersion,
      contentType: "application/merge-patch+json",
    });
  }

  async delete(id, { ifVersion } = {}) {
    await this.duplex.fetchJson(this.path(id), { method: "DELETE", ifVersion });
  }
}

/** One channel followed by this client. */
class Subscription {
  constructor(duplex, channel, handlers) {
    this.duplex = duplex;
    this.channel = channel;
    this.handlers = handlers;
    /** The last offset delivered, and its epoch: where a resubscription resumes. */
    this.offset = 0;
    this.epoch = null;
    this.active = true;
    this.ready = null;
    this.source = null;
  }

  deliver(message) {
    if (message.offset <= this.offset && message.epoch === this.epoch) return;
    this.offset = message.offset;
    this.handlers.onMessage?.(message);
  }

  /** Stops following the channel. */
  unsubscribe() {
    if (!this.active) return;
    this.active = false;
    this.duplex.subscriptions.delete(this.channel);
    if (this.source) this.source.close();
    else this.duplex.sendRequest({ type: "unsubscribe", channel: this.channel }).catch(() => {});
  }
}

/** A client of one duplex server. */
export class Duplex {
  /**
   * @param {string} [url] the server's base URL (default: this page's origin)
   * @param {object} [options] `token`, `meta`, `transport` ("auto" | "websocket" | "sse"),
   *   `minBackoff`/`maxBackoff` in ms (default 100 and 10000)
   */
  constructor(url, options = {}) {
    this.url = new URL(url || globalThis.location.origin);
    this.token = options.token;
    this.meta = options.meta;
    this.minBackoff = options.minBackoff ?? 100;
    this.maxBackoff = options.maxBackoff ?? 10000;
    const wsAvailable = typeof globalThis.WebSocket === "function";
    this.transport = options.transport || "auto";
    if (this.transport === "auto" && !wsAvailable) this.transport = "sse";
    this.subscriptions = new Map();
    this.pending = new Map();
    this.nextId = 1;
    this.socket = null;
    this.connecting = null;
    this.closed = false;
    this.clientId = null;
    this.requestHandler = null;
    this.statusListeners = new Set();
    this.status = "idle";
  }

  /** The records of one collection. */
  records(collection) {
    return new Records(this, collection);
  }

  /** Answers the server's requests: `handler(data)` returns (or resolves to) the reply;
   * throwing a DuplexError answers with its code. */
  onRequest(handler) {
    this.requestHandler = handler;
  }

  /** Calls `listener(status)` on every change: "connecting", "open", "reconnecting", "closed". */
  onStatus(listener) {
    this.statusListeners.add(listener);
    return () => this.statusListeners.delete(listener);
  }

  setStatus(status) {
    this.status = status;
    for (const listener of this.statusListeners) listener(status);
  }

  async fetchJson(path, { method = "GET", json, ifVersion, contentType = "application/json", headers: extra = {} } = {}) {
    const headers = { ...extra };
    if (this.token) headers.authorization = `Bearer ${this.token}`;
    if (ifVersion !== undefined) headers["if-match"] = `"${ifVersion}"`;
    let body;
    if (json !== undefined) {
      headers["content-type"] = contentType;
      body = JSON.stringify(json);
    }
    const response = await fetch(new URL(path, this.url), { method, headers, body });
    if (!response.ok) throw await problem(response);
    if (response.status === 204) return undefined;
    return response.json();
  }

  // ---- sockets ----

  /** Opens the WebSocket now (it also opens on the first subscribe or publish). */
  connect() {
    if (this.transport === "sse") return Promise.resolve();
    if (this.socket && this.socket.readyState === 1) return Promise.resolve();
    if (!this.connecting) this.connecting = this.openWithRetry();
    return this.connecting;
  }

  wsUrl() {
    const ws = new URL("/ws", this.url);
    ws.protocol = this.url.protocol === "https:" ? "wss:" : "ws:";
    return ws.toString();
  }

  async openWithRetry() {
    let wait = this.minBackoff;
    let failures = 0;
    let everOpened = this.clientId !== null;
    while (!this.closed) {
      this.setStatus(everOpened ? "reconnecting" : "connecting");
      try {
        await this.openOnce();
        this.connecting = null;
        return;
      } catch (error) {
        failures += 1;
        if (error instanceof DuplexError && error.code === "refused") throw error;
        // WebSocket never worked here (a proxy that refuses upgrades, say): use SSE.
        if (this.transport === "auto" && !everOpened && failures >= 2) {
          this.transport = "sse";
          this.connecting = null;
          for (const sub of this.subscriptions.values()) this.openEventSource(sub);
          this.setStatus("open");
          return;
        }
        await sleep(wait * (0.5 + Math.random() * 0.5));
        wait = Math.min(wait * 2, this.maxBackoff);
      }
    }
    throw new DuplexError("closed", "the client is closed");
  }

  openOnce() {
    return new Promise((resolve, reject) => {
      const socket = new WebSocket(this.wsUrl());
      socket.binaryType = "arraybuffer";
      let settled = false;
      const fail = (error) => {
        if (!settled) {
          settled = true;
          reject(error);
        }
      };
      socket.onerror = () => fail(new DuplexError("unreachable", "the WebSocket did not open"));
      socket.onclose = () => {
        fail(new DuplexError("unreachable", "the WebSocket closed while opening"));
        if (settled && this.socket === socket) this.lost();
      };
      socket.onmessage = async (event) => {
        if (typeof event.data !== "string") {
          this.onBinary(new Uint8Array(event.data));
          return;
        }
        const frame = JSON.parse(event.data);
        if (!settled && frame.type === "connected") {
          this.socket = socket;
          this.clientId = frame.client;
          try {
            if (this.token || this.meta !== undefined || frame.connect_required) {
              await this.sendRequest({ type: "connect", token: this.token, meta: this.meta });
            }
            for (const sub of this.subscriptions.values()) this.resubscribe(sub);
            settled = true;
            this.setStatus("open");
            resolve();
          } catch (error) {
            settled = true;
            this.closed = true;
            socket.close();
            reject(error);
          }
          return;
        }
        this.onFrame(frame);
      };
    });
  }

  /** The socket broke: fail what waits on it and reconnect. */
  lost() {
    this.socket = null;
    for (const { reject } of this.pending.values()) {
      reject(new DuplexError("connection_lost", "the connection was lost before the server answered"));
    }
    this.pending.clear();
    if (this.closed) {
      this.setStatus("closed");
      return;
    }
    this.connecting = this.openWithRetry().catch(() => {});
  }

  onFrame(frame) {
    switch (frame.type) {
      case "reply":
      case "error": {
        const waiting = this.pending.get(frame.id);
        if (!waiting) return;
        this.pending.delete(frame.id);
        if (frame.type === "reply") waiting.resolve(frame.result);
        else waiting.reject(new DuplexError(frame.code, frame.message));
        return;
      }
      case "message": {
        const sub = this.subscriptions.get(frame.channel);
        if (sub && sub.ready === true) sub.deliver({ channel: frame.channel, offset: frame.offset, epoch: sub.epoch, data: frame.data });
        return;
      }
      case "join":
      case "leave": {
        const sub = this.subscriptions.get(frame.channel);
        const handler = frame.type === "join" ? sub?.handlers.onJoin : sub?.handlers.onLeave;
        handler?.({ client: frame.client, user: frame.user, meta: frame.meta });
        return;
      }
      case "unsubscribed": {
        // The server ended the subscription (a refreshed token no longer allows it): it is
        // not resubscribed.
        const sub = this.subscriptions.get(frame.channel);
        if (!sub) return;
        this.subscriptions.delete(frame.channel);
        sub.active = false;
        sub.handlers.onEnd?.(frame.code);
        return;
      }
      case "request":
        this.answer(frame);
        return;
      case "disconnect":
        if (!frame.reconnect) {
          this.closed = true;
          for (const sub of this.subscriptions.values()) sub.handlers.onEnd?.(frame.code);
        }
        return;
      default:
    }
  }

  onBinary(bytes) {
    if (bytes[0] !== 0x01) return;
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const length = view.getUint16(1);
    const channel = new TextDecoder().decode(bytes.subarray(3, 3 + length));
    const offset = Number(view.getBigUint64(3 + length));
    const sub = this.subscriptions.get(channel);
    if (sub && sub.ready === true) sub.deliver({ channel, offset, epoch: sub.epoch, data: bytes.slice(11 + length) });
  }

  async answer(frame) {
    let reply;
    try {
      if (!this.requestHandler) throw new DuplexError("no_handler", "this client answers no requests");
      reply = { type: "reply", id: frame.id, result: await this.requestHandler(frame.data) };
    } catch (error) {
      reply = { type: "error", id: frame.id, code: error.code || "handler_failed", message: String(error.message || error) };
    }
    if (this.socket) this.socket.send(JSON.stringify(reply));
  }

  /** Sends a request frame over the socket and resolves with the reply's `result`. */
  async sendRequest(frame) {
    if (this.transport === "sse") throw new DuplexError("unsupported", "this needs a WebSocket, and this client fell back to SSE");
    if (!this.socket || this.socket.readyState !== 1) {
      if (frame.type !== "connect") await this.connect();
    }
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.socket.send(JSON.stringify({ ...frame, id }));
    });
  }

  resubscribe(sub) {
    sub.ready = false;
    const frame = { type: "subscribe", channel: sub.channel };
    if (sub.epoch !== null) frame.since = { offset: sub.offset, epoch: sub.epoch };
    const hadPosition = sub.epoch !== null;
    const lastSeen = sub.offset;
    sub.subscribing = this.sendRequest(frame).then(
      (result) => {
        // Not recovered: live after the channel's offset, less what follows the reply (a new
        // epoch the server keeps whole is replayed from its first offset).
        const resumedAt = result.offset - (result.missed ?? 0);
        if (hadPosition && result.recovered === false) {
          sub.handlers.onGap?.({ reason: result.reason, lastSeen, resumedAt, epoch: result.epoch });
        }
        if (hadPosition && result.recovered === true) {
          sub.handlers.onRecover?.({ missed: result.missed, lastSeen, offset: result.offset, epoch: result.epoch });
        }
        if (result.recovered !== true) sub.offset = resumedAt;
        sub.epoch = result.epoch;
        sub.ready = true;
        return result;
      },
      (error) => {
        if (error.code === "connection_lost") return null; // retried on reconnect
        this.subscriptions.delete(sub.channel);
        sub.active = false;
        sub.handlers.onEnd?.(error.code);
        throw error;
      },
    );
    return sub.subscribing;
  }

  /**
   * Follows a channel. `handlers`: `onMessage({channel, offset, epoch, data})` (data is JSON,
   * or a Uint8Array for binary publications), `onJoin`/`onLeave({client, user, meta})`,
   * `onGap({reason, lastSeen, resumedAt, epoch})` when missed publications could not be
   * replayed, `onRecover({missed, lastSeen, offset, epoch})` when a resubscription replayed
   * what was missed, `onEnd(code)` when the subscription ends for good. `options.since`
   * (`{offset, epoch}`, from `history`) starts after that position: what was published since
   * comes first, so a page that shows history and then follows misses nothing in between.
   * Resolves once subscribed.
   */
  async subscribe(channel, handlers = {}, options = {}) {
    if (typeof handlers === "function") handlers = { onMessage: handlers };
    if (this.subscriptions.has(channel)) throw new DuplexError("already_subscribed", `already following ${channel}`);
    const sub = new Subscription(this, channel, handlers);
    if (options.since) {
      sub.offset = options.since.offset;
      sub.epoch = options.since.epoch;
    }
    this.subscriptions.set(channel, sub);
    if (this.transport === "sse") {
      await this.openEventSource(sub);
      return sub;
    }
    await this.connect();
    if (this.transport === "sse") return sub; // fell back while connecting
    // Opening the socket subscribed it already; else subscribe now.
    await (sub.ready === null ? this.resubscribe(sub) : sub.subscribing);
    return sub;
  }

  openEventSource(sub) {
    const url = new URL(`/api/channels/${encodeURIComponent(sub.channel)}/events`, this.url);
    if (this.token) url.searchParams.set("token", this.token);
    if (sub.epoch !== null) {
      url.searchParams.set("since", String(sub.offset));
      url.searchParams.set("epoch", sub.epoch);
    }
    // The browser resumes the stream itself (`Last-Event-ID`); each `subscribed` after the first
    // is such a resume, as is the first when the subscription started `since` a position.
    const hadPosition = sub.epoch !== null;
    return new Promise((resolve, reject) => {
      const source = new EventSource(url);
      sub.source = source;
      let subscribed = false;
      source.addEventListener("subscribed", (event) => {
        const result = JSON.parse(event.data);
        if ((subscribed || hadPosition) && result.recovered === true) {
          sub.handlers.onRecover?.({ missed: result.missed, lastSeen: sub.offset, offset: result.offset, epoch: result.epoch });
        }
        if (result.recovered === false) sub.offset = result.offset - (result.missed ?? 0);
        else if (sub.epoch === null) sub.offset = Math.max(sub.offset, result.offset);
        sub.epoch = result.epoch;
        sub.ready = true;
        if (!subscribed) {
          subscribed = true;
          resolve(sub);
        }
      });
      source.addEventListener("not_recovered", (event) => {
        const info = JSON.parse(event.data);
        const resumedAt = info.offset - (info.missed ?? 0);
        sub.handlers.onGap?.({ reason: info.reason, lastSeen: sub.offset, resumedAt, epoch: info.epoch });
        sub.offset = resumedAt;
      });
      source.addEventListener("message", (event) => {
        const frame = JSON.parse(event.data);
        const [epoch] = (event.lastEventId || "").split(":");
        if (epoch) sub.epoch = epoch;
        sub.deliver({ channel: frame.channel, offset: frame.offset, epoch: sub.epoch, data: frame.data });
      });
      source.addEventListener("join", (event) => sub.handlers.onJoin?.(JSON.parse(event.data)));
      source.addEventListener("leave", (event) => sub.handlers.onLeave?.(JSON.parse(event.data)));
      source.addEventListener("disconnect", (event) => {
        const info = JSON.parse(event.data);
        if (!info.reconnect) {
          source.close();
          sub.handlers.onEnd?.(info.code);
        }
      });
      source.onerror = () => {
        if (!subscribed && source.readyState === EventSource.CLOSED) {
          reject(new DuplexError("unreachable", "the event stream did not open"));
        }
      };
    });
  }

  /** Publishes JSON on a channel; resolves with `{offset, epoch}`. With
   * `options.idempotencyKey` (1 to 128 visible ASCII characters, e.g. `crypto.randomUUID()`),
   * a retry with the same key and data within 2 minutes resolves with the first publication's
   * `{offset, epoch, replayed: true}` instead of publishing again: retry with it after a
   * `connection_lost`, when the first attempt may or may not have run. */
  publish(channel, data, options = {}) {
    const frame = { type: "publish", channel, data };
    if (options.idempotencyKey !== undefined) frame.idempotency_key = options.idempotencyKey;
    return this.sendRequest(frame);
  }

  /** Publishes bytes (a Uint8Array or ArrayBuffer) on a channel of a namespace with `binary`
   * on, in one binary frame: 0x02 | request id u32 | channel length u16 | channel | payload. */
  async publishBytes(channel, bytes) {
    if (this.transport === "sse") throw new DuplexError("unsupported", "this needs a WebSocket, and this client fell back to SSE");
    if (!this.socket || this.socket.readyState !== 1) await this.connect();
    const payload = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
    const name = new TextEncoder().encode(channel);
    const id = this.nextId++ % 0x100000000;
    const frame = new Uint8Array(7 + name.length + payload.length);
    const view = new DataView(frame.buffer);
    frame[0] = 0x02;
    view.setUint32(1, id);
    view.setUint16(5, name.length);
    frame.set(name, 7);
    frame.set(payload, 7 + name.length);
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.socket.send(frame);
    });
  }

  /** Who is subscribed to a channel with presence. */
  async presence(channel) {
    const result = await this.sendRequest({ type: "presence", channel });
    return result.clients;
  }

  /** A channel's last `limit` publications, or the ones after `since`. */
  history(channel, { since, limit } = {}) {
    return this.sendRequest({ type: "history", channel, since, limit });
  }

  /** Calls the application's backend through the server (its `rpc` hook): resolves with the
   * backend's result, rejects with a DuplexError carrying the backend's code. */
  rpc(method, data) {
    return this.sendRequest({ type: "rpc", method, data });
  }

  /** Hands the server a fresh token for the same user; subscriptions the new token no longer
   * allows end with `onEnd("permission_denied")`. */
  async refresh(token) {
    const result = await this.sendRequest({ type: "refresh", token });
    if (token !== undefined) this.token = token;
    return result;
  }

  /** Closes the socket and every event stream; nothing reconnects after this. */
  close() {
    this.closed = true;
    for (const sub of this.subscriptions.values()) sub.source?.close();
    this.subscriptions.clear();
    if (this.socket) this.socket.close(1000);
    this.setStatus("closed");
  }
}
