// Queues: GET /api/v1/queues (the document `zbroker queues --json` prints), polled
// once a second. Every figure in the table is the API's, shown as it came; the
// trends are the history of three of those figures as this page sampled them.
// Rows are updated in place, so that a button is never replaced under a click.

import { api } from "../api.js";
import { h, fill, show, poll, attempt, KeyedRows, setCell } from "../dom.js";
import { History, sparkline } from "../sparkline.js";
import { href } from "../router.js";

const COUNTS = ["ready", "delayed", "blocked", "inflight", "dead", "done", "requests", "workers"];
const RATES = ["enqueue_rate", "done_rate", "fail_rate"];
const TIMES = ["oldest_age_s", "wait_s_p95", "run_s_p95"];
// The figures of a row, in their columns' order ("credit" is credit_in_use / credit).
const FIGURES = [...COUNTS, "credit", ...RATES, ...TIMES];
const TRENDS = [
  ["ready", "ready"],
  ["done_rate", "done_rate"],
  ["wait_s_p95", "wait_p95"],
];
// One history for the page's life, so leaving the view and coming back keeps it.
const history = new History(90);
// The limit fields outlive each redraw, so that a value being typed is not replaced.
const limitInputs = new Map();

export const title = "Queues";

export function mount(root) {
  const stamp = h("span.stamp");
  const body = h("tbody");
  const rows = new KeyedRows(body, {
    key: (q) => q.service,
    build: newRow,
    update,
    empty: "No services yet.",
    columns: FIGURES.length + 4,
  });
  fill(
    root,
    h("div.viewbar", h("h2", "Queues"), h("span.source", {}, "GET /api/v1/queues, every 1 s; ", stamp)),
    h(
      "p.note",
      {},
      "Counts, rates (tasks/s, over the broker's window) and times (s) are the broker's figures as ",
      h("code", "zbroker queues --json"),
      " gives them. Trends: the last 90 samples this page took of ready, done_rate and" +
        " wait_s_p95, one a second.",
    ),
    h("div.scroll", h("table.grid.queues", {}, h("thead", {}, header()), body)),
  );
  return poll("Reading the queues", async () => {
    const answer = await api("/queues");
    for (const q of answer) history.push(q.service, q);
    stamp.textContent = `as of ${new Date().toLocaleTimeString([], { hour12: false })}`;
    rows.render(answer);
  });
}

function header() {
  return h(
    "tr",
    {},
    h("th", "service"),
    FIGURES.map((f) => h("th.num", { title: f === "credit" ? "credit_in_use / credit" : "" }, f)),
    h("th", { title: "sampled by this page once a second" }, "trends (sampled)"),
    h("th", "limit"),
    h("th", ""),
  );
}

function newRow(q) {
  return h(
    "tr",
    { dataset: { service: q.service } },
    h("td.service", {}, h("a", { href: href("tasks", { service: q.service }) }, q.service), h("span.flag")),
    FIGURES.map((field) => h("td.num", { dataset: { field } })),
    h("td.trends"),
    h("td", { dataset: { field: "limit" } }),
    h("td.actions"),
  );
}

/** Put `q`'s figures in its row; a cell is rewritten only when its figure changed. */
function update(tr, q) {
  for (const field of [...FIGURES, "limit"]) {
    const td = tr.querySelector(`td[data-field="${field}"]`);
    const shown = field === "credit" ? `${show(q.credit_in_use)} / ${show(q.credit)}` : show(q[field]);
    setCell(td, shown, figure(q, field, shown));
  }
  tr.classList.toggle("paused", Boolean(q.paused));
  fill(tr.querySelector("span.flag"), q.paused ? h("span.badge.paused", { dataset: { field: "paused" } }, "paused") : null);
  fill(
    tr.querySelector("td.trends"),
    TRENDS.map(([field, label]) =>
      h(
        "div.trend",
        { dataset: { spark: field } },
        h("span.trend-label", label),
        sparkline(history.get(q.service, field), {
          width: 80,
          height: 13,
          title: `${field} of ${q.service}, sampled by this page every 1 s`,
        }),
      ),
    ),
  );
  const actions = tr.querySelector("td.actions");
  if (actions.dataset.paused !== String(Boolean(q.paused))) {
    actions.dataset.paused = String(Boolean(q.paused));
    fill(actions, buttons(q));
  }
  limitField(q);
}

function figure(q, field, shown) {
  if (field === "credit") {
    return [h("span", { dataset: { field: "credit_in_use" } }, show(q.credit_in_use)), " / ", show(q.credit)];
  }
  if (field === "dead" && q.dead) {
    return h("a", { href: href("dead", { service: q.service }), title: "the dead letters" }, shown);
  }
  return shown;
}

function post(doing, path, init) {
  return () => attempt(doing, () => api(path, init));
}

function buttons(q) {
  const service = encodeURIComponent(q.service);
  const pause = q.paused
    ? h(
        "button",
        { dataset: { action: "resume" }, onclick: post(`Resuming ${q.service}`, `/queues/${service}/resume`, { method: "POST" }) },
        "Resume",
      )
    : h(
        "button",
        { dataset: { action: "pause" }, onclick: post(`Pausing ${q.service}`, `/queues/${service}/pause`, { method: "POST" }) },
        "Pause",
      );
  const input = limitField(q);
  const setLimit = h(
    "button",
    {
      dataset: { action: "limit" },
      title: "Set the service's concurrency limit (empty: no limit)",
      onclick: () => {
        const text = input.value.trim();
        delete input.dataset.edited;
        const limit = text === "" ? null : Number(text);
        attempt(`Setting the limit of ${q.service}`, () => api(`/queues/${service}/limit`, { method: "PUT", body: { limit } }));
      },
    },
    "Limit",
  );
  const purge = h(
    "button.danger",
    {
      dataset: { action: "purge" },
      onclick: () => {
        if (confirm(`Purge every waiting task of ${q.service}?`)) {
          attempt(`Purging ${q.service}`, () => api(`/queues/${service}/purge`, { method: "POST" }));
        }
      },
    },
    "Purge",
  );
  return [pause, h("span.limitbox", {}, input, setLimit), purge];
}

function limitField(q) {
  let input = limitInputs.get(q.service);
  if (!input) {
    input = h("input.limit", {
      type: "number",
      min: "1",
      placeholder: "none",
      "aria-label": `concurrency limit of ${q.service}`,
      oninput: (event) => (event.target.dataset.edited = "1"),
    });
    limitInputs.set(q.service, input);
  }
  if (!input.dataset.edited) input.value = q.limit === null || q.limit === undefined ? "" : String(q.limit);
  return input;
}
