// The console's shell: the header (connection state, bearer token), the tabs, and
// which view is mounted, after the URL hash.

import { api, onConnection, setToken, token } from "./api.js";
import { h, fill, mountErrors } from "./dom.js";
import { current, href, onRoute } from "./router.js";
import * as queues from "./views/queues.js";
import * as workers from "./views/workers.js";
import * as tasks from "./views/tasks.js";
import * as task from "./views/task.js";
import * as dead from "./views/dead.js";
import * as events from "./views/events.js";
import * as graph from "./views/graph.js";

const VIEWS = { queues, workers, tasks, task, dead, events, graph };
const TABS = ["queues", "workers", "tasks", "dead", "events", "graph"];

let unmount = () => {};

function show(route) {
  const view = VIEWS[route.view] || queues;
  unmount();
  const main = document.getElementById("view");
  main.replaceChildren();
  main.dataset.view = route.view in VIEWS ? route.view : "queues";
  for (const tab of document.querySelectorAll("nav a")) {
    tab.classList.toggle("active", tab.dataset.view === main.dataset.view);
  }
  document.title = `${view.title} · zbroker`;
  unmount = view.mount(main, route.params) || (() => {});
}

function header() {
  const badge = document.getElementById("connection");
  onConnection((c) => {
    badge.dataset.state = c.state;
    badge.textContent = c.state === "connected" ? "connected" : c.state;
    badge.title = c.reason || "";
    document.getElementById("token-box").classList.toggle("wanted", c.state === "unauthorized");
  });
  const input = document.getElementById("token");
  input.value = token();
  document.getElementById("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setToken(input.value.trim());
    show(current());
    health();
  });
  document.getElementById("token-clear").addEventListener("click", () => {
    input.value = "";
    setToken("");
    show(current());
    health();
  });
  fill(
    document.querySelector("nav"),
    TABS.map((name) => h("a", { href: href(name), dataset: { view: name } }, VIEWS[name].title)),
  );
}

/** The broker's figures for the header (GET /api/v1/stats, as `zbroker status --json`),
 * every 10 s; a failure is shown in the header (the views report their own). */
async function health() {
  const out = document.getElementById("broker");
  out.title = "GET /api/v1/stats";
  try {
    const stats = await api("/stats");
    const journal = stats.journal || {};
    out.textContent = `broker up ${stats.uptime_s ?? "?"} s · ${stats.services ?? "?"} services · ${stats.workers ?? "?"} workers · ${journal.durability ?? ""}`;
  } catch (exc) {
    out.textContent = `broker status: ${exc.code || "error"}`;
    out.title = exc.message || "";
  }
}

mountErrors(document.getElementById("errors"));
header();
onRoute(show);
show(current());
health();
setInterval(health, 10000);
