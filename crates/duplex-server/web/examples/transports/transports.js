// Transport race: one feed, four ways to receive it, side by side.
//
// The page publishes a tick five times a second through the server API
// (POST /api/channels/{channel}/publish, as a backend would), each stamped with when it was
// sent, on a channel of its own. Four lanes follow the same channel:
//   short poll  GET …/poll?since=N every second: late by up to the interval, a request each time;
//   long poll   GET …/poll?since=N&wait=30s: answered as soon as there is news, a request per answer;
//   SSE         one GET …/events held open: the server writes each tick as it comes;
//   WebSocket   one socket to /ws: the same, and either side may speak.
// Each lane shows the ticks it got, how late they arrived (median and last), the HTTP requests
// it made and the bytes it received per tick (for HTTP lanes the whole responses as the
// browser's Resource Timing reports them, headers included; for the sockets the framed messages).

import { h } from "/examples/lib.js";

const channel = `race:run-${Math.random().toString(36).slice(2, 8)}`;
const TICK_EVERY = 200;
const POLL_EVERY = 1000;
/** The race stops by itself after this long (a tab left open costs the server nothing). */
const RACE_FOR = 2 * 60 * 1000;
const app = document.getElementById("app");

class Lane {
  constructor(key, title, detail) {
    this.key = key;
    this.count = 0;
    this.requests = 0;
    this.bytes = 0;
    this.latencies = [];
    this.seen = new Set();
    this.big = h("div", { class: "big" }, "0");
    this.median = h("dd", {}, "–");
    this.last = h("dd", {}, "–");
    this.requestsCell = h("dd", {}, "0");
    this.perTick = h("dd", {}, "–");
    this.bar = h("div");
    this.element = h(
      "section",
      { class: "panel lane", "data-testid": `transport-${key}`, "data-count": "0" },
      h("h2", {}, title),
      this.big,
      h("div", { class: "small muted" }, detail),
      h(
        "dl",
        {},
        h("dt", {}, "late, median"),
        this.median,
        h("dt", {}, "late, last"),
        this.last,
        h("dt", {}, "HTTP requests"),
        this.requestsCell,
        h("dt", {}, "bytes per tick"),
        this.perTick,
      ),
      h("div", { class: "tick" }, this.bar),
    );
  }

  /** A tick arrived (each counted once, whatever the transport repeats). */
  got(data) {
    if (!data || this.seen.has(data.n)) return;
    this.seen.add(data.n);
    this.count += 1;
    const late = Math.max(0, Date.now() - data.sent);
    this.latencies.push(late);
    this.last.textContent = `${late} ms`;
    this.element.dataset.count = String(this.count);
    this.element.dataset.lastLatency = String(late);
    this.big.textContent = String(this.count);
    this.bar.style.width = `${Math.min(100, (late / POLL_EVERY) * 100)}%`;
  }

  request() {
    this.requests += 1;
  }

  received(bytes) {
    this.bytes += bytes;
  }

  /** Redraws the slower figures. */
  refresh() {
    if (this.latencies.length) {
      const sorted = [...this.latencies].sort((a, b) => a - b);
      const median = sorted[Math.floor(sorted.length / 2)];
      this.median.textContent = `${median} ms`;
      this.element.dataset.median = String(median);
    }
    this.requestsCell.textContent = this.requests.toLocaleString();
    this.perTick.textContent = this.count ? Math.round(this.bytes / this.count).toLocaleString() : "–";
  }
}

const lanes = {
  poll: new Lane("poll", "Short poll", `asks every ${POLL_EVERY / 1000} s`),
  longpoll: new Lane("longpoll", "Long poll", "a request held until there is news"),
  sse: new Lane("sse", "Server-Sent Events", "one response that never ends"),
  websocket: new Lane("websocket", "WebSocket", "one socket, both ways"),
};

const published = h("span", { class: "pill" }, "0 ticks published");
const stop = h("button", { type: "button", onclick: () => (running = false) }, "Stop");
const problem = h("div");
app.append(
  h("div", { class: "controls" }, h("span", { class: "mono small" }, channel), published, stop),
  problem,
  h("div", { class: "lanes" }, Object.values(lanes).map((lane) => lane.element)),
  h(
    "p",
    { class: "explain" },
    "Short polling is late by half its interval on average and pays a request even when nothing changed; " +
      "long polling is prompt but pays a request (and its headers) per answer; SSE and the WebSocket pay " +
      "one request for the whole run and deliver each tick as it is published.",
  ),
);

let running = true;
const base = `/api/channels/${encodeURIComponent(channel)}`;

// ---- the feed: ticks through the server API ----

let n = 0;
async function tick() {
  if (!running) return;
  n += 1;
  try {
    const response = await fetch(`${base}/publish`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ n, sent: Date.now() }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      problem.replaceChildren(h("p", { class: "notice error" }, `The server API refused the tick: ${body.detail || response.status}`));
      running = false;
      return;
    }
    published.textContent = `${n} ticks published`;
  } finally {
    if (running) setTimeout(tick, TICK_EVERY);
  }
}

// ---- HTTP lanes: bytes from Resource Timing (headers included) ----

new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) {
    if (!entry.name.includes(`${encodeURIComponent(channel)}/poll`)) continue;
    const lane = entry.name.includes("wait=") ? lanes.longpoll : lanes.poll;
    lane.received(entry.transferSize || entry.encodedBodySize || 0);
  }
  performance.clearResourceTimings();
}).observe({ type: "resource", buffered: true });

/** One poll: the publications after `position`, and where to ask from next. */
async function poll(lane, position, wait) {
  const query = new URLSearchParams({ since: String(position.next) });
  if (position.epoch) query.set("epoch", position.epoch);
  if (wait) query.set("wait", wait);
  lane.request();
  const response = await fetch(`${base}/poll?${query}`);
  const page = await response.json();
  for (const frame of page.publications || []) lane.got(frame.data);
  position.next = page.next;
  position.epoch = page.epoch;
}

async function shortPoll() {
  const position = { next: 0, epoch: null };
  while (running) {
    await poll(lanes.poll, position, null).catch(() => {});
    await new Promise((resolve) => setTimeout(resolve, POLL_EVERY));
  }
}

async function longPoll() {
  const position = { next: 0, epoch: null };
  while (running) {
    await poll(lanes.longpoll, position, "30s").catch(() => new Promise((resolve) => setTimeout(resolve, 500)));
  }
}

// ---- socket lanes ----

function sse() {
  lanes.sse.request();
  const source = new EventSource(`${base}/events`);
  source.addEventListener("message", (event) => {
    // The event as framed on the wire: "id: …\ndata: …\n\n".
    lanes.sse.received(event.lastEventId.length + event.data.length + 12);
    lanes.sse.got(JSON.parse(event.data).data);
  });
  return source;
}

function websocket() {
  lanes.websocket.request(); // the upgrade
  const url = new URL("/ws", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(url);
  socket.onopen = () => socket.send(JSON.stringify({ id: 1, type: "subscribe", channel }));
  socket.onmessage = (event) => {
    // The message as framed: its text and a 2 or 4 byte header.
    lanes.websocket.received(event.data.length + (event.data.length > 125 ? 4 : 2));
    const frame = JSON.parse(event.data);
    if (frame.type === "message") lanes.websocket.got(frame.data);
  };
  return socket;
}

const source = sse();
const socket = websocket();
shortPoll();
longPoll();
// Give the streams a moment to subscribe, then start the feed.
setTimeout(tick, 500);
setTimeout(() => (running = false), RACE_FOR);
setInterval(() => {
  for (const lane of Object.values(lanes)) lane.refresh();
  if (!running) {
    source.close();
    socket.close();
    stop.disabled = true;
    stop.textContent = "Stopped";
  }
}, 500);
