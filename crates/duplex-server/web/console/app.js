// The duplex console: a key gate, then a sidebar and one page at a time, chosen by the path so
// that every view has a URL (/console/channels/chat:lobby reloads to the same view).
//
// The console is a client like any other: it reads and writes through the public HTTP API
// (with the API key, when the server has keys, as Bearer) and follows channels through
// /duplex.js over a WebSocket, under the same rules as everyone.

import { Duplex } from "/duplex.js";
import { ApiError, api, storeKey } from "./api.js";
import { describe, fill, h, notice } from "./ui.js";
import overview from "./pages/overview.js";
import channels from "./pages/channels.js";
import channel from "./pages/channel.js";
import records from "./pages/records.js";
import collection from "./pages/collection.js";
import connections from "./pages/connections.js";

const root = document.getElementById("root");

/** Path patterns, their page, the nav entry they belong to, and the scope they need. */
const ROUTES = [
  [/^\/console\/?$/, overview, "overview", null],
  [/^\/console\/channels\/?$/, channels, "channels", "channels:read"],
  [/^\/console\/channels\/(.+)$/, channel, "channels", "channels:read"],
  [/^\/console\/records\/?$/, records, "records", "records"],
  [/^\/console\/records\/([^/]+)\/?$/, collection, "records", "records"],
  [/^\/console\/connections\/?$/, connections, "connections", "connections"],
];

const NAV = [
  ["overview", "/console/", "◎", "Overview"],
  ["channels", "/console/channels", "⇄", "Channels"],
  ["records", "/console/records", "▤", "Records"],
  ["connections", "/console/connections", "⌁", "Connections"],
];

let me = null;
let socket = null;
let cleanup = null;
let main = null;

const ctx = {
  /** Whether the key (or an open server) grants `scope`. */
  can(scope) {
    return me.open || me.scopes.includes("*") || me.scopes.includes(scope);
  },
  /** The console's own socket connection, opened on first use. */
  duplex() {
    if (!socket) socket = new Duplex(location.origin, { minBackoff: 200, maxBackoff: 5000 });
    return socket;
  },
  /** That connection if it is open already (pages that only want to recognise it). */
  openDuplex() {
    return socket;
  },
  navigate(path) {
    history.pushState(null, "", path);
    route();
  },
};

async function start() {
  let error = null;
  try {
    me = await api("/api/me");
  } catch (caught) {
    error = caught;
  }
  if (error) {
    if (error instanceof ApiError && (error.status === 401 || error.status === 403)) {
      gate(error.status === 403 ? "That key is not one this server knows." : null);
      return;
    }
    fill(root, notice(`The server did not answer: ${describe(error)}`, "error"));
    root.removeAttribute("aria-busy");
    return;
  }
  shell();
  route();
}

/** Asks for the API key; nothing of the server shows before a correct one. */
function gate(problem) {
  storeKey(null);
  root.className = "";
  root.removeAttribute("aria-busy");
  const input = h("input", {
    type: "password",
    id: "api-key",
    autocomplete: "off",
    required: true,
    "data-testid": "api-key-input",
  });
  const form = h(
    "form",
    {
      onsubmit: async (event) => {
        event.preventDefault();
        storeKey(input.value.trim());
        fill(root, h("div", { class: "loading" }, "Checking the key…"));
        await start();
      },
    },
    h("label", { for: "api-key" }, "API key"),
    input,
    h("button", { class: "primary", type: "submit", "data-testid": "api-key-submit" }, "Open the console"),
  );
  fill(
    root,
    h(
      "main",
      { class: "gate" },
      h(
        "div",
        { class: "panel" },
        h("div", { class: "brand" }, h("img", { src: "/console/favicon.svg", alt: "" }), "duplex"),
        h("p", {}, "This server asks for an API key (--api-key or [[api_keys]] in duplex.toml). It stays in this tab only."),
        problem && notice(problem, "error"),
        form,
      ),
    ),
  );
  input.focus();
}

function shell() {
  root.className = "";
  root.removeAttribute("aria-busy");
  main = h("main", { id: "main", tabindex: "-1" });
  const nav = h(
    "nav",
    { class: "nav", "aria-label": "Console" },
    NAV.map(([id, href, glyph, label]) =>
      h("a", { href, "data-nav": id }, h("span", { class: "glyph", "aria-hidden": "true" }, glyph), label),
    ),
  );
  const who = me.open
    ? h("span", {}, "Open server API (no key set)")
    : h(
        "span",
        {},
        `Key: ${me.key}`,
        " · ",
        h(
          "a",
          {
            href: "/console/",
            onclick: (event) => {
              event.preventDefault();
              storeKey(null);
              location.reload();
            },
          },
          "forget",
        ),
      );
  fill(
    root,
    h(
      "div",
      { class: "shell" },
      h(
        "aside",
        { class: "sidebar" },
        h(
          "a",
          { href: "/console/", class: "brand" },
          h("img", { src: "/console/favicon.svg", alt: "" }),
          h("span", {}, "duplex", h("small", {}, "console")),
        ),
        nav,
        h("div", { class: "foot" }, who, h("a", { href: "/examples/" }, "Example applications"), h("a", { href: "/openapi.json" }, "OpenAPI document")),
      ),
      main,
    ),
  );
  document.addEventListener("click", (event) => {
    const link = event.target.closest("a[href]");
    if (!link || event.defaultPrevented || event.button !== 0) return;
    if (event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
    const url = new URL(link.href, location.href);
    if (url.origin !== location.origin || !url.pathname.startsWith("/console")) return;
    event.preventDefault();
    if (url.pathname + url.search !== location.pathname + location.search) ctx.navigate(url.pathname + url.search);
  });
  window.addEventListener("popstate", route);
}

function route() {
  if (cleanup) cleanup();
  cleanup = null;
  const path = location.pathname;
  const found = ROUTES.map(([pattern, page, nav, scope]) => [path.match(pattern), page, nav, scope]).find(([m]) => m);
  for (const link of document.querySelectorAll("[data-nav]")) {
    if (found && link.dataset.nav === found[2]) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  main.replaceChildren();
  if (!found) {
    main.append(h("div", { class: "page-head" }, h("h1", {}, "Not found")), notice("The console has no page at this path."));
    return;
  }
  const [match, page, , scope] = found;
  if (scope && !ctx.can(scope)) {
    main.append(
      h("div", { class: "page-head" }, h("h1", {}, "Not with this key")),
      notice(`This page needs an API key with the ${scope} scope. The key "${me.key}" has: ${me.scopes.join(", ") || "none"}.`, "error"),
    );
    return;
  }
  const params = match.slice(1).map(decodeURIComponent);
  try {
    cleanup = page(main, params, ctx) || null;
  } catch (error) {
    main.append(notice(`This page failed: ${describe(error)}`, "error"));
  }
  main.focus({ preventScroll: true });
}

start();
