"""Feedback over loopback gRPC: comparisons from two models or two samples of one, sides
drawn at random, identities revealed by the vote, every bad input's status, metrics."""

import math
import re
import urllib.error
import urllib.request

import grpc
import pytest

from rlhfkit.clients import Client
from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.server.feedback import FeedbackStore
from rlhfkit.v1 import feedback_pb2
from test_feedback_store import postgres_schema

GREEDY = dict(max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def other_policy_dir(tmp_path_factory, tiny_tokenizer):
    from rlhfkit.training.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "other", "policy", tiny_tokenizer, seed=7)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_policy_dir, other_policy_dir):
    """Two different policies: `policy` and (served as the reference) `reference`."""
    db = tmp_path_factory.mktemp("fb") / "feedback.db"
    srv = ServerThread(ServeConfig(policy=str(tiny_policy_dir), reference=str(other_policy_dir), port=0,
                                   metrics_port=0, device="cpu", feedback_db=f"sqlite:///{db}")).wait_loaded()
    srv.db = db
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


def status_of(fn):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code(), e.value.details()


def test_two_models_sides_random_identities_revealed(client):
    # Greedy decoding is deterministic, so each model's text is known in advance.
    text = {m: client.generate("the cat", model=m, **GREEDY).completions[0].text for m in ("policy", "reference")}
    assert text["policy"] != text["reference"]
    sides = []
    for i in range(16):
        c = client.create_comparison("the cat", models=("policy", "reference"), **GREEDY)
        assert c.prompt == "the cat" and c.comparison_id
        assert not set(c.DESCRIPTOR.fields_by_name) & {"left_model", "right_model"}  # nothing to peek at
        vote = client.submit_vote(c.comparison_id, "left", annotator_id=f"a{i}")
        assert text[vote.left_model] == c.left and text[vote.right_model] == c.right
        assert vote.left_model_version.startswith(vote.left_model + "@") and not vote.already_recorded
        sides.append(vote.left_model)
    assert set(sides) == {"policy", "reference"}  # P(one side always) = 2 * 2^-16


def test_two_samples_of_one_policy(client):
    c = client.create_comparison("the cat", samples_of="policy", temperature=1.0, seed=3, max_new_tokens=8)
    assert c.left and c.right and c.left != c.right
    vote = client.submit_vote(c.comparison_id, "tie", "ann")
    assert vote.left_model == vote.right_model == "policy"


def test_vote_statuses(client):
    c = client.create_comparison("the cat", models=("policy", "reference"), **GREEDY)
    first = client.submit_vote(c.comparison_id, "right", "alice", rationale="clearer")
    again = client.submit_vote(c.comparison_id, "right", "alice", rationale="clearer")
    assert again.already_recorded and again.vote_id == first.vote_id
    assert again.left_model == first.left_model
    code, msg = status_of(lambda: client.submit_vote(c.comparison_id, "left", "alice"))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "alice" in msg and "'right'" in msg
    code, msg = status_of(lambda: client.submit_vote(c.comparison_id, "right", "alice", rationale="other"))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert client.submit_vote(c.comparison_id, "left", "bob").vote_id != first.vote_id  # another annotator
    code, msg = status_of(lambda: client.submit_vote("0" * 32, "left", "alice"))
    assert code == grpc.StatusCode.NOT_FOUND and "comparison_id" in msg
    code, msg = status_of(lambda: client.submit_vote(c.comparison_id, feedback_pb2.CHOICE_UNSPECIFIED, "carol"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("choice:")
    code, msg = status_of(lambda: client.submit_vote(c.comparison_id, 9, "carol"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("choice:")
    code, msg = status_of(lambda: client.submit_vote(c.comparison_id, "left", ""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("annotator_id:")
    code, msg = status_of(lambda: client.submit_vote("", "left", "carol"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("comparison_id:")


@pytest.mark.parametrize("kwargs, code, field", [
    (dict(prompt="", models=("policy", "reference")), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
    (dict(prompt="x", models=("policy", "nope")), grpc.StatusCode.NOT_FOUND, "'nope'"),
    (dict(prompt="x", samples_of="nope", temperature=1.0), grpc.StatusCode.NOT_FOUND, "'nope'"),
    (dict(prompt="x", samples_of="policy"), grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature"),
    (dict(prompt="x", samples_of="policy", temperature=1.0, n=2), grpc.StatusCode.INVALID_ARGUMENT, "sampling.n"),
    (dict(prompt="x", models=("policy", "reference"), top_p=2.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
])
def test_create_comparison_statuses(client, kwargs, code, field):
    got, msg = status_of(lambda: client.create_comparison(**kwargs))
    assert got == code and field in msg


def test_messages_to_models_without_a_chat_template(client):
    """These tiny models have no chat template: a conversation is FAILED_PRECONDITION naming the
    model, and neither model keeps decoding (the server still answers at once afterwards)."""
    conversation = [{"role": "user", "content": "hi"}]
    code, msg = status_of(lambda: client.create_comparison(messages=conversation, models=("policy", "reference"),
                                                           **GREEDY))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "'policy'" in msg and "chat template" in msg
    code, msg = status_of(lambda: client.create_comparison(conversation, samples_of="reference", temperature=1.0))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "'reference'" in msg
    code, msg = status_of(lambda: client.create_comparison("the cat", messages=conversation, samples_of="policy",
                                                           temperature=1.0))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("messages:") and "prompt" in msg
    assert client.create_comparison("the cat", models=("policy", "reference"), **GREEDY).left


def test_comparison_without_source_is_a_server_chosen_matchup(client):
    """No source: the server draws the pair (issue #17) and decodes with --arena-sampling,
    so sampling from the caller is refused, naming the field; a prompt that does not fit the
    operator's parameters names the prompt. tests/test_arena.py has the rest."""
    req = feedback_pb2.CreateComparisonRequest(prompt="x", sampling={"temperature": 1.0})
    code, msg = status_of(lambda: client.feedback.CreateComparison(req, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("sampling:") and "--arena-sampling" in msg
    # This server keeps the default --arena-sampling (256 new tokens): more than the tiny context holds.
    code, msg = status_of(lambda: client.feedback.CreateComparison(feedback_pb2.CreateComparisonRequest(prompt="x"),
                                                                   timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("prompt: does not fit this server's "
                                                                       "--arena-sampling: max_new_tokens:"), msg


def test_leaderboard_and_metrics_from_the_votes(server, tmp_path):
    # A fresh store on the same models: `policy` wins 3 of 4 against `reference`.
    db = tmp_path / "board.db"
    srv = ServerThread(ServeConfig(policy=server.server.config.policy, reference=server.server.config.reference,
                                   port=0, metrics_port=0, device="cpu", feedback_db=f"sqlite:///{db}")).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            for i, winner in enumerate(["policy", "policy", "reference", "policy"]):
                comp = c.create_comparison("the cat", models=("policy", "reference"), **GREEDY)
                reveal_left = c.submit_vote(comp.comparison_id, "tie", f"probe{i}").left_model  # learn the sides
                c.submit_vote(comp.comparison_id, "left" if reveal_left == winner else "right", f"judge{i}")
            board = c.leaderboard(bootstrap_rounds=50, seed=1)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics").read().decode()
    finally:
        srv.stop()
    assert board.num_votes == 8 and board.num_battles == 8 and list(board.models) == ["policy", "reference"]
    top, bottom = board.ratings
    assert (top.model, top.wins, top.losses, top.ties) == ("policy", 3, 1, 4)
    # BT with ties as half wins: policy 5 of 8. Maximum likelihood would be odds 5:3, a gap of
    # 400 log10(5/3) = 88.74; the server's N(1000, 200^2) prior pulls it in: the MAP x (natural
    # log units, +-x for the two) solves 5 - 8 sigmoid(2x) = x / s^2, s = 200 ln(10) / 400.
    lam = (400 / math.log(10) / 200) ** 2
    lo, hi = 0.0, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 5 - 8 / (1 + math.exp(-2 * mid)) - lam * mid > 0 else (lo, mid)
    half_gap = lo * 400 / math.log(10)  # 37.00 (x = 0.213), against 44.37 without the prior
    assert board.prior_sd == 200 and half_gap == pytest.approx(37.00, abs=0.01)
    assert top.bradley_terry == pytest.approx(1000 + half_gap, abs=0.01)
    assert bottom.bradley_terry == pytest.approx(1000 - half_gap, abs=0.01)
    assert top.bradley_terry_lower <= top.bradley_terry <= top.bradley_terry_upper
    assert board.win_rates[0].win_rates[1] == pytest.approx(5 / 8) and board.win_rates[0].battles[1] == 8
    assert re.search(r'^rlhfkit:feedback_comparisons_total\{source="models"\} 4\.0$', metrics, re.M)
    assert re.search(r'^rlhfkit:feedback_votes_total\{choice="tie"\} 4\.0$', metrics, re.M)
    left = re.search(r'^rlhfkit:feedback_votes_total\{choice="left"\} (\d+)\.0$', metrics, re.M)
    right = re.search(r'^rlhfkit:feedback_votes_total\{choice="right"\} (\d+)\.0$', metrics, re.M)
    assert int(left.group(1) if left else 0) + int(right.group(1) if right else 0) == 4


def test_votes_are_in_the_store(server, client):
    c = client.create_comparison("the dog", models=("policy", "reference"), **GREEDY)
    vote = client.submit_vote(c.comparison_id, "both_bad", "dana", rationale="neither")
    store = FeedbackStore(f"sqlite:///{server.db}")
    rows = {r["vote_id"]: r for r in store.voted_comparisons()}
    store.close()
    row = rows[vote.vote_id]
    assert (row["choice"], row["annotator_id"], row["rationale"], row["prompt"]) == ("both_bad", "dana", "neither", "the dog")
    assert (row["left_response"], row["right_response"]) == (c.left, c.right)


def test_two_replicas_share_a_postgres_store(tiny_policy_dir):
    """Two servers on one PostgreSQL store: a comparison made on one is voted on the other,
    the second vote (through the first) conflicts, and both leaderboards count the vote."""
    with postgres_schema() as url:
        replicas = [ServerThread(ServeConfig(policy=str(tiny_policy_dir), port=0, device="cpu",
                                             feedback_db=url)).wait_loaded() for _ in range(2)]
        try:
            with Client(replicas[0].address, timeout=60) as a, Client(replicas[1].address, timeout=60) as b:
                comp = a.create_comparison("the cat", samples_of="policy", temperature=1.0, max_new_tokens=3)
                assert b.submit_vote(comp.comparison_id, "right", "erin").right_model == "policy"
                code, _ = status_of(lambda: a.submit_vote(comp.comparison_id, "left", "erin"))
                assert code == grpc.StatusCode.ALREADY_EXISTS
                assert a.leaderboard(bootstrap_rounds=1).num_votes == b.leaderboard(bootstrap_rounds=1).num_votes == 1
        finally:
            for r in replicas:
                r.stop()


def test_cli_leaderboard(server, client, capsys):
    from rlhfkit.clients.cli import main as cli_main

    assert cli_main(["feedback", "leaderboard", "--address", server.address, "--bootstrap-rounds", "10"]) == 0
    out = capsys.readouterr().out
    board = client.leaderboard(bootstrap_rounds=10)
    assert out.splitlines()[0] == f"{board.num_battles} battles ({board.num_votes} votes)"
    assert [line.split()[0] for line in out.splitlines()[2:]] == [r.model for r in board.ratings]


def test_labeling_page_draws_from_the_prompts_file(tmp_path, tiny_policy_dir):
    import json

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "only this one"}\n')
    srv = ServerThread(ServeConfig(policy=str(tiny_policy_dir), port=0, metrics_port=0, device="cpu",
                                   feedback_db=f"sqlite:///{tmp_path / 'fb.db'}",
                                   feedback_prompts=str(prompts))).wait_loaded()
    try:
        base = f"http://127.0.0.1:{srv.server.metrics_port}"
        assert json.loads(urllib.request.urlopen(base + "/api/prompt").read()) == {"prompt": "only this one"}
        assert json.loads(urllib.request.urlopen(base + "/api/models").read())["models"] == ["policy"]
        page = urllib.request.urlopen(base + "/").read().decode()
        assert 'id="vote-both-bad"' in page and "/static/label.js" in page
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/static/../feedback.py")
        assert e.value.code == 404
    finally:
        srv.stop()
    assert not (tmp_path / "fb.db").exists()  # no comparison, no file
