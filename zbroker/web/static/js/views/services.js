// A service chooser filled from GET /api/v1/queues (any name may also be typed).

import { api } from "../api.js";
import { h } from "../dom.js";

let listId = 0;

/** `autoPick`: with no service given, choose the first one the broker lists. */
export function serviceChooser(initial, onChoose, { autoPick = true } = {}) {
  const id = `services-${++listId}`;
  const options = h("datalist", { id });
  const input = h("input.service", {
    list: id,
    value: initial,
    placeholder: "service",
    "aria-label": "service",
    onchange: () => onChoose(input.value.trim()),
  });
  let stopped = false;
  api("/queues")
    .then((rows) => {
      if (stopped) return;
      options.replaceChildren(...rows.map((r) => h("option", { value: r.service })));
      if (autoPick && !input.value && rows.length) {
        input.value = rows[0].service;
        onChoose(input.value);
      }
    })
    .catch(() => {}); // the queues view reports a failing /queues; the field still takes a name
  return { element: h("span", {}, input, options), stop: () => (stopped = true) };
}
