// The conversation diagram, drawn as SVG: one lane per participant, one row per node (laid out by
// the server, bus/console/diagram.py). Messages are arrows between lanes, events boxes in their
// lane; marked nodes (contradictions, model calls, block writes, dead letters) are coloured.
"use strict";

const LANE_W = 170, ROW_H = 30, TOP = 44, LEFT = 20, BOX_W = 150, BOX_H = 22;

const SHORT_KINDS = { "llm.call.completed": "model call", "llm.call.failed": "model call failed",
  "memory.contradiction.flagged": "contradiction", "memory.block.set": "block set", "memory.block.appended": "block appended",
  "memory.block.replaced": "block replaced", "memory.fact.recorded": "fact", "memory.fact.superseded": "fact superseded",
  "memory.fact.retracted": "fact retracted", "memory.turn.recorded": "turn", "agent.step": "step",
  "delivery.dead_lettered": "dead-lettered", "delivery.dead_letter.retried": "retried" };

function kindLabel(kind) { return SHORT_KINDS[kind] || kind; }

function laneX(lane) { return LEFT + lane * LANE_W + LANE_W / 2; }

function drawDiagram(diagram, onNode) {
  const width = LEFT * 2 + diagram.lanes.length * LANE_W;
  const height = TOP + diagram.nodes.length * ROW_H + 20;
  const svg = s("svg", { class: "diagram", width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `conversation ${diagram.correlation_id}` });
  svg.append(s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
    s("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#2f5bd3" }))));
  diagram.lanes.forEach((name, lane) => {
    const x = laneX(lane);
    svg.append(s("line", { class: "lane-line", x1: x, y1: TOP - 10, x2: x, y2: height - 10 }));
    svg.append(s("text", { class: "lane-head", x, y: 20, "text-anchor": "middle" }, name));
  });
  for (const node of diagram.nodes) {
    const y = TOP + node.row * ROW_H;
    const classes = ["node", node.to_lane === null || node.to_lane === undefined ? "event" : "message", node.category];
    if (node.mark) classes.push("mark-" + node.mark);
    const g = s("g", { class: classes.join(" "), "data-seq": node.seqs[0], "data-kind": node.kind, tabindex: 0 });
    const title = s("title", {}, `${node.label}${node.count > 1 ? ` (${node.count} events)` : ""} · seq ${node.seqs[0]}`);
    g.append(title);
    if (node.to_lane !== null && node.to_lane !== undefined) {
      const x1 = laneX(node.lane), x2 = laneX(node.to_lane);
      const self = x1 === x2;
      const end = self ? x1 + 40 : x2 + (x2 > x1 ? -6 : 6);
      if (self) g.append(s("path", { d: `M ${x1} ${y + 6} h 40 v 12 h -34`, fill: "none", stroke: "#2f5bd3", "marker-end": "url(#arrow)" }));
      else g.append(s("line", { x1, y1: y + 11, x2: end, y2: y + 11, "marker-end": "url(#arrow)" }));
      g.append(s("rect", { x: Math.min(x1, end), y: y, width: Math.max(Math.abs(end - x1), 40), height: 16, fill: "transparent", stroke: "none" }));
      g.append(s("text", { x: (x1 + (self ? x1 + 40 : x2)) / 2, y: y + 6, "text-anchor": "middle" }, node.label));
    } else {
      const x = laneX(node.lane) - BOX_W / 2;
      g.append(s("rect", { x, y, width: BOX_W, height: BOX_H, rx: 4 }));
      const text = node.count > 1 ? `${node.count} events` : kindLabel(node.kind);
      g.append(s("text", { x: x + 6, y: y + 15 }, text.length > 24 ? text.slice(0, 23) + "…" : text));
    }
    g.addEventListener("click", () => {
      svg.querySelectorAll(".node.selected").forEach((n) => n.classList.remove("selected"));
      g.classList.add("selected");
      onNode(node);
    });
    svg.append(g);
  }
  return svg;
}
