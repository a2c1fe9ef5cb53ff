// One collection: its records a page at a time (cursor paging, sort, filter.FIELD filters),
// changing live as others write (the records:{collection} channel), and an editor that saves
// with If-Match: a stale edit shows the 412 conflict beside the current version and can be
// reapplied on top of it.

import { api, recordsPath } from "../api.js";
import { ago, describe, fill, h, notice, pretty } from "../ui.js";

const SERVER_FIELDS = ["id", "created", "updated", "version"];
const PAGE = 25;

/** The client's fields of a record. */
function fieldsOf(record) {
  const fields = { ...record };
  for (const key of SERVER_FIELDS) delete fields[key];
  return fields;
}

/** `author=ana, stars=5` → [["author", "ana"], ["stars", "5"]]. */
function parseFilters(text) {
  return text
    .split(/[,&\n]/)
    .map((part) => part.trim())
    .filter(Boolean)
    .map((part) => {
      const at = part.indexOf("=");
      return at < 0 ? [part, ""] : [part.slice(0, at).trim(), part.slice(at + 1).trim()];
    });
}

export default function render(main, [collection], ctx) {
  const url = new URLSearchParams(location.search);
  const sort = h(
    "select",
    { "aria-label": "Sort" },
    [
      ["-created", "newest first"],
      ["created", "oldest first"],
      ["-updated", "recently updated"],
      ["updated", "least recently updated"],
    ].map(([value, label]) => h("option", { value, selected: (url.get("sort") || "-created") === value }, label)),
  );
  const filter = h("input", {
    class: "wide",
    placeholder: "filter: author=ana, stars=5",
    "aria-label": "Filters",
    value: url.get("filter") || "",
  });
  const rows = h("tbody");
  const problem = h("div");
  const pageLabel = h("span", { class: "muted" });
  const previous = h("button", { type: "button", onclick: () => go(page - 1) }, "← Previous");
  const next = h("button", { type: "button", onclick: () => go(page + 1) }, "Next →");
  const live = h("span", { class: "pill" }, "connecting");
  const editorPanel = h("section", { class: "panel", "aria-label": "Record" });

  main.append(
    h(
      "div",
      { class: "page-head" },
      h("h1", {}, h("a", { href: "/console/records" }, "Records"), " / ", h("span", { class: "mono" }, collection)),
      live,
      h("span", { class: "grow" }),
      h("button", { type: "button", class: "primary", onclick: () => openEditor(null) }, "New record"),
    ),
    h(
      "form",
      {
        class: "toolbar",
        onsubmit: (event) => {
          event.preventDefault();
          go(0, true);
        },
      },
      sort,
      filter,
      h("button", { type: "submit" }, "Apply"),
      h("span", { class: "grow" }),
      previous,
      pageLabel,
      next,
    ),
    problem,
    h(
      "div",
      { class: "grid two" },
      h(
        "section",
        { class: "panel" },
        h(
          "div",
          { class: "table-wrap" },
          h(
            "table",
            {},
            h("thead", {}, h("tr", {}, h("th", {}, "id"), h("th", { class: "num" }, "version"), h("th", {}, "updated"), h("th", {}, "fields"))),
            rows,
          ),
        ),
      ),
      editorPanel,
    ),
  );
  sort.addEventListener("change", () => go(0, true));
  fill(editorPanel, h("h2", {}, "Record"), h("p", { class: "muted" }, "Open a record to see and edit it."));

  // ---- paging ----

  // cursors[i] opens page i (undefined for the first).
  let cursors = [undefined];
  let page = 0;
  let stopped = false;
  const shown = new Map();

  function query() {
    const params = new URLSearchParams({ limit: String(PAGE), sort: sort.value });
    for (const [field, value] of parseFilters(filter.value)) params.set(`filter.${field}`, value);
    return params;
  }

  async function go(index, fresh = false) {
    if (fresh) cursors = [undefined];
    if (index < 0 || index >= cursors.length) return;
    const params = query();
    if (cursors[index]) params.set("cursor", cursors[index]);
    try {
      const result = await api(`${recordsPath(collection)}?${params}`);
      if (stopped) return;
      fill(problem);
      page = index;
      cursors = cursors.slice(0, index + 1);
      if (result.next) cursors.push(result.next);
      shown.clear();
      fill(rows, result.items.map((record) => row(record)));
      if (result.items.length === 0) rows.append(h("tr", {}, h("td", { colspan: "4", class: "muted" }, "No record here.")));
      pageLabel.textContent = `page ${page + 1}`;
      previous.disabled = page === 0;
      next.disabled = !result.next;
      const state = new URL(location.href);
      state.searchParams.set("sort", sort.value);
      if (filter.value.trim()) state.searchParams.set("filter", filter.value.trim());
      else state.searchParams.delete("filter");
      history.replaceState(null, "", state);
    } catch (error) {
      if (!stopped) fill(problem, notice(`Cannot list records: ${describe(error)}`, "error"));
    }
  }

  function row(record, flash = false) {
    const fields = JSON.stringify(fieldsOf(record));
    const tr = h(
      "tr",
      { class: `clickable${flash ? " flash" : ""}`, "data-record-id": record.id, onclick: () => openEditor(record.id) },
      // Record ids made by the server start with the time: their end tells them apart.
      h("td", { class: "mono", title: record.id }, record.id.length > 14 ? `…${record.id.slice(-12)}` : record.id),
      h("td", { class: "num" }, String(record.version)),
      h("td", { title: record.updated }, ago(record.updated)),
      h("td", { class: "mono" }, fields.length > 90 ? `${fields.slice(0, 88)}…` : fields),
    );
    shown.set(record.id, tr);
    return tr;
  }

  // ---- live changes by others ----

  const duplex = ctx.duplex();
  const channel = `records:${collection}`;
  let subscription = null;
  duplex
    .subscribe(channel, {
      onMessage({ data }) {
        const { op, record } = data;
        const current = shown.get(record.id);
        if (op === "deleted") {
          current?.remove();
          shown.delete(record.id);
        } else if (current) {
          current.replaceWith(row(record, true));
        } else if (op === "created" && page === 0) {
          rows.querySelector("td[colspan]")?.parentElement.remove();
          rows.prepend(row(record, true));
        }
        editor?.changed(op, record);
      },
      onEnd(code) {
        live.textContent = `not live: ${code}`;
        live.className = "pill paused";
      },
    })
    .then(
      (sub) => {
        subscription = sub;
        live.textContent = "live";
        live.className = "pill live";
      },
      (error) => {
        live.textContent = `not live: ${error.code || error.message}`;
        live.className = "pill paused";
      },
    );

  // ---- the editor ----

  let editor = null;

  async function openEditor(id) {
    if (id === null) {
      editor = recordEditor(null);
      return;
    }
    try {
      const record = await api(recordsPath(collection, id));
      editor = recordEditor(record);
    } catch (error) {
      fill(editorPanel, h("h2", {}, "Record"), notice(`Cannot read the record: ${describe(error)}`, "error"));
    }
  }

  /** Shows `record` (null: a new one) in the editor panel; returns its handle. */
  function recordEditor(record) {
    let current = record;
    const text = h("textarea", {
      rows: "14",
      "data-testid": "record-editor",
      "aria-label": "Record JSON",
      spellcheck: "false",
      value: pretty(record ? fieldsOf(record) : {}),
    });
    const facts = h("div", { class: "facts" });
    const result = h("div", { "aria-live": "polite" });
    const conflict = h("div");
    const save = h("button", { class: "primary", type: "submit", "data-testid": "record-save" }, record ? "Save" : "Create");
    const remove = record ? h("button", { type: "button", class: "danger", onclick: deleteRecord }, "Delete") : null;

    function showFacts() {
      if (!current) {
        fill(facts, h("span", {}, "a new record in ", h("b", { class: "mono" }, collection)));
        return;
      }
      fill(
        facts,
        h("span", {}, "id ", h("b", { class: "mono" }, current.id)),
        h("span", {}, "version ", h("b", { "data-testid": "record-version" }, String(current.version))),
        h("span", { title: current.updated }, "updated ", h("b", {}, ago(current.updated))),
      );
    }

    function parsed() {
      try {
        const value = JSON.parse(text.value);
        if (value === null || typeof value !== "object" || Array.isArray(value)) throw new Error("a record is a JSON object");
        return value;
      } catch (error) {
        fill(result, notice(`Not a JSON object: ${error.message}`, "error"));
        return null;
      }
    }

    async function put(fields, version) {
      return api(recordsPath(collection, current.id), { method: "PUT", json: fields, headers: { "if-match": `"${version}"` } });
    }

    async function submit(event) {
      event.preventDefault();
      const fields = parsed();
      if (!fields) return;
      save.disabled = true;
      fill(conflict);
      try {
        if (!current) {
          current = await api(recordsPath(collection), { method: "POST", json: fields });
          fill(result, notice(`Created ${current.id}.`, "ok"));
          save.textContent = "Save";
        } else {
          current = await put(fields, current.version);
          fill(result, notice(`Saved version ${current.version}.`, "ok"));
        }
        text.value = pretty(fieldsOf(current));
        showFacts();
      } catch (error) {
        if (error.status === 412) await showConflict(fields);
        else fill(result, notice(`Refused: ${describe(error)}`, "error"));
      } finally {
        save.disabled = false;
      }
    }

    /** Someone saved first: theirs beside ours, and the choice. */
    async function showConflict(mine) {
      fill(result);
      let theirs;
      try {
        theirs = await api(recordsPath(collection, current.id));
      } catch (error) {
        fill(result, notice(`The record changed, and cannot be read now: ${describe(error)}`, "error"));
        return;
      }
      const reapply = h(
        "button",
        {
          type: "button",
          class: "primary",
          "data-testid": "record-reapply",
          onclick: async () => {
            try {
              current = await put(mine, theirs.version);
              fill(conflict);
              text.value = pretty(fieldsOf(current));
              showFacts();
              fill(result, notice(`Saved version ${current.version} over version ${theirs.version}.`, "ok"));
            } catch (error) {
              if (error.status === 412) await showConflict(mine);
              else fill(result, notice(`Refused: ${describe(error)}`, "error"));
            }
          },
        },
        `Save mine over version ${theirs.version}`,
      );
      const take = h(
        "button",
        {
          type: "button",
          onclick: () => {
            current = theirs;
            text.value = pretty(fieldsOf(theirs));
            fill(conflict);
            showFacts();
          },
        },
        "Discard mine, take theirs",
      );
      fill(
        conflict,
        h(
          "div",
          { class: "conflict", role: "alert", "data-testid": "record-conflict" },
          h("b", {}, `Someone saved version ${theirs.version} after you opened version ${current.version} (412 precondition_failed).`),
          h(
            "div",
            { class: "sides" },
            h("div", {}, h("div", { class: "muted" }, "Your edit"), h("pre", { class: "json" }, pretty(mine))),
            h("div", {}, h("div", { class: "muted" }, `Version ${theirs.version}, now stored`), h("pre", { class: "json" }, pretty(fieldsOf(theirs)))),
          ),
          h("div", { class: "row" }, reapply, take),
        ),
      );
    }

    async function deleteRecord() {
      if (!confirm(`Delete record ${current.id}?`)) return;
      try {
        await api(recordsPath(collection, current.id), { method: "DELETE", headers: { "if-match": `"${current.version}"` } });
        fill(editorPanel, h("h2", {}, "Record"), notice(`Deleted ${current.id}.`, "ok"));
        editor = null;
      } catch (error) {
        if (error.status === 412) fill(result, notice("It changed since you opened it: reload it before deleting.", "error"));
        else fill(result, notice(`Refused: ${describe(error)}`, "error"));
      }
    }

    text.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) submit(event);
    });
    showFacts();
    fill(
      editorPanel,
      h("h2", {}, record ? "Record" : "New record"),
      facts,
      h("form", { onsubmit: submit, class: "grid", style: "gap:8px" }, text, h("div", { class: "row" }, save, remove, h("span", { class: "grow" }), h("span", { class: "muted" }, "Ctrl+Enter"))),
      result,
      conflict,
    );
    text.focus();
    return {
      changed(op, changed) {
        if (!current || changed.id !== current.id) return;
        if (op === "deleted") fill(result, notice("Someone deleted this record.", "error"));
        else if (changed.version > current.version) fill(result, notice(`Someone saved version ${changed.version}; saving yours will show the conflict.`));
      },
    };
  }

  go(0);
  return () => {
    stopped = true;
    if (subscription) subscription.unsubscribe();
    else duplex.subscriptions.get(channel)?.unsubscribe();
  };
}
