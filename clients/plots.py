"""Plots of what a server reports: the leaderboard as a PNG (`rlhfkit feedback leaderboard --png`).

Needs matplotlib only (a client dependency), drawn with the Agg backend: no display needed.
"""

from __future__ import annotations

import math
from pathlib import Path

from rlhfkit.v1 import feedback_pb2 as fb_pb

PLAIN_COLOR, STYLE_COLOR = "tab:blue", "tab:orange"
WIN_RATE_CMAP = "RdYlGn"  # red: row model loses to the column's, green: wins; 0..1
NEVER_MET_COLOR = "lightgrey"


def leaderboard_png(board: fb_pb.Leaderboard, path: str | Path) -> Path:
    """Left: Bradley-Terry ratings with their 95% intervals, and the style-controlled ones
    beside them; right: the win-rate matrix (row model against column model), each cell with
    its percentage and battle count. Models in rating order, best first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ratings = list(board.ratings)
    labels = [f"{r.model} (n={r.battles})" for r in ratings]
    # proto3 doubles have no presence: a server without the style-controlled fit sends 0 for
    # every model (a real rating is near 1000), so its bars would only squash the axis.
    styled = any(r.style_controlled for r in ratings)
    n = max(len(ratings), len(board.models), 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(4.5, 1.5 + 0.6 * n)))

    y = np.arange(len(ratings))[::-1].astype(float)  # best at the top
    offset = 0.17 if styled else 0.0
    bars = [("Bradley-Terry", PLAIN_COLOR, y + offset, "bradley_terry")]
    if styled:
        bars.append(("style-controlled", STYLE_COLOR, y - offset, "style_controlled"))
    for name, color, ys, field in bars:
        mid = np.array([getattr(r, field) for r in ratings])
        lo = np.array([getattr(r, f"{field}_lower") for r in ratings])
        hi = np.array([getattr(r, f"{field}_upper") for r in ratings])
        left.errorbar(mid, ys, xerr=[mid - lo, hi - mid], fmt="o", color=color, capsize=3, label=name)
    left.set_yticks(y, labels, fontsize=8)
    left.set_ylim(-0.7, len(ratings) - 0.3)
    left.set_xlabel("rating (Elo scale), 95% interval")
    left.grid(axis="x", alpha=0.3)
    if ratings:
        left.legend(fontsize=8, loc="lower right")

    # The matrix in rating order, so the upper-right triangle is where better models beat worse.
    rank = {r.model: i for i, r in enumerate(ratings)}
    order = sorted(range(len(board.models)), key=lambda j: (rank.get(board.models[j], len(rank)), j))
    names = [board.models[j] for j in order]
    rows = {row.model: row for row in board.win_rates}
    rates = np.full((len(names), len(names)), np.nan)
    battles = np.zeros((len(names), len(names)), dtype=int)
    for i, a in enumerate(names):
        row = rows.get(a)
        if row is None:
            continue
        for k, j in enumerate(order):
            if j < len(row.win_rates):
                rates[i, k] = row.win_rates[j]
                battles[i, k] = row.battles[j] if j < len(row.battles) else 0
    cmap = matplotlib.colormaps[WIN_RATE_CMAP].with_extremes(bad=NEVER_MET_COLOR)
    image = right.imshow(np.ma.masked_invalid(rates), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    for i in range(len(names)):
        for k in range(len(names)):
            if not math.isnan(rates[i, k]):
                right.text(k, i, f"{rates[i, k]:.0%}\nn={battles[i, k]}", ha="center", va="center", fontsize=7)
    right.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    right.set_yticks(range(len(names)), names, fontsize=8)
    right.set_xlabel("against")
    right.set_title("win rate of row over column (ties half)", fontsize=9)
    fig.colorbar(image, ax=right, fraction=0.046, pad=0.04)

    prior = f", prior sd {board.prior_sd:g} Elo" if board.prior_sd else ""
    fig.suptitle(f"leaderboard: {board.num_battles} battles ({board.num_votes} votes){prior}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
