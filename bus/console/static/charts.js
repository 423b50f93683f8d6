// Small line charts as SVG: a few series over time, the newest on the right.
"use strict";

const CHART_COLORS = ["#2f5bd3", "#2c7a7b", "#b7791f", "#c53030", "#6b46c1", "#1e8a4c"];

function lineChart(series, opts) {
  const width = (opts && opts.width) || 360, height = (opts && opts.height) || 110, pad = 22;
  const all = series.flatMap((x) => x.points.map((p) => p[1]));
  const times = series.flatMap((x) => x.points.map((p) => p[0]));
  const max = Math.max(1, ...all);
  const t0 = Math.min(...times), t1 = Math.max(...times);
  const span = Math.max(1, t1 - t0);
  const svg = s("svg", { class: "chart", width, height, viewBox: `0 0 ${width} ${height}` });
  svg.append(s("text", { x: 4, y: 12, fill: "#6b7385", "font-size": 10 }, num(max)));
  svg.append(s("line", { x1: pad, y1: height - pad, x2: width - 4, y2: height - pad, stroke: "#dde1e8" }));
  series.forEach((line, i) => {
    if (!line.points.length) return;
    const d = line.points.map(([t, v], k) => {
      const x = pad + ((t - t0) / span) * (width - pad - 6);
      const y = height - pad - (v / max) * (height - pad - 16);
      return `${k ? "L" : "M"}${x.toFixed(1)},${y.toFixed(1)}`;
    }).join(" ");
    svg.append(s("path", { class: "series", d, stroke: CHART_COLORS[i % CHART_COLORS.length], "data-series": line.name }));
  });
  const legend = h("div", { class: "legend" }, series.map((line, i) =>
    h("span", {}, h("i", { style: `background:${CHART_COLORS[i % CHART_COLORS.length]}` }), `${line.name} ${num(line.points.length ? line.points[line.points.length - 1][1] : 0)}`)));
  return h("div", {}, svg, legend);
}
