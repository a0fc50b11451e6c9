// Queues: GET /api/v1/queues (the document `zbroker queues --json` prints), polled
// once a second. Every figure in the table is the API's, shown as it came; the
// sparklines are the history of those same figures as this page sampled them.

import { api } from "../api.js";
import { h, fill, show, poll, attempt } from "../dom.js";
import { History, sparkline } from "../sparkline.js";
import { href } from "../router.js";

const COUNTS = ["ready", "delayed", "blocked", "inflight", "dead", "done", "requests"];
const RATES = ["enqueue_rate", "done_rate", "fail_rate"];
const TIMES = ["oldest_age_s", "wait_s_p95", "run_s_p95"];
// One history for the page's life, so leaving the view and coming back keeps it.
const history = new History(90);
// The limit fields outlive each redraw, so that a value being typed is not replaced.
const limitInputs = new Map();

export const title = "Queues";

export function mount(root) {
  const stamp = h("span.stamp");
  const table = h("table.grid.queues");
  fill(
    root,
    h(
      "div.viewbar",
      h("h2", {}, "Queues"),
      h("span.source", {}, "GET /api/v1/queues, every 1 s; ", stamp),
    ),
    h(
      "p.note",
      {},
      "Counts, rates (tasks/s, the broker's window) and times (s) are the broker's figures as ",
      h("code", {}, "zbroker queues --json"),
      " gives them. Trends: the last 90 samples this page took of ready, done_rate and wait_s_p95, one a second.",
    ),
    table,
  );
  return poll("Reading the queues", async () => {
    const rows = await api("/queues");
    for (const row of rows) history.push(row.service, row);
    stamp.textContent = `as of ${new Date().toLocaleTimeString([], { hour12: false })}`;
    render(table, rows);
  });
}

function render(table, rows) {
  const head = h(
    "tr",
    {},
    h("th", {}, "service"),
    COUNTS.map((c) => h("th.num", {}, c)),
    h("th.num", {}, "workers"),
    h("th.num", { title: "credit in use / credit" }, "credit"),
    RATES.map((c) => h("th.num", {}, c)),
    TIMES.map((c) => h("th.num", {}, c)),
    h("th", { title: "sampled by this page once a second" }, "trends (sampled)"),
    h("th", {}, "limit"),
    h("th", {}, ""),
  );
  const body = rows.length
    ? rows.map(row)
    : [h("tr", {}, h("td.empty", { colspan: 20 }, "No services yet."))];
  fill(table, h("thead", {}, head), h("tbody", {}, body));
}

function cell(row, field) {
  return h("td.num", { dataset: { field } }, show(row[field]));
}

function deadCell(q) {
  const count = show(q.dead);
  const link = h("a", { href: href("dead", { service: q.service }), title: "the dead letters" }, count);
  return h("td.num", { dataset: { field: "dead" } }, q.dead ? link : count);
}

function row(q) {
  const spark = (field, label) =>
    h(
      "div.trend",
      { dataset: { spark: field } },
      h("span.trend-label", {}, label),
      sparkline(history.get(q.service, field), {
        width: 80,
        height: 13,
        title: `${field} of ${q.service}, sampled by this page every 1 s`,
      }),
    );
  return h(
    "tr",
    { dataset: { service: q.service }, class: q.paused ? "paused" : "" },
    h(
      "td.service",
      {},
      h("a", { href: `#tasks?service=${encodeURIComponent(q.service)}` }, q.service),
      q.paused ? h("span.badge.paused", { dataset: { field: "paused" } }, "paused") : null,
    ),
    COUNTS.map((c) => (c === "dead" ? deadCell(q) : cell(q, c))),
    cell(q, "workers"),
    h(
      "td.num",
      { dataset: { field: "credit" } },
      h("span", { dataset: { field: "credit_in_use" } }, show(q.credit_in_use)),
      " / ",
      show(q.credit),
    ),
    RATES.map((c) => cell(q, c)),
    TIMES.map((c) => cell(q, c)),
    h("td.trends", {}, spark("ready", "ready"), spark("done_rate", "done_rate"), spark("wait_s_p95", "wait_p95")),
    h("td", { dataset: { field: "limit" } }, show(q.limit)),
    h("td.actions", {}, actions(q)),
  );
}

function actions(q) {
  const service = encodeURIComponent(q.service);
  const pause = q.paused
    ? h(
        "button",
        {
          dataset: { action: "resume" },
          onclick: () => attempt(`Resuming ${q.service}`, () => api(`/queues/${service}/resume`, { method: "POST" })),
        },
        "Resume",
      )
    : h(
        "button",
        {
          dataset: { action: "pause" },
          onclick: () => attempt(`Pausing ${q.service}`, () => api(`/queues/${service}/pause`, { method: "POST" })),
        },
        "Pause",
      );
  const limitInput = limitField(q);
  const setLimit = h(
    "button",
    {
      dataset: { action: "limit" },
      title: "Set the service's concurrency limit (empty: no limit)",
      onclick: () => {
        const text = limitInput.value.trim();
        const limit = text === "" ? null : Number(text);
        delete limitInput.dataset.edited;
        attempt(`Setting the limit of ${q.service}`, () =>
          api(`/queues/${service}/limit`, { method: "PUT", body: { limit } }),
        );
      },
    },
    "Limit",
  );
  const purge = h(
    "button.danger",
    {
      dataset: { action: "purge" },
      onclick: () => {
        if (confirm(`Purge every ready task of ${q.service}?`)) {
          attempt(`Purging ${q.service}`, () => api(`/queues/${service}/purge`, { method: "POST" }));
        }
      },
    },
    "Purge",
  );
  return [pause, h("span.limitbox", {}, limitInput, setLimit), purge];
}

function limitField(q) {
  let input = limitInputs.get(q.service);
  if (!input) {
    input = h("input.limit", {
      type: "number",
      min: "0",
      placeholder: "none",
      "aria-label": `concurrency limit of ${q.service}`,
      oninput: (event) => (event.target.dataset.edited = "1"),
    });
    limitInputs.set(q.service, input);
  }
  if (!input.dataset.edited) input.value = q.limit === null || q.limit === undefined ? "" : String(q.limit);
  return input;
}
