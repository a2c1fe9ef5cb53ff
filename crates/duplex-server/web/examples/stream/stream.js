// Live stream relay: what a socket with binary frames is for.
//
// The broadcaster (?role=broadcast&name=N) records a canvas animation (or its camera) with
// MediaRecorder as WebM. The stream's initialisation segment is kept as a record
// (`streams/{name}`), where a viewer who joins late reads it over HTTP; every Cluster then goes
// out on `stream:{name}` as binary publications, cut at 48 KiB so each fits a socket frame. The
// first byte of each says whether it begins a Cluster (1) or continues one (0): a viewer starts
// at a piece that begins a Cluster (each begins with a keyframe) and plays from there with Media
// Source Extensions. The server never looks inside: it relays bytes, to every viewer.

import { Duplex } from "/duplex.js";
import { fill, h, statusBadge } from "/examples/lib.js";
import { WebmCutter } from "/examples/stream/webm.js";

const PIECE = 48 * 1024;
const STARTS = 1;
const CONTINUES = 0;

const params = new URLSearchParams(location.search);
const name = (params.get("name") || "demo").replace(/[^A-Za-z0-9_-]/g, "").slice(0, 40) || "demo";
const channel = `stream:${name}`;
const duplex = new Duplex(undefined, { minBackoff: 100, maxBackoff: 2000 });
const app = document.getElementById("app");
document.getElementById("status").append(statusBadge(duplex));

function figure(label, testid) {
  const value = h("div", { class: "value", "data-testid": testid }, "–");
  return { element: h("div", { class: "figure" }, h("div", { class: "label" }, label), value), value };
}

/** Bytes per second over the last five seconds, from (time, bytes) samples. */
function bitrate(samples) {
  const now = performance.now();
  while (samples.length && now - samples[0][0] > 5000) samples.shift();
  const total = samples.reduce((sum, [, bytes]) => sum + bytes, 0);
  return (total * 8) / 5 / 1000;
}

const kbps = (value) => `${value.toFixed(0)} kbit/s`;

if (params.get("role") === "broadcast") broadcast();
else view();

// ---- the broadcaster ----

function broadcast() {
  const canvas = h("canvas", { width: "640", height: "360", "aria-label": "What is broadcast" });
  const start = h("button", { class: "primary", type: "button", "data-testid": "stream-start" }, "Start broadcasting");
  const camera = h("button", { type: "button" }, "Use my camera");
  const sent = figure("Bytes sent", "stream-sent");
  const rate = figure("Bitrate", "stream-bitrate");
  const viewers = figure("Viewers", "stream-viewers");
  const problem = h("div");
  const viewerUrl = new URL(`/examples/stream?name=${encodeURIComponent(name)}`, location.href).toString();
  app.append(
    h(
      "div",
      { class: "stage" },
      h("div", { class: "screen" }, canvas),
      h(
        "aside",
        { class: "panel figures" },
        h("h2", {}, `Broadcasting as “${name}”`),
        h("div", { class: "row" }, start, camera),
        sent.element,
        rate.element,
        viewers.element,
        h("p", { class: "small muted share" }, "Viewers open ", h("a", { href: viewerUrl, target: "_blank" }, viewerUrl)),
        problem,
      ),
    ),
  );

  // A timer, not requestAnimationFrame, draws the canvas: background tabs and headless browsers
  // throttle animation frames, and captureStream only yields frames when the canvas is drawn.
  const context = canvas.getContext("2d");
  let frame = 0;
  let source = null;
  const video = h("video", { muted: true, playsinline: true });
  setInterval(() => {
    frame += 1;
    if (source === "camera") {
      context.drawImage(video, 0, 0, canvas.width, canvas.height);
    } else {
      const t = frame / 30;
      context.fillStyle = `hsl(${(frame * 2) % 360} 60% 18%)`;
      context.fillRect(0, 0, 640, 360);
      for (let i = 0; i < 6; i++) {
        context.fillStyle = `hsl(${(frame * 2 + i * 60) % 360} 80% 60%)`;
        context.beginPath();
        context.arc(320 + Math.cos(t + i) * (100 + i * 20), 180 + Math.sin(t * 1.3 + i) * 110, 18 + i * 3, 0, Math.PI * 2);
        context.fill();
      }
    }
    context.fillStyle = "#fff";
    context.font = "bold 28px system-ui, sans-serif";
    context.fillText(`${name} · ${new Date().toLocaleTimeString()} · frame ${frame}`, 20, 44);
  }, 33);

  camera.addEventListener("click", async () => {
    try {
      video.srcObject = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 360 } });
      await video.play();
      source = "camera";
    } catch (error) {
      fill(problem, h("p", { class: "notice error" }, `No camera: ${error.message}`));
    }
  });

  // What was published, for anyone checking the relay (offset → bytes).
  window.published = [];
  let total = 0;
  const samples = [];

  async function publish(bytes) {
    const result = await duplex.publishBytes(channel, bytes);
    window.published.push({ offset: result.offset, epoch: result.epoch, bytes: bytes.length });
    total += bytes.length;
    samples.push([performance.now(), bytes.length]);
    sent.value.textContent = total.toLocaleString();
  }

  start.addEventListener("click", async () => {
    start.disabled = true;
    const mime = ["video/webm;codecs=vp8", "video/webm;codecs=vp9"].find((t) => MediaRecorder.isTypeSupported(t) && MediaSource.isTypeSupported(t));
    if (!mime) {
      fill(problem, h("p", { class: "notice error" }, "This browser records no WebM that it could play back."));
      return;
    }
    // A keyframe every second starts a new Cluster every second: a late viewer waits at most
    // that long for a place to start.
    const recorder = new MediaRecorder(canvas.captureStream(30), { mimeType: mime, videoBitsPerSecond: 600_000, videoKeyFrameIntervalDuration: 1000 });
    let chain = Promise.resolve();
    const cutter = new WebmCutter({
      onInit: (init) => {
        // Kept where a late joiner reads it over HTTP (PUT creates or replaces the record).
        chain = chain.then(() =>
          duplex.records("streams").upsert(name, { mime, init: btoa(String.fromCharCode(...init)), started: new Date().toISOString() }),
        );
      },
      onCluster: (cluster) => {
        for (let at = 0; at < cluster.length; at += PIECE) {
          const piece = new Uint8Array(Math.min(PIECE, cluster.length - at) + 1);
          piece[0] = at === 0 ? STARTS : CONTINUES;
          piece.set(cluster.subarray(at, at + PIECE), 1);
          chain = chain.then(() => publish(piece));
        }
      },
    });
    recorder.ondataavailable = async (event) => cutter.push(new Uint8Array(await event.data.arrayBuffer()));
    recorder.start(250);
    start.textContent = "Broadcasting";
    window.broadcasting = true;
  });

  setInterval(async () => {
    rate.value.textContent = kbps(bitrate(samples));
    try {
      viewers.value.textContent = String((await duplex.presence(channel)).length);
    } catch (_) {
      /* reconnecting */
    }
  }, 1000);
}

// ---- a viewer ----

async function view() {
  const video = h("video", { muted: true, autoplay: true, playsinline: true, controls: true, "data-testid": "stream-video" });
  const received = figure("Bytes received", "stream-bytes");
  const rate = figure("Bitrate", "stream-bitrate");
  const viewers = figure("Viewers", "stream-viewers");
  const state = h("p", { class: "notice" }, "Waiting for the broadcast…");
  const broadcastUrl = `/examples/stream?role=broadcast&name=${encodeURIComponent(name)}`;
  app.append(
    h(
      "div",
      { class: "stage" },
      h("div", { class: "screen" }, video),
      h(
        "aside",
        { class: "panel figures" },
        h("h2", {}, `Watching “${name}”`),
        state,
        received.element,
        rate.element,
        viewers.element,
        h("p", { class: "small muted" }, "Broadcast from ", h("a", { href: broadcastUrl, target: "_blank" }, "the broadcaster's page"), "."),
      ),
    ),
  );

  // For anyone checking the relay: what arrived, from which offset.
  window.viewer = { bytes: 0, initBytes: 0, firstOffset: null, lastOffset: null, epoch: null, pieces: 0 };
  const samples = [];
  const queue = [];
  let buffer = null;
  let started = false;
  let present = new Set();

  function count(bytes) {
    window.viewer.bytes += bytes;
    samples.push([performance.now(), bytes]);
    received.value.textContent = window.viewer.bytes.toLocaleString();
    received.value.dataset.bytes = String(window.viewer.bytes);
  }

  function appendNext() {
    if (!buffer || buffer.updating || queue.length === 0) return;
    buffer.appendBuffer(queue.shift());
  }

  // Live pieces, buffered until the initialisation segment is in.
  await duplex.subscribe(channel, {
    onMessage: ({ offset, epoch, data }) => {
      count(data.length);
      window.viewer.epoch = epoch;
      window.viewer.firstOffset ??= offset;
      window.viewer.lastOffset = offset;
      window.viewer.pieces += 1;
      // Decoding can only begin where a Cluster begins.
      if (!started && data[0] !== STARTS) return;
      started = true;
      queue.push(data.subarray(1));
      appendNext();
    },
    onJoin: (who) => {
      present.add(who.client);
      viewers.value.textContent = String(present.size);
    },
    onLeave: (who) => {
      present.delete(who.client);
      viewers.value.textContent = String(present.size);
    },
    onGap: () => {
      // Pieces were lost while reconnecting: start again at the next Cluster.
      started = false;
    },
  });
  present = new Set((await duplex.presence(channel)).map((who) => who.client));
  viewers.value.textContent = String(present.size);

  // The initialisation segment, over HTTP, from the stream's record.
  let record = null;
  while (!record) {
    try {
      record = await duplex.records("streams").get(name);
    } catch (error) {
      if (error.code !== "not_found") throw error;
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
  const init = Uint8Array.from(atob(record.init), (c) => c.charCodeAt(0));
  window.viewer.initBytes = init.length;
  count(init.length);
  const media = new MediaSource();
  video.src = URL.createObjectURL(media);
  await new Promise((resolve) => media.addEventListener("sourceopen", resolve, { once: true }));
  buffer = media.addSourceBuffer(record.mime);
  buffer.mode = "segments";
  let positioned = false;
  buffer.addEventListener("updateend", () => {
    // A late joiner's first Cluster is stamped with the time since the broadcast began: jump
    // to it once it is buffered.
    if (!positioned && buffer.buffered.length > 0) {
      positioned = true;
      video.currentTime = buffer.buffered.start(0);
      video.play().catch(() => {});
      fill(state, "Live.");
      state.className = "notice ok";
    }
    appendNext();
  });
  queue.unshift(init);
  appendNext();
  setInterval(() => {
    rate.value.textContent = kbps(bitrate(samples));
  }, 1000);
}
