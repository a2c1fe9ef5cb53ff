// What every example shares: a tiny element builder that puts user data into the page as text
// (never as HTML), and a connection-status badge. Everything else each page does with
// /duplex.js and the public HTTP API, in the open.

/** `h("button", { class: "primary", onclick }, "Save")`: attributes, listeners, text children. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "value") el.value = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Replaces an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** A badge that follows a Duplex client's connection: connecting, live, reconnecting. */
export function statusBadge(duplex) {
  const badge = h("span", { class: "pill", role: "status", "data-testid": "connection-status" }, "connecting");
  duplex.onStatus((status) => {
    const live = status === "open";
    badge.textContent = live ? "live" : status;
    badge.className = `pill ${live ? "live" : status === "reconnecting" ? "off" : ""}`;
  });
  return badge;
}

/** A random name for a visitor, so two windows are told apart at once. */
export function randomName() {
  const first = ["Ada", "Bo", "Cy", "Dee", "Eli", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu", "Mo", "Nia", "Oz", "Pia"];
  return `${first[Math.floor(Math.random() * first.length)]}-${Math.floor(Math.random() * 90 + 10)}`;
}
