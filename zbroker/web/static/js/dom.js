// Small DOM helpers shared by the views: element building, how a value from the
// API is written (as it is: the console shows the API's numbers, never its own
// derivations), the error area and polling.

/** h("td.num", {title: "x"}, "text", child, ...): an element. */
export function h(tag, attrs = {}, ...children) {
  if (attrs instanceof Node || typeof attrs !== "object" || Array.isArray(attrs)) {
    children.unshift(attrs); // no attributes: the second argument is a child
    attrs = {};
  }
  const [name, ...classes] = tag.split(".");
  const el = document.createElement(name || "div");
  if (classes.length) el.className = classes.join(" ");
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

/** Replace the children of `el`. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** A value from the API as text: exactly its JSON number or string, "–" for none. */
export function show(value) {
  if (value === null || value === undefined) return "–";
  if (Array.isArray(value)) return value.length ? value.map(show).join(", ") : "–";
  if (typeof value === "object") {
    const entries = Object.entries(value);
    return entries.length ? entries.map(([k, v]) => `${k}=${show(v)}`).join(" ") : "–";
  }
  return String(value);
}

/** A time from the API (seconds since the epoch) as local time; the raw value in its title. */
export function when(epochS) {
  if (epochS === null || epochS === undefined || epochS === 0) return h("span", {}, "–");
  const date = new Date(epochS * 1000);
  const text = date.toLocaleTimeString([], { hour12: false }) + "." +
    String(date.getMilliseconds()).padStart(3, "0");
  return h("time", { title: `${epochS} (${date.toISOString()})` }, text);
}

// --- errors -------------------------------------------------------------------

let errorList = null;

export function mountErrors(el) {
  errorList = el;
}

/** Show an error readably: what was being done, the API's code and message. */
export function showError(doing, exc) {
  if (exc && exc.name === "AbortError") return;
  const code = exc && exc.code ? exc.code : "error";
  const status = exc && exc.status ? ` (HTTP ${exc.status})` : "";
  const message = exc && exc.message ? exc.message : String(exc);
  const item = h(
    "div.error",
    { role: "alert", dataset: { code } },
    h("strong", {}, doing),
    h("span.code", {}, `${code}${status}`),
    h("span.message", {}, message),
    h("button.dismiss", { title: "Dismiss", onclick: () => item.remove() }, "×"),
  );
  errorList.prepend(item);
  while (errorList.children.length > 5) errorList.lastChild.remove();
}

/** Run `action`; an error is shown, not thrown. What it returned, or undefined. */
export async function attempt(doing, action) {
  try {
    return await action();
  } catch (exc) {
    showError(doing, exc);
    return undefined;
  }
}

// --- polling ------------------------------------------------------------------

/**
 * Call `tick` now and then every `intervalMs` after each call ends, until the
 * returned stop function is called (which also calls `onStop`). A failed tick is
 * shown once per failure run.
 */
export function poll(doing, tick, intervalMs = 1000, onStop = () => {}) {
  let timer = null;
  let stopped = false;
  let failing = false;
  const run = async () => {
    try {
      await tick();
      failing = false;
    } catch (exc) {
      if (!failing) showError(doing, exc);
      failing = true;
    }
    if (!stopped) timer = setTimeout(run, intervalMs);
  };
  run();
  return () => {
    stopped = true;
    clearTimeout(timer);
    onStop();
  };
}

/** A checkbox selection over rows keyed by id, with "all" handling. */
export class Selection {
  constructor(onChange) {
    this.ids = new Set();
    this.onChange = onChange;
  }

  box(id) {
    return h("input", {
      type: "checkbox",
      checked: this.ids.has(id),
      "aria-label": `select ${id}`,
      dataset: { id },
      onchange: (event) => {
        if (event.target.checked) this.ids.add(id);
        else this.ids.delete(id);
        this.onChange();
      },
    });
  }

  allBox(ids) {
    return h("input", {
      type: "checkbox",
      "aria-label": "select all",
      dataset: { all: ids.join(" ") },
      checked: ids.length > 0 && ids.every((id) => this.ids.has(id)),
      onchange: (event) => {
        for (const id of ids) {
          if (event.target.checked) this.ids.add(id);
          else this.ids.delete(id);
        }
        this.onChange();
      },
    });
  }

  /** Check the boxes under `root` that are selected, uncheck the others. */
  sync(root) {
    for (const box of root.querySelectorAll("input[data-id]")) box.checked = this.ids.has(box.dataset.id);
    for (const box of root.querySelectorAll("input[data-all]")) {
      const ids = box.dataset.all.split(" ").filter(Boolean);
      box.checked = ids.length > 0 && ids.every((id) => this.ids.has(id));
    }
  }

  /** Forget ids no longer listed. */
  keep(ids) {
    const listed = new Set(ids);
    for (const id of this.ids) if (!listed.has(id)) this.ids.delete(id);
  }

  clear() {
    this.ids.clear();
  }
}

/**
 * Rows of a table body kept by key across refreshes: a row is built once
 * (`build(item)`), then `update(tr, item)` puts the new figures in it, so that
 * nothing under the pointer is replaced while the data stays the same.
 */
export class KeyedRows {
  constructor(body, { key, build, update, empty, columns }) {
    this.body = body;
    this.rows = new Map();
    Object.assign(this, { key, build, update, empty, columns });
  }

  render(items) {
    const listed = new Set(items.map(this.key));
    for (const [key, tr] of this.rows) {
      if (!listed.has(key)) {
        tr.remove();
        this.rows.delete(key);
      }
    }
    if (!items.length) {
      fill(this.body, h("tr", {}, h("td.empty", { colspan: this.columns }, this.empty)));
      return;
    }
    this.body.querySelector("td.empty")?.parentElement.remove();
    for (const item of items) {
      let tr = this.rows.get(this.key(item));
      if (!tr) this.rows.set(this.key(item), (tr = this.build(item)));
      this.update(tr, item);
      this.body.append(tr); // in the API's order (appending moves a row already there)
    }
  }
}

/** Set a cell's content, only when its text changed. */
export function setCell(td, shown, content = shown) {
  if (td.dataset.shown === shown) return;
  td.dataset.shown = shown;
  fill(td, content);
}
