// Drives a real headless Chromium against a real duplex server to test /duplex.js.
//
// Run by crates/duplex-server/tests/browser.rs, which starts the server and a TCP proxy in front
// of it. DUPLEX_URL is the proxy (what the page uses), DUPLEX_DIRECT the server itself (what this
// script uses to act as a backend). To drop the page's socket it asks the harness to cut the
// proxy (see harness.mjs).

import { check, checkNoProblems, done, harness as ask, launch, waitFor, watch } from "./harness.mjs";

const PAGE = process.env.DUPLEX_URL;
let DIRECT = process.env.DUPLEX_DIRECT;

/**
 * DOWN: cut every proxied connection and refuse new ones; UP: accept again; RESTART: stop the
 * server, start it again on its data folder (a new port the proxy then forwards to).
 */
async function harness(command) {
  return ask(command.toLowerCase());
}

async function backend(path, body) {
  const response = await fetch(`${DIRECT}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`${path}: ${response.status} ${text}`);
  return JSON.parse(text);
}

const browser = await launch();
try {
  // The proxy is cut under the page on purpose: its failed sockets are logged, not counted.
  const page = watch(await browser.newPage(), "page", { consoleErrors: false });
  await page.goto(`${PAGE}/duplex.js`);
  await page.evaluate(async () => {
    window.D = await import("/duplex.js");
  });

  // Records over fetch, with typed errors.
  const records = await page.evaluate(async () => {
    const duplex = new D.Duplex();
    const notes = duplex.records("browser-notes");
    const created = await notes.create({ title: "from chromium" });
    const patched = await notes.patch(created.id, { done: true }, { ifVersion: 1 });
    let stale = null;
    try {
      await notes.update(created.id, { title: "lost" }, { ifVersion: 1 });
    } catch (error) {
      stale = error.code;
    }
    const listed = [];
    for await (const record of notes.all({ limit: 1 })) listed.push(record.id);
    await notes.delete(created.id);
    let missing = null;
    try {
      await notes.get(created.id);
    } catch (error) {
      missing = error instanceof D.DuplexError ? error.code : "not a DuplexError";
    }
    return { version: patched.version, done: patched.done, stale, listed: listed.length, missing };
  });
  check(records.version === 2 && records.done === true, `patch: ${JSON.stringify(records)}`);
  check(records.stale === "precondition_failed", `stale update: ${records.stale}`);
  check(records.listed === 1 && records.missing === "not_found", JSON.stringify(records));
  console.error("ok: records");

  // Subscribe, publish, receive.
  await page.evaluate(async () => {
    window.got = [];
    window.gaps = [];
    window.statuses = [];
    window.duplex = new D.Duplex(undefined, { meta: { name: "chromium" }, minBackoff: 50, maxBackoff: 200 });
    duplex.onStatus((status) => statuses.push(status));
    duplex.onRequest(async (data) => {
      if (data.ping === undefined) throw new D.DuplexError("bad_question", "send a ping");
      return { pong: data.ping };
    });
    await duplex.subscribe("feed:browser", {
      onMessage: (m) => got.push(m.offset),
      onGap: (gap) => gaps.push(gap),
    });
    for (let i = 1; i <= 3; i++) await duplex.publish("feed:browser", { i });
  });
  await waitFor(page, () => got.length === 3, null, "three messages");
  check(JSON.stringify(await page.evaluate(() => got)) === "[1,2,3]", "offsets 1..3");
  // Bytes travel in binary frames both ways.
  const bytes = await page.evaluate(async () => {
    const received = [];
    await duplex.subscribe("stream:bytes", (m) => received.push(Array.from(m.data)));
    const published = await duplex.publishBytes("stream:bytes", new Uint8Array([0, 1, 2, 255]));
    const start = Date.now();
    while (received.length === 0 && Date.now() - start < 5000) await new Promise((r) => setTimeout(r, 10));
    let refused = null;
    try {
      await duplex.publishBytes("chat:lobby", new Uint8Array([1]));
    } catch (error) {
      refused = error.code;
    }
    return { offset: published.offset, received, refused };
  });
  check(bytes.offset === 1 && JSON.stringify(bytes.received) === "[[0,1,2,255]]", `binary: ${JSON.stringify(bytes)}`);
  check(bytes.refused === "binary_not_allowed", `binary refused: ${bytes.refused}`);
  // A publish retried with its idempotency key is answered with the first one's position.
  const once = await page.evaluate(async () => {
    const key = crypto.randomUUID();
    const first = await duplex.publish("chat:once", { n: 1 }, { idempotencyKey: key });
    const retry = await duplex.publish("chat:once", { n: 1 }, { idempotencyKey: key });
    const next = await duplex.publish("chat:once", { n: 2 });
    return { first, retry, next };
  });
  check(
    once.retry.offset === once.first.offset && once.retry.replayed === true && once.first.replayed === undefined &&
      once.next.offset === once.first.offset + 1,
    `publish once: ${JSON.stringify(once)}`,
  );
  console.error("ok: subscribe and publish");

  // The server asks the page.
  const clientId = await page.evaluate(() => duplex.clientId);
  const answer = await backend(`/api/connections/${clientId}/request?timeout=5s`, { ping: 7 });
  check(answer.pong === 7, `request answer ${JSON.stringify(answer)}`);
  const declined = await fetch(`${DIRECT}/api/connections/${clientId}/request?timeout=5s`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: "{}",
  });
  check(declined.status === 502, `a declined request is a 502, got ${declined.status}`);
  console.error("ok: server request");

  // The socket drops; what is published meanwhile arrives after the reconnect, once, in order.
  await harness("DOWN");
  await waitFor(page, () => statuses.includes("reconnecting"), null, "the page to notice the drop");
  for (let i = 4; i <= 6; i++) await backend("/api/channels/feed:browser/publish", { i });
  await harness("UP");
  await waitFor(page, () => got.length >= 6, null, "the missed messages");
  await page.evaluate(() => duplex.publish("feed:browser", { i: 7 }));
  await waitFor(page, () => got.length >= 7, null, "a message after the reconnect");
  const after = await page.evaluate(() => ({ got, gaps, status: duplex.status, id: duplex.clientId }));
  check(JSON.stringify(after.got) === "[1,2,3,4,5,6,7]", `gapless across the drop: ${JSON.stringify(after.got)}`);
  check(after.gaps.length === 0, `no gap reported: ${JSON.stringify(after.gaps)}`);
  check(after.status === "open" && after.id !== clientId, "a new connection");
  // The request handler still answers on the new connection.
  const again = await backend(`/api/connections/${after.id}/request?timeout=5s`, { ping: 8 });
  check(again.pong === 8, "request after reconnect");
  console.error("ok: reconnect and recover");

  // A server restart is just a reconnect for a channel whose history is in the store (chat):
  // what was published before, while and after it was down arrives once, in the same epoch.
  await page.evaluate(async () => {
    window.chat = [];
    window.chatGaps = [];
    window.chatRecovered = [];
    await duplex.subscribe("chat:restart", {
      onMessage: (m) => chat.push([m.offset, m.epoch, m.data.i]),
      onGap: (gap) => chatGaps.push(gap),
      onRecover: (r) => chatRecovered.push(r.missed),
    });
    await duplex.publish("chat:restart", { i: 1 });
    // feed keeps history in memory: a restart loses it and starts a new epoch.
    window.feed = [];
    window.feedGaps = [];
    await duplex.subscribe("feed:restart", {
      onMessage: (m) => feed.push([m.offset, m.epoch, m.data.i]),
      onGap: (gap) => feedGaps.push(gap),
    });
    await duplex.publish("feed:restart", { i: 1 });
  });
  await waitFor(page, () => chat.length === 1 && feed.length === 1, null, "a chat and a feed message");
  const dropsBefore = await page.evaluate(() => statuses.filter((s) => s === "reconnecting").length);
  await harness("DOWN");
  await waitFor(page, (n) => statuses.filter((s) => s === "reconnecting").length > n, dropsBefore, "the page to notice");
  await backend("/api/channels/chat:restart/publish", { i: 2 });
  DIRECT = (await harness("RESTART")).direct;
  await backend("/api/channels/chat:restart/publish", { i: 3 });
  await backend("/api/channels/feed:restart/publish", { i: 3 });
  await harness("UP");
  await waitFor(page, () => chat.length >= 3, null, "the messages from around the restart");
  await waitFor(page, () => feed.length >= 2, null, "the feed's new epoch");
  const restart = await page.evaluate(() => ({ chat, chatGaps, chatRecovered }));
  const epochs = new Set(restart.chat.map(([, epoch]) => epoch));
  check(
    JSON.stringify(restart.chat.map(([offset, , i]) => [offset, i])) === "[[1,1],[2,2],[3,3]]",
    `gapless across the restart: ${JSON.stringify(restart)}`,
  );
  check(epochs.size === 1 && restart.chatGaps.length === 0, `one epoch, no gap: ${JSON.stringify(restart)}`);
  check(JSON.stringify(restart.chatRecovered) === "[2]", `recovered the two missed: ${JSON.stringify(restart)}`);
  // The feed's history was lost: the page is told so, then gets the new epoch from its start
  // (what was published after the restart is not skipped).
  const lost = await page.evaluate(() => ({ feed, feedGaps }));
  check(
    lost.feedGaps.length === 1 && lost.feedGaps[0].reason === "epoch_changed" && lost.feedGaps[0].lastSeen === 1 &&
      lost.feedGaps[0].resumedAt === 0,
    `one gap, the new epoch from its start: ${JSON.stringify(lost)}`,
  );
  check(
    JSON.stringify(lost.feed.map(([offset, , i]) => [offset, i])) === "[[1,1],[1,3]]" &&
      lost.feed[0][1] !== lost.feed[1][1] && lost.feed[1][1] === lost.feedGaps[0].epoch,
    `the old epoch's message, then the new epoch's: ${JSON.stringify(lost)}`,
  );
  console.error("ok: a server restart is a reconnect");

  // A refresh whose token no longer allows a subscription ends it with onEnd, for good.
  const narrowed = await page.evaluate(
    async ({ wide, narrow }) => {
      const client = new D.Duplex(undefined, { token: wide });
      const ends = [];
      const got = [];
      await client.subscribe("private:kept", (m) => got.push(m.data));
      await client.subscribe("private:lost", { onMessage: (m) => got.push(m.data), onEnd: (code) => ends.push(code) });
      await client.refresh(narrow);
      const start = Date.now();
      while (ends.length === 0 && Date.now() - start < 5000) await new Promise((r) => setTimeout(r, 10));
      const following = [...client.subscriptions.keys()];
      client.close();
      return { ends, following };
    },
    { wide: process.env.DUPLEX_TOKEN_WIDE, narrow: process.env.DUPLEX_TOKEN_NARROW },
  );
  check(JSON.stringify(narrowed.ends) === '["permission_denied"]', `unsubscribed: ${JSON.stringify(narrowed)}`);
  check(JSON.stringify(narrowed.following) === '["private:kept"]', `still following: ${JSON.stringify(narrowed)}`);
  console.error("ok: a narrowed token ends what it no longer allows");

  // Without WebSocket, subscriptions fall back to Server-Sent Events.
  const fallback = watch(await browser.newPage(), "fallback", { consoleErrors: false });
  await fallback.goto(`${PAGE}/duplex.js`);
  await fallback.evaluate(async () => {
    delete window.WebSocket;
    const { Duplex } = await import("/duplex.js");
    window.sse = new Duplex();
    window.sseGot = [];
    await sse.subscribe("chat:sse", (m) => sseGot.push(m.data.text));
  });
  check((await fallback.evaluate(() => sse.transport)) === "sse", "the transport is sse");
  await backend("/api/channels/chat:sse/publish", { text: "over sse" });
  await waitFor(fallback, () => sseGot.length === 1, null, "a message over SSE");
  check((await fallback.evaluate(() => sseGot[0])) === "over sse", "SSE data");
  console.error("ok: SSE fallback");

  // An event stream lost before its first message comes back where it subscribed: the browser
  // resumes it with the id of `subscribed` and gets what was published while it was away.
  await backend("/api/channels/chat:quiet/publish", { text: "before" });
  await fallback.evaluate(async () => {
    window.quietGot = [];
    window.quietRecovered = [];
    window.quiet = await sse.subscribe("chat:quiet", {
      onMessage: (m) => quietGot.push(m.data.text),
      onRecover: (r) => quietRecovered.push(r.missed),
    });
  });
  await harness("DOWN");
  await waitFor(fallback, () => quiet.source.readyState !== EventSource.OPEN, null, "the stream to drop");
  await backend("/api/channels/chat:quiet/publish", { text: "away 1" });
  await backend("/api/channels/chat:quiet/publish", { text: "away 2" });
  await harness("UP");
  await waitFor(fallback, () => quietGot.length >= 2, null, "the messages published while the stream was down");
  const quiet = await fallback.evaluate(() => ({ got: quietGot, recovered: quietRecovered }));
  check(JSON.stringify(quiet.got) === '["away 1","away 2"]', `resumed from the subscription: ${JSON.stringify(quiet)}`);
  check(JSON.stringify(quiet.recovered) === "[2]", `onRecover over SSE: ${JSON.stringify(quiet)}`);
  console.error("ok: an SSE stream lost before its first message resumes from its subscription");

  await page.evaluate(() => duplex.close());
  checkNoProblems();
  console.log("PASS");
} finally {
  await browser.close();
  done();
}
