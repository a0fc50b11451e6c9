// One task: GET /api/v1/tasks/{id} (its record and history, as `zbroker task --json`),
// its result (GET .../result), its stream live (SSE .../stream?offset=) and cancel.

import { api, follow } from "../api.js";
import { h, fill, show, when, attempt, showError } from "../dom.js";
import { href, reload } from "../router.js";

export const title = "Task";

const PREVIEW_CHARS = 4096;
const RETRY_MS = 2000;
const FINAL = new Set(["done", "dead", "cancelled", "expired", "upstream_failed"]);
const SKIP = new Set(["history", "payload"]);

export function mount(root, params) {
  const id = params.id || "";
  const input = h("input.mono.taskid", { value: id, placeholder: "task id", "aria-label": "task id" });
  const open = h("form", { onsubmit: (e) => (e.preventDefault(), (location.hash = href("task", { id: input.value.trim() }))) }, input, h("button", {}, "Open"));
  const record = h("div.record");
  const history = h("div.history");
  const result = h("div.result");
  const stream = h("div.stream");
  const heading = h("div.taskhead");
  fill(
    root,
    h("div.viewbar", h("h2", {}, "Task"), open, h("span.source", {}, "GET /api/v1/tasks/{id}")),
    heading,
    h("div.columns", record, h("div", {}, stream, result, history)),
  );
  if (!id) return () => {};

  let stopStream = () => {};
  let alive = true;

  async function load() {
    const task = await api(`/tasks/${encodeURIComponent(id)}`);
    if (!alive) return task;
    drawRecord(task);
    drawHistory(task.history || []);
    if (FINAL.has(task.state)) await loadResult(task);
    else fill(result, h("h3", {}, "Result"), h("p.note", {}, `Not finished (${task.state}).`));
    return task;
  }

  function drawRecord(task) {
    const rows = Object.entries(task)
      .filter(([k]) => !SKIP.has(k))
      .map(([k, v]) => h("tr", { dataset: { field: k } }, h("th", {}, k), h("td", {}, value(k, v))));
    const actions = h(
      "div.actions",
      {},
      FINAL.has(task.state)
        ? null
        : h("button.danger", { dataset: { action: "cancel" }, onclick: cancel }, "Cancel"),
      task.state === "dead" ? deadActions(task.service) : null,
      h("a", { href: href("graph", { id }) }, "Dependency graph"),
      h("a", { href: href("tasks", { service: task.service, state: task.state }) }, `All ${task.state} tasks of ${task.service}`),
    );
    if (heading.dataset.state !== task.state) {
      // Drawn again only when the state changes: a button is not replaced under a click.
      heading.dataset.state = task.state;
      fill(
        heading,
        h("h3", {}, task.id, " ", h(`span.badge.state-${task.state}`, { dataset: { field: "state" } }, task.state)),
        actions,
      );
    }
    fill(
      record,
      h("table.kv", {}, h("tbody", {}, rows)),
      h("h3", {}, "Payload"),
      payloadView(task.payload),
    );
  }

  function drawHistory(entries) {
    fill(
      history,
      h("h3", {}, "History"),
      h(
        "table.grid",
        {},
        h("thead", {}, h("tr", {}, h("th", {}, "time"), h("th", {}, "event"), h("th", {}, "details"))),
        h(
          "tbody",
          {},
          entries.map(([event, at, ...details]) => h("tr", {}, h("td", {}, when(at)), h("td", {}, event), h("td.mono", {}, details.map(show).join(" ")))),
        ),
      ),
    );
  }

  async function loadResult(task) {
    if (task.state !== "done") {
      fill(result, h("h3", {}, "Result"), h("p.note", {}, `No result: the task ended ${task.state}${task.error ? ` (${task.error})` : ""}.`));
      return;
    }
    try {
      const answer = await api(`/tasks/${encodeURIComponent(id)}/result`);
      const frames = answer.frames || [];
      fill(
        result,
        h("h3", {}, "Result"),
        h("p.note", {}, `${frames.length} frame(s), from GET /api/v1/tasks/{id}/result`),
        frames.map((frame, i) => h("pre.preview", { dataset: { field: "result", frame: i } }, preview(dataText(frame)))),
      );
    } catch (exc) {
      fill(result, h("h3", {}, "Result"), h("p.error-text", {}, `${exc.code || "error"}: ${exc.message}`));
    }
  }

  // The stream is read from its first chunk; if the connection is lost before the
  // end, it is read again from the next chunk after RETRY_MS (the API resumes at
  // any offset), so that nothing is shown twice or missed.
  function startStream() {
    const chunks = h("pre.preview.live", { dataset: { field: "stream" } });
    const status = h("span.stream-state", { dataset: { field: "stream-state" } }, "connecting");
    let count = 0;
    let next = 0;
    let ended = false;
    let failing = false;
    let retry = null;
    fill(stream, h("h3", {}, "Stream ", status), h("p.note", {}, "Chunks as the worker sends them (SSE /api/v1/tasks/{id}/stream?offset=0)."), chunks);
    const onEvent = (message) => {
      if (message.event === "chunk") {
        count += 1;
        next = message.data.offset + 1;
        chunks.append(h("span.chunk", { dataset: { offset: message.data.offset } }, dataText(message.data)));
        status.textContent = `live: ${count} chunk(s) received by this page`;
        return;
      }
      ended = message.event === "result" || message.event === "error";
      if (message.event === "result") status.textContent = `ended: ${count} chunk(s) received by this page, then the result`;
      if (message.event === "error") status.textContent = `ended: ${(message.data.error || {}).code || "error"}`;
      if (ended) attempt("Reading the task", load);
    };
    const onState = (state, exc) => {
      if (state === "open") {
        failing = false;
        status.textContent = "live";
        return;
      }
      if (ended || !alive) return;
      if (state === "error" && !failing) showError("Following the task's stream", exc);
      failing = state === "error";
      status.textContent = `interrupted after ${count} chunk(s): again in ${RETRY_MS / 1000} s`;
      retry = setTimeout(open, RETRY_MS);
    };
    const open = () => {
      const following = follow(`/tasks/${encodeURIComponent(id)}/stream?offset=${next}`, { onEvent, onState });
      stopStream = () => {
        clearTimeout(retry);
        following();
      };
    };
    open();
  }

  function deadActions(service) {
    const act = async (verb, doing) => {
      if (verb === "drop" && !confirm(`Drop the dead letter ${id}? It cannot be redriven after.`)) return;
      const path = `/queues/${encodeURIComponent(service)}/dead/${verb}`;
      const answer = await attempt(`${doing} ${id}`, () => api(path, { method: "POST", body: { ids: [id] } }));
      if (answer === undefined) return;
      if (verb === "drop") location.hash = href("dead", { service }); // its record is gone
      else reload(); // queued again: followed afresh, stream included
    };
    return [
      h("button", { dataset: { action: "redrive" }, onclick: () => act("redrive", "Redriving") }, "Redrive"),
      h("button.danger", { dataset: { action: "drop" }, onclick: () => act("drop", "Dropping") }, "Drop"),
    ];
  }

  async function cancel() {
    await attempt(`Cancelling ${id}`, () => api(`/tasks/${encodeURIComponent(id)}/cancel`, { method: "POST" }));
    await attempt("Reading the task", load);
  }

  // The record is read again every 2 s until the task ends (its figures change as it runs).
  let timer = null;
  const again = async () => {
    const task = await attempt("Reading the task", load);
    if (alive && task && !FINAL.has(task.state)) timer = setTimeout(again, 2000);
    return task;
  };
  again().then((task) => {
    if (task && alive) startStream();
  });
  return () => {
    alive = false;
    clearTimeout(timer);
    stopStream();
  };
}

/** The record's `payload`: {frames, bytes, preview} (its first frame's first bytes,
 * {text} or {base64}), or null when the broker no longer holds it. */
function payloadView(payload) {
  if (!payload) return h("p.note", { dataset: { field: "payload" } }, "The broker no longer holds this task's payload.");
  const { text, base64 } = payload.preview;
  const shownBytes = text !== undefined ? new TextEncoder().encode(text).length : atob(base64).length;
  const sizes = `${payload.frames} frame(s), ${payload.bytes} bytes`;
  const part = shownBytes < payload.bytes ? `: the first ${shownBytes} bytes of the first frame` : "";
  return h(
    "div.payload",
    { dataset: { field: "payload", kind: text !== undefined ? "text" : "binary" } },
    h("p.note", {}, text !== undefined ? `${sizes}${part}` : `binary, ${sizes}${part}, as base64`),
    h("pre.preview", {}, text !== undefined ? text : base64),
  );
}

/** The text of a data document of the API: {"text": ...} or {"base64": ...}. */
function dataText(doc) {
  if (doc.text !== undefined) return doc.text;
  if (doc.base64 !== undefined) return `base64:${doc.base64}`;
  return JSON.stringify(doc);
}

function preview(text, cut = false) {
  const shown = text.length > PREVIEW_CHARS ? text.slice(0, PREVIEW_CHARS) : text;
  return cut || text.length > PREVIEW_CHARS ? `${shown}\n… (cut at ${PREVIEW_CHARS} characters)` : shown;
}

function value(field, v) {
  if (field.endsWith("_at") || field === "keep_until" || field === "not_before") {
    return typeof v === "number" && v > 0 ? when(v) : "–";
  }
  if (field === "depends_on" && Array.isArray(v) && v.length) {
    return v.map((dep) => h("a.mono", { href: href("task", { id: dep }) }, dep, " "));
  }
  return show(v);
}
