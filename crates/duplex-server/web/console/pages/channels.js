// Channels: the active channels of this node, searchable and a page at a time
// (GET /api/channels?search=&cursor=), refreshed every few seconds; and a box to open any
// channel by name, active or not.

import { api } from "../api.js";
import { debounce, describe, fill, h, notice, number } from "../ui.js";

const PAGE = 50;

/** The console's URL of a channel's view. */
export function channelHref(name) {
  return `/console/channels/${encodeURIComponent(name)}`;
}

export default function render(main, _params, ctx) {
  const search = h("input", {
    type: "search",
    placeholder: "Search channels  ( / )",
    "aria-label": "Search channels",
    value: new URLSearchParams(location.search).get("search") || "",
  });
  const open = h("input", { class: "wide", placeholder: "namespace:name", "aria-label": "Channel to open" });
  const rows = h("tbody");
  const more = h("button", { type: "button", hidden: true, onclick: () => load(false) }, "More");
  const problem = h("div");
  const count = h("span", { class: "sub" });

  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Channels"), count),
    h(
      "div",
      { class: "toolbar" },
      search,
      h("span", { class: "grow" }),
      h(
        "form",
        {
          class: "row",
          onsubmit: (event) => {
            event.preventDefault();
            const name = open.value.trim();
            if (name) ctx.navigate(channelHref(name));
          },
        },
        open,
        h("button", { type: "submit" }, "Open"),
      ),
    ),
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
            h("tr", {}, h("th", {}, "Channel"), h("th", { class: "num" }, "Subscribers"), h("th", { class: "num" }, "Offset"), h("th", {}, "Epoch"), h("th", { class: "num" }, "Publications / s")),
          ),
          rows,
        ),
      ),
      h("div", { class: "row", style: "margin-top:10px" }, more),
    ),
  );

  let next = null;
  let pages = 1;
  let stopped = false;

  async function load(first) {
    const query = new URLSearchParams({ limit: String(first ? Math.min(PAGE * pages, 1000) : PAGE) });
    if (search.value.trim()) query.set("search", search.value.trim());
    if (!first && next) query.set("cursor", next);
    try {
      const page = await api(`/api/channels?${query}`);
      if (stopped) return;
      fill(problem);
      if (first) rows.replaceChildren();
      else pages += 1;
      for (const item of page.items) rows.append(row(item));
      next = page.next;
      more.hidden = !next;
      count.textContent = `${rows.children.length}${next ? "+" : ""} active`;
      if (rows.children.length === 0) {
        rows.append(h("tr", {}, h("td", { colspan: "5", class: "muted" }, search.value ? "No channel matches." : "No channel is active: nothing is subscribed and no history is kept.")));
      }
    } catch (error) {
      if (!stopped) fill(problem, notice(`Cannot list channels: ${describe(error)}`, "error"));
    }
  }

  function row(item) {
    const link = h("a", { href: channelHref(item.channel), class: "mono" }, item.channel);
    return h(
      "tr",
      { class: "clickable", onclick: (event) => event.target !== link && ctx.navigate(channelHref(item.channel)) },
      h("td", {}, link),
      h("td", { class: "num" }, number(item.subscribers)),
      h("td", { class: "num" }, number(item.offset)),
      h("td", { class: "mono muted" }, item.epoch),
      h("td", { class: "num" }, number(item.rate, 1)),
    );
  }

  search.addEventListener(
    "input",
    debounce(() => {
      pages = 1;
      const url = new URL(location.href);
      if (search.value) url.searchParams.set("search", search.value);
      else url.searchParams.delete("search");
      history.replaceState(null, "", url);
      load(true);
    }, 200),
  );
  const slash = (event) => {
    if (event.key === "/" && document.activeElement?.tagName !== "INPUT" && document.activeElement?.tagName !== "TEXTAREA") {
      event.preventDefault();
      search.focus();
    }
  };
  document.addEventListener("keydown", slash);
  load(true);
  const timer = setInterval(() => load(true), 3000);
  return () => {
    stopped = true;
    clearInterval(timer);
    document.removeEventListener("keydown", slash);
  };
}
