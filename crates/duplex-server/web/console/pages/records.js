// Records: the collections that hold records, with their counts (GET /api/collections), and a
// box to open any collection by name (a collection exists once it holds a record).

import { api } from "../api.js";
import { describe, fill, h, notice, number } from "../ui.js";

/** The console's URL of a collection's view. */
export function collectionHref(name) {
  return `/console/records/${encodeURIComponent(name)}`;
}

export default function render(main, _params, ctx) {
  const rows = h("tbody");
  const problem = h("div");
  const open = h("input", { class: "wide", placeholder: "collection", "aria-label": "Collection to open", pattern: "[a-z0-9_-]{1,64}" });
  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Records"), h("span", { class: "sub" }, "JSON records in named collections, over HTTP")),
    h(
      "div",
      { class: "toolbar" },
      h("span", { class: "grow" }),
      h(
        "form",
        {
          class: "row",
          onsubmit: (event) => {
            event.preventDefault();
            if (open.value.trim()) ctx.navigate(collectionHref(open.value.trim()));
          },
        },
        open,
        h("button", { type: "submit" }, "Open or create"),
      ),
    ),
    problem,
    h(
      "section",
      { class: "panel" },
      h("table", {}, h("thead", {}, h("tr", {}, h("th", {}, "Collection"), h("th", { class: "num" }, "Records"))), rows),
    ),
  );
  let stopped = false;
  async function load() {
    try {
      const list = await api("/api/collections");
      if (stopped) return;
      fill(problem);
      fill(
        rows,
        list.items.map((item) =>
          h(
            "tr",
            { class: "clickable", onclick: () => ctx.navigate(collectionHref(item.name)) },
            h("td", {}, h("a", { href: collectionHref(item.name), class: "mono" }, item.name)),
            h("td", { class: "num" }, number(item.records)),
          ),
        ),
      );
      if (list.items.length === 0) rows.append(h("tr", {}, h("td", { colspan: "2", class: "muted" }, "No collection holds a record yet.")));
    } catch (error) {
      if (!stopped) fill(problem, notice(`Cannot list collections: ${describe(error)}`, "error"));
    }
  }
  load();
  const timer = setInterval(load, 5000);
  return () => {
    stopped = true;
    clearInterval(timer);
  };
}
