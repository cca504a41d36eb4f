// The leaderboard page: /api/leaderboard as a forest plot of the ratings and their 95%
// intervals, a heat map of the win rates, and tables (text only; charts.js makes the SVG).
"use strict";
const BT_COLOUR = "#1f5fbf", STYLE_COLOUR = "#e07b00";
// Win-rate colours: red at 0, white at 0.5, blue at 1 (ColorBrewer RdBu's ends).
const RED = [202, 0, 32], WHITE = [255, 255, 255], BLUE = [5, 113, 176];

// Room for labels of `texts`: about 7.5 px a character at the charts' 13 px font.
const labelRoom = (texts, least) => Math.max(least, 24 + 7.5 * Math.max(...texts.map((t) => t.length)));

function winColour(x) {
  const [from, to, t] = x < 0.5 ? [RED, WHITE, x / 0.5] : [WHITE, BLUE, (x - 0.5) / 0.5];
  return `rgb(${from.map((c, i) => Math.round(c + (to[i] - c) * t)).join(", ")})`;
}

const interval = (value, lower, upper) => `${num(value)} (${num(lower)} – ${num(upper)})`;

// One row per model, best first: the Bradley-Terry rating (dot) and its interval (bar), and
// just below it the style-controlled one in another colour; an Elo axis underneath.
function forestPlot(ratings) {
  const label = (r) => `${r.model} (${r.battles} battle${r.battles === 1 ? "" : "s"})`;
  const rowH = 34, left = labelRoom(ratings.map(label), 160), right = 30, top = 34, bottom = 44;
  const width = left + 600 + right;
  const height = top + rowH * ratings.length + bottom;
  const ends = ratings.flatMap((r) => [r.bradley_terry_lower, r.bradley_terry_upper, r.style_controlled_lower,
    r.style_controlled_upper, r.bradley_terry, r.style_controlled]).map(Number).filter(Number.isFinite);
  let lo = Math.min(...ends), hi = Math.max(...ends);
  if (!(hi > lo)) [lo, hi] = [lo - 50, hi + 50];  // one value only: still an axis around it
  const pad = (hi - lo) * 0.05;
  [lo, hi] = [lo - pad, hi + pad];
  const x = (v) => left + ((Number(v) - lo) / (hi - lo)) * (width - left - right);
  const svg = svgRoot(width, height, "ratings with 95% intervals");
  const axisY = top + rowH * ratings.length;
  for (const t of ticks(lo, hi)) {
    svg.append(svgEl("line", {x1: x(t), x2: x(t), y1: top - 6, y2: axisY, class: t === 1000 ? "mean" : "grid"}),
      svgEl("text", {x: x(t), y: axisY + 16, "text-anchor": "middle", class: "tick"}, String(t)));
  }
  svg.append(svgEl("line", {x1: left, x2: width - right, y1: axisY, y2: axisY, class: "axis"}),
    svgEl("text", {x: (left + width - right) / 2, y: axisY + 36, "text-anchor": "middle", class: "axis-label"},
      "rating (Elo scale; 1000 is the mean)"));
  [["Bradley-Terry", BT_COLOUR], ["style-controlled", STYLE_COLOUR]].forEach(([name, colour], i) => {
    const lx = left + i * 240;
    svg.append(svgEl("circle", {cx: lx + 6, cy: 14, r: 5, fill: colour}),
      svgEl("text", {x: lx + 16, y: 18, class: "legend"}, `${name} (95% interval)`));
  });
  ratings.forEach((r, i) => {
    const y = top + rowH * i + rowH / 2;
    const row = svgEl("g", {class: "forest-row", "data-model": r.model});
    row.append(svgEl("text", {x: left - 12, y: y + 4, "text-anchor": "end", class: "label"}, label(r)));
    for (const [kind, dy, colour, value, lower, upper] of [
      ["bt", -6, BT_COLOUR, r.bradley_terry, r.bradley_terry_lower, r.bradley_terry_upper],
      ["style", 6, STYLE_COLOUR, r.style_controlled, r.style_controlled_lower, r.style_controlled_upper]]) {
      if (!Number.isFinite(Number(value))) continue;
      const name = kind === "bt" ? "Bradley-Terry" : "style-controlled";
      const mark = svgEl("g", {class: kind});
      mark.append(svgEl("title", {}, `${r.model}, ${name}: ${interval(value, lower, upper)}`),
        svgEl("line", {x1: x(lower), x2: x(upper), y1: y + dy, y2: y + dy, stroke: colour, "stroke-width": 3,
          "stroke-linecap": "round", class: "interval"}),
        svgEl("circle", {cx: x(value), cy: y + dy, r: 5, fill: colour, stroke: "white", class: "point"}));
      row.append(mark);
    }
    svg.append(row);
  });
  return svg;
}

// models x models cells: the row model's win rate over the column model, coloured red (0)
// through white (0.5) to blue (1); grey where they never met (and on the diagonal).
function heatMap(models, rows) {
  const cell = 70, left = labelRoom(models, 100), top = Math.min(200, labelRoom(models, 60) * 0.65 + 10);
  const width = left + cell * models.length + 90;
  const keyHeight = Math.max(cell * models.length, 100), height = top + keyHeight + 20;
  const svg = svgRoot(width, height, "win rates of row over column");
  models.forEach((m, j) => {
    const cx = left + cell * j + cell / 2;
    svg.append(svgEl("text", {x: cx, y: top - 8, transform: `rotate(-40 ${cx} ${top - 8})`, class: "label"}, m));
  });
  rows.forEach((w, i) => {
    const y = top + cell * i;
    svg.append(svgEl("text", {x: left - 10, y: y + cell / 2 + 4, "text-anchor": "end", class: "label"}, w.model));
    w.win_rates.forEach((rate, j) => {
      const n = w.battles[j], x = left + cell * j, p = Number(rate);
      const met = n > 0 && Number.isFinite(p);
      const rect = svgEl("rect", {x, y, width: cell - 2, height: cell - 2, fill: met ? winColour(p) : "#e6e6e6",
        class: "cell", "data-row": w.model, "data-col": models[j]});
      svg.append(withTitle(rect, met ? `${w.model} over ${models[j]}: ${(100 * p).toFixed(0)}% of ${n}`
        : `${w.model} and ${models[j]} never met`));
      if (!met) return;
      const ink = Math.abs(p - 0.5) > 0.3 ? "white" : "#222";  // readable on the dark ends
      svg.append(svgEl("text", {x: x + cell / 2 - 1, y: y + cell / 2 - 2, "text-anchor": "middle", fill: ink,
        class: "pct"}, `${(100 * p).toFixed(0)}%`),
      svgEl("text", {x: x + cell / 2 - 1, y: y + cell / 2 + 14, "text-anchor": "middle", fill: ink, class: "count"},
        `${n} battle${n === 1 ? "" : "s"}`));
    });
  });
  // The colour key: 0% .. 100% down the right-hand side.
  const kx = left + cell * models.length + 20, kh = keyHeight;
  for (let k = 0; k < 20; k++) {
    svg.append(svgEl("rect", {x: kx, y: top + (kh * k) / 20, width: 14, height: kh / 20 + 0.5,
      fill: winColour(1 - k / 19)}));
  }
  svg.append(svgEl("text", {x: kx + 18, y: top + 10, class: "tick"}, "100%"),
    svgEl("text", {x: kx + 18, y: top + kh / 2 + 4, class: "tick"}, "50%"),
    svgEl("text", {x: kx + 18, y: top + kh, class: "tick"}, "0%"));
  return svg;
}

async function load() {
  let board;
  try {
    board = await api("/api/leaderboard");  // api.js: asks for a token if the server wants one
  } catch (e) {
    document.getElementById("summary").textContent = e.message;
    return;
  }
  const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
  document.getElementById("summary").textContent =
    `${plural(board.num_battles, "battle")} from ${plural(board.num_votes, "vote")}.`;
  document.getElementById("prior-sd").textContent = num(board.prior_sd, 0);
  const body = document.querySelector("#ratings tbody");
  board.ratings.forEach((r, i) => cells(body.insertRow(), [i + 1, r.model,
    interval(r.bradley_terry, r.bradley_terry_lower, r.bradley_terry_upper),
    interval(r.style_controlled, r.style_controlled_lower, r.style_controlled_upper), num(r.elo), r.battles, r.wins,
    r.losses, r.ties, r.both_bad]));
  if (board.ratings.length) document.getElementById("forest").append(forestPlot(board.ratings));
  if (board.models.length) document.getElementById("heatmap").append(heatMap(board.models, board.win_rates));
  const table = document.getElementById("win-rates");
  cells(table.createTHead().insertRow(), ["", ...board.models], "th");
  const tbody = table.createTBody();
  board.win_rates.forEach((w) => {
    const row = tbody.insertRow();
    cells(row, [w.model], "th");
    cells(row, w.win_rates.map((x, j) => (w.battles[j] ? `${(100 * Number(x)).toFixed(0)}% (${w.battles[j]})` : "")));
  });
  const style = document.querySelector("#style tbody");
  board.style.forEach((s) => cells(style.insertRow(), [s.feature, num(s.elo_per_sd), `${num(s.lower)} – ${num(s.upper)}`]));
  if (!board.style.length) cells(style.insertRow(), ["no battles to fit yet", "–", "–"]);
}
load();
