// Workers: GET /api/v1/workers (as `zbroker workers --json`), polled once a second.

import { api } from "../api.js";
import { h, fill, show, poll, attempt } from "../dom.js";
import { href } from "../router.js";

export const title = "Workers";

export function mount(root) {
  const table = h("table.grid.workers");
  fill(
    root,
    h("div.viewbar", h("h2", {}, "Workers"), h("span.source", {}, "GET /api/v1/workers, every 1 s")),
    h(
      "p.note",
      {},
      "last_seen_s: seconds since the broker last heard from the worker, as the broker " +
        "reported it; metrics: what the worker sent with its last heartbeat.",
    ),
    table,
  );
  return poll("Reading the workers", async () => render(table, await api("/workers")));
}

function render(table, rows) {
  const head = h(
    "tr",
    {},
    ["worker", "service", "dialect", "state", "credit", "held", "tasks", "tags", "last_seen_s", "metrics", ""].map(
      (c) => h("th", {}, c),
    ),
  );
  const body = rows.length
    ? rows.map(row)
    : [h("tr", {}, h("td.empty", { colspan: 11 }, "No workers registered."))];
  fill(table, h("thead", {}, head), h("tbody", {}, body));
}

function row(w) {
  const tasks = w.tasks || [];
  return h(
    "tr",
    { dataset: { worker: w.worker } },
    h("td.mono", { dataset: { field: "worker" } }, w.worker),
    h("td", { dataset: { field: "service" } }, show(w.service)),
    h("td", { dataset: { field: "dialect" } }, show(w.dialect)),
    h("td", { dataset: { field: "state" } }, h(`span.badge.state-${w.state}`, {}, show(w.state))),
    h("td.num", { dataset: { field: "credit" } }, show(w.credit)),
    h("td.num", { dataset: { field: "held" }, title: "how many ids the broker listed under tasks" }, tasks.length),
    h(
      "td.mono",
      { dataset: { field: "tasks" } },
      tasks.length ? tasks.map((id) => h("a", { href: href("task", { id }) }, id, " ")) : "–",
    ),
    h("td", { dataset: { field: "tags" } }, (w.tags || []).map((t) => h("span.tag", {}, t))),
    h("td.num", { dataset: { field: "last_seen_s" } }, show(w.last_seen_s)),
    h("td.metrics", { dataset: { field: "metrics" } }, show(w.metrics)),
    h(
      "td.actions",
      {},
      w.state === "draining"
        ? null
        : h(
            "button",
            {
              dataset: { action: "drain" },
              title: "No new tasks; the worker finishes those it holds",
              onclick: () =>
                attempt(`Draining ${w.worker}`, () =>
                  api(`/workers/${encodeURIComponent(w.worker)}/drain`, { method: "POST" }),
                ),
            },
            "Drain",
          ),
    ),
  );
}
