// The leaderboard page: ratings and win rates of /api/leaderboard as tables (text only).
"use strict";
const fmt = (x) => (typeof x === "number" ? x.toFixed(1) : "–");

function cells(row, values, tag = "td") {
  values.forEach((v) => row.appendChild(Object.assign(document.createElement(tag), {textContent: v})));
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
  const body = document.querySelector("#ratings tbody");
  board.ratings.forEach((r, i) => cells(body.insertRow(), [i + 1, r.model, fmt(r.bradley_terry),
    `${fmt(r.bradley_terry_lower)} – ${fmt(r.bradley_terry_upper)}`, fmt(r.elo), r.battles, r.wins, r.losses,
    r.ties, r.both_bad]));
  const table = document.getElementById("win-rates");
  cells(table.createTHead().insertRow(), ["", ...board.models], "th");
  const tbody = table.createTBody();
  board.win_rates.forEach((w) => {
    const row = tbody.insertRow();
    cells(row, [w.model], "th");
    cells(row, w.win_rates.map((x, j) => (w.battles[j] ? `${(100 * Number(x)).toFixed(0)}% (${w.battles[j]})` : "")));
  });
}
load();
