// The web console in a real headless Chromium against a real server, as a person would use it:
// the overview counts a connection the harness opens and closes; publishing from a channel
// view reaches a Rust client and a Rust client's publication shows in the tail (as text, even
// when it looks like HTML); a stale record edit shows the conflict and is reapplied; asking a
// connection shows its answer, or the timeout for one that never answers; with an API key
// nothing shows before the right key, and a key with fewer scopes sees what they allow.
//
// Run by crates/duplex-server/tests/console.rs (the harness: see harness.mjs). DUPLEX_URL is an
// open server, DUPLEX_KEYED_URL one with keys DUPLEX_ADMIN_KEY (every scope) and
// DUPLEX_RECORDS_KEY (records only). With DUPLEX_SCREENSHOTS set, screenshots are saved there.

import { check, checkNoProblems, done, harness, launch, provoke, screenshot, waitFor, waitForText, watch } from "./harness.mjs";

const BASE = process.env.DUPLEX_URL;
const KEYED = process.env.DUPLEX_KEYED_URL;

async function api(path, options = {}) {
  const response = await fetch(`${BASE}${path}`, {
    ...options,
    headers: { "content-type": "application/json", ...(options.headers || {}) },
  });
  const text = await response.text();
  if (!response.ok) throw new Error(`${path}: ${response.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

const browser = await launch();
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const page = watch(await context.newPage(), "console");
  page.on("dialog", (dialog) => dialog.accept());

  // `/` is the console.
  await page.goto(`${BASE}/`);
  check(new URL(page.url()).pathname === "/console/", `/ redirects to the console, got ${page.url()}`);

  // ---- overview: a connection opened by a client shows, and goes when it closes ----
  const count = async () => Number((await page.getByTestId("overview-connections").textContent()).replace(/\D/g, ""));
  await waitForText(page, "overview-connections", /^\d+$/, "the overview's first figures");
  const before = await count();
  const opened = await harness("ws_open");
  await waitForText(page, "overview-connections", String(before + 1), "the new connection in the overview");
  await harness("ws_close", { id: opened.id });
  await waitForText(page, "overview-connections", new RegExp(`^${before}$`), "the closed connection to leave the count");
  console.error("ok: overview counts connections live");

  // ---- a channel: publish reaches a Rust client; a Rust client's publication is in the tail ----
  await harness("rust_subscribe", { channel: "chat:console" });
  await page.goto(`${BASE}/console/channels/chat:console`);
  await waitForText(page, "channel-tail", "Subscribed", "the tail to follow the channel");
  await page.getByTestId("channel-publish-input").fill('{"text": "from the console"}');
  await page.getByTestId("channel-publish-button").click();
  const reached = await harness("rust_next", { channel: "chat:console" });
  check(reached.data?.text === "from the console", `the Rust client got ${JSON.stringify(reached)}`);
  await waitForText(page, "channel-tail", "from the console", "the console's own publication in its tail");
  const evil = "<img src=x onerror=window.pwned=1>";
  await harness("rust_publish", { channel: "chat:console", data: { text: evil } });
  await waitForText(page, "channel-tail", evil, "the Rust client's publication, as text");
  check((await page.evaluate(() => window.pwned)) === undefined, "nothing ran from a publication");
  check((await page.getByTestId("channel-tail").locator("img").count()) === 0, "no element was made from a publication");
  const own = await harness("rust_next", { channel: "chat:console" });
  check(own.data?.text === evil, "the Rust client saw its own publication too");
  // Text mode sends a JSON string; a binary publication shows as size and bytes.
  await page.getByLabel("text").check();
  await page.getByTestId("channel-publish-input").fill("plain words");
  await page.getByTestId("channel-publish-button").click();
  const text = await harness("rust_next", { channel: "chat:console" });
  check(text.data === "plain words", `text mode: ${JSON.stringify(text)}`);
  for (let i = 1; i <= 3; i++) await harness("rust_publish", { channel: "chat:console", data: { text: `hello ${i}`, from: "rust" } });
  await waitForText(page, "channel-tail", "hello 3", "more publications");
  await screenshot(page, "console-channel");
  await page.goto(`${BASE}/console/channels/stream:console`);
  await waitForText(page, "channel-tail", "Subscribed", "the stream tail");
  await harness("rust_publish_bytes", { channel: "stream:console", bytes: [0, 1, 2, 254, 255] });
  await waitForText(page, "channel-tail", "5 bytes: 00 01 02 fe ff", "binary as size and hex");
  console.error("ok: channel view publishes, tails and escapes");

  // ---- records: a stale edit shows the conflict, and reapplying saves it ----
  const note = await api("/api/collections/notes/records", { method: "POST", body: JSON.stringify({ title: "first", body: "draft" }) });
  await page.goto(`${BASE}/console/records/notes`);
  await page.locator(`tr[data-record-id="${note.id}"]`).click();
  await waitFor(page, () => document.querySelector('[data-testid="record-editor"]')?.value.includes("draft"), null, "the record in the editor");
  await page.getByTestId("record-editor").fill(JSON.stringify({ title: "mine", body: "edited in the console" }, null, 2));
  await harness("record_patch", { collection: "notes", id: note.id, fields: { title: "theirs" } });
  provoke(412);
  await page.getByTestId("record-save").click();
  await waitForText(page, "record-conflict", "version 2", "the conflict with the current version");
  const conflict = await page.getByTestId("record-conflict").textContent();
  check(conflict.includes("theirs") && conflict.includes("edited in the console"), `both sides shown: ${conflict}`);
  await page.getByTestId("record-reapply").click();
  await waitForText(page, "record-version", "3", "the reapplied save");
  const saved = await api(`/api/collections/notes/records/${note.id}`);
  check(saved.version === 3 && saved.title === "mine" && saved.body === "edited in the console", `saved: ${JSON.stringify(saved)}`);
  // A record created elsewhere appears in the table live.
  const other = await api("/api/collections/notes/records", { method: "POST", body: JSON.stringify({ title: "from elsewhere" }) });
  await waitFor(page, (id) => document.querySelector(`tr[data-record-id="${id}"]`) !== null, other.id, "a record created elsewhere to appear");
  console.error("ok: record conflict and reapply, live rows");

  // ---- connections: ask one that answers, one that never does; disconnect one ----
  const answerer = await harness("answerer_open");
  const silent = await harness("silent_open");
  await page.goto(`${BASE}/console/connections`);
  const row = (id) => page.locator(`[data-testid="connection-row"][data-connection-id="${id}"]`);
  await row(answerer.id).waitFor();
  await row(answerer.id).getByRole("button", { name: "Ask" }).click();
  await page.getByTestId("connection-ask-input").fill('{"question": "ready?"}');
  await page.getByTestId("connection-ask-button").click();
  await waitForText(page, "connection-ask-answer", '"ready": true', "the client's answer");
  const answered = await page.getByTestId("connection-ask-answer").textContent();
  check(answered.includes("ready?"), `the answer echoes the question: ${answered}`);
  await row(answerer.id).getByRole("button", { name: "Ask" }).click(); // close that panel
  await row(silent.id).getByRole("button", { name: "Ask" }).click();
  await page.getByTestId("connection-ask-timeout").selectOption("1s");
  provoke(504);
  await page.getByTestId("connection-ask-button").click();
  await waitForText(page, "connection-ask-answer", "No answer within 1s", "the timeout");
  await row(silent.id).getByRole("button", { name: "Disconnect" }).click();
  await waitFor(page, (id) => !document.querySelector(`[data-connection-id="${id}"]`), silent.id, "the disconnected row to go");
  const kicked = await harness("silent_disconnect_code", { id: silent.id });
  check(kicked.code === "kicked", `the client was told: ${JSON.stringify(kicked)}`);
  console.error("ok: ask a connection, time out, disconnect");

  // ---- every page at a phone's width: nothing wider than the screen ----
  await page.setViewportSize({ width: 390, height: 844 });
  for (const path of ["/console/", "/console/channels", "/console/channels/chat:console", "/console/records", "/console/records/notes", "/console/connections"]) {
    await page.goto(`${BASE}${path}`);
    await page.waitForTimeout(300);
    const width = await page.evaluate(() => document.documentElement.scrollWidth);
    check(width <= 392, `${path} fits a phone (scroll width ${width})`);
  }
  await page.setViewportSize({ width: 1280, height: 800 });
  console.error("ok: phone width");

  // ---- the overview screenshot, with some traffic on it ----
  for (let i = 0; i < 5; i++) await harness("ws_open");
  await page.goto(`${BASE}/console/`);
  // Long enough for the charts to show a shape when screenshots are taken.
  await harness("traffic", { seconds: process.env.DUPLEX_SCREENSHOTS ? 40 : 3 });
  await screenshot(page, "console-overview");
  checkNoProblems();

  // ---- an API key: nothing before it, a wrong one refused, scopes respected ----
  provoke(401); // the gate asks /api/me, without a key first
  const keyed = watch(await (await browser.newContext()).newPage(), "keyed console");
  const asked = [];
  keyed.on("request", (request) => asked.push(new URL(request.url()).pathname));
  await keyed.goto(`${KEYED}/console/`);
  await keyed.getByTestId("api-key-input").waitFor();
  check((await keyed.getByTestId("overview-connections").count()) === 0, "no figure before the key");
  check(!asked.some((path) => path.startsWith("/api/") && path !== "/api/me"), `only /api/me before the key: ${asked.join(" ")}`);
  provoke(403);
  await keyed.getByTestId("api-key-input").fill("not-the-key-at-all");
  await keyed.getByTestId("api-key-submit").click();
  await keyed.getByText("not one this server knows").waitFor();
  check((await keyed.getByTestId("overview-connections").count()) === 0, "a wrong key shows nothing");
  await keyed.getByTestId("api-key-input").fill(process.env.DUPLEX_ADMIN_KEY);
  await keyed.getByTestId("api-key-submit").click();
  await waitForText(keyed, "overview-connections", /^\d+$/, "the overview with the right key");
  await keyed.goto(`${KEYED}/console/connections`);
  await keyed.getByRole("heading", { name: "Connections" }).waitFor();
  const scoped = watch(await (await browser.newContext()).newPage(), "records-only console");
  await scoped.goto(`${KEYED}/console/records`);
  await scoped.getByTestId("api-key-input").fill(process.env.DUPLEX_RECORDS_KEY);
  await scoped.getByTestId("api-key-submit").click();
  await scoped.getByRole("heading", { name: "Records" }).waitFor();
  await scoped.goto(`${KEYED}/console/channels`);
  await scoped.getByText("needs an API key with the channels:read scope").waitFor();
  await scoped.goto(`${KEYED}/console/connections`);
  await scoped.getByText("needs an API key with the connections scope").waitFor();
  checkNoProblems();
  console.error("ok: API key gate and scopes");

  console.log("PASS");
} finally {
  await browser.close();
  done();
}
