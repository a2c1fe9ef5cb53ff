// Small DOM helpers. Everything a user or a client wrote (messages, records, names, channel
// names) reaches the page through textContent or attributes set by the DOM, never as HTML.

/**
 * Makes an element: `h("button", { class: "primary", onclick }, "Save")`. Attributes starting
 * with `on` become listeners; `dataset`-style keys (`data-testid`) and the rest are attributes;
 * children are nodes or text (null and false are skipped).
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "value") el.value = value;
    else if (key === "checked") el.checked = Boolean(value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** Replaces an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

const SVG = "http://www.w3.org/2000/svg";

/** Samples a sparkline spans: one minute at one a second, growing to five as samples come;
 * the newest at the right edge. */
const MIN_SPAN = 60;
const MAX_SPAN = 300;

/** A sparkline of `values` (numbers or null), scaled to its own maximum. */
export function sparkline(values) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 300 40");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("aria-hidden", "true");
  const area = document.createElementNS(SVG, "polygon");
  const line = document.createElementNS(SVG, "polyline");
  svg.append(area, line);
  drawSparkline(svg, values);
  return svg;
}

/** Redraws a sparkline made by `sparkline`. */
export function drawSparkline(svg, values) {
  const [area, line] = svg.children;
  const shown = values.slice(-MAX_SPAN).map((v) => (typeof v === "number" && Number.isFinite(v) ? v : 0));
  const span = Math.max(MIN_SPAN, shown.length);
  if (shown.length < 2) {
    line.setAttribute("points", "");
    area.setAttribute("points", "");
    return;
  }
  const max = Math.max(...shown) || 1;
  const step = 300 / (span - 1);
  const start = 300 - (shown.length - 1) * step;
  const points = shown.map((v, i) => `${(start + i * step).toFixed(1)},${(38 - (v / max) * 34).toFixed(1)}`);
  line.setAttribute("points", points.join(" "));
  area.setAttribute("points", `${start.toFixed(1)},40 ${points.join(" ")} 300,40`);
}

/** 1234567 → "1.2 MB". */
export function bytes(n) {
  if (!Number.isFinite(n)) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${i === 0 ? n : n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
}

/** A count or rate for a card: 1234 → "1,234", 12.345 → "12.3". */
export function number(n, digits = 0) {
  if (n === null || n === undefined || !Number.isFinite(n)) return "–";
  return n.toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: 0 });
}

/** Seconds → "3 d 4 h", "5 min 2 s". */
export function duration(seconds) {
  const s = Math.floor(seconds);
  const parts = [[86400, "d"], [3600, "h"], [60, "min"], [1, "s"]];
  const out = [];
  let rest = s;
  for (const [size, unit] of parts) {
    if (rest >= size || (unit === "s" && out.length === 0)) {
      out.push(`${Math.floor(rest / size)} ${unit}`);
      rest %= size;
    }
    if (out.length === 2) break;
  }
  return out.join(" ");
}

/** An RFC 3339 time → "12 s ago", "3 min ago", or a date. */
export function ago(text) {
  const then = Date.parse(text);
  if (!Number.isFinite(then)) return text || "";
  const seconds = Math.max(0, (Date.now() - then) / 1000);
  if (seconds < 90) return `${Math.round(seconds)} s ago`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 129600) return `${Math.round(seconds / 3600)} h ago`;
  return new Date(then).toLocaleString();
}

/** Pretty JSON text of any value. */
export function pretty(value) {
  return JSON.stringify(value, null, 2);
}

/** "12 bytes: 0a ff 00 …" for binary data. */
export function hexPreview(data, shown = 32) {
  const hex = Array.from(data.slice(0, shown), (b) => b.toString(16).padStart(2, "0")).join(" ");
  return `${data.length} bytes: ${hex}${data.length > shown ? " …" : ""}`;
}

/** A notice line; `kind` is "", "error" or "ok". */
export function notice(text, kind = "") {
  return h("p", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
}

/** The message of an error for people, with its code when it has one. */
export function describe(error) {
  if (error && error.code) return `${error.message} (${error.code})`;
  return String(error?.message || error);
}

/** Calls `fn` at most once per `ms`, after the last call. */
export function debounce(fn, ms) {
  let timer;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}
