// The console's shell: the header (connection state, bearer token), the tabs, and
// which view is mounted, after the URL hash.

import { api, connection, onConnection, setToken, token } from "./api.js";
import { h, fill, mountErrors, attempt } from "./dom.js";
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
  });
  document.getElementById("token-clear").addEventListener("click", () => {
    input.value = "";
    setToken("");
    show(current());
  });
  fill(
    document.querySelector("nav"),
    TABS.map((name) => h("a", { href: href(name), dataset: { view: name } }, VIEWS[name].title)),
  );
}

/** The broker's health, once in a while, for the header (GET /health, GET /stats). */
async function health() {
  const out = document.getElementById("broker");
  const stats = await attempt("Reading the broker's status", () => api("/stats"));
  if (!stats) return;
  const journal = stats.journal || {};
  out.textContent = `broker up ${stats.uptime_s ?? "?"} s · ${stats.services ?? "?"} services · ${stats.workers ?? "?"} workers · ${journal.durability ?? ""}`;
  out.title = "GET /api/v1/stats";
}

mountErrors(document.getElementById("errors"));
header();
onRoute(show);
show(current());
health();
setInterval(() => connection.state !== "unauthorized" && health(), 10000);
