// The page's place lives in the URL hash: #view?key=value&..., so a view can be
// linked to and reloaded.

const listeners = new Set();

export function current() {
  const hash = location.hash.replace(/^#/, "");
  const [view, query = ""] = hash.split("?");
  return { view: view || "queues", params: Object.fromEntries(new URLSearchParams(query)) };
}

export function href(view, params = {}) {
  const query = new URLSearchParams(
    Object.entries(params).filter(([, v]) => v !== undefined && v !== null && v !== ""),
  ).toString();
  return `#${view}${query ? "?" + query : ""}`;
}

export function go(view, params = {}) {
  location.hash = href(view, params);
}

/** Change the params of the current view without redrawing it. */
export function replaceParams(params) {
  history.replaceState(null, "", href(current().view, params));
}

/** Draw the current view afresh (its state changed beyond what it follows). */
export function reload() {
  for (const listener of listeners) listener(current());
}

export function onRoute(listener) {
  listeners.add(listener);
}

window.addEventListener("hashchange", () => {
  for (const listener of listeners) listener(current());
});
