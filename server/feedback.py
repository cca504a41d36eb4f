"""The feedback store: comparisons and votes, one schema on two backends.

SQLite is the embedded default (one file); PostgreSQL lets several server replicas share
one store. Both go through SQLAlchemy Core, so there is no dialect code here beyond the
SQLite durability pragmas. A vote is acknowledged only after its transaction commits
(SQLite: WAL with synchronous=FULL, so the commit is on disk; PostgreSQL: synchronous
commit, its default), so a crash right after the reply loses nothing.

One vote per (comparison, annotator) is a unique constraint, so two replicas racing on the
same vote cannot both insert it.

A comparison made from a conversation keeps it in `messages` (JSON text; NULL for a text
prompt); one made on a server with a reward model keeps both responses' rewards and which
model scored them (left_reward, right_reward, reward_model; NULL otherwise). Stores created
before those columns existed get them on open (migrate()).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa

from rlhfkit.errors import InvalidArgumentError
from rlhfkit.server import ratings
from rlhfkit.server.errors import ConflictError, NotFoundError, QuotaExceededError

CHOICES = ("left", "right", "tie", "both_bad")


class ModelText(sa.TypeDecorator):
    """Text as a model or a person wrote it, NUL characters included.

    PostgreSQL text cannot hold U+0000, which a sampled response can contain (byte-level
    tokenizers decode it). Such a value is stored as ESCAPED + its JSON (a JSON string has
    no NUL), on every backend alike; so is one that happens to start with ESCAPED, so
    reading back is unambiguous. Everything else is stored as it is.
    """

    impl = sa.Text
    cache_ok = True
    ESCAPED = "\x1bjson:"

    def process_bind_param(self, value, dialect):
        if value is not None and ("\x00" in value or value.startswith(self.ESCAPED)):
            return self.ESCAPED + json.dumps(value)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.startswith(self.ESCAPED):
            return json.loads(value[len(self.ESCAPED):])
        return value


class MessagesJSON(sa.TypeDecorator):
    """A conversation ([{"role", "content"}, ...]) as JSON text, None as NULL. JSON escapes
    control characters, so a NUL in a message is stored as \\u0000 (PostgreSQL-safe)."""

    impl = sa.Text
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else json.dumps(value, ensure_ascii=False)

    def process_result_value(self, value, dialect):
        return None if value is None else json.loads(value)


metadata = sa.MetaData()
comparisons = sa.Table(
    "rlhfkit_comparisons", metadata,
    sa.Column("comparison_id", sa.String(32), primary_key=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("prompt", ModelText, nullable=False),
    sa.Column("source", sa.String(16), nullable=False),  # "models" or "samples"
    sa.Column("left_model", sa.Text, nullable=False),
    sa.Column("left_model_version", sa.Text, nullable=False),
    sa.Column("left_response", ModelText, nullable=False),
    sa.Column("right_model", sa.Text, nullable=False),
    sa.Column("right_model_version", sa.Text, nullable=False),
    sa.Column("right_response", ModelText, nullable=False),
    sa.Column("sampling", sa.Text, nullable=False),  # the request's SamplingParams as JSON
    # The conversation the responses answer (then prompt is ""); NULL for a text prompt.
    # Added after the first release: migrate() adds it to older stores.
    sa.Column("messages", MessagesJSON, nullable=True),
    # The served reward model's score of each response when the comparison was made, and that
    # model's name@version (annotator agreement with the reward model); NULL without one.
    # Added for issue #17: migrate() adds them to older stores.
    sa.Column("left_reward", sa.Float, nullable=True),
    sa.Column("right_reward", sa.Float, nullable=True),
    sa.Column("reward_model", sa.Text, nullable=True),
)
# Columns added after the first release, in the order they were added.
ADDED_COLUMNS = [(comparisons, comparisons.c[name]) for name in ("messages", "left_reward", "right_reward",
                                                                 "reward_model")]
votes = sa.Table(
    "rlhfkit_votes", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),  # vote order (online Elo)
    sa.Column("vote_id", sa.String(32), nullable=False, unique=True),
    sa.Column("comparison_id", sa.String(32), sa.ForeignKey(comparisons.c.comparison_id), nullable=False),
    sa.Column("annotator_id", ModelText, nullable=False),
    sa.Column("choice", sa.String(16), nullable=False),
    sa.Column("rationale", ModelText),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("comparison_id", "annotator_id", name="rlhfkit_one_vote_per_annotator"),
)


class ComparisonNotFoundError(NotFoundError):
    """A vote named a comparison the store does not have."""


class VoteConflictError(ConflictError):
    """The annotator already voted differently on this comparison."""


@dataclass
class Vote:
    vote_id: str
    comparison_id: str
    annotator_id: str
    choice: str
    rationale: str | None
    already_recorded: bool
    comparison: dict  # the comparisons row: models revealed


def utc_midnight(t: float) -> float:
    """00:00 UTC of the day of Unix time t (Unix time has no leap seconds: days are 86400 s)."""
    return t - t % 86400


def utc_day(t: float) -> str:
    """YYYY-MM-DD (UTC) of Unix time t."""
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d")


def database_url(url: str) -> str:
    """SQLAlchemy URL with a driver: postgresql:// means psycopg 3 (psycopg2 is not a dependency)."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _sqlite_durable(dbapi_connection, _record):
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer (several processes)
    cur.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every commit: an acknowledged vote is on disk
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _columns(engine: sa.Engine, table: str) -> set[str]:
    return {c["name"] for c in sa.inspect(engine).get_columns(table)}


def migrate(engine: sa.Engine):
    """Bring an existing store up to this schema: add the columns added since it was created
    (nullable, so old rows read as before). Safe when several replicas open one store at once:
    PostgreSQL adds IF NOT EXISTS; on SQLite a concurrent add shows as a duplicate column."""
    for table, column in ADDED_COLUMNS:
        if column.name in _columns(engine, table.name):
            continue
        ddl = column.type.compile(dialect=engine.dialect)  # a TypeDecorator compiles as its impl
        exists = " IF NOT EXISTS" if engine.dialect.name == "postgresql" else ""
        try:
            with engine.begin() as conn:
                conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN{exists} {column.name} {ddl}")
        except sa.exc.OperationalError:
            if column.name not in _columns(engine, table.name):  # not a race lost to another process
                raise


class FeedbackStore:
    """Opens (and creates the tables of) the database on first use, so a server that never
    sees a comparison never writes a file."""

    def __init__(self, url: str):
        if not url or "://" not in url:
            raise ValueError(f"feedback_db must be a database URL (sqlite:///PATH or postgresql://...), got {url!r}")
        self.url = database_url(url)
        self._engine: sa.Engine | None = None
        self._opening = threading.Lock()  # the first two requests must not both create the tables
        self._quota_lock = threading.Lock()  # a capped vote's count and insert, one at a time

    @property
    def engine(self) -> sa.Engine:
        with self._opening:
            if self._engine is None:
                engine = sa.create_engine(self.url, pool_pre_ping=True)
                if engine.dialect.name == "sqlite":
                    sa.event.listen(engine, "connect", _sqlite_durable)
                    if engine.url.database and engine.url.database != ":memory:":
                        Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)
                try:
                    metadata.create_all(engine, checkfirst=True)
                except sa.exc.DBAPIError:  # another replica created them between our check and create
                    metadata.create_all(engine, checkfirst=True)
                migrate(engine)
                self._engine = engine
        return self._engine

    def close(self):
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def add_comparison(self, prompt: str, source: str, left: tuple[str, str, str], right: tuple[str, str, str],
                       sampling_json: str = "{}", messages: list[dict] | None = None,
                       rewards: tuple[float, float] | None = None, reward_model: str | None = None) -> str:
        """left/right: (model name, model version, response); messages: the conversation the
        responses answer (prompt "" then), or None; rewards: the (left, right) scores of
        reward_model (name@version), or None. Returns the comparison id."""
        comparison_id = uuid.uuid4().hex
        left_reward, right_reward = rewards if rewards is not None else (None, None)
        with self.engine.begin() as conn:
            conn.execute(comparisons.insert().values(
                comparison_id=comparison_id, created_at=time.time(), prompt=prompt, source=source,
                left_model=left[0], left_model_version=left[1], left_response=left[2],
                right_model=right[0], right_model_version=right[1], right_response=right[2],
                sampling=sampling_json, messages=messages or None, left_reward=left_reward,
                right_reward=right_reward, reward_model=reward_model))
        return comparison_id

    def get_comparison(self, comparison_id: str, conn=None) -> dict:
        def read(c):
            row = c.execute(comparisons.select().where(comparisons.c.comparison_id == comparison_id)).mappings().first()
            if row is None:
                raise ComparisonNotFoundError(f"comparison_id: no comparison {comparison_id!r} in the feedback store")
            return dict(row)

        if conn is not None:
            return read(conn)
        with self.engine.connect() as c:
            return read(c)

    def add_vote(self, comparison_id: str, choice: str, annotator_id: str, rationale: str | None = None,
                 max_per_day: int = 0) -> Vote:
        """Record a vote; returns once it is committed. The same vote again returns the
        recorded one (even over the cap: a retry of an acknowledged vote is not a new vote); a
        different one by the same annotator raises VoteConflictError. max_per_day > 0: an
        annotator with that many votes since 00:00 UTC gets QuotaExceededError.

        The count and the insert are one step: within this process a lock holds capped votes
        one at a time (the count alone would let concurrent votes all see room: 16 threads
        at a cap of 5 stored 9); across PostgreSQL replicas a transaction-scoped advisory lock
        on the annotator does the same. Several processes on one SQLite file are not locked
        against each other and can overshoot by the number of concurrent votes."""
        if choice not in CHOICES:
            raise InvalidArgumentError("choice", f"must be one of {', '.join(CHOICES)}, got {choice!r}")
        if not annotator_id:
            raise InvalidArgumentError("annotator_id", "is empty: say who votes (any stable id)")
        if not comparison_id:
            raise InvalidArgumentError("comparison_id", "is empty")
        vote_id = uuid.uuid4().hex
        mine = (votes.c.comparison_id == comparison_id, votes.c.annotator_id == annotator_id)
        try:
            with self._quota_lock if max_per_day > 0 else contextlib.nullcontext(), self.engine.begin() as conn:
                comparison = self.get_comparison(comparison_id, conn)
                old = conn.execute(votes.select().where(*mine)).mappings().first()
                if old is None:
                    now = time.time()
                    if max_per_day > 0:
                        if conn.dialect.name == "postgresql":  # released at commit; other replicas wait here
                            conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:a))"), {"a": annotator_id})
                        self._check_quota(conn, annotator_id, max_per_day, now)
                    conn.execute(votes.insert().values(vote_id=vote_id, comparison_id=comparison_id,
                                                       annotator_id=annotator_id, choice=choice,
                                                       rationale=rationale, created_at=now))
                    return Vote(vote_id, comparison_id, annotator_id, choice, rationale, False, comparison)
        except sa.exc.IntegrityError:  # this annotator voted here just now (perhaps on another replica)
            with self.engine.connect() as conn:
                comparison = self.get_comparison(comparison_id, conn)
                old = conn.execute(votes.select().where(*mine)).mappings().one()
        if (old["choice"], old["rationale"]) != (choice, rationale):
            raise VoteConflictError(f"annotator {annotator_id!r} already voted {old['choice']!r} on comparison "
                                    f"{comparison_id!r} (vote {old['vote_id']}); a vote cannot be changed")
        return Vote(old["vote_id"], comparison_id, annotator_id, choice, rationale, True, comparison)

    @staticmethod
    def _check_quota(conn, annotator_id: str, max_per_day: int, now: float):
        midnight = utc_midnight(now)
        today = conn.execute(sa.select(sa.func.count()).select_from(votes).where(
            votes.c.annotator_id == annotator_id, votes.c.created_at >= midnight)).scalar()
        if today >= max_per_day:
            left = midnight + 86400 - now
            raise QuotaExceededError(
                f"annotator {annotator_id!r} has cast {today} votes today, the most "
                f"--max-votes-per-annotator-per-day {max_per_day} allows; the count resets at 00:00 UTC "
                f"(in {int(left // 3600)}h{int(left % 3600 // 60):02d}m)")

    def battles(self, responses: bool = False) -> list[tuple]:
        """(left model, right model, choice) of every vote, in vote order; with responses,
        also (..., left response, right response), for style control."""
        columns = [comparisons.c.left_model, comparisons.c.right_model, votes.c.choice]
        if responses:
            columns += [comparisons.c.left_response, comparisons.c.right_response]
        q = (sa.select(*columns)
             .join(comparisons, votes.c.comparison_id == comparisons.c.comparison_id).order_by(votes.c.seq))
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(q)]

    def voted_comparisons(self) -> list[dict]:
        """Every vote with its comparison, in vote order."""
        q = (sa.select(votes.c.vote_id, votes.c.annotator_id, votes.c.choice, votes.c.rationale,
                       votes.c.created_at.label("voted_at"), comparisons)
             .join(comparisons, votes.c.comparison_id == comparisons.c.comparison_id).order_by(votes.c.seq))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    def random_prompt(self) -> str | list[dict] | None:
        """The prompt of a random comparison: its text, or its conversation."""
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(comparisons.c.prompt, comparisons.c.messages)
                               .order_by(sa.func.random()).limit(1)).first()
        return None if row is None else (row.messages or row.prompt)


def export_records(rows: list[dict], fmt: str, style_features: bool = False) -> list[dict]:
    """Training records from voted comparisons. trl: {"prompt", "chosen", "rejected"} (TRL /
    HH-RLHF); rankings: {"prompt", "responses": [best, worst]}. A comparison made from a
    conversation is written in TRL's conversational form: the prompt is its messages and
    each response one assistant message (chosen: [{"role": "assistant", "content": ...}],
    responses: [[best message], [worst message]]). Ties and both-bad votes say nothing about
    which response is better and are left out; every record keeps the vote, comparison and
    annotator ids and the models, so it can be traced back. style_features: each record also
    gets the style covariates of its responses (ratings.style_features: length, headers,
    lists, bold), as chosen_style / rejected_style (trl) or responses_style (rankings)."""
    if fmt not in ("trl", "rankings"):
        raise ValueError(f"format must be trl or rankings, got {fmt!r}")
    records = []
    for r in rows:
        if r["choice"] not in ("left", "right"):
            continue
        win, lose = ("left", "right") if r["choice"] == "left" else ("right", "left")
        chosen, rejected = r[f"{win}_response"], r[f"{lose}_response"]
        messages = r.get("messages")
        if messages:
            chosen, rejected = ([{"role": "assistant", "content": t}] for t in (chosen, rejected))
        record = {"prompt": messages or r["prompt"]}
        if fmt == "trl":
            record.update(chosen=chosen, rejected=rejected)
        else:
            record["responses"] = [chosen, rejected]
        record.update(vote_id=r["vote_id"], comparison_id=r["comparison_id"], annotator_id=r["annotator_id"],
                      chosen_model=r[f"{win}_model_version"], rejected_model=r[f"{lose}_model_version"])
        if style_features:
            styles = [ratings.style_features(r[f"{side}_response"]) for side in (win, lose)]
            if fmt == "trl":
                record.update(chosen_style=styles[0], rejected_style=styles[1])
            else:
                record["responses_style"] = styles
        records.append(record)
    return records
