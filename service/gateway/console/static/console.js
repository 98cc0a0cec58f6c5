// Octograph graph console. Plain JavaScript, no build step, no third-party code: the gateway
// serves this file offline. Data comes from /console/api/* and /v1/* with the API key (if any)
// sent as `Authorization: Bearer`; the key lives in sessionStorage (this tab only).
"use strict";

(() => {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const KEY_STORAGE = "octograph.apiKey";
  const STATS_EVERY_MS = 3000;
  const GRAPH_EVERY_MS = 5000;
  // Layout (SVG units): node box, horizontal gap, vertical distance between levels.
  const NODE_W = 100, NODE_H = 52, GAP_X = 14, LEVEL_H = 108, MARGIN = 22, TOP = 14;
  const BUS_DROP = 16;  // from a router's bottom edge to the bus its child edges share

  const $ = (id) => document.getElementById(id);
  const state = {
    graph: null,         // /console/api/graph
    byId: new Map(),     // node id -> node
    pos: new Map(),      // node id -> {x, y} (top-left of the box)
    stats: null,         // /console/api/stats
    filter: "",          // decisions filter (node id)
    route: null,         // route shown on the picture {route, scores}
    abort: null,         // AbortController of the running playground request
    keyWaiters: [],      // calls waiting for the user to enter a key
    graphSig: "",
  };

  // --- API calls with the key ------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  function authHeaders(extra) {
    const headers = Object.assign({}, extra || {});
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (key) headers["Authorization"] = "Bearer " + key;
    return headers;
  }

  async function errorMessage(resp) {
    try {
      const body = await resp.json();
      return (body && body.error && body.error.message) || resp.statusText;
    } catch (_) {
      return resp.statusText || ("HTTP " + resp.status);
    }
  }

  // fetch() that asks for a key on 401 and retries once the user gave one.
  async function apiFetch(path, options) {
    for (;;) {
      const opts = Object.assign({}, options || {});
      opts.headers = authHeaders(opts.headers);
      const resp = await fetch(path, opts);
      if (resp.status !== 401) {
        setConn(resp.ok ? "ok" : "bad", resp.ok ? "live" : "error " + resp.status);
        return resp;
      }
      const hadKey = !!sessionStorage.getItem(KEY_STORAGE);
      setConn("bad", "API key needed");
      await askForKey(hadKey ? "That key was refused: " + (await errorMessage(resp)) : "");
    }
  }

  async function apiJson(path, options) {
    const resp = await apiFetch(path, options);
    if (!resp.ok) throw new ApiError(resp.status, await errorMessage(resp));
    return resp.json();
  }

  function askForKey(message) {
    return new Promise((resolve) => {
      state.keyWaiters.push(resolve);
      const dialog = $("key-dialog");
      $("key-error").hidden = !message;
      $("key-error").textContent = message || "";
      if (!dialog.open) {
        $("key-input").value = "";
        dialog.showModal();
        $("key-input").focus();
      }
    });
  }

  function keyGiven() {
    const waiters = state.keyWaiters.splice(0);
    waiters.forEach((resolve) => resolve());
  }

  function setConn(kind, text) {
    const el = $("conn");
    el.className = "pill " + (kind === "ok" ? "pill-ok" : kind === "bad" ? "pill-bad" : "pill-wait");
    el.textContent = text;
  }

  // --- the graph picture ------------------------------------------------------------------

  function svg(tag, attrs, parent) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
    if (parent) parent.appendChild(el);
    return el;
  }

  // Layered tree: the root router on top, each router's children one level below, leaves
  // spread left to right and parents centred over their children. Nodes no router reaches
  // (ensembles, nodes addressed by id) go in a side column to the right.
  function computeLayout(graph) {
    const byId = new Map(graph.nodes.map((n) => [n.id, n]));
    const placed = new Map();
    const childOf = new Set();
    graph.nodes.forEach((n) => (n.children || []).forEach((c) => childOf.add(c.node)));
    let slot = 0;
    let maxDepth = 0;

    function place(id, depth) {
      const node = byId.get(id);
      const p = { id, depth, slot: 0 };
      placed.set(id, p);
      maxDepth = Math.max(maxDepth, depth);
      const kids = (node.children || []).map((c) => c.node).filter((c) => byId.has(c) && !placed.has(c));
      const slots = kids.map((c) => place(c, depth + 1));
      p.slot = slots.length ? (slots[0] + slots[slots.length - 1]) / 2 : slot++;
      return p.slot;
    }

    const roots = [];
    if (graph.root && byId.has(graph.root)) roots.push(graph.root);
    graph.nodes.forEach((n) => {
      if (n.kind === "router" && !childOf.has(n.id) && !roots.includes(n.id)) roots.push(n.id);
    });
    roots.forEach((r) => { if (!placed.has(r)) place(r, 0); });
    const treeSlots = slot;
    const side = graph.nodes.filter((n) => !placed.has(n.id)).map((n) => n.id);

    const pos = new Map();
    for (const p of placed.values()) {
      pos.set(p.id, { x: MARGIN + p.slot * (NODE_W + GAP_X), y: TOP + 30 + p.depth * LEVEL_H });
    }
    // Side column: after the tree, a dashed separator, then the unrouted nodes stacked.
    const sideX = MARGIN + treeSlots * (NODE_W + GAP_X) + (treeSlots ? 30 : 0);
    side.forEach((id, i) => {
      const col = Math.floor(i / Math.max(1, maxDepth + 1));
      const row = i % Math.max(1, maxDepth + 1);
      pos.set(id, { x: sideX + col * (NODE_W + GAP_X), y: TOP + 30 + row * LEVEL_H });
    });
    const sideCols = side.length ? Math.ceil(side.length / Math.max(1, maxDepth + 1)) : 0;
    const width = sideX + sideCols * (NODE_W + GAP_X) - (sideCols ? GAP_X : (treeSlots ? GAP_X + 30 : 0)) + MARGIN;
    const height = TOP + 30 + maxDepth * LEVEL_H + NODE_H + 12;
    return { pos, width: Math.max(width, 320), height, side, sideX: treeSlots ? sideX - 16 : null };
  }

  // Org-chart edges: down from the parent to a bus, across, down into the child; edges of
  // one router share the bus instead of fanning out of one point.
  function edgePath(a, b) {
    const x1 = a.x + NODE_W / 2, y1 = a.y + NODE_H;
    const x2 = b.x + NODE_W / 2, y2 = b.y;
    if (y2 <= y1 + BUS_DROP + 8) return curvePath(a, b);
    const yb = y1 + BUS_DROP;
    if (Math.abs(x2 - x1) < 1) return `M${x1},${y1} V${y2}`;
    const dir = x2 > x1 ? 1 : -1;
    const r = Math.min(7, Math.abs(x2 - x1) / 2);
    return `M${x1},${y1} V${yb - r} Q${x1},${yb} ${x1 + dir * r},${yb} ` +
      `H${x2 - dir * r} Q${x2},${yb} ${x2},${yb + r} V${y2}`;
  }

  // Cross edges (a node already drawn elsewhere, a fallback outside the children): a curve.
  function curvePath(a, b) {
    const x1 = a.x + NODE_W / 2, y1 = a.y + NODE_H;
    const x2 = b.x + NODE_W / 2, y2 = b.y;
    const my = (y1 + y2) / 2;
    return `M${x1},${y1} C${x1},${my + 40} ${x2},${my - 40} ${x2},${y2}`;
  }

  function fmtMs(ms) {
    if (ms === null || ms === undefined) return "–";
    if (ms >= 10000) return (ms / 1000).toFixed(0) + " s";
    if (ms >= 1000) return (ms / 1000).toFixed(1) + " s";
    if (ms >= 10) return ms.toFixed(0) + " ms";
    return ms.toFixed(1) + " ms";
  }

  function drawGraph(graph) {
    const root = $("graph");
    root.textContent = "";
    const layout = computeLayout(graph);
    state.pos = layout.pos;
    root.setAttribute("viewBox", `0 0 ${layout.width} ${layout.height}`);
    // Never upscale a small graph: text keeps its designed size.
    root.style.maxWidth = layout.width + "px";

    const edges = svg("g", { class: "edges" }, root);
    const nodes = svg("g", { class: "nodes" }, root);
    if (layout.sideX !== null && layout.side.length) {
      svg("line", { class: "side-sep", x1: layout.sideX, y1: TOP, x2: layout.sideX, y2: layout.height - 6 }, edges);
      const label = svg("text", { class: "side-label", x: layout.sideX + 16, y: TOP + 12 }, edges);
      label.textContent = "addressed by id";
    } else if (layout.side.length) {
      const label = svg("text", { class: "side-label", x: MARGIN, y: TOP + 12 }, edges);
      label.textContent = "addressed by id";
    }

    const drawn = new Set();
    for (const n of graph.nodes) {
      for (const c of n.children || []) {
        const a = layout.pos.get(n.id), b = layout.pos.get(c.node);
        if (!a || !b) continue;
        // A child drawn under another router already: a dotted cross edge, still labelled.
        const cross = drawn.has(c.node) || b.y <= a.y;
        drawn.add(c.node);
        const g = svg("g", {
          class: "edge" + (c.node === n.fallback ? " fallback" : "") + (cross ? " cross" : ""),
          "data-from": n.id, "data-to": c.node,
        }, edges);
        const d = cross ? curvePath(a, b) : edgePath(a, b);
        svg("path", { d }, g);
        svg("path", { d, class: "flow" }, g);
        const lx = b.x + NODE_W / 2;
        const token = svg("text", { class: "token", x: lx, y: b.y - 20, "text-anchor": "middle" }, g);
        token.textContent = c.token;
        const score = svg("text", { class: "score", x: lx, y: b.y - 7, "text-anchor": "middle" }, g);
        score.textContent = "";
      }
    }
    // A fallback that is not also a child: a dashed edge of its own.
    for (const n of graph.nodes) {
      if (!n.fallback || (n.children || []).some((c) => c.node === n.fallback)) continue;
      const a = layout.pos.get(n.id), b = layout.pos.get(n.fallback);
      if (!a || !b) continue;
      const g = svg("g", { class: "edge fallback", "data-from": n.id, "data-to": n.fallback }, edges);
      svg("path", { d: curvePath(a, b) }, g);
      svg("path", { d: curvePath(a, b), class: "flow" }, g);
      const t = svg("text", { class: "token", x: b.x + NODE_W / 2, y: b.y - 20, "text-anchor": "middle" }, g);
      t.textContent = "fallback";
      svg("text", { class: "score", x: b.x + NODE_W / 2, y: b.y - 7, "text-anchor": "middle" }, g);
    }

    for (const n of graph.nodes) {
      const p = layout.pos.get(n.id);
      const g = svg("g", {
        class: `node kind-${n.kind}${n.remote ? " remote" : ""} health-${n.health}`,
        "data-node": n.id, "data-kind": n.kind, "data-health": n.health,
        transform: `translate(${p.x},${p.y})`, tabindex: 0,
      }, nodes);
      svg("title", {}, g).textContent = tooltip(n);
      if (n.kind === "ensemble") {
        // Stacked cards: an ensemble is several models answering as one.
        svg("rect", { class: "shadow-card", x: 5, y: -5, width: NODE_W, height: NODE_H, rx: 8 }, g);
      }
      svg("rect", { class: "box", width: NODE_W, height: NODE_H, rx: n.kind === "router" ? 10 : 8 }, g);
      svg("circle", { class: "health " + n.health, cx: NODE_W - 10, cy: 10, r: 4.5 }, g);
      svg("text", { class: "kind", x: 9, y: 14 }, g).textContent = kindLabel(n);
      svg("text", { class: "name", x: 9, y: 31 }, g).textContent = ellipsize(n.id, 13);
      svg("text", { class: "counters", x: 9, y: 45 }, g).textContent = "–";
      g.addEventListener("click", () => selectNode(n.id));
      g.addEventListener("keydown", (e) => { if (e.key === "Enter") selectNode(n.id); });
    }
    $("graph-empty").hidden = true;
    applyStats();
    if (state.route) showRouteOnGraph(state.route);
  }

  function kindLabel(n) {
    // A node whose model is an OpenAI-compatible upstream (models: {kind: openai}).
    const kind = n.remote ? `remote ${n.kind}` : n.kind;
    if (n.kind === "ensemble") return `ensemble · ${n.members.length}`;
    // A router's fallback (where requests go when the router is unsure or a node fails) says
    // so instead of its kind, which the box's style already shows; the tooltip has both.
    const isFallback = state.graph && state.graph.nodes.some((r) => r.fallback === n.id);
    return isFallback ? "fallback" : kind;
  }

  function ellipsize(text, max) {
    return text.length > max ? text.slice(0, max - 1) + "…" : text;
  }

  function tooltip(n) {
    const lines = [`${n.id} (${n.kind})`];
    if (n.description) lines.push(n.description);
    if (n.model) lines.push("model: " + n.model + (n.remote ? " (OpenAI-compatible upstream)" : ""));
    if (n.members && n.members.length) {
      lines.push("members: " + n.members.map((m) => `${m.model} ×${m.weight}`).join(", ") + (n.mode ? ` (${n.mode})` : ""));
    }
    if (n.fallback) lines.push("fallback: " + n.fallback);
    if (n.models && n.models.length) {
      lines.push("replicas: " + n.models.map((m) => `${m.model} ${m.up}/${m.total} up`).join(", "));
    }
    lines.push("health: " + n.health);
    return lines.join("\n");
  }

  // Health changes without a new layout: only classes and tooltips move.
  function updateHealth(graph) {
    for (const n of graph.nodes) {
      const g = document.querySelector(`#graph .node[data-node="${CSS.escape(n.id)}"]`);
      if (!g) continue;
      const keep = Array.from(g.classList).filter((c) => !c.startsWith("health-"));
      g.setAttribute("class", keep.concat("health-" + n.health).join(" "));
      g.setAttribute("data-health", n.health);
      g.querySelector("circle.health").setAttribute("class", "health " + n.health);
      g.querySelector("title").textContent = tooltip(n);
    }
    const up = graph.models.filter((m) => m.up > 0).length;
    $("summary").textContent = `${graph.nodes.length} nodes · ${up}/${graph.models.length} models up`;
  }

  function applyStats() {
    if (!state.stats) return;
    for (const s of state.stats.nodes) {
      const text = document.querySelector(`#graph .node[data-node="${CSS.escape(s.node)}"] text.counters`);
      if (!text) continue;
      text.textContent = "";
      const main = document.createElementNS(SVG_NS, "tspan");
      main.textContent = `${s.requests_1m}/min · ${fmtMs(s.p50_ms)}`;
      text.appendChild(main);
      if (s.errors_1m > 0) {
        const err = document.createElementNS(SVG_NS, "tspan");
        err.setAttribute("class", "err");
        err.textContent = ` · ${s.errors_1m}✕`;
        text.appendChild(err);
      }
      const title = text.parentNode.querySelector("title");
      const node = state.byId.get(s.node);
      if (title && node) {
        title.textContent = tooltip(node) + `\nlast minute: ${s.requests_1m} requests, ${s.errors_1m} errors` +
          `\np50 ${fmtMs(s.p50_ms)} · p99 ${fmtMs(s.p99_ms)}` +
          `\nsince start: ${s.requests_total} requests, ${s.errors_total} errors`;
      }
    }
  }

  // --- route highlight --------------------------------------------------------------------

  function clearRoute() {
    document.querySelectorAll("#graph .on-route, #graph .route-target").forEach((el) => {
      el.classList.remove("on-route", "route-target");
    });
    document.querySelectorAll("#graph .edge text.score").forEach((t) => { t.textContent = ""; });
  }

  // route: ["root", "science", "physics"] (maybe with "fallback:general"); scores: one
  // {child: probability} per router hop, in order.
  function showRouteOnGraph(r) {
    clearRoute();
    const hops = normalizeRoute(r.route);
    hops.forEach((id, i) => {
      const g = document.querySelector(`#graph .node[data-node="${CSS.escape(id)}"]`);
      if (!g) return;
      g.classList.add("on-route");
      if (i === hops.length - 1) g.classList.add("route-target");
      if (i > 0) {
        const e = document.querySelector(
          `#graph .edge[data-from="${CSS.escape(hops[i - 1])}"][data-to="${CSS.escape(id)}"]`);
        if (e) {
          e.classList.add("on-route");
          e.parentNode.appendChild(e);  // drawn last: the route stays on top of shared buses
        }
      }
    });
    (r.scores || []).forEach((scores, i) => {
      const router = r.route[i];
      for (const [child, p] of Object.entries(scores || {})) {
        const t = document.querySelector(
          `#graph .edge[data-from="${CSS.escape(router)}"][data-to="${CSS.escape(child)}"] text.score`);
        if (t) t.textContent = pct(p);
      }
    });
  }

  // The pipeline writes a fallback hop as "fallback:<node>": on the picture it is that node.
  function normalizeRoute(route) {
    const out = [];
    for (const hop of route || []) {
      if (hop.startsWith("fallback:")) {
        out.pop();
        out.push(hop.slice("fallback:".length));
      } else out.push(hop);
    }
    return out;
  }

  function pct(p) {
    const v = p * 100;
    return (v >= 99.95 ? "100" : v >= 10 ? v.toFixed(0) : v.toFixed(1)) + "%";
  }

  function selectNode(id) {
    state.filter = state.filter === id ? "" : id;
    $("dec-filter").value = state.filter;
    document.querySelectorAll("#graph .node.selected").forEach((el) => el.classList.remove("selected"));
    if (state.filter) {
      const g = document.querySelector(`#graph .node[data-node="${CSS.escape(id)}"]`);
      if (g) g.classList.add("selected");
    }
    renderDecisions();
  }

  // --- refresh loops ----------------------------------------------------------------------

  async function refreshGraph() {
    const graph = await apiJson("/console/api/graph");
    const sig = JSON.stringify(graph.nodes.map((n) => [n.id, n.kind, (n.children || []).map((c) => c.node)]));
    state.graph = graph;
    state.byId = new Map(graph.nodes.map((n) => [n.id, n]));
    if (sig !== state.graphSig) {
      state.graphSig = sig;
      drawGraph(graph);
      fillSelects(graph);
    }
    updateHealth(graph);
  }

  async function refreshStats() {
    state.stats = await apiJson("/console/api/stats");
    showScope(state.stats);
    applyStats();
    renderDecisions();
  }

  // Whose traffic the counters and decisions are: every gateway replica's (shared state in
  // Redis) or only the replica that answered this page (no Redis, or Redis unreachable).
  function showScope(stats) {
    const el = $("scope");
    const unreachable = stats.shared_view === "unreachable";
    el.hidden = false;
    el.dataset.scope = stats.scope;
    el.className = "pill " + (unreachable ? "pill-bad" : stats.scope === "deployment" ? "pill-ok" : "pill-wait");
    el.textContent = stats.scope === "deployment" ? "all replicas"
      : unreachable ? "this replica (shared view unreachable)" : "this replica";
    el.title = stats.scope === "deployment"
      ? "Counters and decisions of every gateway replica (shared in Redis)"
      : unreachable
        ? "Redis cannot be read: counters and decisions of the replica that answered only"
        : "Counters and decisions of the gateway replica that answered (no shared state)";
  }

  function loop(fn, every) {
    const tick = async () => {
      try { await fn(); } catch (err) { setConn("bad", err.message || "offline"); }
      setTimeout(tick, every);
    };
    return tick();
  }

  function fillSelects(graph) {
    const target = $("target"), filter = $("dec-filter");
    const keepTarget = target.value, keepFilter = filter.value;
    target.textContent = "";
    filter.textContent = "";
    const auto = new Option(graph.root ? `auto (routed from ${graph.root})` : "auto", "auto");
    auto.disabled = !graph.root;
    target.add(auto);
    filter.add(new Option("all nodes", ""));
    const groups = [["router", "Routers"], ["model", "Models"], ["ensemble", "Ensembles"]];
    const known = new Set(groups.map((g) => g[0]));
    for (const [kind, label] of groups.concat([["*", "Other"]])) {
      const nodes = graph.nodes.filter((n) => (kind === "*" ? !known.has(n.kind) : n.kind === kind));
      if (!nodes.length) continue;
      const og = document.createElement("optgroup");
      og.label = label;
      nodes.forEach((n) => og.appendChild(new Option(n.id, n.id)));
      target.appendChild(og);
    }
    graph.nodes.forEach((n) => filter.add(new Option(n.id, n.id)));
    target.value = Array.from(target.options).some((o) => o.value === keepTarget && !o.disabled)
      ? keepTarget : (graph.root ? "auto" : (graph.nodes.find((n) => n.kind !== "router") || {}).id || "");
    filter.value = keepFilter;
  }

  // --- recent decisions -------------------------------------------------------------------

  function chipRoute(route, parent) {
    route.forEach((hop, i) => {
      if (i) {
        const s = document.createElement("span");
        s.className = "sep";
        s.textContent = " › ";
        parent.appendChild(s);
      }
      const c = document.createElement("span");
      const fb = hop.startsWith("fallback:");
      c.className = "chip" + (fb ? " fallback" : "");
      c.textContent = fb ? "↩ " + hop.slice(9) : hop;
      parent.appendChild(c);
    });
  }

  function renderDecisions() {
    const body = document.querySelector("#decisions tbody");
    const all = (state.stats && state.stats.decisions) || [];
    const rows = state.filter ? all.filter((d) => d.route.includes(state.filter)) : all;
    body.textContent = "";
    for (const d of rows) {
      const tr = document.createElement("tr");
      tr.dataset.route = d.route.join(">");
      const time = document.createElement("td");
      time.className = "time";
      time.textContent = new Date(d.at * 1000).toLocaleTimeString([], { hour12: false });
      const route = document.createElement("td");
      chipRoute(d.route, route);
      const conf = document.createElement("td");
      conf.className = "num";
      const last = d.scores.length ? d.scores[d.scores.length - 1] : null;
      const chosen = last && d.route[d.scores.length];
      conf.textContent = last && chosen in last ? pct(last[chosen]) : "–";
      conf.title = d.scores.map((s, i) => `${d.route[i]}: ` + Object.entries(s)
        .sort((a, b) => b[1] - a[1]).slice(0, 3).map(([k, v]) => `${k} ${pct(v)}`).join(", ")).join("\n");
      const ms = document.createElement("td");
      ms.className = "num";
      ms.textContent = fmtMs(d.latency_ms);
      tr.append(time, route, conf, ms);
      tr.addEventListener("click", () => {
        state.route = { route: d.route, scores: d.scores };
        showRouteOnGraph(state.route);
      });
      body.appendChild(tr);
    }
    $("dec-empty").hidden = rows.length > 0;
    $("dec-empty").textContent = state.stats && state.stats.decisions_hidden
      ? "Routing decisions carry every client's traffic: they are listed to admin keys only."
      : state.filter
        ? `No recent decision went through ${state.filter}.`
        : "No routing decisions yet: send a prompt with auto.";
  }

  // --- playground -------------------------------------------------------------------------

  // latencyMs: from sending to the response headers (routing plus the node accepting it).
  function showRouteBox(r, latencyMs, reformatted) {
    $("route-box").hidden = false;
    const chips = $("route-chips");
    chips.textContent = "";
    chipRoute(r.route, chips);
    let note = latencyMs !== undefined ? `· route known after ${fmtMs(latencyMs)}` : "";
    if (reformatted) note += ` · reformatted: “${reformatted}”`;
    $("route-ms").textContent = note;
    const hops = $("hops");
    hops.textContent = "";
    $("hops-box").hidden = !(r.scores && r.scores.length);
    (r.scores || []).forEach((scores, i) => {
      const box = document.createElement("div");
      const title = document.createElement("div");
      title.className = "hop-title";
      title.textContent = `hop ${i + 1} · ${r.route[i]}`;
      box.appendChild(title);
      const chosen = r.route[i + 1];
      Object.entries(scores).sort((a, b) => b[1] - a[1]).slice(0, 5).forEach(([child, p]) => {
        box.appendChild(barRow(child, p, child === chosen));
      });
      hops.appendChild(box);
    });
  }

  function barRow(label, p, chosen) {
    const row = document.createElement("div");
    row.className = "bar-row" + (chosen ? " chosen" : "");
    const l = document.createElement("span");
    l.className = "label";
    l.textContent = label;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = Math.max(0, Math.min(100, p * 100)).toFixed(1) + "%";
    track.appendChild(fill);
    const v = document.createElement("span");
    v.className = "val";
    v.textContent = pct(p);
    row.append(l, track, v);
    return row;
  }

  // The ensemble a route ends at, if it ends at one.
  function ensembleAt(route) {
    const hops = normalizeRoute(route);
    const node = state.byId.get(hops[hops.length - 1]);
    return node && node.kind === "ensemble" ? node : null;
  }

  // Member weights of an ensemble, as the graph sets them (the gateway does not stream the
  // adaptive mode's running weights).
  function showWeights(weights, node, source) {
    let entries;
    if (Array.isArray(weights)) {
      const members = node.members || [];
      entries = weights.map((w, i) => [(members[i] && members[i].model) || `member ${i + 1}`, Number(w)]);
    } else {
      entries = Object.entries(weights).map(([k, v]) => [k, Number(v)]);
    }
    const total = entries.reduce((s, e) => s + (isFinite(e[1]) ? e[1] : 0), 0) || 1;
    const box = $("weights");
    box.textContent = "";
    entries.forEach(([name, w]) => box.appendChild(barRow(name, w / total, false)));
    $("weights-title").textContent =
      `Ensemble weights of ${node.id} (from the graph, mode ${node.mode || "mix"})`;
    $("weights-box").dataset.source = source;
    $("weights-box").hidden = false;
  }

  function setBusy(busy) {
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    $("answer").classList.toggle("streaming", busy);
  }

  function answerError(message) {
    const p = document.createElement("span");
    p.className = "error-text";
    p.textContent = message;
    $("answer").appendChild(p);
  }

  async function send(ev) {
    if (ev) ev.preventDefault();
    const prompt = $("prompt").value.trim();
    if (!prompt || state.abort) return;
    const target = $("target").value || "auto";
    const maxTokens = parseInt($("max-tokens").value, 10) || 256;
    const messages = [{ role: "user", content: prompt }];
    const controller = new AbortController();
    state.abort = controller;
    setBusy(true);
    $("answer").textContent = "";
    delete $("answer").dataset.done;
    $("answer-meta").textContent = "";
    $("weights-box").hidden = true;
    const t0 = performance.now();
    state.route = null;
    clearRoute();
    $("route-box").hidden = true;
    $("hops-box").hidden = true;
    try {
      await streamAnswer(target, messages, maxTokens, controller, t0);
    } catch (err) {
      if (err.name !== "AbortError") answerError(err.message || String(err));
    } finally {
      state.abort = null;
      setBusy(false);
      refreshStats().catch(() => {});
    }
  }

  async function streamAnswer(target, messages, maxTokens, controller, t0) {
    const resp = await apiFetch("/v1/chat/completions", {
      method: "POST", signal: controller.signal,
      headers: { "Content-Type": "application/json", "Accept": "text/event-stream" },
      body: JSON.stringify({ model: target, messages, stream: true, max_tokens: maxTokens }),
    });
    if (!resp.ok) throw new ApiError(resp.status, await errorMessage(resp));
    // One request does both: the gateway routes, then streams. The route is in the response
    // headers (known before the first token); each hop's scores come with the first chunk.
    // (Asking /v1/route first would route every prompt twice and log two decisions.)
    const header = resp.headers.get("x-octograph-route");
    const routeMs = performance.now() - t0;
    state.route = { route: header ? header.split(">") : [target], scores: [] };
    showRouteOnGraph(state.route);
    showRouteBox(state.route, routeMs);
    let ensemble = ensembleAt(state.route.route);
    if (ensemble) showWeights(ensemble.members.map((m) => m.weight), ensemble, "graph");
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    const answer = $("answer");
    let buffer = "", chunks = 0, ttft = null, first = true;
    const meta = () => {
      const total = performance.now() - t0;
      $("answer-meta").textContent =
        `${chunks} chunks · first token ${fmtMs(ttft)} · total ${fmtMs(total)}`;
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          let obj;
          try { obj = JSON.parse(data); } catch (_) { continue; }
          if (obj.error) { answerError(obj.error.message || "the stream failed"); continue; }
          if (first && obj.octograph && obj.octograph.route) {
            first = false;
            state.route = { route: obj.octograph.route, scores: obj.octograph.scores || [] };
            showRouteOnGraph(state.route);
            showRouteBox(state.route, routeMs, obj.octograph.reformatted_query);
            ensemble = ensembleAt(state.route.route);
          }
          for (const choice of obj.choices || []) {
            const text = choice.delta && choice.delta.content;
            if (text) {
              if (ttft === null) ttft = performance.now() - t0;
              chunks += 1;
              answer.appendChild(document.createTextNode(text));
              answer.scrollTop = answer.scrollHeight;
            }
          }
          meta();
        }
      }
    }
    answer.dataset.done = "1";
    meta();
  }

  // --- start ------------------------------------------------------------------------------

  function init() {
    $("play-form").addEventListener("submit", send);
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(e);
    });
    $("stop").addEventListener("click", () => { if (state.abort) state.abort.abort(); });
    $("dec-filter").addEventListener("change", (e) => {
      state.filter = "";
      selectNode(e.target.value);
    });
    $("key-button").addEventListener("click", () => {
      askForKey("").then(() => { refreshGraph().catch(() => {}); refreshStats().catch(() => {}); });
    });
    $("key-form").addEventListener("submit", (e) => {
      const key = $("key-input").value.trim();
      if (!key) { e.preventDefault(); return; }
      sessionStorage.setItem(KEY_STORAGE, key);
      keyGiven();
    });
    $("key-clear").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORAGE);
      $("key-input").value = "";
      setConn("wait", "no key");
    });
    $("graph-empty").hidden = false;
    // Graph first (the stats decorate its nodes), then both on their own timers.
    loop(refreshGraph, GRAPH_EVERY_MS).then(() => loop(refreshStats, STATS_EVERY_MS));
  }

  document.addEventListener("DOMContentLoaded", init);
})();
