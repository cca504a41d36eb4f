"""The feedback store, one suite on both backends: SQLite (embedded) and PostgreSQL
(RLHFKIT_TEST_POSTGRES_URL; each run gets its own schema, dropped afterwards)."""

import contextlib
import json
import os
import threading
import uuid

import pytest
import sqlalchemy as sa

from rlhfkit.clients.cli import main as cli_main
from rlhfkit.errors import InvalidArgumentError
from rlhfkit.server.feedback import (ComparisonNotFoundError, FeedbackStore, VoteConflictError,
                                     database_url, export_records)
from rlhfkit.training.data import read_jsonl
from rlhfkit.training.rm import read_rankings

PG_URL = os.environ.get("RLHFKIT_TEST_POSTGRES_URL")


@contextlib.contextmanager
def postgres_schema():
    """A URL into a fresh schema of the test database (dropped on exit), or a skip."""
    if not PG_URL:
        pytest.skip("RLHFKIT_TEST_POSTGRES_URL is not set (e.g. postgresql://postgres@127.0.0.1:5432/test)")
    schema = f"rlhfkit_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(database_url(PG_URL))
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    except sa.exc.OperationalError as e:
        pytest.skip(f"PostgreSQL at {PG_URL} is unreachable: {e.orig}")
    sep = "&" if "?" in PG_URL else "?"
    try:
        yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'feedback.db'}"
        return
    with postgres_schema() as pg:
        yield pg


@pytest.fixture
def store(url):
    s = FeedbackStore(url)
    yield s
    s.close()


def add(store, prompt="p", left=("m1", "m1@v1", "L"), right=("m2", "m2@v1", "R")):
    return store.add_comparison(prompt, "models", left, right)


def test_comparison_round_trip(store, url):
    cid = add(store, "the cat", ("ppo-1", "ppo-1@abc", "purrs"), ("sft-1", "sft-1@def", "sleeps"))
    c = FeedbackStore(url).get_comparison(cid)  # another connection (another replica) sees it
    assert (c["prompt"], c["left_model"], c["left_model_version"], c["left_response"]) == \
        ("the cat", "ppo-1", "ppo-1@abc", "purrs")
    assert (c["right_model"], c["right_response"], c["source"]) == ("sft-1", "sleeps", "models")
    with pytest.raises(ComparisonNotFoundError, match="comparison_id"):
        store.get_comparison("nope")


def test_text_with_nul_characters_round_trips(store, url):
    # PostgreSQL text cannot hold U+0000, which a sampled response can contain; every value
    # must still come back exactly as written, on both backends. "\x1bjson:..." is what an
    # escaped value looks like, written here as plain text: it must come back as written too.
    texts = ["al\x00rit", "\x00", "\x1bjson:\"x\"", "plain \\x00 text", "\ufffdsorta"]
    for i, t in enumerate(texts):
        cid = add(store, f"prompt {t}", ("m1", "m1@v1", t), ("m2", "m2@v1", t + "!"))
        store.add_vote(cid, "left", f"annotator {t}", rationale=t)
        c = FeedbackStore(url).get_comparison(cid)
        assert (c["prompt"], c["left_response"], c["right_response"]) == (f"prompt {t}", t, t + "!")
        again = store.add_vote(cid, "left", f"annotator {t}", rationale=t)  # found by its annotator
        assert again.already_recorded and again.rationale == t
    voted = store.voted_comparisons()
    assert sorted(v["rationale"] for v in voted) == sorted(texts)


def test_votes_idempotent_conflicting_and_bad(store):
    cid = add(store)
    v = store.add_vote(cid, "left", "alice", "better")
    assert not v.already_recorded and v.comparison["left_model"] == "m1"
    again = store.add_vote(cid, "left", "alice", "better")
    assert again.already_recorded and again.vote_id == v.vote_id
    with pytest.raises(VoteConflictError, match="already voted 'left'"):
        store.add_vote(cid, "right", "alice", "better")
    with pytest.raises(VoteConflictError):
        store.add_vote(cid, "left", "alice", None)
    assert store.add_vote(cid, "tie", "bob").vote_id != v.vote_id
    with pytest.raises(ComparisonNotFoundError):
        store.add_vote("f" * 32, "left", "alice")
    with pytest.raises(InvalidArgumentError, match="^choice:"):
        store.add_vote(cid, "middle", "carol")
    with pytest.raises(InvalidArgumentError, match="^annotator_id:"):
        store.add_vote(cid, "left", "")
    assert [(r["annotator_id"], r["choice"]) for r in store.voted_comparisons()] == [("alice", "left"), ("bob", "tie")]


def test_replicas_racing_on_one_vote(url):
    """Two store instances (two server replicas), eight threads, one annotator, one comparison:
    exactly one vote is recorded; same-choice retries get it back, a different choice conflicts."""
    replicas = [FeedbackStore(url), FeedbackStore(url)]
    cid = add(replicas[0])
    results, errors = [], []
    barrier = threading.Barrier(8)

    def vote(i):
        barrier.wait()
        try:
            results.append(replicas[i % 2].add_vote(cid, "left" if i < 6 else "right", "alice").vote_id)
        except VoteConflictError:
            errors.append(i)
        except Exception as e:  # noqa: BLE001 - any other failure fails the test below
            errors.append(repr(e))

    threads = [threading.Thread(target=vote, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = replicas[1].voted_comparisons()
    for r in replicas:
        r.close()
    assert len(rows) == 1
    winner = rows[0]["choice"]
    assert all(v == rows[0]["vote_id"] for v in results)
    # Whichever choice landed first, every thread with the other choice conflicted.
    assert sorted(errors) == ([6, 7] if winner == "left" else [0, 1, 2, 3, 4, 5])


def test_battles_in_vote_order(store):
    c1 = add(store, left=("a", "a@1", "x"), right=("b", "b@1", "y"))
    c2 = add(store, left=("b", "b@1", "x"), right=("c", "c@1", "y"))
    store.add_vote(c2, "right", "u1")
    store.add_vote(c1, "tie", "u1")
    store.add_vote(c2, "both_bad", "u2")
    assert store.battles() == [("b", "c", "right"), ("a", "b", "tie"), ("b", "c", "both_bad")]


def test_export_formats(store, url, tmp_path, capsys):
    c1 = add(store, "p1", ("a", "a@1", "A1"), ("b", "b@1", "B1"))
    c2 = add(store, "p2", ("b", "b@1", "B2"), ("a", "a@1", "A2"))
    v1 = store.add_vote(c1, "left", "ann1")
    v2 = store.add_vote(c2, "left", "ann2")
    store.add_vote(c1, "tie", "ann2")
    store.add_vote(c2, "both_bad", "ann1")
    rows = store.voted_comparisons()
    assert export_records(rows, "trl") == [
        {"prompt": "p1", "chosen": "A1", "rejected": "B1", "vote_id": v1.vote_id, "comparison_id": c1,
         "annotator_id": "ann1", "chosen_model": "a@1", "rejected_model": "b@1"},
        {"prompt": "p2", "chosen": "B2", "rejected": "A2", "vote_id": v2.vote_id, "comparison_id": c2,
         "annotator_id": "ann2", "chosen_model": "b@1", "rejected_model": "a@1"}]
    assert [(r["prompt"], r["responses"]) for r in export_records(rows, "rankings")] == [("p1", ["A1", "B1"]),
                                                                                         ("p2", ["B2", "A2"])]
    # Through the CLI, straight from the database, into files the RM trainer reads as they are.
    store.close()
    for fmt in ("trl", "rankings"):
        out = tmp_path / f"{fmt}.jsonl"
        assert cli_main(["feedback", "export", "--feedback-db", url, "--format", fmt, "--out", str(out)]) == 0
        assert f"2 {fmt} records" in capsys.readouterr().err
        assert [r["vote_id"] for r in map(json.loads, out.read_text().splitlines())] == [v1.vote_id, v2.vote_id]
        assert [r["responses"] for r in read_rankings(str(out), "auto")] == [["A1", "B1"], ["B2", "A2"]]
    assert len(read_jsonl(tmp_path / "trl.jsonl", "preferences")) == 2


def test_sqlite_is_durable_by_configuration(tmp_path):
    store = FeedbackStore(f"sqlite:///{tmp_path / 'd' / 'feedback.db'}")  # parent directory created
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    store.close()


def test_bad_url():
    with pytest.raises(ValueError, match="feedback_db"):
        FeedbackStore("feedback.db")


CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count the fish\x00 <b>"},
                {"role": "assistant", "content": "one"}, {"role": "user", "content": "and now?"}]


def old_schema(metadata):
    """rlhfkit_comparisons and rlhfkit_votes as the first release created them (no messages
    column), written out here by hand rather than derived from the module's schema."""
    sa.Table("rlhfkit_comparisons", metadata,
             sa.Column("comparison_id", sa.String(32), primary_key=True),
             sa.Column("created_at", sa.Float, nullable=False),
             sa.Column("prompt", sa.Text, nullable=False),
             sa.Column("source", sa.String(16), nullable=False),
             sa.Column("left_model", sa.Text, nullable=False),
             sa.Column("left_model_version", sa.Text, nullable=False),
             sa.Column("left_response", sa.Text, nullable=False),
             sa.Column("right_model", sa.Text, nullable=False),
             sa.Column("right_model_version", sa.Text, nullable=False),
             sa.Column("right_response", sa.Text, nullable=False),
             sa.Column("sampling", sa.Text, nullable=False))
    first_votes_table(metadata)
    return metadata


def first_votes_table(metadata: sa.MetaData) -> sa.Table:
    """The votes table as the first release created it (unchanged since)."""
    return sa.Table("rlhfkit_votes", metadata,
                    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
                    sa.Column("vote_id", sa.String(32), nullable=False, unique=True),
                    sa.Column("comparison_id", sa.String(32), sa.ForeignKey("rlhfkit_comparisons.comparison_id"),
                              nullable=False),
                    sa.Column("annotator_id", sa.Text, nullable=False),
                    sa.Column("choice", sa.String(16), nullable=False),
                    sa.Column("rationale", sa.Text),
                    sa.Column("created_at", sa.Float, nullable=False),
                    sa.UniqueConstraint("comparison_id", "annotator_id", name="rlhfkit_one_vote_per_annotator"))


def test_messages_round_trip(store, url):
    cid = store.add_comparison("", "samples", ("m", "m@1", "L"), ("m", "m@1", "R"), messages=CONVERSATION)
    text = add(store, "the cat")
    other = FeedbackStore(url)
    assert other.get_comparison(cid)["messages"] == CONVERSATION  # the NUL too, on PostgreSQL
    assert other.get_comparison(cid)["prompt"] == "" and other.get_comparison(text)["messages"] is None
    other.close()
    with store.engine.connect() as conn:  # stored as JSON text
        raw = conn.execute(sa.text("SELECT messages FROM rlhfkit_comparisons WHERE comparison_id = :c"),
                           {"c": cid}).scalar()
    assert json.loads(raw) == CONVERSATION


def add_old_rows(engine, old: sa.MetaData, prompt: str, choice: str):
    """One comparison (a vs b, responses A and B) and one vote on it, in an older schema."""
    with engine.begin() as conn:
        conn.execute(old.tables["rlhfkit_comparisons"].insert().values(
            comparison_id="c" * 32, created_at=1.0, prompt=prompt, source="models", left_model="a",
            left_model_version="a@1", left_response="A", right_model="b", right_model_version="b@1",
            right_response="B", sampling="{}"))
        conn.execute(old.tables["rlhfkit_votes"].insert().values(
            vote_id="v" * 32, comparison_id="c" * 32, annotator_id="ann", choice=choice, created_at=2.0))


def test_old_store_is_migrated_on_open(url):
    engine = sa.create_engine(database_url(url))
    old = old_schema(sa.MetaData())
    old.create_all(engine)
    add_old_rows(engine, old, "old prompt", "right")
    assert "messages" not in {c["name"] for c in sa.inspect(engine).get_columns("rlhfkit_comparisons")}
    stores = [FeedbackStore(url), FeedbackStore(url)]  # two replicas opening it at once
    errors = []

    def open_it(s):
        try:
            s.engine
        except Exception as e:  # noqa: BLE001 - asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=open_it, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    columns = {c["name"]: c for c in sa.inspect(engine).get_columns("rlhfkit_comparisons")}
    assert columns["messages"]["nullable"]
    store = stores[0]
    old_row = store.get_comparison("c" * 32)
    assert (old_row["prompt"], old_row["messages"], old_row["left_response"]) == ("old prompt", None, "A")
    cid = store.add_comparison("", "models", ("a", "a@1", "A2"), ("b", "b@1", "B2"), messages=CONVERSATION)
    v = store.add_vote(cid, "left", "ann")
    assert export_records(store.voted_comparisons(), "trl") == [
        {"prompt": "old prompt", "chosen": "B", "rejected": "A", "vote_id": "v" * 32, "comparison_id": "c" * 32,
         "annotator_id": "ann", "chosen_model": "b@1", "rejected_model": "a@1"},
        {"prompt": CONVERSATION, "chosen": [{"role": "assistant", "content": "A2"}],
         "rejected": [{"role": "assistant", "content": "B2"}], "vote_id": v.vote_id, "comparison_id": cid,
         "annotator_id": "ann", "chosen_model": "a@1", "rejected_model": "b@1"}]
    for s in stores:
        s.close()
    FeedbackStore(url).engine.dispose()  # opening a migrated store again changes nothing
    engine.dispose()


def test_export_conversational_formats(store, url, tmp_path, capsys):
    conv = store.add_comparison("", "models", ("a", "a@1", "A1"), ("b", "b@1", "B1"), messages=CONVERSATION)
    text = add(store, "p2", ("b", "b@1", "B2"), ("a", "a@1", "A2"))
    v1 = store.add_vote(conv, "right", "ann1")
    v2 = store.add_vote(text, "left", "ann2")
    store.add_vote(conv, "tie", "ann2")
    store.close()
    expected = {
        "trl": [
            {"prompt": CONVERSATION, "chosen": [{"role": "assistant", "content": "B1"}],
             "rejected": [{"role": "assistant", "content": "A1"}], "vote_id": v1.vote_id, "comparison_id": conv,
             "annotator_id": "ann1", "chosen_model": "b@1", "rejected_model": "a@1"},
            {"prompt": "p2", "chosen": "B2", "rejected": "A2", "vote_id": v2.vote_id, "comparison_id": text,
             "annotator_id": "ann2", "chosen_model": "b@1", "rejected_model": "a@1"}],
        "rankings": [
            {"prompt": CONVERSATION, "responses": [[{"role": "assistant", "content": "B1"}],
                                                   [{"role": "assistant", "content": "A1"}]],
             "vote_id": v1.vote_id, "comparison_id": conv, "annotator_id": "ann1", "chosen_model": "b@1",
             "rejected_model": "a@1"},
            {"prompt": "p2", "responses": ["B2", "A2"], "vote_id": v2.vote_id, "comparison_id": text,
             "annotator_id": "ann2", "chosen_model": "b@1", "rejected_model": "a@1"}]}
    for fmt in ("trl", "rankings"):
        out = tmp_path / f"{fmt}.jsonl"
        assert cli_main(["feedback", "export", "--feedback-db", url, "--format", fmt, "--out", str(out)]) == 0
        assert f"2 {fmt} records" in capsys.readouterr().err
        assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == expected[fmt]


def test_a_fresh_store_opened_by_two_requests_at_once(tmp_path):
    """The first two requests on a new store both found no tables; one of them failed creating
    them (INTERNAL in the load bench)."""
    import threading

    for k in range(5):
        store = FeedbackStore(f"sqlite:///{tmp_path / f'fb{k}.db'}")
        start, errors = threading.Barrier(4), []

        def add():
            start.wait()
            try:
                store.add_comparison("p", "samples", ("a", "a@1", "x"), ("a", "a@1", "y"))
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=add) for _ in range(4)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        store.close()
        assert errors == []
