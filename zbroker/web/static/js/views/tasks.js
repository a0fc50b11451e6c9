// Tasks of one service in one state: GET /api/v1/tasks?service=&state=&limit=&after=,
// with a selection and the actions that apply to it (cancel; redrive and drop for
// dead letters). A task's id opens its detail (#task?id=).

import { api } from "../api.js";
import { h, fill, show, when, poll, attempt, Selection } from "../dom.js";
import { href, replaceParams } from "../router.js";
import { serviceChooser } from "./services.js";

// The states GET /tasks lists (zbroker.protocol.zbc.LISTABLE_STATES).
export const STATES = [
  "ready",
  "delayed",
  "blocked",
  "inflight",
  "done",
  "dead",
  "cancelled",
  "expired",
  "upstream_failed",
];
const CANCELLABLE = new Set(["ready", "delayed", "blocked", "inflight"]);

export const title = "Tasks";

/** A page of GET /tasks as {rows, after}: `after` is where the next page starts, or null. */
export async function listTasks(service, state, limit, after = 0) {
  const query = new URLSearchParams({ service, state, limit: String(limit), after: String(after) });
  const answer = await api(`/tasks?${query}`);
  return { rows: answer.tasks, after: answer.next_after ?? null };
}

/** The first cells of a task's row: its checkbox and its id, a link to it. */
export function selectableId(selection, id) {
  return [h("td", {}, selection.box(id)), h("td.mono", {}, h("a", { href: href("task", { id }) }, id))];
}

export function mount(root, params) {
  const view = { service: params.service || "", state: params.state || "ready", limit: 100, after: 0 };
  // Boxes are checked in place: a row is not drawn again unless the list changed.
  const selection = new Selection(() => {
    selection.sync(table);
    drawActions();
  });
  let drawn = "";
  let rows = [];
  let next = null;

  const stateSelect = h(
    "select",
    {
      "aria-label": "state",
      onchange: () => {
        view.state = stateSelect.value;
        view.after = 0;
        changed();
      },
    },
    STATES.map((s) => h("option", { value: s, selected: s === view.state }, s)),
  );
  const chooser = serviceChooser(view.service, (service) => {
    view.service = service;
    view.after = 0;
    changed();
  });
  const actionBar = h("div.actions.selection");
  const table = h("table.grid.tasks");
  const pager = h("div.pager");
  fill(
    root,
    h(
      "div.viewbar",
      h("h2", {}, "Tasks"),
      h("label", {}, "service ", chooser.element),
      h("label", {}, "state ", stateSelect),
      h("span.source", {}, "GET /api/v1/tasks, every 2 s"),
    ),
    actionBar,
    h("div.scroll", table),
    pager,
  );

  function changed() {
    selection.clear();
    drawn = "";
    replaceParams({ service: view.service, state: view.state });
    refresh();
  }

  async function refresh() {
    if (!view.service) {
      rows = [];
      next = null;
      fill(table, h("tbody", {}, h("tr", {}, h("td.empty", {}, "Choose a service."))));
      drawActions();
      return;
    }
    const page = await listTasks(view.service, view.state, view.limit, view.after);
    rows = page.rows;
    next = page.after;
    selection.keep(rows.map((r) => r.id));
    draw();
  }

  function draw() {
    const shown = JSON.stringify([rows, next, view]);
    if (shown === drawn) return;
    drawn = shown;
    const ids = rows.map((r) => r.id);
    const head = h(
      "tr",
      {},
      h("th", {}, selection.allBox(ids)),
      ["id", "state"].map((c) => h("th", c)),
      ["priority", "attempt"].map((c) => h("th.num", c)),
      ["created_at", "finished_at", "depends_on", "error"].map((c) => h("th", c)),
    );
    const body = rows.length
      ? rows.map((t) =>
          h(
            "tr",
            { dataset: { task: t.id } },
            selectableId(selection, t.id),
            h("td", {}, h(`span.badge.state-${t.state}`, {}, t.state)),
            h("td.num", {}, show(t.priority)),
            h("td.num", {}, `${show(t.attempt)} / ${show(t.max_attempts)}`),
            h("td", {}, when(t.created_at)),
            h("td", {}, when(t.finished_at)),
            h("td.mono", {}, (t.depends_on || []).length ? h("a", { href: href("graph", { id: t.id }) }, show(t.depends_on)) : "–"),
            h(t.error ? "td.error-text" : "td", {}, show(t.error)),
          ),
        )
      : [h("tr", {}, h("td.empty", { colspan: 9 }, `No ${view.state} tasks in ${view.service}.`))];
    fill(table, h("thead", {}, head), h("tbody", {}, body));
    fill(
      pager,
      view.after > 0
        ? h("button", { onclick: () => ((view.after = 0), refresh()) }, "First page")
        : null,
      next !== null && next !== undefined
        ? h("button", { onclick: () => ((view.after = next), refresh()) }, "Next page")
        : null,
    );
    drawActions();
  }

  function drawActions() {
    const chosen = [...selection.ids];
    const buttons = [h("span.count", {}, `${chosen.length} selected`)];
    if (CANCELLABLE.has(view.state)) {
      buttons.push(
        h(
          "button.danger",
          { disabled: !chosen.length, dataset: { action: "cancel" }, onclick: () => cancel(chosen) },
          "Cancel selected",
        ),
      );
    }
    if (view.state === "dead") {
      buttons.push(h("a", { href: href("dead", { service: view.service }) }, "Redrive or drop in Dead letters"));
    }
    fill(actionBar, buttons);
  }

  async function cancel(ids) {
    await attempt(`Cancelling ${ids.length} task(s)`, async () => {
      for (const id of ids) await api(`/tasks/${encodeURIComponent(id)}/cancel`, { method: "POST" });
    });
    selection.clear();
    selection.sync(table);
    await attempt("Reading the tasks", refresh);
  }

  return poll("Reading the tasks", refresh, 2000, chooser.stop);
}
