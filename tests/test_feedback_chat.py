"""A/B feedback on conversations over loopback gRPC and the page's JSON API: both responses
decoded from the conversation exactly as Generate decodes it, the conversation stored with
the comparison and returned, exported in TRL's conversational form."""

import json
import urllib.error
import urllib.request

import grpc
import pytest

from rlhfkit.clients import Client
from rlhfkit.clients.cli import main as cli_main
from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.server.feedback import FeedbackStore
from rlhfkit.server.http import HttpSide
from rlhfkit.v1 import feedback_pb2
from test_client_chat import chat_model_dirs  # noqa: F401 - a fixture

CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count the red fish"},
                {"role": "assistant", "content": "one two"}, {"role": "user", "content": "and <b>blue</b>?"}]
GREEDY = dict(max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory, chat_model_dirs):  # noqa: F811
    root = tmp_path_factory.mktemp("fbchat")
    prompts = root / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": CONVERSATION}) + "\n")
    srv = ServerThread(ServeConfig(policy=str(chat_model_dirs["policy"]), reference=str(chat_model_dirs["other"]),
                                   port=0, metrics_port=0, device="cpu", feedback_db=f"sqlite:///{root / 'fb.db'}",
                                   feedback_prompts=str(prompts))).wait_loaded()
    srv.db = f"sqlite:///{root / 'fb.db'}"
    srv.http = f"http://127.0.0.1:{srv.server.metrics_port}"
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


def as_dicts(messages):
    return [{"role": m.role, "content": m.content} for m in messages]


def stored(server, comparison_id):
    store = FeedbackStore(server.db)
    try:
        return store.get_comparison(comparison_id)
    finally:
        store.close()


def test_two_models_answer_the_conversation(server, client):
    text = {m: client.generate(messages=CONVERSATION, model=m, **GREEDY).completions[0].text
            for m in ("policy", "reference")}
    assert text["policy"] != text["reference"]
    c = client.create_comparison(messages=CONVERSATION, models=("policy", "reference"), **GREEDY)
    assert c.prompt == "" and as_dicts(c.messages) == CONVERSATION
    vote = client.submit_vote(c.comparison_id, "left", "ann")
    assert (c.left, c.right) == (text[vote.left_model], text[vote.right_model])
    row = stored(server, c.comparison_id)
    assert (row["prompt"], row["messages"], row["left_response"]) == ("", CONVERSATION, c.left)
    # The conversation as the prompt argument does the same.
    again = client.create_comparison(CONVERSATION, models=("policy", "reference"), **GREEDY)
    assert {again.left, again.right} == set(text.values()) and as_dicts(again.messages) == CONVERSATION


def test_two_samples_are_generates_two_samples(client):
    sampling = dict(temperature=1.0, seed=3, max_new_tokens=8, ignore_eos=True)
    gen = client.generate(messages=CONVERSATION, n=2, **sampling)
    c = client.create_comparison(messages=CONVERSATION, samples_of="policy", **sampling)
    assert c.left != c.right
    assert sorted([c.left, c.right]) == sorted(x.text for x in gen.completions)


@pytest.mark.parametrize("request_fields, field", [
    (dict(prompt="the cat", messages=CONVERSATION), "messages:"),
    (dict(), "prompt:"),
    (dict(messages=[{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]), "messages[1].role:"),
])
def test_create_comparison_statuses(client, request_fields, field):
    req = feedback_pb2.CreateComparisonRequest(samples_of="policy", **request_fields)
    req.sampling.temperature = 1.0
    with pytest.raises(grpc.RpcError) as e:
        client.feedback.CreateComparison(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field)


def test_export_after_votes(server, client, tmp_path, capsys):
    """Voted through gRPC, exported by `rlhfkit feedback export`: the conversational records
    are the comparison's conversation and its two responses, the text ones as before."""
    fresh = tmp_path / "fb.db"
    srv = ServerThread(ServeConfig(policy=server.server.config.policy, reference=server.server.config.reference,
                                   port=0, device="cpu", feedback_db=f"sqlite:///{fresh}")).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            conv = c.create_comparison(messages=CONVERSATION, models=("policy", "reference"), **GREEDY)
            conv_vote = c.submit_vote(conv.comparison_id, "right", "ann")
            text = c.create_comparison("the cat", models=("policy", "reference"), **GREEDY)
            text_vote = c.submit_vote(text.comparison_id, "left", "ann")
    finally:
        srv.stop()
    out = tmp_path / "prefs.jsonl"
    assert cli_main(["feedback", "export", "--feedback-db", f"sqlite:///{fresh}", "--out", str(out)]) == 0
    assert "2 trl records" in capsys.readouterr().err
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == [
        {"prompt": CONVERSATION, "chosen": [{"role": "assistant", "content": conv.right}],
         "rejected": [{"role": "assistant", "content": conv.left}], "vote_id": conv_vote.vote_id,
         "comparison_id": conv.comparison_id, "annotator_id": "ann", "chosen_model": conv_vote.right_model_version,
         "rejected_model": conv_vote.left_model_version},
        {"prompt": "the cat", "chosen": text.left, "rejected": text.right, "vote_id": text_vote.vote_id,
         "comparison_id": text.comparison_id, "annotator_id": "ann", "chosen_model": text_vote.left_model_version,
         "rejected_model": text_vote.right_model_version}]
    # ... and `rlhfkit train rm` reads the file as it is, conversation and text lines alike.
    from rlhfkit.training.rm import read_rankings

    assert [(g["prompt"], g["responses"]) for g in read_rankings(str(out), "auto")] == [
        (CONVERSATION, [[{"role": "assistant", "content": conv.right}], [{"role": "assistant", "content": conv.left}]]),
        ("the cat", [text.left, text.right])]


def post(server, path, body):
    req = urllib.request.Request(server.http + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req).read())


def test_json_api_draws_and_compares_conversations(server, client):
    assert json.loads(urllib.request.urlopen(server.http + "/api/prompt").read()) == {"messages": CONVERSATION}
    text = {m: client.generate(messages=CONVERSATION, model=m, **GREEDY).completions[0].text
            for m in ("policy", "reference")}
    comp = post(server, "/api/comparisons", {"messages": CONVERSATION, "models": {"modelA": "policy",
                                                                                  "modelB": "reference"},
                                             "sampling": {"maxNewTokens": 6, "ignoreEos": True}})
    assert comp["messages"] == CONVERSATION and comp["prompt"] == ""
    assert {comp["left"], comp["right"]} == set(text.values())
    assert stored(server, comp["comparison_id"])["messages"] == CONVERSATION
    req = urllib.request.Request(server.http + "/api/comparisons", method="POST", data=json.dumps(
        {"prompt": "x", "messages": CONVERSATION, "samplesOf": "policy", "sampling": {"temperature": 1}}).encode(),
        headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    body = json.loads(e.value.read())
    assert e.value.code == 400 and body["code"] == "INVALID_ARGUMENT" and body["error"].startswith("messages:")


def test_prompts_file_entries_are_checked(tmp_path):
    from rlhfkit.server.app import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "the cat"}) + "\n\n" + json.dumps({"prompt": CONVERSATION}) + "\n")
    assert read_prompts(str(path)) == ["the cat", CONVERSATION]
    assert [HttpSide.drawable(p) for p in read_prompts(str(path))] == [{"prompt": "the cat"}, {"messages": CONVERSATION}]
    for bad, message in ((json.dumps({"prompt": [{"role": "bot", "content": "x"}]}), r"prompt\[0\]\.role: must be"),
                         (json.dumps({"text": "x"}), "expected a JSON object"), ("{oops", "expected a JSON object"),
                         (json.dumps({"prompt": ["hi"]}), "bad messages"), (json.dumps({"prompt": ""}), "'prompt' must be a non-empty")):
        path.write_text(json.dumps({"prompt": "ok"}) + "\n" + bad + "\n")
        with pytest.raises(ValueError, match=f"--feedback-prompts {path}:2: " + message):
            read_prompts(str(path))
