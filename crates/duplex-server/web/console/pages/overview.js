// Overview: what this node is, and its live figures once a second from GET /api/stats, each
// with a chart of the last five minutes (the server keeps the samples, so the charts are full
// from the first second).

import { api } from "../api.js";
import { ago, bytes, describe, drawSparkline, duration, fill, h, notice, number, sparkline } from "../ui.js";

/** The cards: label, how to read a sample's figure, how to show it, and its detail line. */
const CARDS = [
  {
    id: "connections",
    label: "Socket connections",
    testid: "overview-connections",
    value: (s) => s.connections.websocket + s.connections.tcp + s.connections.sse,
    detail: (s) => `WebSocket ${s.connections.websocket} · raw TCP ${s.connections.tcp} · SSE ${s.connections.sse}`,
  },
  { id: "subscriptions", label: "Subscriptions", value: (s) => s.subscriptions },
  { id: "channels", label: "Channels", value: (s) => s.channels },
  { id: "publications", label: "Publications / s", value: (s) => s.publications_per_second, digits: 1 },
  { id: "deliveries", label: "Deliveries / s", value: (s) => s.deliveries_per_second, digits: 0 },
  {
    id: "drops",
    label: "Slow-consumer drops / s",
    value: (s) => s.slow_consumer_drops_per_second,
    digits: 1,
    detail: () => "dropped, conflated or disconnected",
  },
  { id: "http", label: "HTTP requests / s", value: (s) => s.http_requests_per_second, digits: 1 },
  {
    id: "p99",
    label: "HTTP p99",
    value: (s) => s.http_p99_ms,
    format: (v) => (v === null || v === undefined ? "–" : `${number(v, v < 10 ? 2 : 0)} ms`),
    detail: () => "slowest 1 % of the second's requests",
  },
  { id: "queued", label: "Queued for clients", value: (s) => s.queued_bytes, format: bytes },
  { id: "history", label: "History in memory", value: (s) => s.history_bytes, format: bytes },
];

export default function render(main) {
  const facts = h("div", { class: "facts" }, "Loading…");
  const problem = h("div");
  const cards = new Map();
  const grid = h(
    "div",
    { class: "grid cards" },
    CARDS.map((card) => {
      const value = h("div", { class: "value", "data-testid": card.testid }, "–");
      const detail = h("div", { class: "detail" });
      const chart = sparkline([]);
      cards.set(card.id, { value, detail, chart });
      return h("section", { class: "panel card", "aria-label": card.label }, h("div", { class: "label" }, card.label), value, detail, chart);
    }),
  );
  const nodes = h("tbody");
  main.append(
    h("div", { class: "page-head" }, h("h1", {}, "Overview"), h("span", { class: "sub" }, "live, every second")),
    problem,
    facts,
    grid,
    h(
      "section",
      { class: "panel", style: "margin-top:16px" },
      h("h2", {}, "Nodes"),
      h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          {},
          h("thead", {}, h("tr", {}, ["Node", "HTTP", "Raw TCP", "Connections", "Version", "Started"].map((t) => h("th", {}, t)))),
          nodes,
        ),
      ),
    ),
  );

  let stopped = false;
  async function refresh() {
    try {
      const stats = await api("/api/stats");
      if (stopped) return;
      fill(problem);
      show(stats);
    } catch (error) {
      if (!stopped) fill(problem, notice(`Cannot read the figures: ${describe(error)}`, "error"));
    }
  }

  function show(stats) {
    fill(
      facts,
      h("span", {}, "duplex ", h("b", {}, stats.version)),
      h("span", {}, "node ", h("b", { class: "mono" }, stats.node)),
      h("span", {}, "up ", h("b", {}, duration(stats.uptime_seconds))),
      h("span", {}, "store ", h("b", {}, stats.store)),
      h("span", {}, "broker ", h("b", {}, stats.broker)),
      stats.nodes_error && h("span", { class: "code" }, stats.nodes_error),
    );
    const samples = stats.samples;
    const last = samples[samples.length - 1];
    for (const card of CARDS) {
      const { value, detail, chart } = cards.get(card.id);
      const format = card.format || ((v) => number(v, card.digits || 0));
      value.textContent = last ? format(card.value(last)) : "–";
      detail.textContent = last && card.detail ? card.detail(last) : "";
      drawSparkline(chart, samples.map(card.value));
    }
    fill(
      nodes,
      stats.nodes.map((node) =>
        h(
          "tr",
          {},
          h("td", { class: "mono" }, node.id, node.id === stats.node ? h("span", { class: "pill", style: "margin-left:6px" }, "this node") : null),
          h("td", { class: "mono" }, node.http),
          h("td", { class: "mono" }, node.tcp),
          h("td", { class: "num" }, number(node.connections)),
          h("td", {}, node.version),
          h("td", { title: node.started_at }, ago(node.started_at)),
        ),
      ),
    );
  }

  refresh();
  const timer = setInterval(refresh, 1000);
  return () => {
    stopped = true;
    clearInterval(timer);
  };
}
