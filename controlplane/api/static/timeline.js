// The scaling timeline of one group: an SVG of the profile ahead (next 24 h), the desired and
// ready replicas this page saw (and, before it was opened, the scaler's decisions), with each
// decision a marker whose tooltip gives its reason, and the latest decisions listed below.
// A pure function of its arguments: the page decides what to fetch and when to redraw.

import { clock, h, svg } from "./dom.js";

const WIDTH = 760;
const HEIGHT = 120;
const MARGIN = { left: 28, right: 8, top: 8, bottom: 22 };
const DECISIONS_LISTED = 5;
const PROFILE_STEP_MS = 60000; // the profile endpoint's slots are minutes
const ENVELOPE_PX = 2;
const TICK_STEPS_S = [300, 900, 1800, 3600, 7200, 10800, 21600, 43200];
const MAX_TICKS = 8;
const LABEL_HALF_PX = 14; // a time label this close to an edge would be cut

export function legend() {
  return h("p", { class: "legend" },
    h("span", { class: "swatch profile" }), " profile (next 24 h) ",
    h("span", { class: "swatch desired" }), " desired ",
    h("span", { class: "swatch ready" }), " ready ",
    h("span", { class: "swatch decision" }), " scaler decision (hover for its reason)");
}

// service, group: what it is about. now: ms. window: [past s, future s].
// profile: {data, error} from /api/v1/profile/{service} (data may be missing while loading).
// samples: [[ms, ready, desired], ...] seen by the page. desired: the desired count now.
// maxReplicas: the group's bound, so every chart of a group has the same scale.
export function timelineFigure({ service, group, now, window, profile, samples, desired, maxReplicas }) {
  const data = profile && profile.data;
  const [past, future] = window;
  const t0 = now - past * 1000;
  const t1 = now + future * 1000;

  const series = (data && data.groups && data.groups[group]) || [];
  const profilePoints = series.map((v, i) => [(data.start + i * 60) * 1000, v]);
  const decisions = ((data && data.decisions) || []).filter((d) => d.group === group);
  const firstSample = samples.length ? samples[0][0] : now;
  // Desired before this page's history: the steps of the decisions.
  const desiredPoints = decisions.filter((d) => d.at * 1000 < firstSample)
    .map((d) => [d.at * 1000, d.replicas]);
  for (const [t, , value] of samples) if (value !== null) desiredPoints.push([t, value]);
  const readyPoints = samples.map(([t, ready]) => [t, ready]);

  const maxY = Math.max(1, maxReplicas || 0, ...series, ...desiredPoints.map((p) => p[1]),
    ...readyPoints.map((p) => p[1]), ...decisions.map((d) => d.replicas));
  const plotWidth = WIDTH - MARGIN.left - MARGIN.right;
  const x = (t) => MARGIN.left + ((Math.min(Math.max(t, t0), t1) - t0) / (t1 - t0)) * plotWidth;
  const y = (v) => MARGIN.top + (1 - v / maxY) * (HEIGHT - MARGIN.top - MARGIN.bottom);
  const bottom = HEIGHT - MARGIN.bottom;

  const children = [];
  for (const v of [0, maxY]) {
    children.push(svg("line", { x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: y(v), y2: y(v), class: "grid" }));
    children.push(svg("text", { x: MARGIN.left - 4, y: y(v) + 4, class: "tick", "text-anchor": "end" }, String(v)));
  }
  const step = tickStep((t1 - t0) / 1000) * 1000;
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) {
    children.push(svg("line", { x1: x(t), x2: x(t), y1: MARGIN.top, y2: bottom, class: "grid" }));
    if (x(t) - MARGIN.left < LABEL_HALF_PX || WIDTH - MARGIN.right - x(t) < LABEL_HALF_PX) continue;
    children.push(svg("text", { x: x(t), y: HEIGHT - 6, class: "tick", "text-anchor": "middle" }, clock(t, false)));
  }
  const envelope = envelopePath(profilePoints, PROFILE_STEP_MS, t0, t1, x, y);
  if (envelope) {
    const area = `${envelope.d}V${y(0).toFixed(1)}H${envelope.start}Z`;
    children.push(svg("path", { d: area, class: "area profile" }));
    children.push(svg("path", { d: envelope.d, class: "line profile" }));
  }
  children.push(svg("path", { d: stepPath(desiredPoints, now, x, y, t0), class: "line desired" }));
  children.push(svg("path", { d: stepPath(readyPoints, now, x, y, t0), class: "line ready" }));
  children.push(svg("line", { x1: x(now), x2: x(now), y1: MARGIN.top - 4, y2: bottom, class: "now" }));
  children.push(svg("text", { x: x(now) + 3, y: MARGIN.top + 4, class: "tick now-label" }, "now"));
  for (const d of decisions) {
    const t = d.at * 1000;
    if (t < t0 || t > t1) continue;
    children.push(svg("circle", { cx: x(t), cy: y(d.replicas), r: 4, class: "decision" },
      svg("title", {}, `${clock(t)} → ${d.replicas} replicas: ${d.reason}`)));
  }

  const readyNow = readyPoints.length ? readyPoints[readyPoints.length - 1][1] : 0;
  const label = `${service} ${group}: ${readyNow} ready, ${desired ?? "no"} desired; `
    + `profile peak in the next 24 h: ${series.length ? Math.max(...series) : "none"}`;
  const recent = decisions.slice(-DECISIONS_LISTED).reverse();
  let note = null;
  if (profile && profile.error) note = h("span", { class: "bad" }, ` profile unavailable: ${profile.error}`);
  else if (!data) note = h("span", { class: "muted" }, " loading profile…");
  return h("figure", { class: "timeline-group", "data-service": service, "data-group": group },
    h("figcaption", {}, h("strong", {}, `${service} · ${group}`), note),
    h("div", { class: "svg-wrap" },
      svg("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, width: WIDTH, height: HEIGHT, role: "img", "aria-label": label },
        children)),
    recent.length === 0
      ? h("p", { class: "muted decisions-empty" }, "No scaler decisions recorded.")
      : h("ol", { class: "decisions", "aria-label": `Recent scaler decisions for ${service} ${group}` },
        recent.map((d) => h("li", {},
          h("time", { datetime: new Date(d.at * 1000).toISOString() }, clock(d.at * 1000)),
          ` → ${d.replicas} replicas: `, h("span", { class: "reason" }, d.reason)))),
  );
}

function tickStep(seconds) {
  return TICK_STEPS_S.find((s) => seconds / s <= MAX_TICKS) || TICK_STEPS_S[TICK_STEPS_S.length - 1];
}

// The profile as the highest value in each ENVELOPE_PX-wide column: per minute over 24 h, a
// cron that fires every few minutes would otherwise be a solid block of strokes, and the peak
// is what capacity has to meet. Zoomed in, each column holds one value: the exact steps.
export function envelopePath(points, stepMs, t0, t1, x, y) {
  const columns = new Map();
  for (const [t, v] of points) {
    if (t + stepMs <= t0 || t >= t1) continue;
    const c0 = Math.floor(x(t) / ENVELOPE_PX);
    const c1 = Math.max(c0, Math.ceil(x(Math.min(t + stepMs, t1)) / ENVELOPE_PX) - 1);
    for (let c = c0; c <= c1; c += 1) columns.set(c, Math.max(columns.get(c) ?? 0, v));
  }
  if (columns.size === 0) return null;
  const sorted = [...columns.keys()].sort((a, b) => a - b);
  let d = `M${(sorted[0] * ENVELOPE_PX).toFixed(1)},${y(columns.get(sorted[0])).toFixed(1)}`;
  let last = columns.get(sorted[0]);
  for (const c of sorted.slice(1)) {
    const v = columns.get(c);
    if (v !== last) d += `H${(c * ENVELOPE_PX).toFixed(1)}V${y(v).toFixed(1)}`;
    last = v;
  }
  return {
    d: `${d}H${((sorted[sorted.length - 1] + 1) * ENVELOPE_PX).toFixed(1)}`,
    start: (sorted[0] * ENVELOPE_PX).toFixed(1),
  };
}

// A step line through (time, value) points, held until `end`; what lies before t0 starts at t0.
export function stepPath(points, end, x, y, t0) {
  const sorted = [...points].sort((a, b) => a[0] - b[0]);
  let d = "";
  let last = null;
  for (const [t, v] of sorted) {
    if (t > end) break;
    if (last === null) d = `M${x(Math.max(t, t0)).toFixed(1)},${y(v).toFixed(1)}`;
    else if (v !== last) d += `H${x(t).toFixed(1)}V${y(v).toFixed(1)}`;
    last = v;
  }
  if (last !== null) d += `H${x(end).toFixed(1)}`;
  return d;
}
