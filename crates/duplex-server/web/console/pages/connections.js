// Connections: the socket connections of this node a page at a time (GET /api/connections),
// refreshed every two seconds in place; ask one (the server → client request:
// POST /api/connections/{id}/request) and see its answer, its error or the timeout; disconnect
// one (DELETE /api/connections/{id}).

import { api } from "../api.js";
import { ago, bytes, describe, fill, h, notice, pretty } from "../ui.js";

const PAGE = 50;

export default function render(main, _params, ctx) {
  const rows = h("tbody");
  const problem = h("div");
  const count = h("span", { class: "sub" });
  const previous = h("button", { type: "button", onclick: () => go(page - 1) }, "← Previous");
  const next = h("button", { type: "button", onclick: () => go(page + 1) }, "Next →");
  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Connections"), count, h("span", { class: "grow" }), previous, next),
    problem,
    h(
      "section",
      { class: "panel" },
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          {},
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              ["Connection", "Transport", "User", "Address", "Subscriptions", "Connected", "Queued", ""].map((t) =>
                h("th", { class: t === "Queued" ? "num" : null }, t),
              ),
            ),
          ),
          rows,
        ),
      ),
    ),
  );

  let cursors = [undefined];
  let page = 0;
  let stopped = false;
  // Rows by connection id, and the open "ask" panels, kept across refreshes.
  const shown = new Map();
  const asking = new Map();

  async function go(index) {
    if (index < 0 || index >= cursors.length) return;
    const query = new URLSearchParams({ limit: String(PAGE) });
    if (cursors[index]) query.set("cursor", cursors[index]);
    try {
      const list = await api(`/api/connections?${query}`);
      if (stopped) return;
      fill(problem);
      page = index;
      cursors = cursors.slice(0, index + 1);
      if (list.next) cursors.push(list.next);
      previous.disabled = page === 0;
      next.disabled = !list.next;
      update(list.items);
    } catch (error) {
      if (!stopped) fill(problem, notice(`Cannot list connections: ${describe(error)}`, "error"));
    }
  }

  /** Updates the table in place: rows keep their place, open "ask" panels stay open (and keep
   * their focus) under their row. */
  function update(items) {
    const ids = new Set(items.map((c) => c.client));
    for (const [id, tr] of shown) {
      if (!ids.has(id)) {
        tr.remove();
        asking.get(id)?.remove();
        asking.delete(id);
        shown.delete(id);
      }
    }
    rows.querySelector("tr.empty")?.remove();
    let anchor = null;
    for (const item of items) {
      let tr = shown.get(item.client);
      if (!tr) {
        tr = h("tr", { "data-testid": "connection-row", "data-connection-id": item.client });
        shown.set(item.client, tr);
      }
      fillRow(tr, item);
      const place = anchor ? anchor.nextSibling : rows.firstChild;
      if (place !== tr) rows.insertBefore(tr, place);
      anchor = tr;
      const panel = asking.get(item.client);
      if (panel) {
        if (anchor.nextSibling !== panel) rows.insertBefore(panel, anchor.nextSibling);
        anchor = panel;
      }
    }
    if (items.length === 0) rows.append(h("tr", { class: "empty" }, h("td", { colspan: "8", class: "muted" }, "No socket connection on this node.")));
    count.textContent = `${items.length}${next.disabled ? "" : "+"} on this node`;
  }

  function fillRow(tr, item) {
    const mine = item.client === ctx.openDuplex()?.clientId;
    const subscriptions = item.subscriptions.length
      ? h("span", { title: item.subscriptions.join("\n") }, `${item.subscriptions.length}: ${item.subscriptions.slice(0, 2).join(", ")}${item.subscriptions.length > 2 ? ", …" : ""}`)
      : h("span", { class: "muted" }, "none");
    fill(
      tr,
      h("td", { class: "mono" }, item.client, mine ? h("span", { class: "pill", style: "margin-left:6px" }, "this console") : null),
      h("td", {}, item.transport),
      h("td", {}, item.user ?? h("span", { class: "muted" }, "anonymous")),
      h("td", { class: "mono" }, item.remote ?? ""),
      h("td", {}, subscriptions),
      h("td", { title: item.connected }, ago(item.connected)),
      h("td", { class: "num" }, item.queued ? `${item.queued} · ${bytes(item.queued_bytes)}` : "0"),
      h(
        "td",
        { class: "row" },
        h("button", { type: "button", onclick: () => toggleAsk(item.client), "aria-expanded": asking.has(item.client) ? "true" : "false" }, "Ask"),
        h("button", { type: "button", class: "danger", onclick: () => disconnect(item.client) }, "Disconnect"),
      ),
    );
  }

  function toggleAsk(id) {
    const open = asking.get(id);
    if (open) {
      open.remove();
      asking.delete(id);
      return;
    }
    const input = h("textarea", { rows: "3", "data-testid": "connection-ask-input", "aria-label": "Request data", value: '{"question": "ready?"}' });
    const timeout = h(
      "select",
      { "aria-label": "Timeout", "data-testid": "connection-ask-timeout" },
      ["1s", "5s", "15s", "60s"].map((t) => h("option", { value: t, selected: t === "5s" }, `wait ${t}`)),
    );
    const answer = h("div", { "data-testid": "connection-ask-answer", "aria-live": "polite" });
    const button = h("button", { class: "primary", type: "submit", "data-testid": "connection-ask-button" }, "Ask");
    const panel = h(
      "tr",
      { class: "ask" },
      h(
        "td",
        { colspan: "8" },
        h(
          "form",
          {
            class: "grid",
            style: "gap:8px",
            onsubmit: async (event) => {
              event.preventDefault();
              let data;
              try {
                data = JSON.parse(input.value);
              } catch (error) {
                fill(answer, notice(`Not JSON: ${error.message}`, "error"));
                return;
              }
              button.disabled = true;
              fill(answer, notice(`Waiting up to ${timeout.value} for ${id} to answer…`));
              try {
                const reply = await api(`/api/connections/${id}/request?timeout=${timeout.value}`, { method: "POST", json: data });
                fill(answer, h("div", { class: "muted" }, "It answered:"), h("pre", { class: "json", "data-outcome": "answer" }, pretty(reply)));
              } catch (error) {
                const outcome = error.code === "timeout" ? "timeout" : error.code === "client_error" ? "client_error" : "error";
                const detail =
                  error.code === "timeout"
                    ? `No answer within ${timeout.value} (504 timeout).`
                    : error.code === "client_error"
                      ? `It declined: ${error.body?.client_error?.code}: ${error.body?.client_error?.message}`
                      : `Refused: ${describe(error)}`;
                fill(answer, h("p", { class: "notice error", "data-outcome": outcome }, detail));
              } finally {
                button.disabled = false;
              }
            },
          },
          input,
          h("div", { class: "row" }, timeout, button),
          answer,
        ),
      ),
    );
    asking.set(id, panel);
    shown.get(id)?.after(panel);
    input.focus();
  }

  async function disconnect(id) {
    if (!confirm(`Disconnect ${id}? It is told not to reconnect (kicked).`)) return;
    try {
      await api(`/api/connections/${id}`, { method: "DELETE" });
    } catch (error) {
      fill(problem, notice(`Cannot disconnect ${id}: ${describe(error)}`, "error"));
    }
    go(page);
  }

  go(0);
  const timer = setInterval(() => go(page), 2000);
  return () => {
    stopped = true;
    clearInterval(timer);
  };
}
