// One channel: a live tail over the console's WebSocket (pause and resume; JSON pretty printed,
// bytes as their size and first bytes), publishing through the server API, its history with
// offsets, and presence kept live by the subscription's joins and leaves.

import { api, channelPath } from "../api.js";
import { debounce, describe, fill, h, hexPreview, notice, number, pretty } from "../ui.js";

const KEEP = 500;

export default function render(main, [name], ctx) {
  const status = h("span", { class: "pill" }, "connecting");
  const position = h("span", { class: "sub mono" });
  const tail = h("div", { class: "tail", "data-testid": "channel-tail", "aria-live": "polite", role: "log" });
  const pause = h("button", { type: "button", onclick: togglePause }, "Pause");
  const waiting = h("span", { class: "muted" });
  const tailProblem = h("div");
  const rules = h("div", { class: "facts" });

  let paused = false;
  let held = [];
  let received = 0;

  // ---- the tail ----

  function togglePause() {
    paused = !paused;
    pause.textContent = paused ? "Resume" : "Pause";
    status.textContent = paused ? "paused" : "live";
    status.className = `pill ${paused ? "paused" : "live"}`;
    if (!paused) {
      for (const message of held) show(message);
      held = [];
      waiting.textContent = "";
    }
  }

  function show(message) {
    const body =
      message.data instanceof Uint8Array
        ? h("pre", { class: "mono" }, hexPreview(message.data))
        : h("pre", {}, pretty(message.data));
    tail.prepend(
      h(
        "div",
        { class: "msg", "data-offset": String(message.offset) },
        h("div", { class: "meta" }, h("span", {}, `#${message.offset}`), h("span", {}, new Date().toLocaleTimeString())),
        body,
      ),
    );
    while (tail.children.length > KEEP) tail.lastChild.remove();
  }

  function system(text) {
    tail.prepend(h("div", { class: "msg system" }, text));
  }

  const duplex = ctx.duplex();
  const presence = presenceOf(duplex);
  const publishing = publishPanel();
  const historyParts = historyPanel();
  const historyView = { refresh: historyParts.refresh };
  const refreshSoon = debounce(() => historyParts.refresh(), 500);
  main.append(
    h("div", { class: "page-head" }, h("h1", { class: "mono" }, name), status, position, h("span", { class: "grow" }), h("a", { href: "/console/channels" }, "All channels")),
    rules,
    h(
      "div",
      { class: "grid two" },
      h(
        "section",
        { class: "panel", "aria-label": "Live tail" },
        h("h2", {}, "Live tail", h("span", { class: "grow" }), waiting, pause, h("button", { type: "button", onclick: () => tail.replaceChildren() }, "Clear")),
        tailProblem,
        tail,
      ),
      h("div", { class: "grid" }, publishing, presence.panel, historyParts.panel),
    ),
  );


  const readInfo = () => api(channelPath(name)).then(
    (info) => {
      const ns = info.namespace;
      const ttl = ns.history_ttl_seconds >= 3600 ? `${ns.history_ttl_seconds / 3600} h` : `${Math.round(ns.history_ttl_seconds / 60)} min`;
      fill(
        rules,
        h("span", {}, "namespace ", h("b", {}, ns.name)),
        h("span", {}, "publish ", h("b", {}, ns.publish)),
        h("span", {}, "subscribe ", h("b", {}, ns.subscribe)),
        h("span", {}, "history ", h("b", {}, ns.history_size ? `${ns.history_size} for ${ttl}` : "none")),
        h("span", {}, "slow consumers ", h("b", {}, ns.slow_consumer)),
        ns.binary ? h("span", {}, h("b", {}, "binary")) : null,
        h("span", {}, "subscribers ", h("b", {}, number(info.subscribers))),
      );
      presence.enable(ns.presence);
    },
    (error) => fill(rules, notice(`Cannot read the channel: ${describe(error)}`, "error")),
  );
  readInfo();

  let subscription = null;
  let ended = false;
  duplex
    .subscribe(name, {
      onMessage(message) {
        received += 1;
        refreshSoon();
        position.textContent = `offset ${message.offset}`;
        if (paused) {
          held.push(message);
          waiting.textContent = `${held.length} waiting`;
        } else {
          show(message);
        }
      },
      onJoin(who) {
        presence.join(who);
      },
      onLeave(who) {
        presence.leave(who);
      },
      onGap(gap) {
        system(
          gap.resumedAt === 0
            ? `The channel's history was lost (${gap.reason}): what followed offset ${gap.lastSeen} before is gone; the new epoch follows from its start.`
            : `Missed publications could not be replayed (${gap.reason}); live again from offset ${gap.resumedAt}.`,
        );
      },
      onEnd(code) {
        ended = true;
        status.textContent = "ended";
        status.className = "pill paused";
        fill(tailProblem, notice(`The server ended the subscription: ${code}`, "error"));
      },
    })
    .then(
      (sub) => {
        subscription = sub;
        if (ended) return;
        presence.load();
        readInfo();
        status.textContent = "live";
        status.className = "pill live";
        if (received === 0) system("Subscribed: new publications appear here.");
      },
      (error) => {
        status.textContent = "not following";
        status.className = "pill paused";
        fill(tailProblem, notice(`The console cannot follow this channel: ${describe(error)}`, "error"));
      },
    );

  // ---- publishing ----

  function publishPanel() {
    const allowed = ctx.can("channels:publish");
    const input = h("textarea", {
      rows: "5",
      "data-testid": "channel-publish-input",
      "aria-label": "Publication",
      placeholder: '{"text": "hello"}',
      disabled: !allowed,
    });
    const asText = h("input", { type: "radio", name: "publish-as", value: "text" });
    const asJson = h("input", { type: "radio", name: "publish-as", value: "json", checked: true });
    const result = h("div", { "aria-live": "polite" });
    const button = h("button", { class: "primary", type: "submit", "data-testid": "channel-publish-button", disabled: !allowed }, "Publish");
    async function publish(event) {
      event.preventDefault();
      let data;
      if (asJson.checked) {
        try {
          data = JSON.parse(input.value);
        } catch (error) {
          fill(result, notice(`Not JSON: ${error.message}. Choose "text" to send it as a string.`, "error"));
          return;
        }
      } else {
        data = input.value;
      }
      button.disabled = true;
      try {
        const published = await api(channelPath(name, "/publish"), { method: "POST", json: data });
        fill(result, notice(`Published at offset ${published.offset} (epoch ${published.epoch}).`, "ok"));
        historyView.refresh();
      } catch (error) {
        fill(result, notice(`Refused: ${describe(error)}`, "error"));
      } finally {
        button.disabled = false;
      }
    }
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) publish(event);
    });
    return h(
      "section",
      { class: "panel", "aria-label": "Publish" },
      h("h2", {}, "Publish"),
      !allowed && notice("This key lacks the channels:publish scope."),
      h(
        "form",
        { onsubmit: publish, class: "grid", style: "gap:8px" },
        input,
        h(
          "div",
          { class: "row" },
          h("label", { class: "inline" }, asJson, "JSON"),
          h("label", { class: "inline" }, asText, "text"),
          h("span", { class: "grow" }),
          h("span", { class: "muted" }, "Ctrl+Enter"),
          button,
        ),
      ),
      result,
    );
  }

  // ---- presence ----

  function presenceOf(duplex) {
    let enabled = false;
    const list = h("ul", { class: "people", "data-testid": "channel-presence" });
    const note = h("div");
    const people = new Map();
    const panel = h("section", { class: "panel", "aria-label": "Presence" }, h("h2", {}, "Presence"), note, list);
    function draw() {
      fill(
        list,
        [...people.values()].map((who) =>
          h(
            "li",
            {},
            h("span", { class: "mono" }, who.client),
            who.user ? h("b", {}, who.user) : h("span", { class: "muted" }, "anonymous"),
            who.meta !== undefined && who.meta !== null ? h("span", { class: "muted mono" }, JSON.stringify(who.meta)) : null,
            who.client === duplex.clientId ? h("span", { class: "pill" }, "this console") : null,
          ),
        ),
      );
      if (people.size === 0) list.append(h("li", { class: "muted" }, "Nobody."));
    }
    function load() {
      api(channelPath(name, "/presence")).then(
        (result) => {
          people.clear();
          for (const who of result.clients) people.set(who.client, who);
          draw();
        },
        (error) => fill(note, notice(`Cannot read presence: ${describe(error)}`, "error")),
      );
    }
    return {
      panel,
      /** Reads the list again (the console's own join is not announced to itself). */
      load() {
        if (enabled) load();
      },
      /** Whether the namespace keeps presence (from its rules). */
      enable(on) {
        enabled = on;
        if (on) load();
        else fill(note, notice("Presence is off in this namespace."));
      },
      join(who) {
        people.set(who.client, who);
        draw();
      },
      leave(who) {
        people.delete(who.client);
        draw();
      },
    };
  }

  // ---- history ----

  function historyPanel() {
    const limit = h(
      "select",
      { "aria-label": "How many" },
      ["20", "50", "100", "500"].map((n) => h("option", { value: n }, `last ${n}`)),
    );
    const list = h("div", { class: "tail", style: "max-height:320px" });
    const note = h("div");
    const refresh = async () => {
      try {
        const page = await api(channelPath(name, `/history?limit=${limit.value}`));
        position.textContent = `offset ${number(page.offset)} · epoch ${page.epoch || "–"}`;
        fill(note, page.publications.length === 0 ? notice("Nothing is kept: no publication yet, or this namespace keeps no history.") : null);
        fill(
          list,
          [...page.publications].reverse().map((frame) => {
            let body;
            if (frame.binary !== undefined) {
              const raw = Uint8Array.from(atob(frame.binary), (c) => c.charCodeAt(0));
              body = h("pre", {}, hexPreview(raw));
            } else {
              body = h("pre", {}, pretty(frame.data));
            }
            return h("div", { class: "msg" }, h("div", { class: "meta" }, h("span", {}, `#${frame.offset}`)), body);
          }),
        );
      } catch (error) {
        fill(note, notice(`Cannot read history: ${describe(error)}`, "error"));
      }
    };
    limit.addEventListener("change", refresh);
    refresh();
    const panel = h(
      "section",
      { class: "panel", "aria-label": "History" },
      h("h2", {}, "History", h("span", { class: "grow" }), limit, h("button", { type: "button", onclick: () => refresh() }, "Reload")),
      note,
      list,
    );
    return { panel, refresh };
  }

  return () => {
    if (subscription) subscription.unsubscribe();
    else duplex.subscriptions.get(name)?.unsubscribe();
  };
}
