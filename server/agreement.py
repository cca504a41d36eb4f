"""How far annotators agree, from their votes on the same comparisons (issue #17, item 4).

Both annotators of a comparison saw the same two responses on the same sides, so their
choices (left, right, tie, both_bad) compare directly.

- Cohen's kappa for two annotators over the comparisons both voted on:
  (p_o - p_e) / (1 - p_e), p_e from each annotator's own choice frequencies on those items.
- Fleiss' kappa for comparisons that the same number of annotators voted on (its formula
  needs that): the items x categories count table.
- Each annotator's agreement with the majority of the *other* annotators of each comparison
  (comparisons with a strict majority among the others only).
- Each annotator's agreement with the reward model that scored both responses when the
  comparison was made (left/right votes on comparisons whose two rewards differ).

annotator_report() puts them together, with votes per day, as GetAnnotators' reply.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from rlhfkit.server.feedback import utc_day, utc_midnight
from rlhfkit.v1 import feedback_pb2 as fb_pb

CHOICES = ("left", "right", "tie", "both_bad")


def cohen_kappa(a: list[str], b: list[str]) -> float:
    """Cohen's kappa of two equally long label lists; NaN when chance agreement is 1 (both
    always chose the same single label: kappa is undefined)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"cohen_kappa needs two non-empty lists of equal length, got {len(a)} and {len(b)}")
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b)) / n
    fa, fb = Counter(a), Counter(b)
    chance = sum(fa[c] * fb[c] for c in set(fa) | set(fb)) / (n * n)
    return float("nan") if chance == 1 else (observed - chance) / (1 - chance)


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa of an items x categories table of how many raters chose each category;
    every row must sum to the same number of raters (at least 2)."""
    counts = np.asarray(counts, dtype=float)
    raters = counts.sum(1)
    if counts.ndim != 2 or len(counts) == 0 or raters.min() != raters.max() or raters[0] < 2:
        raise ValueError("fleiss_kappa needs a non-empty items x categories table with the same number "
                         "(>= 2) of raters in every row")
    n = raters[0]
    per_item = ((counts * (counts - 1)).sum(1)) / (n * (n - 1))
    p_bar = per_item.mean()
    shares = counts.sum(0) / counts.sum()
    p_e = float((shares ** 2).sum())
    return float("nan") if p_e == 1 else float((p_bar - p_e) / (1 - p_e))


@dataclass
class AnnotatorAgreement:
    pairwise: dict[tuple[str, str], tuple[float, int]]  # (a, b) -> (Cohen's kappa, shared comparisons)
    fleiss: tuple[float, int, int] | None  # (kappa, comparisons, raters per comparison), None without data
    with_majority: dict[str, tuple[float, int]]  # annotator -> (share agreeing, comparisons counted)


def agreement(votes: list[tuple[str, str, str]]) -> AnnotatorAgreement:
    """votes: (comparison_id, annotator_id, choice). An annotator's later vote on a comparison
    replaces an earlier one (the store keeps one per annotator)."""
    by_item: dict[str, dict[str, str]] = defaultdict(dict)
    for comparison, annotator, choice in votes:
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        by_item[comparison][annotator] = choice
    annotators = sorted({a for item in by_item.values() for a in item})
    pairwise = {}
    for a, b in combinations(annotators, 2):
        shared = [item for item in by_item.values() if a in item and b in item]
        if shared:
            pairwise[(a, b)] = (cohen_kappa([i[a] for i in shared], [i[b] for i in shared]), len(shared))
    # Fleiss over the comparisons with the most common number (>= 2) of annotators.
    sizes = Counter(len(item) for item in by_item.values() if len(item) >= 2)
    fleiss = None
    if sizes:
        size = max(sizes, key=lambda s: (sizes[s], s))
        rows = [[list(item.values()).count(c) for c in CHOICES] for item in by_item.values() if len(item) == size]
        fleiss = (fleiss_kappa(np.array(rows)), len(rows), size)
    with_majority = {}
    for a in annotators:
        agree = counted = 0
        for item in by_item.values():
            if a not in item:
                continue
            others = Counter(c for who, c in item.items() if who != a).most_common(2)
            if not others or (len(others) == 2 and others[0][1] == others[1][1]):
                continue  # nobody else, or no strict majority among the others
            counted += 1
            agree += item[a] == others[0][0]
        if counted:
            with_majority[a] = (agree / counted, counted)
    return AnnotatorAgreement(pairwise, fleiss, with_majority)


def reward_agreement(rows: list[dict]) -> dict[str, tuple[float, int]]:
    """annotator -> (share of left/right votes picking the side the reward model scored
    higher, votes counted), over comparisons with both rewards known and unequal (a tie in
    reward, or a tie / both-bad vote, says nothing about which side the model preferred)."""
    agree, counted = Counter(), Counter()
    for r in rows:
        left, right = r.get("left_reward"), r.get("right_reward")
        if r["choice"] not in ("left", "right") or left is None or right is None or left == right:
            continue
        counted[r["annotator_id"]] += 1
        agree[r["annotator_id"]] += r["choice"] == ("left" if left > right else "right")
    return {a: (agree[a] / n, n) for a, n in counted.items()}


MAX_DAYS = 366  # the longest window of votes per day a report gives (GetAnnotators, --days)


def annotator_report(rows: list[dict], max_votes_per_day: int = 0, days: int = 14, now: float | None = None):
    """The AnnotatorReport (rlhfkit.v1) of voted comparisons (FeedbackStore.voted_comparisons
    rows): votes in all, today and on each of the last `days` UTC days (today included; only
    days with votes, oldest first), agreement with the majority of the others and with the
    reward model, pairwise Cohen's kappa and Fleiss' kappa. `now`: Unix time (tests)."""
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    now = time.time() if now is None else now
    today = utc_midnight(now)
    since = today - (days - 1) * 86400
    total, on_day, votes_today = Counter(), defaultdict(Counter), Counter()
    for r in rows:
        a, t = r["annotator_id"], r["voted_at"]
        total[a] += 1
        votes_today[a] += t >= today
        if since <= t:
            on_day[a][utc_day(t)] += 1
    agreed = agreement([(r["comparison_id"], r["annotator_id"], r["choice"]) for r in rows])
    with_reward = reward_agreement(rows)
    report = fb_pb.AnnotatorReport(max_votes_per_annotator_per_day=max_votes_per_day, num_votes=len(rows))
    for a in sorted(total, key=lambda a: (-total[a], a)):
        s = report.annotators.add(annotator=a, votes=total[a], votes_today=votes_today[a],
                                  daily=[fb_pb.DailyVotes(day=d, votes=n) for d, n in sorted(on_day[a].items())])
        if a in agreed.with_majority:
            s.agreement_with_majority, s.majority_comparisons = agreed.with_majority[a]
        if a in with_reward:
            s.agreement_with_reward_model, s.reward_comparisons = with_reward[a]
    for (a, b), (kappa, shared) in agreed.pairwise.items():
        report.pairs.add(annotator_a=a, annotator_b=b, shared_comparisons=shared, cohen_kappa=kappa)
    if agreed.fleiss is not None:
        report.fleiss_kappa, report.fleiss_comparisons, report.fleiss_raters = agreed.fleiss
    return report


def filter_by_agreement(rows: list[dict], min_agreement: float) -> tuple[list[dict], Counter, Counter]:
    """The rows of annotators whose agreement with the majority of the others is at least
    min_agreement, or who have no such measure (no comparison with a strict majority among
    the others: nothing says they are bad). Returns (kept rows, votes dropped per annotator,
    votes kept unmeasured per annotator)."""
    with_majority = agreement([(r["comparison_id"], r["annotator_id"], r["choice"]) for r in rows]).with_majority
    kept, dropped, unmeasured = [], Counter(), Counter()
    for r in rows:
        a = r["annotator_id"]
        if a not in with_majority:
            unmeasured[a] += 1
            kept.append(r)
        elif with_majority[a][0] < min_agreement:
            dropped[a] += 1
        else:
            kept.append(r)
    return kept, dropped, unmeasured
