// The annotators page (admin): who votes, how much, and how far they agree, from
// /api/annotators (GetAnnotators). Names are shown as text only.
"use strict";
const share = (x, n) => (x === undefined ? `– (${n})` : `${(100 * Number(x)).toFixed(0)}% (${n})`);

// The last `days` UTC days, oldest first, as YYYY-MM-DD, up to today (or the report's latest
// day, should this browser's clock be behind the server's).
function lastDays(days, latest) {
  const end = Math.max(Date.now(), latest ? Date.parse(`${latest}T00:00:00Z`) : 0);
  return Array.from({length: days}, (_, i) => new Date(end - (days - 1 - i) * 86400000).toISOString().slice(0, 10));
}

// Votes per day as a small bar chart, one bar for each of `days` (the report lists only days
// with votes), all on the same scale (`most`).
function dailyBars(daily, days, most) {
  const votes = Object.fromEntries(daily.map((d) => [d.day, d.votes]));
  const bar = 7, h = 26, svg = svgRoot(days.length * bar, h, "votes per day");
  svg.classList.add("daily");
  days.map((day) => ({day, votes: votes[day] || 0})).forEach((d, i) => {
    const height = d.votes ? Math.max(3, (h - 2) * (d.votes / most)) : 2;
    svg.append(withTitle(svgEl("rect", {x: i * bar, y: h - height, width: bar - 1, height,
      class: d.votes ? "day" : "empty"}), `${d.day}: ${d.votes} vote${d.votes === 1 ? "" : "s"}`));
  });
  return svg;
}

async function load() {
  const days = document.getElementById("days").value;
  const table = document.querySelector("#annotators tbody"), pairs = document.querySelector("#pairs tbody");
  let report;
  try {
    report = await api(`/api/annotators?days=${encodeURIComponent(days)}`);  // asks for a token if needed
  } catch (e) {
    document.getElementById("summary").textContent = e.message;  // a 403: an admin token is needed
    document.getElementById("summary").className = "error";
    if (e.message.startsWith("PERMISSION_DENIED")) {  // signed in as someone else: offer a fresh sign-in
      const again = Object.assign(document.createElement("button"), {type: "button", textContent: "Use another token"});
      again.onclick = () => { sessionStorage.removeItem(TOKEN_KEY); location.reload(); };
      document.getElementById("summary").append(" ", again);
    }
    return;
  }
  const cap = report.max_votes_per_annotator_per_day;
  document.getElementById("summary").className = "";
  document.getElementById("summary").textContent = `${report.num_votes} votes by ${report.annotators.length} ` +
    `annotator${report.annotators.length === 1 ? "" : "s"}. ` +
    (cap ? `Cap: ${cap} votes per annotator per UTC day.` : "No daily cap (--max-votes-per-annotator-per-day 0).");
  const daily = report.annotators.flatMap((a) => a.daily);
  const most = Math.max(1, ...daily.map((d) => d.votes));
  const dayList = lastDays(Number(days), daily.map((d) => d.day).sort().pop());
  table.replaceChildren(...report.annotators.map((a) => {
    const row = cells(document.createElement("tr"), [a.annotator, a.votes, cap ? `${a.votes_today} / ${cap}` : a.votes_today,
      share(a.agreement_with_majority, a.majority_comparisons),
      share(a.agreement_with_reward_model, a.reward_comparisons)]);
    row.insertCell().append(dailyBars(a.daily, dayList, most));
    return row;
  }));
  document.getElementById("fleiss").textContent = report.fleiss_kappa === undefined
    ? "Fleiss' kappa: no comparison has two votes yet."
    : `Fleiss' kappa ${num(report.fleiss_kappa, 3)} over ${report.fleiss_comparisons} comparisons with ` +
      `${report.fleiss_raters} annotators each.`;
  pairs.replaceChildren(...report.pairs.map((p) => cells(document.createElement("tr"),
    [p.annotator_a, p.annotator_b, p.shared_comparisons, num(p.cohen_kappa, 3)])));
  if (!report.pairs.length) pairs.append(cells(document.createElement("tr"), ["no two annotators share a comparison yet", "", "", ""]));
}
document.getElementById("days").onchange = load;
load();
