// The chain-isolation dashboard. Plain JavaScript, no build step, nothing from another origin.
//
// It polls the control plane's read-only API every POLL_MS and updates the page in place:
//   /api/v1/status           sidecars (ACKed versions, NACKs), scaler desired replicas
//   /api/v1/instances        ready instances per service and group
//   /api/v1/isolation        traffic per chain x hop x group (a 404 shows "no traffic data yet")
//   /api/v1/scope            the services each role's sidecars hold the config of, and why
//   /api/v1/probe            the last propagation probe of each chain (`tasklane probe`)
//   /api/v1/rules/{kind}     chains and services (every RULES_EVERY_MS)
//   /api/v1/profile/{svc}    next 24 h of desired replicas and the scaler's decisions, fetched
//                            only for chains whose timeline is open (every PROFILE_EVERY_MS)
// Past desired/ready replicas are what this page saw: it keeps a history of its polls (in
// localStorage, so a reload keeps it) beside the decisions the profile endpoint returns.
// ES modules: dom.js (elements, formats), timeline.js (the scaling chart), this file (the rest).

import { clock, describe, h, latency, num, rate, shortVersion, slug, sum } from "./dom.js";
import { legend, timelineFigure } from "./timeline.js";

const POLL_MS = 2000;
const RULES_EVERY_MS = 5000;
const PROFILE_EVERY_MS = 10000; // new decisions show within this
const HISTORY_KEY = "tasklane.history.v1";
const HISTORY_MAX = 720; // samples per group: a change, or a heartbeat each HEARTBEAT_MS
const HEARTBEAT_MS = 60000;
const SAVE_EVERY_MS = 30000;
// Timelines start open when there are this few chains; with more, each opens on demand.
const OPEN_TIMELINES_UP_TO = 2;
// Totals of the accounting shown in the overview, beside leaks and the two rates; a count other
// than zero is a warning, except where the third element says it is not.
const TOTALS_SHOWN = [
  ["errors_5xx", "5xx"],
  ["fallbacks", "Fallbacks"],
  ["rate_limited", "Rate-limited"],
  ["refused", "Refused"],
  ["uncovered", "Uncovered"],
  ["propagation_breaks", "Propagation breaks"],
  ["outside_mesh", "Outside the mesh", false], // ALLOW_ANY passes them: no warning
  ["outside_mesh_refused", "Refused outside the mesh"],
];

const state = {
  polls: 0,
  status: null,
  instances: null,
  isolation: undefined, // undefined: not asked yet; null: the endpoint does not exist (404)
  isolationError: null,
  scope: null, // {services: {service: {group: [entry, ...]}}}; null: unknown (older control plane)
  rollout: null, // {current, last} of GET /api/v1/rollout; null: unknown
  probes: new Map(), // chain -> the report of its last propagation probe
  chains: [],
  services: new Map(), // name -> spec
  rulesAt: 0,
  profiles: new Map(), // service -> {data, at, loading, error}
  history: loadHistory(), // "service|group" -> [[ms, ready, desired], ...]
  savedAt: Date.now(),
  error: null,
  okAt: 0,
  timelineOpen: new Map(), // chain -> the user's choice
  window: [21600, 86400],
};
const dom = {}; // elements found once
const chainViews = new Map(); // chain name -> {section, head, graph, details, body, sig}

// --- small helpers -----------------------------------------------------------------------

function describeUncovered(item) {
  if (!item || typeof item !== "object" || !item.chain) return describe(item);
  const last = item.last_at ? `, last at ${clock(item.last_at * 1000)}` : "";
  return `${item.chain}: ${item.service} (group ${item.group}) served ${num(item.requests)} `
    + `dyed requests (${rate(item.rate)})${last}`;
}

function describeBreak(item) {
  if (!item || typeof item !== "object" || !item.chain) return describe(item);
  const last = item.last_at ? ` at ${clock(item.last_at * 1000)}` : "";
  const id = item.last_request_id ? ` (last request ${item.last_request_id}${last})` : "";
  return `${item.chain}: ${item.service} (group ${item.group}) called ${item.to} without the dye `
    + `${num(item.count)} times${id}`;
}

// --- fetching ----------------------------------------------------------------------------

class HttpError extends Error {
  constructor(path, status, message) {
    super(`${path}: ${status} ${message}`);
    this.status = status;
  }
}

async function getJSON(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    throw new HttpError(path, response.status, (body && body.error) || response.statusText);
  }
  return body;
}

async function loadRules() {
  const [chains, services] = await Promise.all([
    getJSON("/api/v1/rules/taskchain"),
    getJSON("/api/v1/rules/service"),
  ]);
  state.chains = (chains.items || []).map((doc) => ({
    name: doc.metadata.name,
    dyes: (doc.spec.dye && doc.spec.dye.values) || [],
    header: doc.spec.dye && doc.spec.dye.header,
    fallback: doc.spec.fallback,
    hops: doc.spec.hops || [],
  }));
  state.chains.sort((a, b) => a.name.localeCompare(b.name));
  state.services = new Map((services.items || []).map((doc) => [doc.metadata.name, doc.spec]));
  state.rulesAt = Date.now();
}

async function loadIsolation() {
  try {
    state.isolation = await getJSON("/api/v1/isolation");
    state.isolationError = null;
  } catch (error) {
    if (error instanceof HttpError && error.status === 404) {
      state.isolation = null;
      state.isolationError = null;
    } else {
      state.isolationError = error.message;
    }
  }
}

async function loadScope() {
  try {
    state.scope = await getJSON("/api/v1/scope");
  } catch (_) {
    state.scope = null; // the cell then says it does not know; the rest of the page stays
  }
}

async function loadProbes() {
  try {
    const body = await getJSON("/api/v1/probe");
    state.probes = new Map((body.probes || []).map((report) => [report.chain, report]));
  } catch (_) {
    state.probes = new Map(); // an older control plane: no probe line, the rest of the page stays
  }
}

function loadProfile(service) {
  const entry = state.profiles.get(service) || {};
  if (entry.loading || (entry.at && Date.now() - entry.at < PROFILE_EVERY_MS)) return;
  entry.loading = true;
  state.profiles.set(service, entry);
  getJSON(`/api/v1/profile/${encodeURIComponent(service)}?minutes=1440`)
    .then((data) => {
      entry.data = data;
      entry.error = null;
    })
    .catch((error) => {
      entry.error = error.message;
    })
    .finally(() => {
      entry.at = Date.now();
      entry.loading = false;
      renderTimelines();
    });
}

async function loadRollout() {
  try {
    state.rollout = await getJSON("/api/v1/rollout");
  } catch (_) {
    state.rollout = null; // an older control plane: no rollout to show
  }
}

async function poll() {
  const started = Date.now();
  const jobs = [getJSON("/api/v1/status"), getJSON("/api/v1/instances"), loadIsolation(), loadScope(),
    loadRollout(), loadProbes()];
  const rulesDue = started - state.rulesAt >= RULES_EVERY_MS;
  if (rulesDue) jobs.push(loadRules());
  const [status, instances, , , , , rules] = await Promise.allSettled(jobs);
  const errors = [status, instances, rules]
    .filter((r) => r && r.status === "rejected")
    .map((r) => (r.reason instanceof HttpError ? r.reason.message : "the control plane does not answer"));
  if (status.status === "fulfilled") state.status = status.value;
  if (instances.status === "fulfilled") state.instances = instances.value;
  state.error = errors.length ? [...new Set(errors)].join("; ") : null;
  if (!state.error) state.okAt = Date.now();
  state.polls += 1;
  recordHistory(Date.now());
  try {
    const renderStart = performance.now();
    render();
    document.body.dataset.renderMs = (performance.now() - renderStart).toFixed(1);
  } catch (error) {
    console.error(error);
    dom.live.dataset.state = "error";
    dom.live.textContent = `page error: ${error.message}`;
  } finally {
    document.body.dataset.polls = String(state.polls);
    setTimeout(poll, Math.max(0, POLL_MS - (Date.now() - started)));
  }
}

// --- derived data ------------------------------------------------------------------------

function readyCounts() {
  const counts = new Map();
  for (const item of (state.instances && state.instances.items) || []) {
    const key = `${item.service}|${item.group}`;
    counts.set(key, (counts.get(key) || 0) + 1);
  }
  return counts;
}

function groupSpec(service, group) {
  const spec = state.services.get(service);
  return spec && (spec.groups || []).find((g) => g.name === group);
}

function desiredOf(service, group) {
  const scaler = state.status && state.status.scaler;
  const key = `${service}|${group}`;
  if (scaler && scaler.desired && key in scaler.desired) {
    return { value: scaler.desired[key], source: "scaler" };
  }
  const spec = groupSpec(service, group);
  return spec ? { value: spec.minReplicas, source: "minReplicas" } : { value: null, source: "" };
}

function isolationChain(name) {
  const chains = (state.isolation && state.isolation.chains) || [];
  return chains.find((c) => c.name === name);
}

function isolationGroups(chainName, service, index) {
  const chain = isolationChain(chainName);
  if (!chain) return [];
  // The accounting lists a chain's hops in the rules' order (the rules may be newer).
  const hops = chain.hops || [];
  const hop = hops[index] && hops[index].service === service
    ? hops[index] : hops.find((h) => h.service === service);
  return (hop && hop.groups) || [];
}

// A group's traffic outside any chain: isolation.online is {service: {group: stats}}.
function onlineStats(service, group) {
  const online = (state.isolation && state.isolation.online) || {};
  return (online[service] && online[service][group]) || null;
}

function chainMatches(chain, query) {
  if (!query) return true;
  const q = query.toLowerCase();
  if (chain.name.toLowerCase().includes(q)) return true;
  return chain.dyes.some((dye) => {
    const d = dye.toLowerCase();
    if (d.includes(q)) return true;
    return d.endsWith("*") && q.startsWith(d.slice(0, -1)); // a run's dye: fund-yield@2024
  });
}

function chainLeaks(chain) {
  const data = isolationChain(chain.name);
  if (!data) return null;
  let leaks = 0;
  for (const hop of data.hops || []) {
    for (const group of hop.groups || []) leaks += num(group.leaks);
  }
  return leaks;
}

// --- history of desired and ready replicas --------------------------------------------

function loadHistory() {
  try {
    const saved = JSON.parse(localStorage.getItem(HISTORY_KEY) || "{}");
    return saved && typeof saved === "object" ? saved : {};
  } catch (_) {
    return {};
  }
}

function recordHistory(now) {
  if (!state.instances || !state.status) return;
  const ready = readyCounts();
  for (const [service, spec] of state.services) {
    for (const group of spec.groups || []) {
      const key = `${service}|${group.name}`;
      const desired = desiredOf(service, group.name).value;
      const samples = state.history[key] || (state.history[key] = []);
      const last = samples[samples.length - 1];
      const value = ready.get(key) || 0;
      if (!last || last[1] !== value || last[2] !== desired || now - last[0] >= HEARTBEAT_MS) {
        samples.push([now, value, desired]);
        if (samples.length > HISTORY_MAX) samples.splice(0, samples.length - HISTORY_MAX);
      }
    }
  }
  if (now - state.savedAt >= SAVE_EVERY_MS) {
    state.savedAt = now;
    try {
      localStorage.setItem(HISTORY_KEY, JSON.stringify(state.history));
    } catch (_) {
      // full or disabled: the history then lasts as long as the page
    }
  }
}

// --- rendering ---------------------------------------------------------------------------

function render() {
  renderLive();
  renderSummary();
  renderWarnings();
  renderRollout();
  renderChains();
  renderQueues();
  renderSidecars();
}

function renderLive() {
  const live = dom.live;
  if (state.error) {
    live.dataset.state = "error";
    const since = state.okAt ? ` (last update ${clock(state.okAt)})` : "";
    live.textContent = `not updating: ${state.error}${since}`;
  } else {
    live.dataset.state = "ok";
    live.textContent = `live · updated ${clock(state.okAt)}`;
  }
}

function renderSummary() {
  const status = state.status || {};
  const nodes = status.nodes || [];
  const nacking = nodes.filter((n) => Object.values(n.types || {}).some((t) => t.last_nack));
  const items = [
    ["Chains", String(state.chains.length)],
    ["Instances", String(((state.instances && state.instances.items) || []).length)],
    ["Sidecars", `${nodes.length}${nacking.length ? ` · ${nacking.length} with a NACK` : ""}`,
      nacking.length ? "bad" : ""],
  ];
  if (state.isolation) {
    const totals = state.isolation.totals || {};
    const leaks = "leaks" in totals ? num(totals.leaks)
      : state.chains.reduce((n, c) => n + (chainLeaks(c) || 0), 0);
    items.push(["Leaks", String(leaks), leaks ? "bad" : "good"]);
    // Every hop logs each request once: these add up the hops.
    items.push(["Dyed, all hops", `${rate(totals.rate_dyed)} (${num(totals.dyed)})`]);
    items.push(["Online, all hops", `${rate(totals.rate_online)} (${num(totals.online)})`]);
    for (const [key, label, warns = true] of TOTALS_SHOWN) {
      if (typeof totals[key] === "number") {
        items.push([label, fmtCount(totals[key]), totals[key] && warns ? "warn" : ""]);
      }
    }
  } else {
    items.push(["Traffic", state.isolationError ? `unavailable: ${state.isolationError}` : "no traffic data yet"]);
  }
  const scaler = status.scaler;
  if (scaler) {
    const leader = status.leadership && status.leadership.leader;
    const tick = scaler.last_tick ? ` · tick ${clock(scaler.last_tick * 1000)}` : "";
    items.push(["Scaler", `${scaler.actuator}${leader ? " · leader" : " · standby"}${tick}`,
      scaler.error ? "bad" : ""]);
  } else {
    items.push(["Scaler", "off"]);
  }
  const sync = status.sync;
  if (sync) {
    const refused = Object.keys(sync.refused || {}).length;
    items.push(["Sync", `${sync.builds} builds${refused ? ` · ${refused} refused` : ""}`,
      sync.error || refused ? "bad" : ""]);
  }
  dom.summary.replaceChildren(
    ...items.map(([label, value, tone]) =>
      h("div", { class: `stat ${tone || ""}` }, h("dt", { text: label }), h("dd", { text: value })),
    ),
  );
}

function fmtCount(value) {
  return Number.isInteger(value) ? String(value) : value.toFixed(2);
}

function renderWarnings() {
  const blocks = [];
  const isolation = state.isolation || {};
  const lists = [
    ["Uncovered hops", "the chain's dyed requests reached a service that is not one of its hops: "
      + "extend the chain there", isolation.uncovered, describeUncovered],
    ["Propagation breaks", "a hop received a dyed request and called downstream without the dye",
      isolation.propagation_breaks, describeBreak],
  ];
  for (const [title, help, items, format] of lists) {
    if (!Array.isArray(items) || items.length === 0) continue;
    blocks.push(h("div", { class: "warning", role: "note" },
      h("h3", { text: `${title} (${items.length})` }),
      h("p", { class: "muted", text: help }),
      h("ul", {}, items.slice(0, 20).map((item) => h("li", { text: format(item) }))),
      items.length > 20 ? h("p", { class: "muted", text: `and ${items.length - 20} more` }) : null,
    ));
  }
  const status = state.status || {};
  const refused = (status.sync && status.sync.refused) || {};
  if (Object.keys(refused).length) {
    blocks.push(h("div", { class: "warning", role: "note" },
      h("h3", { text: "Snapshots refused" }),
      h("ul", {}, Object.entries(refused).map(([role, why]) => h("li", { text: `${role}: ${why}` }))),
    ));
  }
  const signature = JSON.stringify([isolation.uncovered, isolation.propagation_breaks, refused]);
  if (dom.warnings.dataset.sig !== signature) {
    dom.warnings.dataset.sig = signature;
    dom.warnings.replaceChildren(...blocks);
  }
}

function renderChains() {
  const query = dom.chainFilter.value.trim();
  const shown = state.chains.filter((chain) => chainMatches(chain, query));
  dom.chainCount.textContent = state.chains.length === 0
    ? (state.rulesAt ? "No chains yet: apply a TaskChain rule." : "Loading rules…")
    : `${shown.length} of ${state.chains.length} chains${query ? ` match “${query}”` : ""}`;

  const ready = readyCounts();
  renderChainTable(shown, ready);

  const names = new Set(state.chains.map((c) => c.name));
  for (const [name, view] of chainViews) {
    if (!names.has(name)) {
      view.section.remove();
      chainViews.delete(name);
    }
  }
  let previous = null;
  for (const chain of state.chains) {
    let view = chainViews.get(chain.name);
    if (!view) {
      view = createChainView(chain);
      chainViews.set(chain.name, view);
    }
    const visible = shown.includes(chain);
    view.section.hidden = !visible;
    // Keep the DOM order the rules' order without touching sections already in place.
    const expected = previous ? previous.nextSibling : dom.chains.firstChild;
    if (expected !== view.section) dom.chains.insertBefore(view.section, expected);
    previous = view.section;
    if (visible) updateChainView(view, chain, ready);
  }
  renderTimelines();
}

// A staged rollout (tasklane apply --canary): the one in progress with both cohorts side by
// side, else how the last one ended.
function renderRollout() {
  const { current, last } = state.rollout || {};
  const blocks = [];
  if (current) {
    const cohorts = Object.entries(current.cohorts || {});
    blocks.push(h("div", { class: "warning", role: "note", "data-rollout": "current" },
      h("h3", { text: `Rollout of revision ${current.revision}: ${current.percent}% of each role's `
        + `sidecars, window ${current.window}` }),
      h("p", { "data-verdict": current.verdict.action,
        text: `verdict so far: ${current.verdict.action}: ${current.verdict.reason}` }),
      h("table", {},
        h("thead", {}, h("tr", {}, ["cohort", "requests", "5xx", "rejected", "fallbacks", "leaks"]
          .map((label) => h("th", { scope: "col", text: label })))),
        h("tbody", {}, cohorts.map(([name, t]) => h("tr", { "data-cohort": name },
          h("th", { scope: "row", text: name }),
          [t.requests, t.errors, t.rejected, t.fallbacks, t.leaks].map((value) =>
            h("td", { class: "num", text: String(value) })))))),
    ));
  } else if (last) {
    blocks.push(h("p", { class: "muted", "data-rollout": "last", "data-outcome": last.outcome,
      text: `Last rollout: revision ${last.rollout.revision} ${last.outcome} `
        + `${clock(last.at * 1000)} by ${last.by}: ${last.reason}` }));
  }
  const signature = JSON.stringify([current, last]);
  if (dom.rollout.dataset.sig !== signature) {
    dom.rollout.dataset.sig = signature;
    dom.rollout.replaceChildren(...blocks);
  }
}

// The list of chains: one row each, the numbers a person scans 20 chains for.
function renderQueues() {
  const queues = (state.isolation && state.isolation.queues) || [];
  dom.queues.hidden = queues.length === 0;
  const rows = queues.map((q) => {
    const fallbacks = sum(q.fallbacks);
    return h("tr", { "data-queue-row": `${q.queue}|${q.chain}|${q.group}` },
      h("th", { scope: "row" }, q.queue),
      h("td", {}, q.chain || h("span", { class: "muted" }, "online")),
      h("td", {}, q.service),
      h("td", { class: q.hop_group ? "" : "muted" }, q.group),
      h("td", { class: "num" }, `${rate(q.rate)} (${q.messages})`),
      h("td", { class: `num ${fallbacks ? "warn" : ""}`, title: describe(q.fallbacks) },
        String(fallbacks)),
      h("td", { class: `num ${q.bad_dyes ? "warn" : ""}` }, String(q.bad_dyes)),
      h("td", { class: `num ${q.leaks ? "bad" : ""}` }, h("strong", {}, String(q.leaks))),
    );
  });
  const signature = JSON.stringify(rows.map((row) => row.textContent));
  if (signature === dom.queueTable.dataset.sig) return;
  dom.queueTable.dataset.sig = signature;
  dom.queueTable.replaceChildren(...rows);
}

function renderChainTable(shown, ready) {
  const rows = shown.map((chain) => {
    let readySum = 0;
    let desiredSum = 0;
    const groups = new Set();
    for (const hop of chain.hops) {
      readySum += ready.get(`${hop.service}|${hop.group}`) || 0;
      desiredSum += num(desiredOf(hop.service, hop.group).value);
      groups.add(hop.group);
    }
    const data = isolationChain(chain.name);
    const totals = { dyed: 0, rate: 0, fallbacks: 0 };
    for (const hop of (data && data.hops) || []) {
      for (const g of hop.groups || []) {
        totals.fallbacks += sum(g.fallbacks);
      }
      // A request passes every hop: the first hop's dyed count is the chain's.
      if (hop === data.hops[0]) {
        for (const g of hop.groups || []) {
          totals.dyed += num(g.dyed);
          totals.rate += num(g.rate_dyed);
        }
      }
    }
    const leaks = chainLeaks(chain);
    return h("tr", { "data-chain-row": chain.name },
      h("th", { scope: "row" }, h("a", { href: `#chain-${slug(chain.name)}` }, chain.name)),
      h("td", {}, chain.dyes.map((d, i) => [i ? " " : null, h("code", { class: "dye" }, d)])),
      h("td", {}, chain.fallback || "–"),
      h("td", { class: "hop-path" },
        chain.hops.map((hop) => hop.service).join(" → "),
        h("span", { class: "muted" }, ` (${[...groups].join(", ")})`)),
      h("td", { class: "num" }, `${readySum} / ${desiredSum}`),
      h("td", { class: "num" }, data ? `${rate(totals.rate)} (${totals.dyed})` : "–"),
      h("td", { class: `num ${totals.fallbacks ? "warn" : ""}` }, data ? String(totals.fallbacks) : "–"),
      h("td", { class: `num ${leaks ? "bad" : ""}` },
        leaks === null ? "–" : h("strong", {}, String(leaks))),
    );
  });
  const signature = JSON.stringify(rows.map((row) => row.textContent));
  if (signature === dom.chainTable.dataset.sig) return;
  dom.chainTable.dataset.sig = signature;
  dom.chainTable.replaceChildren(...rows);
}

function createChainView(chain) {
  const id = `chain-${slug(chain.name)}`;
  const head = h("div", { class: "chain-head" });
  const graph = h("ol", { class: "hops", "aria-label": `Hops of ${chain.name}` });
  const body = h("div", { class: "timeline-body" });
  const open = state.timelineOpen.has(chain.name)
    ? state.timelineOpen.get(chain.name)
    : state.chains.length <= OPEN_TIMELINES_UP_TO;
  const details = h("details", { class: "timeline", open },
    h("summary", {}, "Scaling timeline: profile, desired and ready replicas, decisions"), body);
  details.addEventListener("toggle", () => {
    state.timelineOpen.set(chain.name, details.open);
    renderTimelines();
  });
  const section = h("section", { class: "chain", id, "data-chain": chain.name, "aria-labelledby": `${id}-title` },
    head, h("div", { class: "graph-wrap" }, graph), details);
  return { section, head, graph, details, body, sig: "", timelineSig: "" };
}

function updateChainView(view, chain, ready) {
  const id = `chain-${slug(chain.name)}`;
  const hopData = chain.hops.map((hop, index) => hopGroups(chain, hop, index, ready));
  const probe = state.probes.get(chain.name) || null;
  const signature = JSON.stringify([chain, hopData, state.isolation === null, state.isolationError, probe]);
  if (signature === view.sig) return;
  view.sig = signature;
  const leaks = chainLeaks(chain);
  view.head.replaceChildren(
    h("h3", { id: `${id}-title` }, chain.name),
    h("p", { class: "chain-meta" },
      "dye ", chain.dyes.map((d, i) => [i ? " " : null, h("code", { class: "dye" }, d)]),
      chain.header ? h("span", { class: "muted" }, ` in ${chain.header}`) : null,
      " · fallback ", h("strong", {}, chain.fallback || "–"),
      leaks === null ? null : [" · ", h("span", { class: `badge ${leaks ? "bad" : "good"}` },
        leaks ? `${leaks} leaks` : "no leaks")],
    ),
    probe ? renderProbe(probe) : null,
  );
  view.graph.replaceChildren(...chain.hops.map((hop, index) => renderHop(chain, hop, hopData[index])));
}

// The last `tasklane probe` of a chain: when, the verdict, and each hop's serving group.
function renderProbe(probe) {
  const hops = probe.hops.map((hop, i) => [i ? " → " : null,
    h("span", { class: hop.verdict === "ok" ? null : "bad", title: hop.detail || hop.verdict },
      `${hop.service} ${hop.servedBy || "–"}${hop.dyed === false ? " (undyed)" : ""}`)]);
  return h("p", { class: "probe", "data-ok": String(probe.ok) },
    `last probe ${clock(probe.at * 1000)}: `,
    h("span", { class: `badge ${probe.ok ? "good" : "bad"}` }, probe.ok ? "dye reached every hop" : probe.problem),
    " · ", hops);
}

// The groups a hop box shows: the chain's group, the service's online group, and any other
// group the accounting saw at this hop (e.g. one that served the chain's requests by leak).
function hopGroups(chain, hop, index, ready) {
  const seen = isolationGroups(chain.name, hop.service, index);
  const names = [hop.group];
  const spec = state.services.get(hop.service);
  if (hop.group !== "default" && spec && (spec.groups || []).some((g) => g.name === "default")) {
    names.push("default");
  }
  for (const g of seen) if (!names.includes(g.group)) names.push(g.group);
  return names.map((group) => {
    const stats = seen.find((g) => g.group === group)
      || (group === hop.group ? null : onlineStats(hop.service, group));
    const desired = desiredOf(hop.service, group);
    return {
      group,
      lane: group === hop.group ? "chain" : group === "default" ? "online" : "other",
      ready: ready.get(`${hop.service}|${group}`) || 0,
      desired: desired.value,
      desiredSource: desired.source,
      stats,
    };
  });
}

function renderHop(chain, hop, groups) {
  const limit = hop.rateLimit
    ? `limit ${hop.rateLimit.requestsPerSecond}/s (burst ${hop.rateLimit.burst})`
    : "no rate limit";
  return h("li", { class: "hop", "data-service": hop.service },
    h("h4", {}, hop.service),
    h("p", { class: "hop-meta muted" }, `→ ${hop.group} · weight ${hop.weight ?? 100}% · ${limit}`),
    h("div", { class: "groups" }, groups.map((g) => renderGroup(hop, g))),
  );
}

function renderGroup(hop, g) {
  const laneLabel = { chain: "chain group", online: "online", other: "outside the chain" }[g.lane];
  const desiredTitle = g.desiredSource === "scaler" ? "desired by the scaler"
    : g.desiredSource === "minReplicas" ? "desired: the group's minReplicas (no scaler decision)" : "";
  const instances = h("div", { class: "instances", title: desiredTitle },
    h("span", { class: "big", "data-k": "ready", "data-value": g.ready }, String(g.ready)),
    " / ",
    h("span", { "data-k": "desired", "data-value": g.desired ?? "" }, g.desired ?? "–"),
    h("span", { class: "muted" }, " ready / desired"),
  );
  const head = h("div", { class: "group-head" },
    h("span", { class: "group-name" }, g.group),
    h("span", { class: `lane lane-${g.lane}` }, laneLabel));
  const s = g.stats;
  if (!s) {
    const why = state.isolationError ? "traffic data unavailable"
      : state.isolation ? "no traffic seen" : "no traffic data yet";
    return groupBox(hop, g, [head, instances, h("p", { class: "muted no-data", "data-k": "no-data" }, why)]);
  }
  const fallbacks = sum(s.fallbacks);
  const fallbackTitle = Object.entries(s.fallbacks || {}).map(([k, v]) => `${k}: ${v}`).join(", ");
  const leaks = num(s.leaks);
  return groupBox(hop, g, [
    head,
    h("div", { class: "group-main" },
      instances,
      h("div", { class: `leaks ${leaks ? "bad" : "good"}`, "data-k": "leaks", "data-value": leaks },
        h("span", { class: "leak-count" }, String(leaks)), leaks === 1 ? " leak" : " leaks")),
    h("dl", { class: "counters" },
      counter("dyed", `${rate(s.rate_dyed)}`, num(s.dyed), "dyed"),
      counter("online", `${rate(s.rate_online)}`, num(s.online), "online"),
      counter("5xx", String(num(s.errors_5xx)), null, "errors_5xx", num(s.errors_5xx) ? "bad" : ""),
      counter("fallbacks", String(fallbacks), null, "fallbacks", fallbacks ? "warn" : "",
        fallbackTitle || "no fallbacks"),
      counter("rate-limited", String(num(s.rate_limited)), null, "rate_limited",
        num(s.rate_limited) ? "warn" : ""),
      num(s.refused) ? counter("refused", String(num(s.refused)), null, "refused", "warn",
        "requests of no chain of this group, turned away (403)") : null,
      counter("p50 / p99", latency(s.p50_ms, s.p99_ms), null, "latency", "wide"),
    ),
  ]);
}

function groupBox(hop, g, children) {
  return h("div", {
    class: `group lane-${g.lane}`,
    "data-service": hop.service,
    "data-group": g.group,
  }, children);
}

function counter(label, value, total, key, tone, title) {
  return h("div", { class: `counter ${tone || ""}`, title: title || undefined },
    h("dt", {}, label),
    h("dd", { "data-k": key, "data-value": total ?? undefined },
      value, total === null ? null : h("span", { class: "total" }, ` (${total})`)));
}

// --- timelines ---------------------------------------------------------------------------

function renderTimelines() {
  const now = Date.now();
  for (const chain of state.chains) {
    const view = chainViews.get(chain.name);
    if (!view || view.section.hidden || !view.details.open) continue;
    const groups = [];
    for (const hop of chain.hops) {
      loadProfile(hop.service);
      groups.push([hop.service, hop.group]);
    }
    // Redraw at most every poll: the "now" line moves, the history grows.
    const signature = JSON.stringify([state.polls, state.window, groups,
      groups.map(([s]) => (state.profiles.get(s) || {}).at)]);
    if (signature === view.timelineSig) continue;
    view.timelineSig = signature;
    view.body.replaceChildren(
      legend(),
      ...groups.map(([service, group]) => timelineFigure({
      service,
      group,
      now,
      window: state.window,
      profile: state.profiles.get(service),
      samples: state.history[`${service}|${group}`] || [],
      desired: desiredOf(service, group).value,
      maxReplicas: (groupSpec(service, group) || {}).maxReplicas,
    })),
    );
  }
}

// --- sidecars ----------------------------------------------------------------------------

function sidecarRows() {
  const nodes = (state.status && state.status.nodes) || [];
  return nodes.map((node) => {
    const { service, group } = node;
    const types = node.types || {};
    let nack = null;
    for (const [type, t] of Object.entries(types)) {
      if (t.last_nack && (!nack || t.last_nack.at > nack.at)) nack = { type, count: t.nacks, ...t.last_nack };
    }
    return { node, service: service || "", group: group || "", types, nack, scope: scopeOf(service, group) };
  });
}

// The entries of a role's scope, or null when the control plane does not say.
function scopeOf(service, group) {
  const services = state.scope && state.scope.services;
  if (!services) return null;
  return (services[service] && services[service][group]) || [];
}

function renderSidecars() {
  const rows = sidecarRows();
  const query = dom.sidecarFilter.value.trim().toLowerCase();
  const shown = query
    ? rows.filter((r) => [r.node.node_id, r.service, r.group, r.nack && r.nack.message, r.node.unknown_service && "unknown service"]
      .some((text) => text && text.toLowerCase().includes(query)))
    : rows;
  dom.sidecarCount.textContent = query ? `(${shown.length} of ${rows.length})` : `(${rows.length})`;
  const signature = JSON.stringify([query, shown.map((r) => [r.node, r.scope])]);
  if (signature === dom.sidecarBody.dataset.sig) return;
  dom.sidecarBody.dataset.sig = signature;
  if (rows.length === 0) {
    dom.sidecarBody.replaceChildren(h("tr", {}, h("td", { colspan: 11, class: "muted" }, "No sidecar connected.")));
    return;
  }
  dom.sidecarBody.replaceChildren(...shown.map((r) => h("tr", { "data-node": r.node.node_id, class: r.nack ? "nacked" : "" },
    h("th", { scope: "row", class: "node" }, r.node.node_id),
    serviceCell(r),
    h("td", {}, r.group),
    h("td", {}, r.node.protocol),
    scopeCell(r),
    h("td", { title: new Date(r.node.connected_at * 1000).toString() }, clock(r.node.connected_at * 1000)),
    ...["cds", "eds", "lds", "rds"].map((type) => versionCell(r.types[type])),
    nackCell(r.nack),
  )));
}

// How many services the sidecar holds the config of; opened, each one and why it is there.
// Open cells stay open across re-renders (dom.openScopes, by role).
function scopeCell(r) {
  if (!r.scope) return h("td", { class: "scope muted" }, "–");
  const role = `${r.service}|${r.group}`;
  const why = (e) => {
    const reason = [e.reason, e.detail].filter(Boolean).join(" ");
    const seen = e.lastSeen ? `, last seen ${clock(e.lastSeen * 1000)}` : "";
    const since = e.since ? ` since ${clock(e.since * 1000)}` : "";
    return `${reason}${since}${seen}`;
  };
  const details = h("details", { open: dom.openScopes.has(role) },
    h("summary", { title: r.scope.map((e) => `${e.callee}: ${why(e)}`).join("\n") || "no service" },
      `${r.scope.length}`),
    h("ul", {}, r.scope.map((e) => h("li", { "data-callee": e.callee, "data-reason": e.reason },
      h("b", {}, e.callee), ` ${why(e)}`))));
  details.addEventListener("toggle", () => {
    if (details.open) dom.openScopes.add(role);
    else dom.openScopes.delete(role);
  });
  return h("td", { class: "scope" }, details);
}

// A sidecar whose role no rule defines is served only listeners that answer 503 with why.
function serviceCell(r) {
  if (!r.node.unknown_service) return h("td", {}, r.service);
  return h("td", { class: "unknown-service" }, r.service, " ",
    h("span", { class: "badge bad", title: `No rule defines ${r.node.role}: its listeners answer 503 until it is applied` },
      "UNKNOWN SERVICE"));
}

function versionCell(t) {
  if (!t) return h("td", { class: "version muted" }, "–");
  const pending = t.sent_version && t.sent_version !== t.acked_version;
  const title = [`ACKed ${t.acked_version || "nothing"}`, pending ? `sent ${t.sent_version}, not ACKed yet` : null,
    t.nacks ? `${t.nacks} NACKs` : null].filter(Boolean).join("; ");
  return h("td", { class: `version ${pending ? "pending" : ""}`, title },
    h("code", {}, shortVersion(t.acked_version)),
    pending ? h("span", { class: "pending-mark" }, " (pending)") : null);
}

function nackCell(nack) {
  if (!nack) return h("td", { class: "nack muted" }, "none");
  return h("td", { class: "nack bad", title: nack.message },
    h("span", { class: "nack-head" },
      `${nack.type.toUpperCase()} ${shortVersion(nack.version)} at ${clock(nack.at * 1000)}`
      + (nack.count > 1 ? ` (${nack.count} NACKs)` : "")),
    h("span", { class: "nack-message" }, nack.message));
}

// --- start -------------------------------------------------------------------------------

function start() {
  dom.live = document.getElementById("live");
  dom.summary = document.getElementById("summary");
  dom.warnings = document.getElementById("warnings");
  dom.rollout = document.getElementById("rollout");
  dom.chainFilter = document.getElementById("chain-filter");
  dom.chainCount = document.getElementById("chain-count");
  dom.chainTable = document.querySelector("#chain-table tbody");
  dom.chains = document.getElementById("chains");
  dom.queues = document.getElementById("queues");
  dom.queueTable = document.querySelector("#queue-table tbody");
  dom.window = document.getElementById("window");
  dom.sidecarFilter = document.getElementById("sidecar-filter");
  dom.sidecarCount = document.getElementById("sidecar-count");
  dom.sidecarBody = document.querySelector("#sidecars tbody");
  dom.openScopes = new Set();

  const params = new URLSearchParams(location.search);
  if (params.get("chain")) dom.chainFilter.value = params.get("chain");
  try {
    const saved = localStorage.getItem("tasklane.window");
    if (saved && [...dom.window.options].some((o) => o.value === saved)) dom.window.value = saved;
  } catch (_) {
    // no storage: the default window
  }
  state.window = dom.window.value.split(",").map(Number);

  dom.chainFilter.addEventListener("input", () => {
    const url = new URL(location.href);
    if (dom.chainFilter.value) url.searchParams.set("chain", dom.chainFilter.value);
    else url.searchParams.delete("chain");
    history.replaceState(null, "", url);
    renderChains();
  });
  dom.sidecarFilter.addEventListener("input", renderSidecars);
  dom.window.addEventListener("change", () => {
    state.window = dom.window.value.split(",").map(Number);
    try {
      localStorage.setItem("tasklane.window", dom.window.value);
    } catch (_) {
      // not kept across reloads then
    }
    renderTimelines();
  });
  poll();
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
