// Tasks and their dependencies (depends_on) as a layered graph in SVG. Seeds: one
// task (#graph?id=) or a service's tasks (#graph?service=); dependencies outside
// the seeds are read one by one (GET /tasks/{id}), up to MAX_NODES tasks.

import { api } from "../api.js";
import { h, fill, poll } from "../dom.js";
import { href, replaceParams } from "../router.js";
import { listTasks, STATES } from "./tasks.js";
import { serviceChooser } from "./services.js";

export const title = "Graph";

const SVG = "http://www.w3.org/2000/svg";
const MAX_NODES = 150;
const PER_STATE = 50;
const NODE_W = 200;
const NODE_H = 42;
const GAP_X = 70;
const GAP_Y = 16;

export function mount(root, params) {
  let seed = { id: params.id || "", service: params.service || "" };
  const idInput = h("input.mono.taskid", { value: seed.id, placeholder: "task id", "aria-label": "task id" });
  const chooser = serviceChooser(seed.service, (service) => {
    seed = { id: "", service };
    idInput.value = "";
    replaceParams(seed);
    refresh();
  }, { autoPick: !seed.id });
  const canvas = h("div.graph");
  const note = h("p.note");
  fill(
    root,
    h(
      "div.viewbar",
      h("h2", {}, "Graph"),
      h("form", { onsubmit: (e) => (e.preventDefault(), (seed = { id: idInput.value.trim(), service: "" }), replaceParams(seed), refresh()) }, idInput, h("button", {}, "Around task")),
      h("label", {}, "or service ", chooser.element),
      h("span.source", {}, "GET /api/v1/tasks, every 3 s"),
    ),
    note,
    canvas,
  );

  async function refresh() {
    const nodes = await collect(seed);
    if (!nodes.size) {
      note.textContent = "Choose a task or a service.";
      canvas.replaceChildren();
      return;
    }
    note.textContent = `${nodes.size} task(s)${nodes.size >= MAX_NODES ? ` (the first ${MAX_NODES})` : ""}; an arrow goes from a task to one that depends on it.`;
    fill(canvas, draw(nodes, seed.id));
  }

  return poll("Reading the task graph", refresh, 3000, chooser.stop);
}

async function collect(seed) {
  const nodes = new Map();
  let service = seed.service;
  if (seed.id) {
    const task = await api(`/tasks/${encodeURIComponent(seed.id)}`);
    nodes.set(task.id, task);
    service = task.service;
  }
  if (service) {
    const listed = new Map();
    for (const state of STATES) {
      const { rows } = await listTasks(service, state, PER_STATE);
      for (const row of rows) listed.set(row.id, row);
    }
    if (seed.id) addConnected(nodes, listed);
    else for (const [id, row] of listed) if ((row.depends_on || []).length || dependedOn(listed, id)) nodes.set(id, row);
  }
  await resolveDependencies(nodes);
  return nodes;
}

function dependedOn(rows, id) {
  for (const row of rows.values()) if ((row.depends_on || []).includes(id)) return true;
  return false;
}

/** Add the listed tasks linked to `nodes` through dependencies, either way, until none is left. */
function addConnected(nodes, listed) {
  let grew = true;
  while (grew && nodes.size < MAX_NODES) {
    grew = false;
    for (const [id, row] of listed) {
      if (nodes.has(id)) continue;
      const deps = row.depends_on || [];
      const linked = deps.some((d) => nodes.has(d)) || [...nodes.values()].some((n) => (n.depends_on || []).includes(id));
      if (linked) {
        nodes.set(id, row);
        grew = true;
      }
    }
  }
}

async function resolveDependencies(nodes) {
  const queue = [...nodes.values()].flatMap((n) => n.depends_on || []);
  while (queue.length && nodes.size < MAX_NODES) {
    const id = queue.shift();
    if (nodes.has(id)) continue;
    try {
      const task = await api(`/tasks/${encodeURIComponent(id)}`);
      nodes.set(id, task);
      queue.push(...(task.depends_on || []));
    } catch (exc) {
      if (exc.status !== 404) throw exc;
      nodes.set(id, { id, service: "?", state: "gone", depends_on: [] }); // its record has expired
    }
  }
}

/** Each task's layer: 0 for a task with no dependency in the graph, else one past its deepest. */
function layers(nodes) {
  const layer = new Map();
  const visit = (id, trail) => {
    if (layer.has(id)) return layer.get(id);
    if (trail.has(id)) return 0; // a cycle cannot happen; never loop on one anyway
    trail.add(id);
    const deps = (nodes.get(id).depends_on || []).filter((d) => nodes.has(d));
    const depth = deps.length ? 1 + Math.max(...deps.map((d) => visit(d, trail))) : 0;
    layer.set(id, depth);
    return depth;
  };
  for (const id of nodes.keys()) visit(id, new Set());
  return layer;
}

function draw(nodes, focus) {
  const layer = layers(nodes);
  const columns = [];
  for (const [id, depth] of layer) (columns[depth] ||= []).push(id);
  const at = new Map();
  columns.forEach((ids, x) => ids.sort().forEach((id, y) => at.set(id, { x: 10 + x * (NODE_W + GAP_X), y: 10 + y * (NODE_H + GAP_Y) })));
  const width = 20 + columns.length * (NODE_W + GAP_X);
  const height = 20 + Math.max(...columns.map((c) => c.length)) * (NODE_H + GAP_Y);
  const svg = el("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "dag" });
  svg.append(arrowHead());
  for (const [id, node] of nodes) {
    for (const dep of node.depends_on || []) {
      if (!at.has(dep)) continue;
      const a = at.get(dep);
      const b = at.get(id);
      const x1 = a.x + NODE_W;
      const y1 = a.y + NODE_H / 2;
      const x2 = b.x - 4;
      const y2 = b.y + NODE_H / 2;
      const mid = (x1 + x2) / 2;
      svg.append(el("path", { class: "edge", d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`, "marker-end": "url(#arrow)" }));
    }
  }
  for (const [id, node] of nodes) {
    const { x, y } = at.get(id);
    const link = el("a", { href: href("task", { id }), class: `node state-${node.state}${id === focus ? " focus" : ""}`, "data-task": id });
    link.append(
      el("rect", { x, y, width: NODE_W, height: NODE_H, rx: 6 }),
      text(x + 8, y + 17, id, "id"),
      text(x + 8, y + 33, `${node.service} · ${node.state}${node.blocked_on ? ` · waits on ${node.blocked_on}` : ""}`, "meta"),
    );
    svg.append(link);
  }
  return svg;
}

function el(name, attrs) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

function text(x, y, content, cls) {
  const t = el("text", { x, y, class: cls });
  t.textContent = content;
  return t;
}

function arrowHead() {
  const defs = el("defs", {});
  const marker = el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" });
  marker.append(el("path", { d: "M0,0 L10,5 L0,10 z" }));
  defs.append(marker);
  return defs;
}
