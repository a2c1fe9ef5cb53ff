// Board: what HTTP is for. Posts and comments are records — listed a page at a time with a
// cursor, created with POST, edited with PUT and If-Match so a stale edit is caught instead of
// overwriting someone else's — all plain HTTP a cache or a proxy understands. The socket does
// the one thing HTTP cannot: tell this page, the moment it happens, that someone else wrote.

import { Duplex } from "/duplex.js";
import { fill, h, randomName, statusBadge } from "/examples/lib.js";

const duplex = new Duplex();
const posts = duplex.records("posts");
const comments = duplex.records("comments");
const me = localStorage.getItem("duplex-example-name") || randomName();
localStorage.setItem("duplex-example-name", me);

const app = document.getElementById("app");
document.getElementById("status").append(statusBadge(duplex));

// Every post on the page, by id: its element and the version it shows.
const shown = new Map();
let cursor = null;

const title = h("input", { type: "text", placeholder: "Title", required: true, maxlength: "200", "data-testid": "post-title", "aria-label": "Title" });
const body = h("textarea", { rows: "3", placeholder: `Write something, ${me}…`, "data-testid": "post-body", "aria-label": "Post" });
const submit = h("button", { class: "primary", type: "submit", "data-testid": "post-submit" }, "Post");
const list = h("ul", { class: "posts", "data-testid": "post-list" });
const more = h("button", { type: "button", hidden: true, onclick: () => loadPage() }, "Older posts");
const problem = h("div");

app.append(
  h(
    "form",
    { class: "panel compose", onsubmit: createPost },
    h("div", { class: "row" }, h("span", { class: "muted small" }, `Posting as ${me}`)),
    title,
    body,
    h("div", { class: "row" }, h("span", { class: "grow" }), submit),
  ),
  problem,
  list,
  h("div", { class: "more" }, more),
);

// ---- HTTP: list, create, edit ----

/** The next page of posts, newest first (GET …/records?sort=-created&cursor=…). */
async function loadPage() {
  try {
    const page = await posts.list({ sort: "-created", limit: 10, cursor: cursor || undefined });
    for (const post of page.items) if (!shown.has(post.id)) list.append(postItem(post));
    cursor = page.next;
    more.hidden = !cursor;
    if (shown.size === 0) list.append(h("li", { class: "muted", id: "empty" }, "No post yet: write the first."));
  } catch (error) {
    fill(problem, h("p", { class: "notice error" }, `Cannot load posts: ${error.message}`));
  }
}

async function createPost(event) {
  event.preventDefault();
  submit.disabled = true;
  try {
    // POST …/records: the server gives the id, created, updated and version.
    const post = await posts.create({ title: title.value.trim(), body: body.value.trim(), author: me });
    showNew(post);
    title.value = "";
    body.value = "";
  } catch (error) {
    fill(problem, h("p", { class: "notice error" }, `Not posted: ${error.message}`));
  } finally {
    submit.disabled = false;
  }
}

function postItem(post) {
  const item = h("li", { class: "panel post", "data-testid": "post-item", "data-id": post.id });
  const state = { post, item, comments: null, count: 0 };
  shown.set(post.id, state);
  render(state);
  return item;
}

/** Draws a post as it is now (after an edit here or elsewhere). */
function render(state, { flash = false } = {}) {
  const { post, item } = state;
  const countLabel = h("span", { class: "muted small" });
  const commentsList = h("ul", { class: "comments", hidden: true });
  const toggle = h(
    "button",
    {
      type: "button",
      onclick: async () => {
        commentsList.hidden = !commentsList.hidden;
        if (!commentsList.hidden && !state.comments) await loadComments(state);
      },
    },
    "Comments",
  );
  state.commentsList = commentsList;
  state.countLabel = countLabel;
  fill(
    item,
    h("h3", {}, post.title),
    h("div", { class: "by" }, `${post.author || "someone"} · ${new Date(post.created).toLocaleString()}${post.version > 1 ? ` · edited (v${post.version})` : ""}`),
    post.body ? h("p", { class: "body" }, post.body) : null,
    h("div", { class: "actions" }, toggle, h("button", { type: "button", onclick: () => edit(state) }, "Edit"), countLabel),
    commentsList,
  );
  if (flash) {
    item.classList.remove("flash");
    void item.offsetWidth;
    item.classList.add("flash");
  }
}

/** Comments of a post: GET comments?filter.post=ID, oldest first, and a form to add one. */
async function loadComments(state) {
  const input = h("input", { type: "text", placeholder: "Comment…", "aria-label": "Comment", class: "grow" });
  const form = h(
    "form",
    {
      class: "row",
      onsubmit: async (event) => {
        event.preventDefault();
        if (!input.value.trim()) return;
        const comment = await comments.create({ post: state.post.id, author: me, body: input.value.trim() });
        addComment(state, comment);
        input.value = "";
      },
    },
    input,
    h("button", { type: "submit" }, "Comment"),
  );
  state.comments = new Set();
  const page = await comments.list({ filter: { post: state.post.id }, sort: "created", limit: 100 });
  for (const comment of page.items) addComment(state, comment);
  state.commentsList.append(h("li", {}, form));
}

function addComment(state, comment) {
  if (!state.comments || state.comments.has(comment.id)) return;
  state.comments.add(comment.id);
  const form = state.commentsList.lastElementChild?.querySelector("form") ? state.commentsList.lastElementChild : null;
  const item = h("li", { class: "flash" }, h("b", { class: "by" }, comment.author || "someone"), comment.body);
  state.commentsList.insertBefore(item, form);
}

/** Edits a post in place; saving sends If-Match with the version being edited. */
function edit(state) {
  const editing = state.post;
  const newTitle = h("input", { type: "text", value: editing.title, "aria-label": "Title", "data-testid": "post-edit-title" });
  const newBody = h("textarea", { rows: "3", "aria-label": "Post", "data-testid": "post-edit-body" }, editing.body || "");
  newBody.value = editing.body || "";
  const note = h("div");
  const save = async (version) => {
    try {
      // PUT with If-Match "version": refused with 412 if someone saved after we read it.
      const saved = await posts.update(editing.id, { title: newTitle.value, body: newBody.value, author: editing.author }, { ifVersion: version });
      state.post = saved;
      render(state, { flash: true });
    } catch (error) {
      if (error.code !== "precondition_failed") {
        fill(note, h("p", { class: "notice error" }, `Not saved: ${error.message}`));
        return;
      }
      const theirs = await posts.get(editing.id);
      fill(
        note,
        h(
          "div",
          { class: "conflict", role: "alert", "data-testid": "post-conflict" },
          h("b", {}, `Someone saved this post (version ${theirs.version}) while you were editing.`),
          h("pre", {}, `${theirs.title}\n${theirs.body || ""}`),
          h(
            "div",
            { class: "row" },
            h("button", { type: "button", class: "primary", onclick: () => save(theirs.version) }, "Save mine over it"),
            h(
              "button",
              {
                type: "button",
                onclick: () => {
                  state.post = theirs;
                  render(state, { flash: true });
                },
              },
              "Keep theirs",
            ),
          ),
        ),
      );
    }
  };
  fill(
    state.item,
    h(
      "form",
      {
        class: "edit",
        onsubmit: (event) => {
          event.preventDefault();
          save(editing.version);
        },
      },
      newTitle,
      newBody,
      h("div", { class: "row" }, h("button", { type: "submit", class: "primary", "data-testid": "post-save" }, "Save"), h("button", { type: "button", onclick: () => render(state) }, "Cancel")),
    ),
    note,
  );
  newTitle.focus();
}

function showNew(post) {
  if (shown.has(post.id)) return;
  document.getElementById("empty")?.remove();
  const item = postItem(post);
  list.prepend(item);
  item.classList.add("flash");
}

// ---- the socket: what others write, as it happens ----

await duplex.subscribe("records:posts", ({ data }) => {
  const { op, record } = data;
  const state = shown.get(record.id);
  if (op === "created") showNew(record);
  else if (op === "updated" && state && record.version > state.post.version) {
    // While this page edits the post, its form stays: saving will show the conflict.
    if (state.item.querySelector("form.edit")) return;
    state.post = record;
    render(state, { flash: true });
  } else if (op === "deleted" && state) {
    state.item.remove();
    shown.delete(record.id);
  }
});
await duplex.subscribe("records:comments", ({ data }) => {
  if (data.op !== "created") return;
  const state = shown.get(data.record.post);
  if (!state) return;
  state.count += 1;
  if (state.comments) addComment(state, data.record);
  else state.countLabel.textContent = `${state.count} new comment${state.count > 1 ? "s" : ""}`;
});
await loadPage();
