"""Annotator agreement against hand-worked tables (Cohen's and Fleiss' kappa)."""

import math

import numpy as np
import pytest

from rlhfkit.server.agreement import agreement, cohen_kappa, fleiss_kappa


def test_cohen_kappa_by_hand():
    # 50 comparisons: both left 20, A left / B right 5, A right / B left 10, both right 15.
    # p_o = 35/50 = 0.7; A chose left 25/50, B 30/50: p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = 0.2/0.5.
    a = ["left"] * 20 + ["left"] * 5 + ["right"] * 10 + ["right"] * 15
    b = ["left"] * 20 + ["right"] * 5 + ["left"] * 10 + ["right"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4, abs=1e-12)
    assert cohen_kappa(["left", "right"], ["left", "right"]) == 1.0
    assert math.isnan(cohen_kappa(["tie", "tie"], ["tie", "tie"]))  # chance agreement 1: undefined
    with pytest.raises(ValueError, match="equal length"):
        cohen_kappa(["left"], [])


def test_fleiss_kappa_of_the_textbook_table():
    # Fleiss (1971) as worked on Wikipedia: 10 items, 14 raters, 5 categories; kappa 0.210.
    table = np.array([[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
                      [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]])
    assert fleiss_kappa(table) == pytest.approx(0.210, abs=5e-4)
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa(np.array([[2, 0], [1, 2]]))


def test_agreement_of_three_annotators_by_hand():
    votes = [("c1", "A", "left"), ("c1", "B", "left"), ("c1", "C", "right"),
             ("c2", "A", "right"), ("c2", "B", "right"), ("c2", "C", "right"),
             ("c3", "A", "left"), ("c3", "A", "tie"),  # a later vote replaces the earlier one
             ("c3", "B", "left")]
    r = agreement(votes)
    # A-B on c1..c3: A (left, right, tie), B (left, right, left): p_o 2/3, p_e (1*2 + 1*1)/9 = 1/3 -> 0.5.
    # A-C and B-C on c1, c2: (left, right) vs (right, right): p_o 1/2, p_e 1/2 -> 0.
    assert r.pairwise == {("A", "B"): (pytest.approx(0.5), 3), ("A", "C"): (0.0, 2), ("B", "C"): (0.0, 2)}
    # Fleiss over the two comparisons with 3 voters: rows (2, 1, 0, 0), (0, 3, 0, 0): P_bar = (1/3 + 1)/2,
    # p_e = (2/6)^2 + (4/6)^2 = 5/9, kappa = (2/3 - 5/9) / (4/9) = 1/4.
    kappa, items, raters = r.fleiss
    assert (items, raters) == (2, 3) and kappa == pytest.approx(0.25)
    # With the majority of the others: c1 has no strict majority for A or B (left vs right) but
    # has one against C; c2 all agree; on c3 the one other disagrees.
    assert r.with_majority == {"A": (0.5, 2), "B": (0.5, 2), "C": (0.5, 2)}
    with pytest.raises(ValueError, match="choice must be"):
        agreement([("c1", "A", "up")])


def test_reward_agreement_and_the_agreement_filter_by_hand():
    from rlhfkit.server.agreement import filter_by_agreement, reward_agreement

    def row(c, a, choice, left=None, right=None):
        return {"comparison_id": c, "annotator_id": a, "choice": choice, "left_reward": left, "right_reward": right}

    rows = [row("c1", "A", "left", 2.0, 1.0), row("c1", "B", "left", 2.0, 1.0), row("c1", "C", "right", 2.0, 1.0),
            row("c2", "A", "right", 0.0, 0.0),  # equal rewards: no preference to agree with
            row("c3", "A", "tie", 0.0, 1.0),  # a tie picks no side
            row("c4", "A", "right", None, 1.0),  # unscored
            row("c5", "D", "left", -3.0, -1.0)]
    # A: c1 only (left, left higher) 1/1; B 1/1; C picked the lower side 0/1; D picked the lower side 0/1.
    assert reward_agreement(rows) == {"A": (1.0, 1), "B": (1.0, 1), "C": (0.0, 1), "D": (0.0, 1)}
    # With the majority of the others (only c1 has several voters): A's others are B left, C right, no
    # strict majority, likewise B's; C's are A and B, both left, and C said right: 0/1 < 0.5, dropped.
    # A, B and D have no measure: kept.
    kept, dropped, unmeasured = filter_by_agreement(rows, 0.5)
    assert dropped == {"C": 1} and unmeasured == {"A": 4, "B": 1, "D": 1}
    assert [r["annotator_id"] for r in kept] == ["A", "B", "A", "A", "A", "D"]
