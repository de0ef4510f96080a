// DOM and text helpers of the dashboard: elements from data (text is always text, never
// markup: the page shows names and messages that come from rules and sidecars) and formats.

const SVG_NS = "http://www.w3.org/2000/svg";

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

export function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.setAttribute("class", value);
    else if (key === "text") el.textContent = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

const pad2 = (n) => String(n).padStart(2, "0");
export function clock(ms, seconds = true) {
  const d = new Date(ms);
  const hm = `${pad2(d.getHours())}:${pad2(d.getMinutes())}`;
  return seconds ? `${hm}:${pad2(d.getSeconds())}` : hm;
}

export function num(value) {
  return typeof value === "number" && Number.isFinite(value) ? value : 0;
}

export function rate(value) {
  const v = num(value);
  return v >= 100 ? `${Math.round(v)}/s` : `${v.toFixed(1)}/s`;
}

export function latency(p50, p99) {
  const known = (v) => typeof v === "number" && Number.isFinite(v);
  const one = (v) => (known(v) ? v.toFixed(1) : "–");
  return known(p50) || known(p99) ? `${one(p50)} / ${one(p99)} ms` : "–";
}

export function sum(obj) {
  return Object.values(obj || {}).reduce((total, n) => total + num(n), 0);
}

export function shortVersion(version) {
  if (!version) return "–";
  return version.length > 12 ? `${version.slice(0, 10)}…` : version;
}

export function slug(text) {
  return String(text).replace(/[^A-Za-z0-9_-]/g, "_");
}

export function describe(item) {
  // Items of lists whose exact shape is the accounting's own (uncovered hops, breaks).
  if (item === null || typeof item !== "object") return String(item);
  return Object.entries(item)
    .map(([key, value]) => `${key}: ${typeof value === "object" ? JSON.stringify(value) : value}`)
    .join(", ");
}
