// Small SVG helpers for the leaderboard and annotators pages: elements are made with
// createElementNS and filled with textContent only (model and annotator names are whatever
// people typed), no library.
"use strict";
const SVG_NS = "http://www.w3.org/2000/svg";

// An SVG element with attributes, and optional text (as text, never markup).
function svgEl(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

// An <svg> of width x height user units that scales down with the page.
function svgRoot(width, height, label) {
  return svgEl("svg", {width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": label});
}

// A hover tooltip: SVG's <title> child.
function withTitle(el, text) {
  el.appendChild(svgEl("title", {}, text));
  return el;
}

// Round tick values covering [lo, hi] with at most about `most` ticks.
function ticks(lo, hi, most = 8) {
  const raw = (hi - lo) / most;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9; t += step) out.push(Math.round(t * 1e6) / 1e6);
  return out;
}

// A number for a table: fixed digits, or a dash for NaN / missing (proto JSON writes NaN as "NaN").
function num(x, digits = 1) {
  const v = Number(x);
  return x === undefined || x === null || !Number.isFinite(v) ? "–" : v.toFixed(digits);
}

// Cells of a table row, as text.
function cells(row, values, tag = "td") {
  values.forEach((v) => row.appendChild(Object.assign(document.createElement(tag), {textContent: v})));
  return row;
}
