// The only module that talks to the gateway: REST under /api/v1 and its SSE streams.
// Every request goes to the page's own origin; the bearer token, when the gateway
// asks for one, lives in sessionStorage (gone with the tab).

const BASE = "/api/v1";
const TOKEN_KEY = "zbroker.token";

/** An answer of the API that is not a success: its JSON error, or what went wrong. */
export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status; // the HTTP status; 0 when the gateway could not be reached
    this.code = code;
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(TOKEN_KEY, value);
  else sessionStorage.removeItem(TOKEN_KEY);
}

// The connection state shown in the header: "connecting", "connected",
// "unauthorized" or "offline", with the last reason.
const listeners = new Set();
export const connection = { state: "connecting", reason: "" };

export function onConnection(listener) {
  listeners.add(listener);
  listener(connection);
}

function setConnection(state, reason = "") {
  if (connection.state === state && connection.reason === reason) return;
  connection.state = state;
  connection.reason = reason;
  for (const listener of listeners) listener(connection);
}

function headers(extra = {}) {
  const out = { Accept: "application/json", ...extra };
  const bearer = token();
  if (bearer) out.Authorization = `Bearer ${bearer}`;
  return out;
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: the status line says what there is to say
  }
  const error = body && body.error;
  if (error && typeof error === "object") {
    return new ApiError(response.status, error.code || "error", error.message || "");
  }
  return new ApiError(response.status, `http_${response.status}`, response.statusText);
}

function noteAnswer(status, error) {
  if (status === 401) setConnection("unauthorized", "the gateway asks for a bearer token");
  else if (error && error.code === "broker_unreachable") setConnection("broker_unreachable", error.message);
  else if (status >= 500 && !error) setConnection("offline", `the gateway answered ${status}`);
  else setConnection("connected");
}

/** Call the API: the parsed JSON answer, or an ApiError. */
export async function api(path, { method = "GET", body, signal } = {}) {
  const init = { method, headers: headers(), signal };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers["Content-Type"] = "application/json";
  }
  const response = await send(path, init);
  if (response.status === 204) return null;
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

/** The response of a request that succeeded (2xx); else an ApiError. The
 * connection state follows every answer, or the lack of one. */
async function send(path, init) {
  let response;
  try {
    response = await fetch(BASE + path, init);
  } catch (exc) {
    if (exc.name === "AbortError") throw exc;
    setConnection("offline", "the gateway cannot be reached");
    throw new ApiError(0, "unreachable", "the gateway cannot be reached");
  }
  if (!response.ok) {
    const error = await errorOf(response);
    noteAnswer(response.status, error.code.startsWith("http_") ? null : error);
    throw error;
  }
  noteAnswer(response.status, null);
  return response;
}

/**
 * Follow an SSE stream of the API (read with fetch, so that the bearer token goes
 * in a header, which EventSource cannot send). `onEvent({event, data, id})` gets
 * each message, `data` parsed as JSON when it is JSON; `onState(state, detail)`
 * gets "open", "closed" (the server ended it) or "error". Returns a function that
 * stops it.
 */
export function follow(path, { onEvent, onState = () => {} }) {
  const abort = new AbortController();
  (async () => {
    let response;
    try {
      response = await send(path, { headers: headers({ Accept: "text/event-stream" }), signal: abort.signal });
    } catch (exc) {
      if (exc.name !== "AbortError") onState("error", exc);
      return;
    }
    onState("open");
    try {
      await readEvents(response.body, onEvent);
      onState("closed");
    } catch (exc) {
      if (exc.name !== "AbortError") onState("error", exc);
    }
  })();
  return () => abort.abort();
}

async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const message = parseBlock(block);
      if (message) onEvent(message);
    }
  }
}

function parseBlock(block) {
  const message = { event: "message", data: "", id: null };
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") data.push(value);
    else if (field === "event") message.event = value;
    else if (field === "id") message.id = value;
  }
  if (!data.length) return null;
  message.data = data.join("\n");
  try {
    message.data = JSON.parse(message.data);
  } catch {
    // plain text data stays text
  }
  return message;
}
