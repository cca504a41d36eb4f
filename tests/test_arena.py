"""Server-chosen (blind) matchups over a real socket (issue #17): the server draws the pair
from the policies it serves by the posterior variance of their rating difference, decodes
with the operator's --arena-sampling, hides who answered until the vote and scores both
responses with the served reward model; choosing what answers is the admin's."""

import json
import math

import grpc
import pytest

from rlhfkit.clients import Client
from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.server.feedback import FeedbackStore
from rlhfkit.v1 import feedback_pb2 as fb
from test_store import publish

TOKENS = {"client-token-0123456789": {"name": "app-1", "role": "client"},
          "annotator-token-0123456789": {"name": "ann-1", "role": "annotator"},
          "admin-token-0123456789": {"name": "ops", "role": "admin"}}
TOKEN = {entry["role"]: token for token, entry in TOKENS.items()}
ARENA = {"temperature": 1.0, "maxNewTokens": 3}
POLICIES = ["ppo-1", "ppo-2", "sft-1"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tokenizer):
    """A store serving three policies (the policy, the reference and one more by roles.json's
    "serve") and a reward model."""
    root = tmp_path_factory.mktemp("arena")
    store = root / "store"
    sft = publish(store, "sft-1", "sft", tiny_tokenizer, seed=0)
    publish(store, "rm-1", "rm", tiny_tokenizer, seed=1, parent=sft)
    publish(store, "ppo-1", "ppo", tiny_tokenizer, seed=2, parent=sft)
    publish(store, "ppo-2", "ppo", tiny_tokenizer, seed=3, parent=sft)
    (store / "roles.json").write_text(json.dumps({"policy": "ppo-2", "reference": "sft-1", "reward": "rm-1",
                                                  "serve": ["ppo-1"]}))
    (root / "tokens.json").write_text(json.dumps(TOKENS))
    srv = ServerThread(ServeConfig(store=str(store), port=0, device="cpu", reload_interval=0,
                                   auth_tokens=str(root / "tokens.json"), arena_sampling=json.dumps(ARENA),
                                   feedback_db=f"sqlite:///{root / 'fb.db'}")).wait_loaded()
    srv.db = root / "fb.db"
    yield srv
    srv.stop()


def client(server, role):
    return Client(server.address, timeout=60, token=TOKEN[role])


def rows(server):
    store = FeedbackStore(f"sqlite:///{server.db}")
    try:
        with store.engine.connect() as conn:
            from rlhfkit.server.feedback import comparisons
            return {r["comparison_id"]: dict(r) for r in conn.execute(comparisons.select()).mappings()}
    finally:
        store.close()


def status_of(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_a_server_chosen_matchup_is_blind_until_the_vote(server):
    with client(server, "annotator") as c:
        comp = c.feedback.CreateComparison(fb.CreateComparisonRequest(prompt="the cat"), timeout=60)
        # What the annotator receives: the id, the prompt and two texts; no name, version or parameter.
        assert {f.name for f, _ in comp.ListFields()} <= {"comparison_id", "prompt", "left", "right"}
        wire = comp.SerializeToString()
        assert not any(name.encode() in wire for name in POLICIES + ["rm-1", "policy", "reference"])
        vote = c.submit_vote(comp.comparison_id, "both_bad", "")  # (no winner: the record test below stays clean)
    assert vote.left_model != vote.right_model and {vote.left_model, vote.right_model} <= set(POLICIES)
    row = rows(server)[comp.comparison_id]
    assert (row["source"], row["left_model"], row["right_model"]) == ("arena", vote.left_model, vote.right_model)
    assert json.loads(row["sampling"]) == ARENA  # the operator's parameters, not the caller's
    # Both responses scored by the served reward model when the comparison was made, as Score scores them.
    with client(server, "client") as c:
        expected = c.score([("the cat", row["left_response"]), ("the cat", row["right_response"])])
    assert [row["left_reward"], row["right_reward"]] == pytest.approx(expected, abs=1e-5)
    assert row["reward_model"].startswith("rm-1")


def test_choosing_what_answers_is_the_admins(server):
    chosen = [fb.CreateComparisonRequest(prompt="the cat", models=fb.ModelPair(model_a="ppo-1", model_b="sft-1"),
                                         sampling={"max_new_tokens": 2}),
              fb.CreateComparisonRequest(prompt="the cat", samples_of="ppo-1",
                                         sampling={"temperature": 1.0, "max_new_tokens": 2})]
    for role in ("client", "annotator"):
        with client(server, role) as c:
            for req in chosen:
                code, msg = status_of(lambda: c.feedback.CreateComparison(req, timeout=60))
                assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in msg, (role, msg)
                assert msg.startswith(req.WhichOneof("source") + ":")
    with client(server, "admin") as c:
        for req in chosen:
            assert c.feedback.CreateComparison(req, timeout=60).left is not None
    with client(server, "client") as c:
        req = fb.CreateComparisonRequest(prompt="the cat", sampling={"temperature": 0.1})
        code, msg = status_of(lambda: c.feedback.CreateComparison(req, timeout=60))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("sampling:") and "--arena-sampling" in msg


def test_matchups_favour_the_pair_whose_order_is_least_known(server):
    """sft-1 and ppo-1 tied 60 times; ppo-2 never played. Worked by hand (the MAP is 0, so p =
    1/2 and 60 games give sft-1 and ppo-1 a data precision of 60/4 = 15 each on their
    difference; lam = 1/s^2 = 0.7545 with s = 200 Elo in natural-log units):
    var(sft - ppo1) = 2 / (lam + 30) = 0.065 and var(x - ppo2) = (1/lam + 1/(lam + 30)) / 2 + 1/lam
    = 2.004, so P(sft-1 vs ppo-1) = 0.065 / (0.065 + 2 x 2.004) = 0.016 per draw."""
    store = FeedbackStore(f"sqlite:///{server.db}")
    try:
        for i in range(60):
            cid = store.add_comparison("p", "models", ("sft-1", "sft-1@1", "a"), ("ppo-1", "ppo-1@1", "b"))
            store.add_vote(cid, "tie", f"seed-{i}")
    finally:
        store.close()
    before = set(rows(server))
    with client(server, "client") as c:
        for _ in range(40):
            c.feedback.CreateComparison(fb.CreateComparisonRequest(prompt="the cat"), timeout=60)
    drawn = [frozenset((r["left_model"], r["right_model"])) for cid, r in rows(server).items() if cid not in before]
    assert len(drawn) == 40
    # Binomial(40, 0.016): 5 or more has probability 3e-4; each open pair expects 19.7 (<10: 1e-3).
    assert drawn.count(frozenset(("sft-1", "ppo-1"))) <= 4
    assert drawn.count(frozenset(("sft-1", "ppo-2"))) >= 10 and drawn.count(frozenset(("ppo-1", "ppo-2"))) >= 10


def test_one_policy_is_not_an_arena(tiny_policy_dir, tmp_path):
    srv = ServerThread(ServeConfig(policy=str(tiny_policy_dir), port=0, device="cpu", arena_sampling=json.dumps(ARENA),
                                   feedback_db=f"sqlite:///{tmp_path / 'fb.db'}")).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            code, msg = status_of(lambda: c.feedback.CreateComparison(fb.CreateComparisonRequest(prompt="x"),
                                                                      timeout=60))
    finally:
        srv.stop()
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "two served policies" in msg and "policy" in msg


@pytest.mark.parametrize("bad,says", [('{"temperature": -1}', "temperature"), ('{"n": 2}', "n must be"),
                                      ("not json", "not SamplingParams JSON"), ('{"tempo": 1}', "tempo"),
                                      (json.dumps({"stop": ["x"] * 17}), "--max-stop 16")])
def test_a_bad_arena_sampling_fails_at_start(tiny_policy_dir, bad, says):
    with pytest.raises(ValueError, match="arena_sampling") as e:
        ServeConfig(policy=str(tiny_policy_dir), arena_sampling=bad)
    assert says in str(e.value)


def test_the_leaderboard_is_finite_on_a_perfect_record(server):
    """ppo-2 wins every battle it plays here (besides, perhaps, the both-bad vote above):
    finite ratings, intervals of real width. tests/test_ratings.py has the exact values."""
    with client(server, "admin") as c, client(server, "annotator") as a:
        for _ in range(6):
            comp = c.create_comparison("the cat", models=("ppo-2", "ppo-1"), max_new_tokens=2)
            left = rows(server)[comp.comparison_id]["left_model"]  # the sides, from the store
            a.submit_vote(comp.comparison_id, "left" if left == "ppo-2" else "right", "")
        board = c.leaderboard(bootstrap_rounds=20, seed=0)
    by = {r.model: r for r in board.ratings}
    top = by["ppo-2"]
    assert top.wins == 6 and top.losses == 0 and top.ties == 0 and board.prior_sd == 200
    assert 1000 < top.bradley_terry < 1400 and 100 < top.bradley_terry_upper - top.bradley_terry_lower < 600
    assert all(math.isfinite(r.style_controlled) for r in board.ratings)
    assert {s.feature for s in board.style} <= {"length", "headers", "lists", "bold"}


def test_a_conversation_is_drawn_only_between_chat_models(server):
    """The store's tiny tokenizer has no chat template: a server-chosen matchup for messages
    finds no pair (rather than drawing one and refusing with the drawn model's name)."""
    with client(server, "annotator") as c:
        req = fb.CreateComparisonRequest(messages=[{"role": "user", "content": "hi"}])
        code, msg = status_of(lambda: c.feedback.CreateComparison(req, timeout=60))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "chat template" in msg and "has none" in msg, msg


@pytest.mark.parametrize("prior_sd", [0.0, 0.5, 20_000.0, float("nan"), float("inf")])
def test_a_bad_prior_sd_is_refused_with_its_range(server, prior_sd):
    with client(server, "client") as c:
        code, msg = status_of(lambda: c.leaderboard(5, prior_sd=prior_sd))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("prior_sd: must be in [1, 10000] Elo"), msg
