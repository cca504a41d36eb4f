"""Annotator quality (issue #17, item 4): the daily vote cap (store and real gRPC), the
annotator report against a hand-worked table of votes, the reward columns and their
migration, and the CLI (`feedback annotators`, `export --min-agreement / --style-features`)."""

import asyncio
import json
import time
from datetime import datetime, timezone

import grpc
import pytest
import sqlalchemy as sa

from rlhfkit.clients import AsyncClient, Client
from rlhfkit.clients.cli import main as cli_main
from rlhfkit.clients.client import comparison_request, leaderboard_request
from rlhfkit.server.agreement import annotator_report
from rlhfkit.server.errors import QuotaExceededError
from rlhfkit.server.feedback import FeedbackStore, VoteConflictError, database_url, utc_midnight, votes
from test_feedback_store import add_old_rows, first_votes_table, postgres_schema


def utc(*args) -> float:
    return datetime(*args, tzinfo=timezone.utc).timestamp()


def set_voted_at(store, vote_id: str, t: float):
    with store.engine.begin() as conn:
        conn.execute(votes.update().where(votes.c.vote_id == vote_id).values(created_at=t))


@pytest.fixture
def store(tmp_path):
    s = FeedbackStore(f"sqlite:///{tmp_path / 'fb.db'}")
    yield s
    s.close()


def comparison(store, i: int) -> str:
    return store.add_comparison(f"p{i}", "models", ("a", "a@1", f"A{i}"), ("b", "b@1", f"B{i}"))


# --- the daily cap, in the store ---------------------------------------------------------

def test_cap_in_the_store(store):
    cids = [comparison(store, i) for i in range(5)]
    first = store.add_vote(cids[0], "left", "ann", "why", max_per_day=2)
    store.add_vote(cids[1], "right", "ann", max_per_day=2)
    with pytest.raises(QuotaExceededError) as e:
        store.add_vote(cids[2], "tie", "ann", max_per_day=2)
    msg = str(e.value)
    assert "--max-votes-per-annotator-per-day 2" in msg and "'ann'" in msg and "00:00 UTC" in msg
    # A retry of a recorded vote is acknowledged at the cap; a different one is still a conflict.
    again = store.add_vote(cids[0], "left", "ann", "why", max_per_day=2)
    assert again.already_recorded and again.vote_id == first.vote_id
    with pytest.raises(VoteConflictError):
        store.add_vote(cids[0], "right", "ann", max_per_day=2)
    assert not store.add_vote(cids[2], "tie", "bob", max_per_day=2).already_recorded  # a cap per annotator
    assert store.add_vote(cids[2], "tie", "ann", max_per_day=0).vote_id  # 0: no cap (3 today now)
    assert len([r for r in store.voted_comparisons() if r["annotator_id"] == "ann"]) == 3
    # Only votes since 00:00 UTC today count: ann's first two moved to yesterday's last second and
    # to midnight leave two today (the one at midnight and c2's); to the last second both, one.
    midnight = utc_midnight(time.time())
    set_voted_at(store, first.vote_id, midnight - 1)
    second = store.voted_comparisons()[1]["vote_id"]
    set_voted_at(store, second, midnight)
    with pytest.raises(QuotaExceededError):
        store.add_vote(cids[3], "left", "ann", max_per_day=2)
    set_voted_at(store, second, midnight - 1)
    assert not store.add_vote(cids[3], "left", "ann", max_per_day=2).already_recorded


# --- the reward columns, and the migration of a store without them ------------------------

def previous_schema(metadata):
    """rlhfkit_comparisons and rlhfkit_votes as the release before issue #17 created them
    (messages, no rewards), written out by hand."""
    sa.Table("rlhfkit_comparisons", metadata,
             sa.Column("comparison_id", sa.String(32), primary_key=True),
             sa.Column("created_at", sa.Float, nullable=False),
             sa.Column("prompt", sa.Text, nullable=False),
             sa.Column("source", sa.String(16), nullable=False),
             *(sa.Column(f"{side}_{what}", sa.Text, nullable=False)
               for side in ("left", "right") for what in ("model", "model_version", "response")),
             sa.Column("sampling", sa.Text, nullable=False),
             sa.Column("messages", sa.Text, nullable=True))
    first_votes_table(metadata)
    return metadata


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'old.db'}"
        return
    with postgres_schema() as pg:
        yield pg


def test_reward_columns_migrated_into_an_older_store(url):
    engine = sa.create_engine(database_url(url))
    old = previous_schema(sa.MetaData())
    old.create_all(engine)
    add_old_rows(engine, old, "old", "left")
    before = {c["name"] for c in sa.inspect(engine).get_columns("rlhfkit_comparisons")}
    assert not before & {"left_reward", "right_reward", "reward_model"}
    store = FeedbackStore(url)
    cid = store.add_comparison("new", "models", ("a", "a@2", "A2"), ("b", "b@2", "B2"), rewards=(0.25, -1.5),
                               reward_model="rm@7")
    store.add_vote(cid, "right", "ann")
    columns = {c["name"]: c for c in sa.inspect(engine).get_columns("rlhfkit_comparisons")}
    assert all(columns[c]["nullable"] for c in ("left_reward", "right_reward", "reward_model"))
    old_row, new_row = store.voted_comparisons()
    assert (old_row["prompt"], old_row["left_reward"], old_row["right_reward"], old_row["reward_model"]) == \
        ("old", None, None, None)
    assert (new_row["left_reward"], new_row["right_reward"], new_row["reward_model"]) == (0.25, -1.5, "rm@7")
    store.close()
    engine.dispose()


# --- the report, against a hand-worked table ----------------------------------------------

NOW = utc(2024, 3, 10, 15)  # Sunday 2024-03-10 15:00 UTC
MIDNIGHT = utc(2024, 3, 10)
MARKDOWN = "# T\n- a\n**b**"  # 3 + 1 + 3 + 1 + 5 = 13 characters; 1 header, 1 list item, 1 bold

# comparison: (left response, right response, (left reward, right reward) or None)
COMPARISONS = {"c1": (MARKDOWN, "plain", (1.0, 0.0)), "c2": ("L2", "R2", (0.2, 0.8)), "c3": ("L3", "R3", (0.5, 0.5)),
               "c4": ("L4", "R4", (0.3, 0.9)), "c5": ("L5", "R5", None), "c6": ("L6", "R6", (1.0, 2.0)),
               "c7": ("L7", "R7", (2.0, 1.0))}
# (comparison, annotator, choice, voted at)
VOTES = [("c1", "A", "left", MIDNIGHT), ("c2", "A", "right", MIDNIGHT - 1), ("c3", "A", "left", utc(2024, 3, 9, 10)),
         ("c4", "A", "right", utc(2024, 2, 1, 12)),
         ("c1", "B", "left", utc(2024, 3, 10, 14)), ("c2", "B", "right", utc(2024, 3, 10, 1)),
         ("c3", "B", "tie", utc(2024, 2, 25, 12)), ("c4", "B", "left", utc(2024, 2, 26)),
         ("c1", "C", "right", utc(2024, 3, 8, 12)), ("c2", "C", "right", utc(2024, 3, 8, 12)),
         ("c3", "C", "left", utc(2024, 3, 8, 12)), ("c5", "C", "left", utc(2024, 3, 8, 12)),
         ("c6", "C", "both_bad", utc(2024, 3, 10, 9)),
         ("c7", "D", "left", NOW)]


@pytest.fixture
def voted(tmp_path):
    """The table above in a store: its URL, the vote ids by (comparison, annotator)."""
    url = f"sqlite:///{tmp_path / 'table.db'}"
    s = FeedbackStore(url)
    ids = {name: s.add_comparison(f"prompt {name}", "models", ("m1", "m1@1", left), ("m2", "m2@1", right),
                                  rewards=rewards, reward_model="rm@1" if rewards else None)
           for name, (left, right, rewards) in COMPARISONS.items()}
    vote_ids = {}
    for c, a, choice, t in VOTES:
        vote_ids[c, a] = s.add_vote(ids[c], choice, a).vote_id
        set_voted_at(s, vote_ids[c, a], t)
    s.close()
    return url, vote_ids


def test_report_of_the_hand_worked_table(voted):
    url, _ = voted
    s = FeedbackStore(url)
    rows = s.voted_comparisons()
    s.close()
    report = annotator_report(rows, 5, 14, now=NOW)
    assert (report.num_votes, report.max_votes_per_annotator_per_day) == (14, 5)
    # Most votes first (C 5), then by name: A and B have 4 each.
    stats = {a.annotator: a for a in report.annotators}
    assert [a.annotator for a in report.annotators] == ["C", "A", "B", "D"]
    assert [(a.votes, a.votes_today) for a in report.annotators] == [(5, 1), (4, 1), (4, 2), (1, 1)]
    # With the majority of the others (only comparisons where the others have a strict majority):
    # A: c1 others L/R (none), c2 others R,R -> agrees, c3 others T/L (none), c4 other B says L -> 1/2.
    # B: c1 none, c2 agrees, c3 others L,L but B tie, c4 other A says R but B left -> 1/3.
    # C: c1 others L,L but C right, c2 agrees, c3 others L/T (none), c5 c6 alone -> 1/2. D alone: none.
    assert stats["A"].agreement_with_majority == pytest.approx(1 / 2) and stats["A"].majority_comparisons == 2
    assert stats["B"].agreement_with_majority == pytest.approx(1 / 3) and stats["B"].majority_comparisons == 3
    assert stats["C"].agreement_with_majority == pytest.approx(1 / 2) and stats["C"].majority_comparisons == 2
    assert not stats["D"].HasField("agreement_with_majority") and stats["D"].majority_comparisons == 0
    # With the reward model (left/right votes where the rewards differ): higher side c1 left, c2 right,
    # c4 right, c6 right, c7 left; c3 equal, c5 unscored.
    # A: c1 L yes, c2 R yes, c4 R yes -> 3/3. B: c1 yes, c2 yes, c4 L no (c3 tie) -> 2/3.
    # C: c1 R no, c2 R yes (c6 both_bad, c3 equal, c5 unscored) -> 1/2. D: c7 L yes -> 1/1.
    assert [(stats[a].agreement_with_reward_model, stats[a].reward_comparisons) for a in "ABCD"] == \
        [(1.0, 3), (pytest.approx(2 / 3), 3), (0.5, 2), (1.0, 1)]
    # Cohen's kappa. A-B on c1..c4: A (L R L R), B (L R T L): p_o 2/4; A L2 R2, B L2 R1 T1:
    #   p_e (2*2 + 2*1) / 16 = 3/8; kappa (1/2 - 3/8) / (5/8) = 0.2.
    # A-C on c1..c3: A (L R L), C (R R L): p_o 2/3; p_e (2*1 + 1*2) / 9 = 4/9; kappa (2/9) / (5/9) = 0.4.
    # B-C on c1..c3: B (L R T), C (R R L): p_o 1/3; p_e (1*1 + 1*2) / 9 = 1/3; kappa 0. D shares nothing.
    assert [(p.annotator_a, p.annotator_b, p.shared_comparisons, round(p.cohen_kappa, 12)) for p in report.pairs] == \
        [("A", "B", 4, 0.2), ("A", "C", 3, 0.4), ("B", "C", 3, 0.0)]
    # Fleiss over the 3 comparisons with 3 voters (c4 has 2): rows L/R/T (2,1,0), (0,3,0), (2,0,1):
    # P_i 1/3, 1, 1/3 -> P_bar 5/9; shares 4/9, 4/9, 1/9 -> p_e 33/81; kappa (45-33)/(81-33) = 1/4.
    assert report.fleiss_kappa == pytest.approx(0.25) and (report.fleiss_comparisons, report.fleiss_raters) == (3, 3)


def daily(report):
    return {a.annotator: [(d.day, d.votes) for d in a.daily] for a in report.annotators}


def test_votes_per_day_in_the_window(voted):
    url, _ = voted
    s = FeedbackStore(url)
    rows = s.voted_comparisons()
    s.close()
    # 14 days back from 2024-03-10: from 2024-02-26 00:00 UTC (B's vote at that second is in, its
    # 02-25 one and A's 02-01 one are out); A's vote at 23:59:59 is on the 9th, the one at 00:00 on the 10th.
    assert daily(annotator_report(rows, now=NOW)) == {
        "C": [("2024-03-08", 4), ("2024-03-10", 1)], "A": [("2024-03-09", 2), ("2024-03-10", 1)],
        "B": [("2024-02-26", 1), ("2024-03-10", 2)], "D": [("2024-03-10", 1)]}
    assert daily(annotator_report(rows, days=2, now=NOW)) == {
        "C": [("2024-03-10", 1)], "A": [("2024-03-09", 2), ("2024-03-10", 1)], "B": [("2024-03-10", 2)],
        "D": [("2024-03-10", 1)]}
    # A day later, today's votes are yesterday's.
    later = annotator_report(rows, days=1, now=NOW + 86400)
    assert [(a.annotator, a.votes_today, len(a.daily)) for a in later.annotators] == \
        [("C", 0, 0), ("A", 0, 0), ("B", 0, 0), ("D", 0, 0)]
    with pytest.raises(ValueError, match="days"):
        annotator_report(rows, days=0)


def test_report_of_no_votes():
    report = annotator_report([], 3)
    assert (report.num_votes, len(report.annotators), len(report.pairs)) == (0, 0, 0)
    assert not report.HasField("fleiss_kappa") and report.max_votes_per_annotator_per_day == 3


# --- the CLI on a store ------------------------------------------------------------------

def export(url, tmp_path, capsys, *flags):
    out = tmp_path / "out.jsonl"
    assert cli_main(["feedback", "export", "--feedback-db", url, "--out", str(out), *flags]) == 0
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()], capsys.readouterr().err


def test_export_min_agreement(voted, tmp_path, capsys):
    url, vote_ids = voted
    # Agreement with the majority: A 1/2, B 1/3, C 1/2, D unmeasured (see the report test).
    records, err = export(url, tmp_path, capsys, "--min-agreement", "0.4")
    assert "dropped 4 votes of 1 annotators (B)" in err and "kept 1 votes of 1 annotators with no measure" in err
    # Left/right votes of A (4), C (c1, c2, c3, c5: c6 is both-bad) and D (1).
    assert sorted(r["vote_id"] for r in records) == sorted(
        vote_ids[c, a] for c, a, choice, _ in VOTES if a != "B" and choice in ("left", "right"))
    records, err = export(url, tmp_path, capsys, "--min-agreement", "0.5")  # below X is dropped, X is kept
    assert {r["annotator_id"] for r in records} == {"A", "C", "D"} and "dropped 4 votes of 1 annotators" in err
    records, err = export(url, tmp_path, capsys, "--min-agreement", "0.6")
    assert [r["annotator_id"] for r in records] == ["D"] and "dropped 13 votes of 3 annotators (A, B, C)" in err
    records, err = export(url, tmp_path, capsys, "--min-agreement", "0")
    assert len(records) == 12 and "dropped 0 votes of 0 annotators" in err
    for bad in ("1.5", "-0.1", "nan"):
        with pytest.raises(SystemExit) as e:
            cli_main(["feedback", "export", "--feedback-db", url, "--min-agreement", bad])
        assert e.value.code == 2 and "--min-agreement must be in [0, 1]" in capsys.readouterr().err


def test_export_style_features(voted, tmp_path, capsys):
    url, vote_ids = voted
    marked = {"length": 13, "headers": 1, "lists": 1, "bold": 1}
    plain = {"length": 5, "headers": 0, "lists": 0, "bold": 0}
    two = {"length": 2, "headers": 0, "lists": 0, "bold": 0}  # "L2", "R2"
    records, _ = export(url, tmp_path, capsys, "--style-features")
    by_vote = {r["vote_id"]: r for r in records}
    a1, c1, a2 = by_vote[vote_ids["c1", "A"]], by_vote[vote_ids["c1", "C"]], by_vote[vote_ids["c2", "A"]]
    assert (a1["chosen"], a1["chosen_style"], a1["rejected_style"]) == (MARKDOWN, marked, plain)  # A chose left
    assert (c1["chosen"], c1["chosen_style"], c1["rejected_style"]) == ("plain", plain, marked)  # C chose right
    assert (a2["chosen_style"], a2["rejected_style"]) == (two, two)
    records, _ = export(url, tmp_path, capsys, "--style-features", "--format", "rankings")
    ranked = {r["vote_id"]: r for r in records}[vote_ids["c1", "C"]]
    assert ranked["responses"] == ["plain", MARKDOWN] and ranked["responses_style"] == [plain, marked]
    assert "chosen_style" not in ranked
    records, _ = export(url, tmp_path, capsys)
    assert not any("chosen_style" in r for r in records)  # only when asked


def test_cli_annotators_from_the_store(voted, capsys):
    url, _ = voted
    assert cli_main(["feedback", "annotators", "--feedback-db", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "4 annotators, 14 votes; cap unknown (read from the store)"
    # Every vote is from 2024: none today. Shares with the majority and with the reward model as worked out above.
    assert [line.split() for line in lines[2:6]] == [
        ["C", "5", "0", "50.0%", "(2)", "50.0%", "(2)"], ["A", "4", "0", "50.0%", "(2)", "100.0%", "(3)"],
        ["B", "4", "0", "33.3%", "(3)", "66.7%", "(3)"], ["D", "1", "0", "-", "100.0%", "(1)"]]
    assert [line.split() for line in lines if " / " in line] == [
        ["A", "/", "B", "0.200", "(4", "shared)"], ["A", "/", "C", "0.400", "(3", "shared)"],
        ["B", "/", "C", "0.000", "(3", "shared)"]]
    assert "Fleiss' kappa 0.250 over 3 comparisons with 3 annotators each" in lines
    assert cli_main(["feedback", "annotators", "--feedback-db", url, "--json", "--days", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fleiss_kappa"] == pytest.approx(0.25) and report["num_votes"] == 14
    for argv, flag in ((["--days", "0"], "--days must be in [1, 366]"), (["--png", "x.png"], "--png applies to"),
                       (["--style-features"], "--style-features applies to")):
        with pytest.raises(SystemExit) as e:
            cli_main(["feedback", "annotators", "--feedback-db", url, *argv])
        assert e.value.code == 2 and flag in capsys.readouterr().err


# --- the client's requests ----------------------------------------------------------------

def test_client_requests():
    server_chosen = comparison_request("the cat")
    assert server_chosen.WhichOneof("source") is None and not server_chosen.HasField("sampling")
    with pytest.raises(ValueError, match="--arena-sampling"):
        comparison_request("the cat", temperature=0.7)
    with pytest.raises(ValueError, match="not both"):
        comparison_request("the cat", models=("a", "b"), samples_of="a")
    assert comparison_request("x", samples_of="p", temperature=1.0).sampling.temperature == 1.0
    assert leaderboard_request(10, prior_sd=50.0).prior_sd == 50.0
    assert not leaderboard_request(10).HasField("prior_sd")


# --- over real gRPC: the cap and GetAnnotators -------------------------------------------

@pytest.fixture(scope="module")
def capped(tmp_path_factory, tiny_policy_dir):
    from rlhfkit.server.app import ServeConfig, ServerThread

    db = tmp_path_factory.mktemp("fb") / "capped.db"
    srv = ServerThread(ServeConfig(policy=str(tiny_policy_dir), port=0, device="cpu", feedback_db=f"sqlite:///{db}",
                                   max_votes_per_annotator_per_day=2)).wait_loaded()
    yield srv
    srv.stop()


def test_cap_and_report_over_grpc(capped, capsys):
    with Client(capped.address, timeout=60) as c:
        cids = [c.create_comparison("the cat", samples_of="policy", temperature=1.0, max_new_tokens=3).comparison_id
                for _ in range(3)]
        first = c.submit_vote(cids[0], "left", "ann")
        c.submit_vote(cids[1], "right", "ann")
        with pytest.raises(grpc.RpcError) as e:
            c.submit_vote(cids[2], "left", "ann")
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-votes-per-annotator-per-day 2" in e.value.details() and "00:00 UTC" in e.value.details()
        again = c.submit_vote(cids[0], "left", "ann")  # a retry of a recorded vote: still acknowledged
        assert again.already_recorded and again.vote_id == first.vote_id
        c.submit_vote(cids[2], "left", "bob")
        report = c.annotators(days=3)
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    assert report.max_votes_per_annotator_per_day == 2 and report.num_votes == 3
    assert [(a.annotator, a.votes, a.votes_today, [(d.day, d.votes) for d in a.daily]) for a in report.annotators] == \
        [("ann", 2, 2, [(today, 2)]), ("bob", 1, 1, [(today, 1)])]
    assert len(report.pairs) == 0 and not report.HasField("fleiss_kappa")  # no comparison with two voters

    async def from_the_async_client():
        async with AsyncClient(capped.address, timeout=60) as c:
            return await c.annotators()

    assert asyncio.run(from_the_async_client()) == report
    assert cli_main(["feedback", "annotators", "--address", capped.address]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "2 annotators, 3 votes; cap 2 votes per annotator per UTC day"
    assert out[2].split() == ["ann", "2", "2", "-", "-"]


def test_concurrent_votes_do_not_overrun_the_cap(url):
    """16 threads vote at once against a cap of 5: exactly 5 are stored (review found 9
    when the count and the insert were separate steps). On PostgreSQL the threads go through
    two store objects, as two replicas would, held together by the advisory lock."""
    import concurrent.futures

    replicas = [FeedbackStore(url)] + ([FeedbackStore(url)] if url.startswith("postgresql") else [])
    try:
        cids = [comparison(replicas[0], i) for i in range(40)]

        def vote(i):
            try:
                return replicas[i % len(replicas)].add_vote(cids[i], "left", "ann", max_per_day=5)
            except QuotaExceededError:
                return None

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            accepted = [v for v in pool.map(vote, range(40)) if v is not None]
        stored = [r for r in replicas[0].voted_comparisons() if r["annotator_id"] == "ann"]
    finally:
        for s in replicas:
            s.close()
    assert len(accepted) == len(stored) == 5
