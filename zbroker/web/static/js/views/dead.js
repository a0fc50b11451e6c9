// Dead letters of one service: GET /api/v1/queues/{s}/dead; redrive or drop the
// selected ones, or all of them (POST /queues/{s}/dead/redrive|drop).

import { api } from "../api.js";
import { h, fill, show, when, poll, attempt, Selection } from "../dom.js";
import { replaceParams } from "../router.js";
import { serviceChooser } from "./services.js";
import { selectableId } from "./tasks.js";

export const title = "Dead letters";

export function mount(root, params) {
  let service = params.service || "";
  let rows = [];
  // Boxes are checked in place: a row is not drawn again unless the list changed.
  const selection = new Selection(() => {
    selection.sync(table);
    drawActions();
  });
  let drawn = "";
  const chooser = serviceChooser(service, (chosen) => {
    service = chosen;
    selection.clear();
    replaceParams({ service });
    refresh();
  });
  const actionBar = h("div.actions.selection");
  const table = h("table.grid.dead");
  const outcome = h("p.outcome", { role: "status" });
  fill(
    root,
    h("div.viewbar", h("h2", {}, "Dead letters"), h("label", {}, "service ", chooser.element), h("span.source", {}, "GET /api/v1/queues/{service}/dead, every 2 s")),
    actionBar,
    outcome,
    h("div.scroll", table),
  );

  async function refresh() {
    if (!service) {
      rows = [];
      fill(table, h("tbody", {}, h("tr", {}, h("td.empty", {}, "Choose a service."))));
      drawActions();
      return;
    }
    rows = await api(`/queues/${encodeURIComponent(service)}/dead`);
    selection.keep(rows.map((r) => r.id));
    draw();
  }

  function draw() {
    const shown = JSON.stringify([service, rows]);
    if (shown === drawn) return;
    drawn = shown;
    const ids = rows.map((r) => r.id);
    const head = h("tr", {}, h("th", {}, selection.allBox(ids)), h("th", "id"), ["seq", "attempt"].map((c) => h("th.num", c)), ["created_at", "finished_at", "error"].map((c) => h("th", c)));
    const body = rows.length
      ? rows.map((d) =>
          h(
            "tr",
            { dataset: { task: d.id } },
            selectableId(selection, d.id),
            h("td.num", {}, show(d.seq)),
            h("td.num", {}, show(d.attempt)),
            h("td", {}, when(d.created_at)),
            h("td", {}, when(d.finished_at)),
            h("td.error-text", {}, show(d.error)),
          ),
        )
      : [h("tr", {}, h("td.empty", { colspan: 7 }, `No dead letters in ${service}.`))];
    fill(table, h("thead", {}, head), h("tbody", {}, body));
    drawActions();
  }

  function drawActions() {
    const chosen = [...selection.ids];
    const none = !chosen.length;
    fill(
      actionBar,
      h("span.count", {}, `${chosen.length} selected`),
      h("button", { disabled: none, dataset: { action: "redrive" }, onclick: () => act("redrive", chosen) }, "Redrive selected"),
      h("button.danger", { disabled: none, dataset: { action: "drop" }, onclick: () => act("drop", chosen) }, "Drop selected"),
      h("button", { disabled: !rows.length, dataset: { action: "redrive-all" }, onclick: () => act("redrive", null) }, "Redrive all"),
      h("button.danger", { disabled: !rows.length, dataset: { action: "drop-all" }, onclick: () => act("drop", null) }, "Drop all"),
    );
  }

  async function act(verb, ids) {
    const what = ids ? `${ids.length} dead letter(s)` : "every dead letter";
    if (verb === "drop" && !confirm(`Drop ${what} of ${service}? They cannot be redriven after.`)) return;
    const answer = await attempt(`${verb === "drop" ? "Dropping" : "Redriving"} ${what} of ${service}`, () =>
      api(`/queues/${encodeURIComponent(service)}/dead/${verb}`, { method: "POST", body: ids ? { ids } : {} }),
    );
    if (answer !== undefined) outcome.textContent = `${verb}: ${JSON.stringify(answer)}`;
    selection.clear();
    selection.sync(table);
    await attempt("Reading the dead letters", refresh);
  }

  return poll("Reading the dead letters", refresh, 2000, chooser.stop);
}
