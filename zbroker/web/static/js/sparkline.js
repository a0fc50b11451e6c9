// Sparklines: a series of values the page sampled from the API, drawn as inline SVG.
// The values are the API's own figures; only their history is the page's.

const SVG = "http://www.w3.org/2000/svg";

/** Keeps the last `size` samples of several named series per key (a service). */
export class History {
  constructor(size = 90) {
    this.size = size;
    this.series = new Map();
  }

  push(key, sample) {
    let byName = this.series.get(key);
    if (!byName) this.series.set(key, (byName = new Map()));
    for (const [name, value] of Object.entries(sample)) {
      let values = byName.get(name);
      if (!values) byName.set(name, (values = []));
      values.push(typeof value === "number" ? value : null);
      if (values.length > this.size) values.shift();
    }
  }

  get(key, name) {
    const byName = this.series.get(key);
    return (byName && byName.get(name)) || [];
  }
}

/** An SVG sparkline of `values` (null: no figure then), scaled to its own maximum. */
export function sparkline(values, { width = 120, height = 24, title = "" } = {}) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  if (title) {
    const label = document.createElementNS(SVG, "title");
    label.textContent = title;
    svg.append(label);
    svg.setAttribute("aria-label", title);
  }
  const numbers = values.filter((v) => v !== null);
  if (!numbers.length) return svg;
  const max = Math.max(...numbers) || 1;
  const step = values.length > 1 ? width / (values.length - 1) : width;
  const y = (v) => (height - 2 - (v / max) * (height - 4)).toFixed(1);
  let path = "";
  let pen = "M";
  values.forEach((v, i) => {
    if (v === null) {
      pen = "M";
      return;
    }
    path += `${pen}${(i * step).toFixed(1)},${y(v)} `;
    pen = "L";
  });
  const line = document.createElementNS(SVG, "path");
  line.setAttribute("d", path.trim());
  svg.append(line);
  const last = values[values.length - 1];
  if (last !== null) {
    const dot = document.createElementNS(SVG, "circle");
    dot.setAttribute("cx", ((values.length - 1) * step).toFixed(1));
    dot.setAttribute("cy", y(last));
    dot.setAttribute("r", "2");
    svg.append(dot);
  }
  return svg;
}
