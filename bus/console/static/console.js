// The page's frame: the router (views are addressed by the URL's fragment, #/agents ...), the one
// live stream (server-sent events from /api/live), and the side panel that shows one event.
"use strict";

const App = {
  live: null, liveKey: null, onTraffic: null, onStats: null, healthHistory: [], info: null, renderId: 0,

  route() {
    const raw = location.hash.replace(/^#\/?/, "") || "agents";
    const [path, search] = raw.split("?");
    const parts = path.split("/").map(decodeURIComponent);
    return { view: parts[0], parts, query: new URLSearchParams(search || "") };
  },

  async render() {
    const id = ++this.renderId;
    const route = this.route();
    const view = Views[route.view];
    document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.nav === route.view || (route.view === "agent" && a.dataset.nav === "agents") || (route.view === "conversation" && a.dataset.nav === "conversations") || (route.view === "call" && a.dataset.nav === "calls")));
    this.onTraffic = null; this.onStats = null;
    const main = document.getElementById("view");
    document.body.dataset.ready = "0";
    let element;
    try {
      element = view ? await view(route) : h("p", { class: "error" }, `no such view: ${route.view}`);
    } catch (e) {
      element = h("p", { class: "error" }, e.message);
    }
    if (id !== this.renderId) return;  // a newer render started meanwhile
    if (!this.onTraffic && !this.onStats) this.follow({}, null, null);
    main.replaceChildren(element);
    document.body.dataset.view = route.view;
    document.body.dataset.ready = "1";
    performance.mark(`console-painted-${id}`);
  },

  // Follow the live stream with a traffic filter; one stream per page, reopened only when the
  // filter changes.
  follow(filter, onTraffic, onStats) {
    this.onTraffic = onTraffic; this.onStats = onStats;
    const key = "/api/live" + query(filter);
    if (this.live && this.liveKey === key && this.live.readyState !== EventSource.CLOSED) return;
    if (this.live) this.live.close();
    this.liveKey = key;
    const live = new EventSource(key);
    this.live = live;
    const status = document.getElementById("status");
    live.onopen = () => { status.textContent = "live"; status.className = "status live"; };
    live.onerror = () => { status.textContent = "reconnecting…"; status.className = "status down"; };
    live.addEventListener("traffic", (e) => { if (this.onTraffic) this.onTraffic(JSON.parse(e.data)); });
    live.addEventListener("stats", (e) => {
      const data = JSON.parse(e.data);
      status.textContent = `live · seq ${num(data.head_seq)}`;
      if (this.onStats) this.onStats(data.seconds);
    });
    live.addEventListener("health", (e) => {
      const sample = JSON.parse(e.data);
      this.healthHistory.push(sample);
      if (this.healthHistory.length > 300) this.healthHistory.shift();
      if (document.body.dataset.view === "agents" && document.body.dataset.ready === "1" && !document.getElementById("detail").contains(document.activeElement)) this.refreshAgents();
    });
  },

  async refreshAgents() {
    try {
      const element = await Views.agents(this.route());
      if (document.body.dataset.view === "agents") document.getElementById("view").replaceChildren(element);
    } catch (_) { /* the next sample tries again */ }
  },

  async panel(build) {
    const aside = document.getElementById("detail");
    const body = document.getElementById("detail-body");
    aside.hidden = false;
    body.replaceChildren(h("p", { class: "muted" }, "loading…"));
    try { body.replaceChildren(await build()); } catch (e) { body.replaceChildren(h("p", { class: "error" }, e.message)); }
  },

  showEvent(seq) { return this.panel(() => eventDetail(seq)); },

  showNode(node) {
    return this.panel(async () => {
      const detail = await eventDetail(node.seqs[0]);
      if (node.count > 1) {
        detail.prepend(h("div", {}, h("h2", {}, `${node.count} events`), h("p", {}, node.label),
          h("p", {}, node.seqs.map((seq) => [h("a", { href: "#", onclick: (e) => { e.preventDefault(); App.showEvent(seq); } }, `seq ${seq}`), " "]),
            node.count > node.seqs.length ? "…" : "")));
      }
      return detail;
    });
  },

  showDead(seq) { return this.panel(() => deadDetail(seq, this.info && this.info.operator)); },
};

document.getElementById("detail-close").addEventListener("click", () => { document.getElementById("detail").hidden = true; });
window.addEventListener("hashchange", () => App.render());
// A page nobody sees costs nothing: its live stream closes while it is hidden (a tab in the
// background), and the view is drawn afresh, stream and all, when it is shown again.
document.addEventListener("visibilitychange", () => {
  if (document.hidden) {
    if (App.live) { App.live.close(); App.live = null; }
    const status = document.getElementById("status");
    status.textContent = "paused (hidden)"; status.className = "status";
  } else if (!App.live) {
    App.render();
  }
});
if (new URLSearchParams(location.search).has("measure")) { window.__consoleSeen = new Map(); window.__consoleReached = []; }
api("/api/info").then((info) => { App.info = info; document.title = `Continuum · ${info.namespace}`; if (info.feed_error) document.getElementById("status").textContent = info.feed_error; }).catch(() => {});
App.render();
