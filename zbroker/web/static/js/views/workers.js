// Workers: GET /api/v1/workers (as `zbroker workers --json`), polled once a second.
// Rows are kept by worker id and updated in place.

import { api } from "../api.js";
import { h, fill, show, poll, attempt, KeyedRows, setCell } from "../dom.js";
import { href } from "../router.js";

export const title = "Workers";

const FIELDS = ["worker", "service", "dialect", "state", "credit", "held", "tasks", "tags", "last_seen_s", "metrics"];

export function mount(root) {
  const body = h("tbody");
  const rows = new KeyedRows(body, {
    key: (w) => w.worker,
    build: (w) => h("tr", { dataset: { worker: w.worker } }, FIELDS.map((field) => h("td", { dataset: { field } })), h("td.actions")),
    update,
    empty: "No workers registered.",
    columns: FIELDS.length + 1,
  });
  fill(
    root,
    h("div.viewbar", h("h2", "Workers"), h("span.source", {}, "GET /api/v1/workers, every 1 s")),
    h(
      "p.note",
      {},
      "last_seen_s: seconds since the broker last heard from the worker, as the broker " +
        "reported it; held: how many tasks the broker lists under it; metrics: what the worker " +
        "sent with its last heartbeat.",
    ),
    h(
      "div.scroll",
      h(
        "table.grid.workers",
        {},
        h("thead", {}, h("tr", {}, FIELDS.map((f) => h(["credit", "held", "last_seen_s"].includes(f) ? "th.num" : "th", f)), h("th"))),
        body,
      ),
    ),
  );
  return poll("Reading the workers", async () => rows.render(await api("/workers")));
}

function update(tr, w) {
  const tasks = w.tasks || [];
  const cells = {
    worker: [w.worker, h("span.mono", w.worker)],
    service: [show(w.service)],
    dialect: [show(w.dialect)],
    state: [show(w.state), h(`span.badge.state-${w.state}`, show(w.state))],
    credit: [show(w.credit)],
    held: [String(tasks.length)],
    tasks: [show(tasks), tasks.length ? tasks.map((id) => h("a.mono", { href: href("task", { id }) }, id, " ")) : "–"],
    tags: [show(w.tags), (w.tags || []).map((t) => h("span.tag", t))],
    last_seen_s: [show(w.last_seen_s)],
    metrics: [show(w.metrics), h("span.mono", show(w.metrics))],
  };
  for (const [field, [shown, content]] of Object.entries(cells)) {
    const td = tr.querySelector(`td[data-field="${field}"]`);
    td.classList.toggle("num", ["credit", "held", "last_seen_s"].includes(field));
    setCell(td, shown, content ?? shown);
  }
  const actions = tr.querySelector("td.actions");
  const draining = w.state === "draining";
  if (actions.dataset.draining === String(draining)) return;
  actions.dataset.draining = String(draining);
  fill(
    actions,
    draining
      ? null
      : h(
          "button",
          {
            dataset: { action: "drain" },
            title: "No new tasks; the worker finishes those it holds",
            onclick: () =>
              attempt(`Draining ${w.worker}`, () => api(`/workers/${encodeURIComponent(w.worker)}/drain`, { method: "POST" })),
          },
          "Drain",
        ),
  );
}
