// One function per view: each takes the route's parameters and returns the element to show.
// Views fetch the console's JSON API; the traffic and health views also take the live stream.
"use strict";

const Views = {};

function agentState(agent) {
  if (agent.lifecycle === "agent.circuit_opened") return badge("circuit open", "circuit");
  if (agent.replicas_alive > 0) return badge("alive", "alive");
  if (!agent.replicas) return badge("sender only", "stopped");  // never ran as an agent here: a client that sends
  return badge(agent.state || "unknown", agent.state || "");
}

function agentLinks(name) {
  return h("span", { class: "links" },
    link(`#/traffic?agent=${encodeURIComponent(name)}`, "traffic"), " · ",
    link(`#/conversations?agent=${encodeURIComponent(name)}`, "conversations"), " · ",
    link(`#/memory/${encodeURIComponent(name)}`, "memory"), " · ",
    link(`#/calls?agent=${encodeURIComponent(name)}`, "model calls"), " · ",
    link(`#/dead?agent=${encodeURIComponent(name)}`, "dead letters"));
}

Views.agents = async function () {
  const { agents } = await api("/api/agents");
  const rows = agents.map((a) => h("tr", { class: "agent-row", dataset: { agent: a.name, alive: a.replicas_alive > 0 ? "1" : "0" } },
    h("td", {}, link(`#/agent/${encodeURIComponent(a.name)}`, a.name)),
    h("td", {}, (a.tags || []).join(", ") || h("span", { class: "muted" }, "–")),
    h("td", { class: "state" }, agentState(a)),
    h("td", { class: "num" }, `${num(a.replicas_alive)}/${num(a.replicas)}`),
    h("td", { class: "num" }, num(a.in_flight)),
    h("td", { class: "num" }, num(a.restarts)),
    h("td", { class: "num" }, a.backlog ? num(a.backlog.pending) : "–"),
    h("td", { class: "num" }, a.backlog ? num(a.backlog.ack_pending) : "–"),
    h("td", {}, ago(a.last_heartbeat)),
    h("td", { class: "num" }, num(a.messages_received)),
    h("td", {}, agentLinks(a.name))));
  return h("section", {},
    h("h1", {}, `Agents (${agents.length})`),
    table(["agent", "tags", "state", { label: "replicas alive", num: true }, { label: "in flight", num: true },
      { label: "restarts", num: true }, { label: "backlog", num: true }, { label: "unacked", num: true }, "heartbeat",
      { label: "received", num: true }, ""], rows, { id: "agents-table" }));
};

Views.agent = async function (route) {
  const name = route.parts[1];
  const { agent, replicas, backlog, operator } = await api(`/api/agents/${encodeURIComponent(name)}`);
  // Stop goes through the bus to the agent's supervisor (recorded), wherever it runs.
  const result = h("span", { class: "stop-result" });
  const stop = h("button", { id: "stop-agent", disabled: !operator, title: operator ? "" : "read-only console: start it with `bus ui --operator`",
    onclick: async () => {
      if (!confirm(`Stop ${agent.name}? Its replicas finish their in-flight work, then exit.`)) return;
      stop.disabled = true;
      try {
        const { stop: answer } = await post(`/api/agents/${encodeURIComponent(name)}/stop`);
        result.textContent = ` stopping: its supervisor (pid ${answer.pid}) stops ${answer.replicas} replica(s)`;
        result.className = "stop-result done";
      } catch (e) { result.textContent = " " + e.message; result.className = "stop-result error"; stop.disabled = false; }
    } }, "Stop");
  return h("section", {},
    h("h1", {}, agent.name, " ", agentState(agent)),
    h("p", {}, agentLinks(agent.name), " ", stop, result),
    kv([["tags", (agent.tags || []).join(", ") || "–"], ["lifecycle", `${agent.lifecycle || "–"} (${ago(agent.lifecycle_at)})`],
      ["first seen", agent.first_seen], ["last seen", ago(agent.last_seen)], ["sent / received", `${num(agent.messages_sent)} / ${num(agent.messages_received)}`],
      ["events recorded", num(agent.events_recorded)], ["restarts / crashes", `${num(agent.restarts)} / ${num(agent.crashes)}`],
      ["backlog", backlog ? `${num(backlog.pending)} pending, ${num(backlog.ack_pending)} unacked, ${num(backlog.redelivered)} redelivered` : "–"]]),
    h("h2", {}, "Replicas"),
    table(["replica", "pid", "state", "alive", { label: "in flight", num: true }, { label: "handled", num: true },
      { label: "failed", num: true }, "heartbeat", "started"],
      replicas.map((r) => h("tr", {}, h("td", {}, r.replica), h("td", {}, num(r.pid)), h("td", {}, badge(r.state || "–")),
        h("td", {}, r.alive ? badge("alive") : badge("no", "stopped")), h("td", { class: "num" }, num(r.in_flight)),
        h("td", { class: "num" }, num(r.handled)), h("td", { class: "num" }, num(r.failed)), h("td", {}, ago(r.last_heartbeat)),
        h("td", {}, ago(r.started_at))))));
};

// -- traffic -----------------------------------------------------------------------------------

// The view lists the newest TRAFFIC_ROWS envelopes (more than a screen): every draw costs the
// browser style, layout and paint of the list in proportion to its rows (measured: 200 rows took ~3x
// the layout time of 50), and nobody reads further down a list that moves.
const TRAFFIC_ROWS = 50;
// At most one draw every MIN_DRAW_MS, in an animation frame (so none while the page is hidden).
// The console pushes a batch every 150 ms while envelopes come, once a second in a flood.
const MIN_DRAW_MS = 100;
// Arrivals are highlighted (a static class, no animation: an animated highlight repaints at the
// display's rate) when a draw brings at most this many: on a quiet bus.
const FRESH_AT_MOST = 3;

// One row, cloned from a template and filled with text (cheaper than building each cell);
// clicks are handled once, on the table body.
const TRAFFIC_ROW = h("tr", { class: "traffic-row clickable" }, h("td", { class: "mono" }), h("td", {}), h("td", {}), h("td", { class: "mono" }), h("td", { class: "num mono" }));

function two(n) { return n < 10 ? "0" + n : String(n); }

function fastClock(ms) {
  const d = new Date(ms);
  return `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}.${String(d.getMilliseconds()).padStart(3, "0")}`;
}

function trafficRow(item, fresh) {
  const route = item.tag ? `${item.sender} → #${item.tag}` : item.to ? `${item.sender} → ${item.to}` : `${item.sender || "?"} (${item.category})`;
  const row = TRAFFIC_ROW.cloneNode(true);
  if (fresh) row.classList.add("fresh");
  row.dataset.seq = item.seq; row.dataset.id = item.id || ""; row.dataset.kind = item.kind;
  const cells = row.children;
  cells[0].textContent = fastClock(item.at);
  cells[1].textContent = item.kind;
  cells[2].textContent = route;
  if (item.corr) cells[3].append(link(`#/conversation/${item.corr}`, shortId(item.corr))); else cells[3].textContent = "–";
  cells[4].textContent = item.seq;
  return row;
}

Views.traffic = async function (route) {
  const f = { agent: route.query.get("agent") || "", kind: route.query.get("kind") || "", tag: route.query.get("tag") || "", corr: route.query.get("corr") || "" };
  const { items } = await api("/api/traffic" + query(Object.assign({ limit: TRAFFIC_ROWS }, f)));
  const body = h("tbody", { id: "traffic-body", onclick: (e) => {
    const row = e.target.closest("tr.traffic-row");
    if (row && e.target.tagName !== "A") App.showEvent(Number(row.dataset.seq));
  } }, items.slice().reverse().map((i) => trafficRow(i, false)));
  const counter = h("span", { class: "muted", id: "traffic-count" }, `${items.length} shown`);
  const inputs = ["agent", "kind", "tag", "corr"].map((k) => h("input", { name: k, placeholder: k === "corr" ? "correlation" : k, value: f[k], size: k === "corr" ? 14 : 10 }));
  const form = h("form", { class: "bar", onsubmit: (e) => {
    e.preventDefault();
    const next = {};
    inputs.forEach((i) => { next[i.name] = i.value.trim(); });
    location.hash = "#/traffic" + query(next);
  } }, inputs, h("button", { type: "submit" }, "filter"), link("#/traffic", "clear"), counter);
  const view = h("section", {}, h("h1", {}, "Traffic ", h("span", { class: "muted" }, "live")), form,
    h("div", { class: "traffic-wrap" }, h("table", { id: "traffic-table" }, h("thead", {}, h("tr", {}, ["time", "kind", "from → to", "conversation", "seq"].map((x) => h("th", {}, x)))), body)));
  // Arrivals queue (the newest TRAFFIC_ROWS of them, the rest counted) until the next draw: one
  // write of the table per draw, whatever came in between.
  let skipped = 0, queued = [], scheduled = false, drawnAt = 0;
  const draw = () => {
    scheduled = false; drawnAt = performance.now();
    if (!body.isConnected) return;  // another view replaced this one
    const items = queued; queued = [];
    const fresh = items.length <= FRESH_AT_MOST;
    for (const row of body.querySelectorAll("tr.fresh")) row.classList.remove("fresh");
    const frag = document.createDocumentFragment();
    for (let i = items.length - 1; i >= 0; i--) frag.append(trafficRow(items[i], fresh));
    if (items.length >= TRAFFIC_ROWS) body.replaceChildren(frag);
    else {
      body.prepend(frag);
      while (body.childElementCount > TRAFFIC_ROWS) body.lastElementChild.remove();
    }
    counter.textContent = `${body.childElementCount} shown` + (skipped ? `, ${num(skipped)} passed too fast to list` : "");
    if (window.__consoleSeen) {
      const now = Date.now();
      for (const it of items) if (it.id) window.__consoleSeen.set(it.id, now);
      // Everything up to the newest sequence drawn is on the page now: listed, or counted as passed.
      if (items.length) window.__consoleReached.push([items[items.length - 1].seq, now]);
    }
  };
  App.follow(f, (batch) => {
    skipped += batch.skipped || 0;
    queued.push(...batch.items);
    if (queued.length > TRAFFIC_ROWS) { skipped += queued.length - TRAFFIC_ROWS; queued = queued.slice(-TRAFFIC_ROWS); }
    if (scheduled) return;
    scheduled = true;
    const wait = drawnAt + MIN_DRAW_MS - performance.now();
    if (wait > 0) setTimeout(() => requestAnimationFrame(draw), wait); else requestAnimationFrame(draw);
  });
  return view;
};

// -- one event, in the side panel ------------------------------------------------------------

async function eventDetail(seq) {
  const { event, lifecycle, cause, effects } = await api(`/api/events/${seq}`);
  const refs = (list) => list.length ? h("ul", {}, list.map((e) => h("li", {}, h("a", { href: "#", onclick: (ev) => { ev.preventDefault(); App.showEvent(e.seq); } }, `seq ${e.seq}`), ` ${e.kind} · ${e.sender || "?"}${e.recipient ? " → " + e.recipient : ""}`))) : h("p", { class: "muted" }, "none");
  return h("div", { class: "event-detail", dataset: { seq: event.seq } },
    h("h2", {}, `${event.kind} `, h("span", { class: "muted" }, `seq ${event.seq}`)),
    kv([["subject", h("code", {}, event.subject)], ["id", h("code", {}, event.id)], ["from", event.sender],
      ["to", event.recipient || (event.tag ? "#" + event.tag : null)], ["stored", event.stored_at],
      ["conversation", event.correlation_id ? link(`#/conversation/${event.correlation_id}`, event.correlation_id) : null],
      event.error ? ["error", h("span", { class: "error" }, event.error)] : null]),
    lifecycle ? [h("h2", {}, "Delivery"), kv([["status", badge(lifecycle.status)], ["deliveries", num(lifecycle.deliveries)],
      ["attempts", num(lifecycle.max_attempt)], ["failures", num(lifecycle.failures)], ["handled by", (lifecycle.handled_by || []).join(", ")],
      ["handler", lifecycle.handler_ms === null ? null : `${num(lifecycle.handler_ms)} ms`], ["publish → handled", lifecycle.handled_ms === null ? null : `${num(lifecycle.handled_ms)} ms`],
      ["last error", lifecycle.last_error], ["dead letter", lifecycle.dead_reason]]),
      lifecycle.last_traceback ? [h("h2", {}, "Traceback"), h("pre", { class: "traceback" }, lifecycle.last_traceback)] : null] : null,
    h("h2", {}, "Caused by"), cause ? refs([cause]) : h("p", { class: "muted" }, "nothing recorded (it started here)"),
    h("h2", {}, "Effects"), refs(effects),
    h("h2", {}, "Payload"), h("pre", {}, json(event.payload)),
    event.headers && Object.keys(event.headers).length ? [h("h2", {}, "Headers"), h("pre", {}, json(event.headers))] : null);
}

// -- conversations ---------------------------------------------------------------------------

Views.conversations = async function (route) {
  const agent = route.query.get("agent") || "";
  const { conversations } = await api("/api/conversations" + query({ agent }));
  return h("section", {}, h("h1", {}, "Conversations", agent ? ` of ${agent}` : ""),
    table(["conversation", "started by", "first kind", { label: "steps", num: true }, { label: "contradictions", num: true }, "started", "last"],
      conversations.map((c) => h("tr", { class: "clickable", onclick: () => { location.hash = `#/conversation/${c.correlation_id}`; } },
        h("td", { class: "mono" }, link(`#/conversation/${c.correlation_id}`, c.correlation_id)), h("td", {}, c.started_by),
        h("td", {}, c.first_kind), h("td", { class: "num" }, num(c.steps)), h("td", { class: "num" }, num(c.contradictions)),
        h("td", {}, c.started_at), h("td", {}, ago(c.last_at))))));
};

Views.conversation = async function (route) {
  const diagram = await api(`/api/conversations/${encodeURIComponent(route.parts[1])}`);
  const marks = diagram.nodes.reduce((acc, n) => { if (n.mark) acc[n.mark] = (acc[n.mark] || 0) + 1; return acc; }, {});
  const svg = drawDiagram(diagram, (node) => App.showNode(node));
  return h("section", {},
    h("h1", {}, "Conversation ", h("span", { class: "mono" }, diagram.correlation_id)),
    h("p", { class: "muted", id: "diagram-summary" }, `${num(diagram.steps)} steps in ${diagram.nodes.length} nodes · ${num(marks.model || 0)} model calls · ${num(marks.contradiction || 0)} contradictions · ${num(marks.block || 0)} block writes`,
      diagram.truncated ? " · (truncated)" : "", " · ", link(`#/traffic?corr=${diagram.correlation_id}`, "its traffic"), " · ",
      link(`#/calls?corr=${diagram.correlation_id}`, "its model calls")),
    replayButton(diagram.correlation_id),
    h("div", { class: "diagram-wrap" }, svg));
};

// -- memory inspector ------------------------------------------------------------------------

function replayButton(corr) {
  const result = h("div", { class: "replay-result" });
  const button = h("button", { id: "replay", onclick: async () => {
    button.disabled = true;
    result.replaceChildren(h("p", { class: "muted" }, "replaying on the recorded model answers…"));
    try {
      const { replay } = await post(`/api/replay/${corr}`);
      result.replaceChildren(h("p", { class: replay.same ? "same" : "error", dataset: { same: String(replay.same) } },
        replay.same ? "the replay matches: same events" : replay.same === false ? "the replay DIFFERS from the log" : "the replay could not run"),
        h("pre", {}, replay.output));
    } catch (e) { result.replaceChildren(h("p", { class: "error" }, e.message)); }
    button.disabled = false;
  } }, "Replay");
  return h("div", { class: "replay" }, button, " re-run the recorded handlers on the recorded model answers (no model is called) and compare", result);
}

function contextParts(context, reported) {
  const max = Math.max(1, ...context.parts.map((p) => p.tokens));
  return h("div", { class: "context" },
    h("p", {}, h("strong", { id: "context-total" }, `${num(context.estimated_tokens)} tokens estimated`),
      reported !== null && reported !== undefined ? ` · ${num(reported)} input tokens reported by the model` : "",
      context.error ? h("span", { class: "error" }, ` · ${context.error}`) : ""),
    h("div", { class: "parts" }, context.parts.map((p) => h("details", { class: `part section-${p.section.replace(/ /g, "-")}`, dataset: { section: p.section } },
      h("summary", {}, h("span", { class: "label" }, p.label), h("span", { class: "muted" }, `${num(p.chars)} chars`),
        h("span", { class: "meter" }, h("span", { style: `width:${(100 * p.tokens / max).toFixed(1)}%` })),
        h("span", { class: "tokens" }, `${num(p.tokens)} tokens`)),
      h("pre", {}, p.text)))));
}

function blockHistory(block) {
  return h("div", { class: "block", dataset: { block: block.block_id } },
    h("h2", {}, `${block.label} `, h("span", { class: "muted mono" }, block.block_id), ` · ${block.versions.length} versions`),
    h("pre", { class: "current" }, block.value || "(empty)"),
    block.versions.slice().reverse().map((v) => h("div", { class: "version", dataset: { version: v.version } },
      h("div", {}, h("strong", {}, `v${v.version}`), ` ${v.op} by `, h("strong", { class: "actor" }, v.actor || "?"),
        ` · seq ${v.seq} · ${v.written_at}`, v.rejected ? h("span", { class: "error" }, ` · rejected: ${v.reject_reason}`) : "",
        v.reason ? h("span", { class: "muted" }, ` · ${v.reason}`) : ""),
      h("div", { class: "diff" }, v.diff.map(([op, line]) => h("span", { class: op === "+" ? "add" : op === "-" ? "del" : "same" }, `${op} ${line}`))))));
}

Views.memory = async function (route) {
  const name = route.parts[1];
  const asOf = route.query.get("as_of") || "";
  const mine = route.query.get("mine") || "";
  const m = await api(`/api/memory/${encodeURIComponent(name)}` + query({ as_of: asOf, mine }));
  const input = h("input", { name: "as_of", placeholder: "now (a seq or a time)", value: asOf, size: 24 });
  const form = h("form", { class: "bar", onsubmit: (e) => { e.preventDefault(); location.hash = `#/memory/${encodeURIComponent(name)}` + query({ as_of: input.value.trim(), mine }); } },
    h("label", {}, "as of ", input), h("button", { type: "submit" }, "show"), link(`#/memory/${encodeURIComponent(name)}`, "now"),
    h("span", { class: "muted" }, m.as_of_seq ? `what ${name} knew at seq ${m.as_of_seq}` : `what ${name} knows now`));
  const context = h("div", { id: "context" }, m.calls.length ? h("p", { class: "muted" }, "loading the latest model call…") : h("p", { class: "muted" }, "no model calls"));
  const callRows = m.calls.map((c, i) => h("tr", { class: `clickable call-row${i === 0 ? " selected" : ""}`, dataset: { call: c.call_id }, onclick: () => showContext(c) },
    h("td", { class: "num" }, c.seq), h("td", {}, c.called_at), h("td", { class: "num" }, num(c.input_tokens)), h("td", { class: "num" }, num(c.output_tokens)), h("td", {}, c.stop_reason || "")));
  async function showContext(call) {
    const { call: full, context: window_ } = await api(`/api/llm_calls/${call.call_id}`);
    context.replaceChildren(h("h2", {}, `Context window of the call at seq ${full.seq} `, link(`#/call/${full.call_id}`, "(the whole call)")),
      contextParts(window_, full.input_tokens));
  }
  if (m.calls.length) showContext(m.calls[0]).catch((e) => context.replaceChildren(h("p", { class: "error" }, e.message)));
  const facts = table(["fact", "subject", "value", { label: "confidence", num: true }, "source", "by", "then"],
    m.facts.map((f) => h("tr", { class: "fact-row" }, h("td", {}, f.statement), h("td", {}, f.subject), h("td", {}, f.value),
      h("td", { class: "num" }, num(f.confidence)), h("td", {}, h("span", { title: f.source_quote || "" }, `${f.source_ref || ""} ${f.source_title ? "— " + f.source_title : ""}`)),
      h("td", {}, f.recorded_by), h("td", {}, f.held ? badge("held", "alive") : badge(`${f.status}${f.ended_by_fact ? " by " + shortId(f.ended_by_fact) : ""}`, "stopped")))));
  const contradictions = table(["subject", "claim a", "claim b", "flagged by", "then"],
    m.contradictions.map((c) => h("tr", { class: "contradiction-row" }, h("td", {}, c.subject_a), h("td", {}, `${c.value_a} (${c.source_a})`),
      h("td", {}, `${c.value_b} (${c.source_b})`), h("td", {}, c.actor), h("td", {}, c.open_then ? badge("open", "failed") : badge("resolved", "handled")))));
  return h("section", {}, h("h1", {}, `Memory of ${name}`), form,
    h("div", { class: "cols" },
      h("div", {}, h("h2", {}, `Model calls (${m.calls.length})`), table([{ label: "seq", num: true }, "at", { label: "in", num: true }, { label: "out", num: true }, "stop"], callRows, { id: "memory-calls" })),
      context),
    h("h2", {}, `Core blocks (${m.blocks.length})`), h("div", { id: "blocks" }, m.blocks.map(blockHistory)),
    h("h2", {}, `Facts (${m.facts.length}) `, link(`#/memory/${encodeURIComponent(name)}` + query({ as_of: asOf, mine: mine === "1" ? "" : "1" }), mine === "1" ? "show the team's" : `only ${name}'s`)), facts,
    h("h2", {}, `Contradictions (${m.contradictions.length})`), contradictions);
};

// -- model calls -----------------------------------------------------------------------------

Views.calls = async function (route) {
  const agent = route.query.get("agent") || "", corr = route.query.get("corr") || "";
  const { calls } = await api("/api/llm_calls" + query({ agent, corr }));
  return h("section", {}, h("h1", {}, `Model calls (${calls.length})`, agent ? ` of ${agent}` : "", corr ? ` in ${shortId(corr)}` : ""),
    table([{ label: "seq", num: true }, "agent", "model", { label: "in", num: true }, { label: "out", num: true }, { label: "cache read", num: true },
      { label: "ms", num: true }, { label: "cost $", num: true }, "stop", "tools"],
      calls.map((c) => h("tr", { class: "clickable", onclick: () => { location.hash = `#/call/${c.call_id}`; } },
        h("td", { class: "num" }, c.seq), h("td", {}, c.agent), h("td", {}, c.model), h("td", { class: "num" }, num(c.input_tokens)),
        h("td", { class: "num" }, num(c.output_tokens)), h("td", { class: "num" }, num(c.cache_read_tokens)), h("td", { class: "num" }, num(c.latency_ms)),
        h("td", { class: "num" }, c.cost_usd === null ? "unpriced" : num(c.cost_usd)), h("td", {}, c.stop_reason || c.error_type || ""),
        h("td", {}, (c.tool_calls || []).join(", "))))));
};

Views.call = async function (route) {
  const { call, context } = await api(`/api/llm_calls/${encodeURIComponent(route.parts[1])}`);
  return h("section", {}, h("h1", {}, `Model call of ${call.agent} `, h("span", { class: "muted" }, `seq ${call.seq}`)),
    kv([["model", `${call.model} (${call.provider})`], ["at", call.called_at], ["latency", `${num(call.latency_ms)} ms`],
      ["tokens", `${num(call.input_tokens)} in, ${num(call.output_tokens)} out; cache ${num(call.cache_read_tokens)} read, ${num(call.cache_write_tokens)} written`],
      ["cost", call.cost_usd === null ? "unpriced" : `$${num(call.cost_usd)}`], ["stop", call.stop_reason || call.error_type],
      ["conversation", call.correlation_id ? link(`#/conversation/${call.correlation_id}`, call.correlation_id) : null],
      ["replay", call.correlation_id ? replayButton(call.correlation_id) : null],
      ["memory then", link(`#/memory/${encodeURIComponent(call.agent)}?as_of=${call.seq}`, `${call.agent} as of seq ${call.seq}`)]]),
    h("h2", {}, "Context window"), contextParts(context, call.input_tokens),
    h("h2", {}, "Response"), h("pre", {}, call.response_text || ""), h("pre", {}, json(call.response_json)),
    h("h2", {}, "Request"), h("details", {}, h("summary", {}, "the full request as sent"), h("pre", {}, json(call.request_json))));
};

// -- dead letters ----------------------------------------------------------------------------

Views.dead = async function (route) {
  const agent = route.query.get("agent") || "";
  const { dead_letters, operator } = await api("/api/dead_letters" + query({ agent }));
  return h("section", {}, h("h1", {}, `Dead letters (${dead_letters.length})`, agent ? ` of ${agent}` : ""),
    operator ? null : h("p", { class: "muted" }, "read-only console: start it with `bus ui --operator` to retry from here"),
    table([{ label: "seq", num: true }, "agent", "reason", { label: "attempts", num: true }, "kind", "error", "retried"],
      dead_letters.map((d) => h("tr", { class: "clickable dead-row", dataset: { seq: d.seq, id: d.id }, onclick: () => App.showDead(d.seq) },
        h("td", { class: "num" }, d.seq), h("td", {}, d.agent), h("td", {}, badge(d.reason, "failed")), h("td", { class: "num" }, num(d.attempts)),
        h("td", {}, d.original_kind), h("td", {}, (d.error || "").slice(0, 120)),
        h("td", { class: "retried" }, d.retried_as ? `by ${d.retried_by} as ${shortId(d.retried_as)}` : "–")))));
};

async function deadDetail(seq, operator) {
  const { dead_letter: d } = await api(`/api/dead_letters/${seq}`);
  const result = h("p", { class: "retry-result" });
  const button = h("button", { class: "primary", id: "retry", disabled: !operator, onclick: async () => {
    button.disabled = true;
    try {
      const { retry } = await post(`/api/dead_letters/${seq}/retry`);
      result.textContent = retry.already ? `retried before, as ${retry.retried_as} (seq ${retry.retried_seq}); nothing new sent`
        : `sent again to ${retry.to} as ${retry.retried_as} (seq ${retry.retried_seq})`;
      result.className = "retry-result done";
      if (location.hash.startsWith("#/dead")) App.render();
    } catch (e) { result.textContent = e.message; result.className = "retry-result error"; button.disabled = false; }
  } }, "Retry");
  return h("div", { class: "dead-detail" }, h("h2", {}, `Dead letter `, h("span", { class: "muted" }, `seq ${d.seq}`)),
    kv([["id", h("code", {}, d.id)], ["agent", d.agent], ["consumer", d.consumer], ["reason", badge(d.reason, "failed")],
      ["attempts", num(d.attempts)], ["error", d.error], ["original", `${d.original_kind || "?"} at seq ${d.original_seq}`],
      ["conversation", d.correlation_id ? link(`#/conversation/${d.correlation_id}`, d.correlation_id) : null]]),
    h("p", {}, button, operator ? "" : h("span", { class: "muted" }, " read-only console")), result,
    d.traceback ? [h("h2", {}, "Traceback"), h("pre", { class: "traceback" }, d.traceback)] : null,
    h("h2", {}, "Original"), h("pre", {}, d.original_envelope ? json(d.original_envelope) : "(not an envelope, or too large to carry: see its seq)"));
}

// -- health ----------------------------------------------------------------------------------

Views.health = async function () {
  const { health, seconds } = await api("/api/health");
  const view = h("section", {}, h("h1", {}, "Health"));
  const charts = h("div", { class: "charts", id: "health-charts" });
  view.append(charts);
  const draw = (secs) => {
    // Seconds in which nothing was stored are absent: count them as zero, over the last minute.
    const known = new Map(secs.map((x) => [x.t, x]));
    const last = Math.max(Math.floor(Date.now() / 1000), ...secs.map((x) => x.t));
    const span = [];
    for (let t = last - 59; t <= last; t++) span.push(known.get(t) || { t });
    const by = (key) => span.map((x) => [x.t, x[key] || 0]);
    const samples = App.healthHistory;
    charts.replaceChildren(
      h("div", { class: "chart-card" }, h("h2", {}, "Throughput (stored per second)"),
        lineChart([{ name: "all", points: by("total") }, { name: "inbox", points: by("inbox") }, { name: "group", points: by("group") }, { name: "event", points: by("event") }])),
      h("div", { class: "chart-card" }, h("h2", {}, "Errors per second"),
        lineChart([{ name: "failed", points: by("failed") }, { name: "retried", points: by("retried") }, { name: "dead letters", points: by("dead") }])),
      h("div", { class: "chart-card" }, h("h2", {}, "Projection lag (events)"),
        lineChart([{ name: "lag", points: samples.filter((x) => x.projection_lag !== null).map((x) => [x.at / 1000, x.projection_lag]) }])),
      h("div", { class: "chart-card" }, h("h2", {}, "Consumer backlog"),
        lineChart([{ name: "pending", points: samples.map((x) => [x.at / 1000, x.backlog.reduce((a, b) => a + b.pending, 0)]) },
          { name: "unacked", points: samples.map((x) => [x.at / 1000, x.backlog.reduce((a, b) => a + b.ack_pending, 0)]) }])),
      h("div", { class: "chart-card" }, h("h2", {}, "Backlog by agent"),
        table(["agent", { label: "pending", num: true }, { label: "unacked", num: true }, { label: "redelivered", num: true }],
          ((samples[samples.length - 1] || health || { backlog: [] }).backlog).map((b) => h("tr", {}, h("td", {}, b.agent),
            h("td", { class: "num" }, num(b.pending)), h("td", { class: "num" }, num(b.ack_pending)), h("td", { class: "num" }, num(b.redelivered)))))));
    const latest = samples[samples.length - 1] || health;
    if (latest && latest.error) charts.append(h("p", { class: "error" }, latest.error));
  };
  if (health && !App.healthHistory.length) App.healthHistory.push(health);
  draw(seconds);
  App.follow({}, null, (secs) => draw(secs));
  return view;
};
