// Line charts as plain SVG: no library, nothing fetched from the internet.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function svgNode(name, attributes) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  return node;
}

// About five round values from lo to hi (1, 2 or 5 times a power of ten apart).
function niceTicks(lo, hi, count = 5) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const raw = span / count, power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

// series: [{name, color, points: [[x, y], ...], dash?}]; options: {xLabel, yLabel, yRange, empty}.
// Draws axes with round ticks and titles, a line and one <circle class="point"
// data-series=name> per point (tests count them). The SVG is drawn at the container's own
// pixel size (no stretching), and the left margin is measured from the widest tick label,
// so no label is ever cut off, whatever the values' magnitude.
function drawChart(container, series, options = {}) {
  const width = container.clientWidth || 600, height = container.clientHeight || 240;
  const xLabel = options.xLabel ?? "step", yLabel = options.yLabel ?? "";
  const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  container.replaceChildren();
  const svg = svgNode("svg", { viewBox: `0 0 ${width} ${height}`, width, height });
  container.appendChild(svg);
  if (all.length === 0) {
    const empty = svgNode("text", { x: width / 2, y: height / 2, "text-anchor": "middle", fill: "#6b7280" });
    empty.textContent = options.empty ?? "waiting for the first step…";
    svg.appendChild(empty);
    return;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  // A fixed range where the quantity has one (accuracy: 0 to 1), else the data's own.
  if (options.yRange) [y0, y1] = [Math.min(y0, options.yRange[0]), Math.max(y1, options.yRange[1])];
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const text = (content, attributes) => {
    const node = svgNode("text", { "font-size": 11, fill: "#4b5563", ...attributes });
    node.textContent = content;
    svg.appendChild(node);
    return node;
  };
  // The y range widened to round values, so both ends carry a label.
  let yTicks = niceTicks(y0, y1, height > 160 ? 5 : 3);
  if (yTicks.length > 1) {
    const step = yTicks[1] - yTicks[0];
    if (yTicks[0] > y0) yTicks.unshift(Number((yTicks[0] - step).toPrecision(12)));
    if (yTicks[yTicks.length - 1] < y1) yTicks.push(Number((yTicks[yTicks.length - 1] + step).toPrecision(12)));
    [y0, y1] = [yTicks[0], yTicks[yTicks.length - 1]];
  }
  // Tick labels first, measured in place: the plot starts right of the widest one.
  const yNodes = yTicks.map((v) => text(formatNumber(v), { "text-anchor": "end", "dominant-baseline": "middle" }));
  const widest = Math.max(...yNodes.map((n) => n.getBBox().width));
  const titleRoom = yLabel ? 18 : 0;
  const left = Math.ceil(widest) + 8 + titleRoom, right = 22, top = 12, bottom = 34;
  const sx = (x) => left + ((x - x0) / (x1 - x0)) * (width - left - right);
  const sy = (y) => height - bottom - ((y - y0) / (y1 - y0)) * (height - top - bottom);
  yTicks.forEach((v, i) => {
    yNodes[i].setAttribute("x", left - 6);
    yNodes[i].setAttribute("y", sy(v));
    svg.appendChild(svgNode("line", { x1: left, y1: sy(v), x2: width - right, y2: sy(v), stroke: "#eef0f4" }));
  });
  const xTicks = niceTicks(x0, x1, Math.max(2, Math.floor((width - left) / 90))).filter((v) => Number.isInteger(v) || x1 - x0 < 5);
  for (const v of xTicks) text(formatNumber(v), { x: sx(v), y: height - bottom + 14, "text-anchor": "middle" });
  svg.appendChild(svgNode("line", { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, stroke: "#9aa3b2" }));
  svg.appendChild(svgNode("line", { x1: left, y1: top, x2: left, y2: height - bottom, stroke: "#9aa3b2" }));
  text(xLabel, { x: left + (width - left - right) / 2, y: height - 4, "text-anchor": "middle", class: "axis-title" });
  if (yLabel) {
    const cy = top + (height - top - bottom) / 2;
    text(yLabel, { x: 12, y: cy, "text-anchor": "middle", transform: `rotate(-90 12 ${cy})`, class: "axis-title" });
  }
  for (const s of series) {
    const points = s.points.filter((p) => Number.isFinite(p[1]));
    if (points.length === 0) continue;
    const path = points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    const line = { d: path, fill: "none", stroke: s.color, "stroke-width": 2, "data-series": s.name };
    if (s.dash) line["stroke-dasharray"] = "6 4";
    svg.appendChild(svgNode("path", line));
    for (const p of points) {
      svg.appendChild(svgNode("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: s.color, class: "point", "data-series": s.name }));
    }
  }
}

function formatNumber(value) {
  if (value === 0) return "0";
  const magnitude = Math.abs(value);
  if (magnitude >= 1e5 || magnitude < 1e-3) return value.toExponential(1);
  return Number(value.toPrecision(3)).toString();
}
