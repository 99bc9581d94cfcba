// Line charts as plain SVG: no library, nothing fetched from the internet.
"use strict";

const SVG = "http://www.w3.org/2000/svg";

function svgNode(name, attributes) {
  const node = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  return node;
}

// series: [{name, color, points: [[x, y], ...]}]; draws axes with min/max labels, a line and
// one <circle class="point" data-series=name> per point (tests count them).
function drawChart(container, series) {
  const width = 600, height = container.clientHeight > 160 ? 240 : 140, pad = 36;
  const all = series.flatMap((s) => s.points);
  container.replaceChildren();
  const svg = svgNode("svg", { viewBox: `0 0 ${width} ${height}`, preserveAspectRatio: "none" });
  container.appendChild(svg);
  if (all.length === 0) {
    const empty = svgNode("text", { x: width / 2, y: height / 2, "text-anchor": "middle", fill: "#6b7280" });
    empty.textContent = "waiting for the first step…";
    svg.appendChild(empty);
    return;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const sx = (x) => pad + ((x - x0) / (x1 - x0 || 1)) * (width - 2 * pad);
  const sy = (y) => height - pad / 2 - ((y - y0) / (y1 - y0)) * (height - pad);
  svg.appendChild(svgNode("line", { x1: pad, y1: height - pad / 2, x2: width - pad, y2: height - pad / 2, stroke: "#9aa3b2" }));
  svg.appendChild(svgNode("line", { x1: pad, y1: pad / 2, x2: pad, y2: height - pad / 2, stroke: "#9aa3b2" }));
  const label = (text, x, y, anchor) => {
    const node = svgNode("text", { x, y, "font-size": 11, fill: "#4b5563", "text-anchor": anchor });
    node.textContent = text;
    svg.appendChild(node);
  };
  label(formatNumber(y1), pad - 4, pad / 2 + 8, "end");
  label(formatNumber(y0), pad - 4, height - pad / 2, "end");
  label(`step ${x0}`, pad, height - 2, "start");
  label(`step ${x1}`, width - pad, height - 2, "end");
  for (const s of series) {
    if (s.points.length === 0) continue;
    const path = s.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    svg.appendChild(svgNode("path", { d: path, fill: "none", stroke: s.color, "stroke-width": 2 }));
    for (const p of s.points) {
      svg.appendChild(svgNode("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: s.color, class: "point", "data-series": s.name }));
    }
  }
}

function formatNumber(value) {
  if (value === 0) return "0";
  const magnitude = Math.abs(value);
  return magnitude >= 1000 || magnitude < 0.01 ? value.toExponential(1) : value.toPrecision(3);
}
