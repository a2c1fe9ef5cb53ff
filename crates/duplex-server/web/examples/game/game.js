// Coin rush: what a socket with latest-wins delivery is for.
//
// Players move with the arrow keys (or WASD) and publish where they are, at most 20 times a
// second, on `game:arena.moves`; every player draws the others from it. The game master (Rust:
// `cargo run -p duplex-client --example game-master`) follows the same moves, runs rounds and
// publishes the whole game — phase, coins, scores, time left — 20 times a second on
// `game:arena`. Both are in the `game` namespace, whose slow-consumer policy is `latest`: a
// player whose connection falls behind skips to the newest state instead of replaying stale
// ones. Before each round the master asks every player "ready?" (a server → client request,
// answered by this page's onRequest handler) and plays with those who answered. Scores are
// records (`scores`), written over HTTP when a round ends.

import { Duplex } from "/duplex.js";
import { fill, h, randomName } from "/examples/lib.js";

const WIDTH = 800;
const HEIGHT = 500;
const RADIUS = 16;
const SPEED = 260; // pixels a second
const SEND_EVERY = 50; // ms: 20 updates a second at most

const app = document.getElementById("app");
const status = document.getElementById("status");
const params = new URLSearchParams(location.search);

const nameInput = h("input", { value: params.get("name") || localStorage.getItem("duplex-example-name") || randomName(), maxlength: "20", "aria-label": "Your name" });
const hue = Math.floor(Math.random() * 360);
const color = `hsl(${hue} 85% 60%)`;
const play = h("button", { class: "primary", type: "submit", "data-testid": "game-play" }, "Play");
const canvas = h("canvas", { width: String(WIDTH), height: String(HEIGHT), tabindex: "0", "aria-label": "The arena: move with the arrow keys", "data-testid": "game-canvas", "data-phase": "none" });
const banner = h("div", { class: "banner" });
const players = h("ul", { class: "players", "data-testid": "game-players" });
const results = h("ol", { class: "results" });
const badge = h("span", { class: "pill" }, "not playing");
status.append(badge);

app.append(
  h(
    "form",
    { class: "join", onsubmit: (event) => (event.preventDefault(), start()) },
    h("label", {}, "Your name", nameInput),
    play,
    h("span", { class: "keys" }, "Arrow keys or WASD to move. Grab the coins."),
  ),
  h(
    "div",
    { class: "arena-wrap" },
    h("section", { class: "panel arena" }, canvas, banner),
    h(
      "aside",
      { class: "grid" },
      h("section", { class: "panel" }, h("h2", {}, "Players"), players),
      h("section", { class: "panel" }, h("h2", {}, "Last rounds"), results),
    ),
  ),
);

// What the page knows: itself, the others (from their moves), the game (from the master).
const me = { x: 60 + Math.random() * (WIDTH - 120), y: 60 + Math.random() * (HEIGHT - 120) };
const others = new Map();
let game = null;
let gameAt = 0;
let present = new Map();
let duplex = null;
let keys = new Set();
let resultsOf = null;
const trail = [];

// For anyone checking the game from outside (the browser test): what this page sees.
window.gameState = { me, others, phase: "none", round: 0, inRound: false };

async function start() {
  const name = nameInput.value.trim() || randomName();
  localStorage.setItem("duplex-example-name", name);
  play.disabled = true;
  nameInput.disabled = true;
  // Name and colour travel as connection metadata: presence shows them to everyone.
  duplex = new Duplex(undefined, { meta: { name, color }, minBackoff: 100, maxBackoff: 2000 });
  duplex.onStatus((now) => {
    badge.textContent = now === "open" ? "playing" : now;
    badge.className = `pill ${now === "open" ? "live" : now === "reconnecting" ? "off" : ""}`;
  });
  // The master asks before each round; answering is how a player takes part.
  duplex.onRequest((data) => {
    if (data?.question !== "ready?") throw new Error("I only answer ready?");
    return { ready: true, name };
  });
  await duplex.subscribe("game:arena", {
    onMessage: ({ data }) => {
      game = data;
      gameAt = performance.now();
      canvas.dataset.phase = data.phase;
      window.gameState.phase = data.phase;
      window.gameState.round = data.round;
      window.gameState.inRound = Boolean(data.players?.some((p) => p.client === duplex.clientId && p.in_round));
      drawPlayers();
      if (data.phase === "over" && data.round !== resultsOf) {
        resultsOf = data.round;
        setTimeout(loadResults, 500);
      }
    },
    onJoin: (who) => {
      present.set(who.client, who);
      drawPlayers();
    },
    onLeave: (who) => {
      present.delete(who.client);
      others.delete(who.client);
      drawPlayers();
    },
  });
  await duplex.subscribe("game:arena.moves", ({ data }) => {
    if (data.client === duplex.clientId) return;
    others.set(data.client, { ...data, at: performance.now() });
  });
  present = new Map((await duplex.presence("game:arena")).map((who) => [who.client, who]));
  drawPlayers();
  loadResults();
  canvas.focus();
  send(true);
}

// ---- moving and telling the others ----

const KEYS = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1], a: [-1, 0], d: [1, 0], w: [0, -1], s: [0, 1] };
window.addEventListener("keydown", (event) => {
  if (!KEYS[event.key] || document.activeElement === nameInput) return;
  keys.add(event.key);
  event.preventDefault();
});
window.addEventListener("keyup", (event) => keys.delete(event.key));
window.addEventListener("blur", () => (keys = new Set()));

let lastSent = 0;
let lastStep = performance.now();
let moved = false;

function step() {
  const now = performance.now();
  const dt = Math.min(0.1, (now - lastStep) / 1000);
  lastStep = now;
  let dx = 0;
  let dy = 0;
  for (const key of keys) {
    dx += KEYS[key][0];
    dy += KEYS[key][1];
  }
  if (dx || dy) {
    const length = Math.hypot(dx, dy);
    me.x = Math.max(RADIUS, Math.min(WIDTH - RADIUS, me.x + (dx / length) * SPEED * dt));
    me.y = Math.max(RADIUS, Math.min(HEIGHT - RADIUS, me.y + (dy / length) * SPEED * dt));
    moved = true;
    trail.push([me.x, me.y, now]);
  }
  send(false);
}

/** Publishes this player's position: when it moved (20 times a second at most), and every 1.5 s
 * anyway so that newcomers see players who stand still. */
function send(force) {
  if (!duplex || duplex.status !== "open") return;
  const now = performance.now();
  if (!force && (now - lastSent < SEND_EVERY || (!moved && now - lastSent < 1500))) return;
  lastSent = now;
  moved = false;
  duplex
    .publish("game:arena.moves", { client: duplex.clientId, name: nameInput.value.trim(), color, x: Math.round(me.x), y: Math.round(me.y) })
    .catch(() => {});
}

// ---- drawing (on a timer: headless and background pages throttle animation frames) ----

const context = canvas.getContext("2d");

function draw() {
  const now = performance.now();
  context.fillStyle = "#0b1020";
  context.fillRect(0, 0, WIDTH, HEIGHT);
  context.strokeStyle = "rgb(255 255 255 / 6%)";
  for (let x = 50; x < WIDTH; x += 50) line(x, 0, x, HEIGHT);
  for (let y = 50; y < HEIGHT; y += 50) line(0, y, WIDTH, y);
  const fresh = game && now - gameAt < 2000;
  if (fresh && game.phase === "playing") {
    for (const [x, y] of game.coins) {
      const pulse = 9 + Math.sin(now / 180 + x) * 2;
      context.fillStyle = "#ffd43b";
      circle(x, y, pulse);
      context.fillStyle = "#fff3bf";
      circle(x - 3, y - 3, pulse / 3);
    }
  }
  while (trail.length && now - trail[0][2] > 300) trail.shift();
  for (const [x, y, at] of trail) {
    context.fillStyle = `hsl(${hue} 85% 60% / ${0.35 * (1 - (now - at) / 300)})`;
    circle(x, y, RADIUS * 0.7);
  }
  for (const [client, other] of others) {
    if (now - other.at > 10000) others.delete(client);
    else player(other.x, other.y, other.color, other.name, scoreOf(client));
  }
  if (duplex) player(me.x, me.y, color, `${nameInput.value.trim()} (you)`, scoreOf(duplex.clientId));
  drawBanner(fresh, now);
}

function line(x1, y1, x2, y2) {
  context.beginPath();
  context.moveTo(x1, y1);
  context.lineTo(x2, y2);
  context.stroke();
}

function circle(x, y, r) {
  context.beginPath();
  context.arc(x, y, r, 0, Math.PI * 2);
  context.fill();
}

function player(x, y, fillColor, label, score) {
  context.fillStyle = fillColor;
  circle(x, y, RADIUS);
  context.fillStyle = "#fff";
  context.font = "600 13px system-ui, sans-serif";
  context.textAlign = "center";
  context.fillText(score === undefined ? label : `${label} · ${score}`, x, y - RADIUS - 6);
}

function scoreOf(client) {
  return game?.players?.find((p) => p.client === client)?.score;
}

function drawBanner(fresh, now) {
  let title = null;
  let detail = "";
  if (!duplex) {
    title = "Press Play";
    detail = "then move with the arrow keys";
  } else if (!fresh) {
    title = "No game master";
    detail = "run: cargo run -p duplex-client --example game-master";
  } else if (game.phase === "lobby") {
    title = "Waiting for the next round";
    detail = game.message || "";
  } else if (game.phase === "playing") {
    const left = Math.max(0, game.ends_in_ms - (now - gameAt));
    if (left < 4000) title = `${Math.ceil(left / 1000)}`;
  } else if (game.phase === "over") {
    const best = [...(game.players || [])].filter((p) => p.in_round).sort((a, b) => b.score - a.score)[0];
    title = best ? `${best.name} wins round ${game.round}` : `Round ${game.round} is over`;
    detail = "scores saved";
  }
  if (title === null) banner.replaceChildren();
  else fill(banner, h("div", {}, title, detail ? h("small", {}, detail) : null));
}

function drawPlayers() {
  const list = [...present.values()].map((who) => ({
    client: who.client,
    name: who.meta?.name || who.client.slice(0, 6),
    color: who.meta?.color || "gray",
    score: scoreOf(who.client) ?? 0,
  }));
  list.sort((a, b) => b.score - a.score);
  fill(
    players,
    list.map((p) =>
      h(
        "li",
        { class: p.client === duplex?.clientId ? "me" : "", "data-client": p.client },
        h("span", { class: "dot", style: `background:${p.color}` }),
        p.name,
        h("span", { class: "score" }, String(p.score)),
      ),
    ),
  );
}

/** The last rounds' scores, from the records the master writes. */
async function loadResults() {
  try {
    const page = await duplex.records("scores").list({ sort: "-created", limit: 8 });
    fill(results, page.items.map((r) => h("li", {}, `Round ${r.round}: ${r.name} — ${r.score}`)));
    if (page.items.length === 0) results.append(h("li", { class: "muted" }, "No round played yet."));
  } catch (_) {
    /* no scores yet */
  }
}

setInterval(step, 16);
setInterval(draw, 33);
draw();
