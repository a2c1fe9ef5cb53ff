// The example applications in a real headless Chromium against a real server, each with two
// people in two browser contexts where there are two: the board (a post made in one window
// appears in the other; a stale edit shows the conflict), the chat (presence both ways; a
// message arrives; a connection cut through the harness's proxy comes back with what it
// missed), the live stream (a late viewer plays, and received exactly what was published after
// it joined plus the initialisation segment), the game (two players see each other move; the
// game master's "ready?" reaches both, a round starts, scores are records) and the transport
// race (every lane counts; SSE and WebSocket are prompter than short polling).
//
// Run by crates/duplex-server/tests/examples.rs (the harness: see harness.mjs). DUPLEX_URL is
// the server, DUPLEX_PROXY_URL the same server through a proxy the harness can cut.

import { check, checkNoProblems, done, harness, launch, provoke, screenshot, waitFor, waitForText, watch } from "./harness.mjs";

const BASE = process.env.DUPLEX_URL;
const PROXIED = process.env.DUPLEX_PROXY_URL;

const browser = await launch();
const person = async (name, url, options) => {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = watch(await context.newPage(), name, options);
  await page.goto(url);
  return page;
};

try {
  // ---- the index ----
  const index = await person("index", `${BASE}/examples/`);
  for (const app of ["board", "chat", "stream", "game", "transports"]) {
    check((await index.locator(`a[href^="/examples/${app}"]`).count()) === 1, `the index links ${app}`);
  }
  await screenshot(index, "examples");

  // ---- board ----
  const ana = await person("board A", `${BASE}/examples/board`);
  const bo = await person("board B", `${BASE}/examples/board`);
  await waitForText(bo, "connection-status", "live", "board B live");
  await waitForText(ana, "connection-status", "live", "board A live");
  await ana.getByTestId("post-title").fill("First post <script>window.pwned=1</script>");
  await ana.getByTestId("post-body").fill("Written over HTTP.");
  await ana.getByTestId("post-submit").click();
  await waitForText(bo, "post-list", "First post <script>window.pwned=1</script>", "the post in the other window, without reload");
  check((await bo.evaluate(() => window.pwned)) === undefined, "a post is text, not HTML");
  // Both open the editor; A saves first; B's save is stale.
  const postB = bo.getByTestId("post-item").filter({ hasText: "First post" });
  const postA = ana.getByTestId("post-item").filter({ hasText: "First post" });
  await postB.getByRole("button", { name: "Edit" }).click();
  await postA.getByRole("button", { name: "Edit" }).click();
  await ana.getByTestId("post-edit-title").fill("First post, edited by A");
  await ana.getByTestId("post-save").click();
  await waitForText(ana, "post-list", "edited by A", "A's edit saved");
  await bo.getByTestId("post-edit-title").fill("First post, edited by B");
  provoke(412);
  await bo.getByTestId("post-save").click();
  await waitForText(bo, "post-conflict", "edited by A", "the conflict in B, with A's version");
  await bo.getByRole("button", { name: "Save mine over it" }).click();
  await waitForText(ana, "post-list", "edited by B", "B's edit, saved over A's, live in A");
  await screenshot(ana, "example-board");
  console.error("ok: board");

  // ---- chat ----
  const cara = await person("chat A", `${BASE}/examples/chat?name=Cara&room=test`);
  // Dan goes through the proxy the harness cuts: his failed reconnects are expected errors.
  const dan = await person("chat B", `${PROXIED}/examples/chat?name=Dan&room=test`, { consoleErrors: false });
  await waitForText(cara, "chat-presence", "Dan", "Dan in Cara's presence");
  await waitForText(dan, "chat-presence", "Cara", "Cara in Dan's presence");
  await cara.getByTestId("chat-input").fill("hello Dan");
  await cara.getByTestId("chat-send").click();
  await waitForText(dan, "chat-messages", "hello Dan", "Cara's message at Dan's");
  await cara.getByTestId("chat-input").pressSequentially("typing", { delay: 20 });
  await dan.getByText("Cara is typing").waitFor();
  await cara.getByTestId("chat-input").fill("");
  await harness("down");
  await waitForText(dan, "connection-status", "reconnecting", "Dan noticing the cut");
  for (const text of ["are you there?", "you missed this"]) {
    await cara.getByTestId("chat-input").fill(text);
    await cara.getByTestId("chat-send").click();
  }
  await waitForText(cara, "chat-messages", "you missed this", "Cara's messages sent");
  await harness("up");
  await waitForText(dan, "chat-recovered", "recovered 2 messages", "Dan told what was recovered");
  await waitForText(dan, "chat-messages", "you missed this", "the missed messages at Dan's");
  const seen = await dan.getByTestId("chat-messages").textContent();
  check(seen.indexOf("are you there?") < seen.indexOf("you missed this"), "in order");
  await screenshot(dan, "example-chat");
  console.error("ok: chat");

  // ---- live stream ----
  const caster = await person("broadcaster", `${BASE}/examples/stream?role=broadcast&name=test`);
  await caster.getByTestId("stream-start").click();
  await waitFor(caster, () => (window.published || []).length >= 3, null, "the broadcast to be going");
  // A viewer joins late.
  const viewer = await person("viewer", `${BASE}/examples/stream?name=test`);
  await waitFor(viewer, () => window.viewer?.pieces >= 3 && document.querySelector("video").currentTime > 0, null, "the late viewer to play");
  const t1 = await viewer.evaluate(() => document.querySelector("video").currentTime);
  await waitFor(viewer, (t) => document.querySelector("video").currentTime > t + 0.5, t1, "the video's time to advance");
  const got = await viewer.evaluate(() => ({ ...window.viewer }));
  const sent = await caster.evaluate(() => window.published);
  const after = sent.filter((p) => p.epoch === got.epoch && p.offset >= got.firstOffset && p.offset <= got.lastOffset);
  const published = after.reduce((sum, p) => sum + p.bytes, 0);
  check(after.length === got.pieces, `pieces: received ${got.pieces}, published ${after.length} since joining`);
  check(got.bytes === published + got.initBytes, `bytes: received ${got.bytes} = ${published} published since joining + ${got.initBytes} of initialisation`);
  await screenshot(viewer, "example-stream");
  console.error("ok: stream");

  // ---- game ----
  const eve = await person("player A", `${BASE}/examples/game?name=Eve`);
  const fox = await person("player B", `${BASE}/examples/game?name=Fox`);
  await eve.getByTestId("game-play").click();
  await fox.getByTestId("game-play").click();
  await waitFor(fox, () => document.querySelectorAll('[data-testid="game-players"] li').length === 2, null, "two players listed");
  const eveId = await eve.evaluate(() => window.gameState && document.querySelector('[data-testid="game-players"] li.me')?.dataset.client);
  await waitFor(fox, (id) => window.gameState.others.has(id), eveId, "Fox to see Eve");
  const before = await fox.evaluate((id) => window.gameState.others.get(id).x, eveId);
  await eve.locator("canvas").focus();
  await eve.keyboard.down("ArrowRight");
  await waitFor(fox, ([id, x]) => window.gameState.others.get(id)?.x > x + 40, [eveId, before], "Eve's move at Fox's");
  await eve.keyboard.up("ArrowRight");
  // The master asked both "ready?"; both play the round.
  await waitFor(eve, () => window.gameState.phase === "playing" && window.gameState.inRound, null, "Eve in a round");
  await waitFor(fox, () => window.gameState.phase === "playing" && window.gameState.inRound, null, "Fox in the round");
  await screenshot(eve, "example-game");
  const round = await eve.evaluate(() => window.gameState.round);
  await waitFor(eve, (r) => window.gameState.phase === "over" || window.gameState.round > r, round, "the round to end");
  let scores = [];
  for (let i = 0; i < 50 && scores.length < 2; i++) {
    const page = await (await fetch(`${BASE}/api/collections/scores/records?filter.round=${round}`)).json();
    scores = page.items;
    if (scores.length < 2) await new Promise((r) => setTimeout(r, 100));
  }
  check(scores.map((s) => s.name).sort().join() === "Eve,Fox", `score records: ${JSON.stringify(scores)}`);
  console.error("ok: game");

  // ---- transport race ----
  const race = await person("race", `${BASE}/examples/transports`);
  for (const lane of ["poll", "longpoll", "sse", "websocket"]) {
    await waitFor(race, (l) => Number(document.querySelector(`[data-testid="transport-${l}"]`).dataset.count) >= 12, lane, `${lane} to count updates`, 30000);
  }
  const medians = await race.evaluate(() =>
    Object.fromEntries(["poll", "longpoll", "sse", "websocket"].map((l) => [l, Number(document.querySelector(`[data-testid="transport-${l}"]`).dataset.median)])),
  );
  check(medians.websocket < medians.poll && medians.sse < medians.poll, `latency: ${JSON.stringify(medians)}`);
  await screenshot(race, "example-transports");
  console.error("ok: transport race");

  checkNoProblems();
  console.log("PASS");
} finally {
  await browser.close();
  done();
}
