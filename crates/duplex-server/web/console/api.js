// The console's one way to the server's HTTP API: the API key (when the server has keys) goes
// in `Authorization: Bearer`, and every error is an ApiError with the problem's stable code.

const KEY = "duplex-console-api-key";

/** An HTTP error answered as problem+json. */
export class ApiError extends Error {
  constructor(status, code, detail, body) {
    super(detail || `HTTP ${status}`);
    this.name = "ApiError";
    this.status = status;
    this.code = code;
    this.body = body;
  }
}

/** The API key kept for this tab (sessionStorage: gone when the tab closes). */
export function storedKey() {
  return sessionStorage.getItem(KEY);
}

export function storeKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

/**
 * Calls the API. `json` is sent as the body; `headers` are added; `raw` returns the Response
 * itself (for statuses such as 304). Resolves with the parsed JSON, or undefined on 204.
 */
export async function api(path, { method = "GET", json, body, headers = {}, contentType, raw = false } = {}) {
  const all = { ...headers };
  const key = storedKey();
  if (key) all.authorization = `Bearer ${key}`;
  let payload = body;
  if (json !== undefined) {
    payload = JSON.stringify(json);
    all["content-type"] = contentType || "application/json";
  } else if (body !== undefined && contentType) {
    all["content-type"] = contentType;
  }
  const response = await fetch(path, { method, headers: all, body: payload });
  if (raw) return response;
  if (!response.ok) throw await problem(response);
  if (response.status === 204) return undefined;
  return response.json();
}

/** The ApiError of a failed response. */
export async function problem(response) {
  let body = {};
  try {
    body = await response.json();
  } catch (_) {
    /* not JSON */
  }
  return new ApiError(response.status, body.code || `http_${response.status}`, body.detail || response.statusText, body);
}

/** `/api/channels/{channel}…` with the channel escaped. */
export function channelPath(channel, rest = "") {
  return `/api/channels/${encodeURIComponent(channel)}${rest}`;
}

/** `/api/collections/{collection}/records[/{id}]`. */
export function recordsPath(collection, id) {
  const base = `/api/collections/${encodeURIComponent(collection)}/records`;
  return id === undefined ? base : `${base}/${encodeURIComponent(id)}`;
}
