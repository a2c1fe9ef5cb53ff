// Chat: what a socket is for. Either side speaks at any time; the server tells everyone who
// joins and leaves (presence, in the `chat` namespace), and who is typing (the `signal`
// namespace keeps nothing: a typing indicator is worth nothing a second later).
//
// Joining a room reads its recent history, then subscribes *since* the last offset it showed, so
// nothing published in between is lost. When the connection drops, /duplex.js reconnects and
// resubscribes since the last message shown: the server replays what was missed (onRecover), or
// says plainly that it cannot (onGap) — never a silent hole.

import { Duplex } from "/duplex.js";
import { fill, h, randomName } from "/examples/lib.js";

const params = new URLSearchParams(location.search);
const app = document.getElementById("app");
const status = document.getElementById("status");

const nameInput = h("input", {
  value: params.get("name") || localStorage.getItem("duplex-example-name") || randomName(),
  maxlength: "40",
  required: true,
  "data-testid": "chat-name",
});
const roomInput = h("input", { value: params.get("room") || "lobby", pattern: "[A-Za-z0-9_-]{1,40}", required: true, list: "rooms" });
const joinButton = h("button", { class: "primary", type: "submit" }, "Join");
const messages = h("div", { class: "messages", "data-testid": "chat-messages", role: "log", "aria-live": "polite" });
const typingLine = h("div", { class: "typing", "aria-live": "polite" });
const input = h("input", { placeholder: "Message", "aria-label": "Message", maxlength: "2000", "data-testid": "chat-input", disabled: true });
const send = h("button", { class: "primary", type: "submit", "data-testid": "chat-send", disabled: true }, "Send");
const people = h("ul", { class: "people", "data-testid": "chat-presence" });
const roomTitle = h("b", {}, "");
const badge = h("span", { class: "pill", role: "status", "data-testid": "connection-status" }, "not joined");

app.append(
  h(
    "form",
    { class: "join", onsubmit: (event) => (event.preventDefault(), join()) },
    h("label", {}, "Your name", nameInput),
    h("label", {}, "Room", roomInput),
    h("datalist", { id: "rooms" }, ["lobby", "random", "dev"].map((r) => h("option", { value: r }))),
    joinButton,
  ),
  h(
    "div",
    { class: "grid side" },
    h(
      "section",
      { class: "panel room" },
      h("div", { class: "head" }, roomTitle, badge),
      messages,
      typingLine,
      h("form", { class: "send", onsubmit: (event) => (event.preventDefault(), say()) }, input, send),
    ),
    h("aside", { class: "panel" }, h("h2", {}, "Here now"), people),
  ),
);
status.append(badge);

let duplex = null;
let room = null;
let present = new Map();
let lastTypingSent = 0;
const typing = new Map();

async function join() {
  const name = nameInput.value.trim();
  localStorage.setItem("duplex-example-name", name);
  if (duplex) duplex.close();
  room = roomInput.value.trim();
  history.replaceState(null, "", `?room=${encodeURIComponent(room)}&name=${encodeURIComponent(name)}`);
  roomTitle.textContent = `#${room}`;
  messages.replaceChildren();
  people.replaceChildren();
  present = new Map();

  // The name travels as connection metadata: presence shows it to everyone.
  duplex = new Duplex(undefined, { meta: { name }, minBackoff: 100, maxBackoff: 2000 });
  let was = null;
  duplex.onStatus((now) => {
    badge.textContent = now === "open" ? "live" : now;
    badge.className = `pill ${now === "open" ? "live" : now === "reconnecting" ? "off" : ""}`;
    // Once per outage, however many attempts it takes.
    if (now === "reconnecting" && was === "open") note("Connection lost, reconnecting…", "bad");
    was = now;
  });
  const channel = `chat:${room}`;

  // Recent history first, then live messages from just after it.
  const recent = await duplex.history(channel, { limit: 50 });
  for (const frame of recent.publications) show(frame.data, frame.offset);
  if (recent.publications.length === 0) note("No message yet in this room.");
  let joined = false;
  await duplex.subscribe(
    channel,
    {
      onMessage: (message) => show(message.data, message.offset),
      onJoin: (who) => arrive(who, joined),
      onLeave: (who) => depart(who),
      onRecover: ({ missed }) => {
        if (joined) note(`Back: recovered ${missed} message${missed === 1 ? "" : "s"} sent while away.`, "good", "chat-recovered");
        refreshPresence();
      },
      onGap: ({ reason }) => {
        note(`Back, but the messages sent meanwhile could not be recovered (${reason}). Reload to see the room as it is.`, "bad");
        refreshPresence();
      },
    },
    { since: { offset: recent.offset, epoch: recent.epoch } },
  );
  joined = true;
  await refreshPresence();
  await duplex.subscribe(`signal:typing-${room}`, ({ data }) => {
    if (data.client === duplex.clientId) return;
    typing.set(data.client, { name: data.name, until: Date.now() + 3000 });
    showTyping();
  });
  input.disabled = false;
  send.disabled = false;
  input.focus();
}

async function say() {
  const text = input.value.trim();
  if (!text || !duplex) return;
  input.value = "";
  // The message ends the typing; the next keystroke announces it again.
  lastTypingSent = 0;
  await duplex.publish(`chat:${room}`, { name: nameInput.value.trim(), text });
}

/** Tells the room this person is typing, at most every 1.5 s (a publication nobody keeps). */
input.addEventListener("input", () => {
  if (!duplex || Date.now() - lastTypingSent < 1500) return;
  lastTypingSent = Date.now();
  duplex.publish(`signal:typing-${room}`, { client: duplex.clientId, name: nameInput.value.trim() }).catch(() => {});
});

function show(data, offset) {
  if (!data || typeof data.text !== "string") return;
  const mine = data.name === nameInput.value.trim();
  messages.append(
    h(
      "div",
      { class: `message${mine ? " mine" : ""}`, "data-offset": String(offset) },
      h("span", { class: "who" }, data.name || "someone"),
      data.text,
    ),
  );
  typing.delete([...typing.entries()].find(([, t]) => t.name === data.name)?.[0]);
  showTyping();
  messages.scrollTop = messages.scrollHeight;
}

function note(text, kind = "", testid = null) {
  messages.append(h("div", { class: `system ${kind}`, "data-testid": testid }, text));
  messages.scrollTop = messages.scrollHeight;
}

function nameOf(who) {
  return who.meta?.name || who.user || who.client.slice(0, 6);
}

async function refreshPresence() {
  const list = await duplex.presence(`chat:${room}`);
  present = new Map(list.map((who) => [who.client, who]));
  drawPeople();
}

function arrive(who, announce) {
  present.set(who.client, who);
  drawPeople();
  if (announce) note(`${nameOf(who)} joined`);
}

function depart(who) {
  const known = present.get(who.client);
  present.delete(who.client);
  drawPeople();
  note(`${known ? nameOf(known) : "someone"} left`);
}

function drawPeople() {
  fill(
    people,
    [...present.values()].map((who) =>
      h("li", { class: who.client === duplex.clientId ? "me" : "" }, nameOf(who), who.client === duplex.clientId ? " (you)" : ""),
    ),
  );
}

function showTyping() {
  const now = Date.now();
  for (const [client, entry] of typing) if (entry.until < now) typing.delete(client);
  const names = [...typing.values()].map((t) => t.name);
  typingLine.textContent = names.length === 0 ? "" : `${names.join(", ")} ${names.length === 1 ? "is" : "are"} typing…`;
}
setInterval(showTyping, 1000);

join();
