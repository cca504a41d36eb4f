"""Access control on the gRPC port, over a real socket: every RPC without a token, with an
unknown one and with each role gets the status ARCHITECTURE.md's table gives; votes go under
the token's name; undecodable bytes are INVALID_ARGUMENT; the error table reads by isinstance."""

import json
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rlhfkit.errors import InvalidArgumentError
from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.server.errors import ModelNotFoundError, status_for
from rlhfkit.server.feedback import FeedbackStore
from rlhfkit.v1 import feedback_pb2 as fb
from rlhfkit.v1 import feedback_pb2_grpc, generation_pb2_grpc, models_pb2_grpc, reward_pb2_grpc
from rlhfkit.v1 import generation_pb2 as gen
from rlhfkit.v1 import models_pb2 as models
from rlhfkit.v1 import reward_pb2 as reward

TOKENS = {"client-token-0123456789": {"name": "app-1", "role": "client"},
          "annotator-token-0123456789": {"name": "ann-7", "role": "annotator"},
          "annotator-token-abcdefghij": {"name": "ann-8", "role": "annotator"},
          "admin-token-0123456789": {"name": "ops", "role": "admin"}}
TOKEN_OF = {"client": "client-token-0123456789", "annotator": "annotator-token-0123456789",
            "admin": "admin-token-0123456789"}
RANK = {"client": 0, "annotator": 1, "admin": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_policy_dir, tiny_reward_dir):
    tmp = tmp_path_factory.mktemp("access")
    (tmp / "tokens.json").write_text(json.dumps(TOKENS))
    srv = ServerThread(ServeConfig(policy=str(tiny_policy_dir), reward=str(tiny_reward_dir), port=0, device="cpu",
                                   auth_tokens=str(tmp / "tokens.json"),
                                   feedback_db=f"sqlite:///{tmp / 'feedback.db'}")).wait_loaded()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def stubs(channel):
    return {"Generation": generation_pb2_grpc.GenerationStub(channel), "Reward": reward_pb2_grpc.RewardStub(channel),
            "Models": models_pb2_grpc.ModelsStub(channel), "Feedback": feedback_pb2_grpc.FeedbackStub(channel)}


def auth(role_or_token: str | None):
    if role_or_token is None:
        return []
    return [("authorization", f"Bearer {TOKEN_OF.get(role_or_token, role_or_token)}")]


def comparison_id(channel) -> str:
    c = stubs(channel)["Feedback"].CreateComparison(
        fb.CreateComparisonRequest(prompt="the cat", samples_of="policy",
                                   sampling=gen.SamplingParams(temperature=1.0, max_new_tokens=2)),
        metadata=auth("admin"), timeout=60)  # choosing what answers (samples_of) is the admin's (issue #17)
    return c.comparison_id


def calls(channel):
    """(RPC, role it needs, call(metadata) -> None) for every RPC of rlhfkit.v1, each with a
    request that succeeds once the caller may make it (SetRole: FAILED_PRECONDITION, this
    server has no store)."""
    s = stubs(channel)
    sampling = gen.SamplingParams(max_new_tokens=2)
    item = reward.ScoreItem(prompt="the cat", response=" sat")
    cid = comparison_id(channel)
    return [
        ("Generate", "client", lambda md: s["Generation"].Generate(gen.GenerateRequest(prompt="the cat", sampling=sampling),
                                                                   metadata=md, timeout=60)),
        ("GenerateStream", "client", lambda md: list(s["Generation"].GenerateStream(
            gen.GenerateRequest(prompt="the cat", sampling=sampling), metadata=md, timeout=60))),
        ("Score", "client", lambda md: s["Reward"].Score(reward.ScoreRequest(items=[item]), metadata=md, timeout=60)),
        ("Compare", "client", lambda md: s["Reward"].Compare(
            reward.CompareRequest(prompt="the cat", response_a=" sat", response_b=" ran"), metadata=md, timeout=60)),
        ("LogProbs", "client", lambda md: s["Reward"].LogProbs(
            reward.LogProbsRequest(items=[reward.LogProbsItem(prompt="the cat", response=" sat")]), metadata=md,
            timeout=60)),
        ("ListModels", "client", lambda md: s["Models"].ListModels(models.ListModelsRequest(), metadata=md, timeout=60)),
        # The RPC is the client's; choosing what answers (samples_of, models) is the admin's, which
        # the servicer checks (a server-chosen matchup, any client's: tests/test_arena.py).
        ("CreateComparison", "admin", lambda md: s["Feedback"].CreateComparison(
            fb.CreateComparisonRequest(prompt="the cat", samples_of="policy",
                                       sampling=gen.SamplingParams(temperature=1.0, max_new_tokens=2)),
            metadata=md, timeout=60)),
        ("GetLeaderboard", "client", lambda md: s["Feedback"].GetLeaderboard(fb.GetLeaderboardRequest(bootstrap_rounds=5),
                                                                              metadata=md, timeout=60)),
        ("SubmitVote", "annotator", lambda md: s["Feedback"].SubmitVote(
            fb.SubmitVoteRequest(comparison_id=cid, choice=fb.CHOICE_LEFT), metadata=md, timeout=60)),
        ("GetAnnotators", "admin", lambda md: s["Feedback"].GetAnnotators(fb.GetAnnotatorsRequest(), metadata=md,
                                                                          timeout=60)),
        ("SetRole", "admin", lambda md: s["Models"].SetRole(models.SetRoleRequest(name="policy", role="policy"),
                                                            metadata=md, timeout=60)),
    ]


def code_of(call, metadata):
    try:
        call(metadata)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def test_every_rpc_gets_the_status_of_the_role_table(channel):
    assert {name for name, _, _ in calls(channel)} == {
        m.name for svc in (gen, reward, models, fb) for s in svc.DESCRIPTOR.services_by_name.values() for m in s.methods}
    for name, needed, call in calls(channel):
        assert code_of(call, auth(None)) == grpc.StatusCode.UNAUTHENTICATED, name
        assert code_of(call, auth("wrong-token-0123456789")) == grpc.StatusCode.UNAUTHENTICATED, name
        assert code_of(call, [("authorization", "Basic dXNlcjpwYXNz")]) == grpc.StatusCode.UNAUTHENTICATED, name
        for role in ("client", "annotator", "admin"):
            got = code_of(call, auth(role))
            if RANK[role] < RANK[needed]:
                assert got == grpc.StatusCode.PERMISSION_DENIED, (name, role)
            elif name == "SetRole":
                assert got == grpc.StatusCode.FAILED_PRECONDITION, (name, role)  # allowed; no store here
            else:
                assert got == grpc.StatusCode.OK, (name, role, got)


def test_the_refusal_says_what_to_do(channel):
    with pytest.raises(grpc.RpcError) as e:
        stubs(channel)["Models"].ListModels(models.ListModelsRequest(), timeout=30)
    assert "authorization: Bearer" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stubs(channel)["Models"].SetRole(models.SetRoleRequest(name="policy", role="policy"), metadata=auth("annotator"),
                                         timeout=30)
    assert "admin" in e.value.details() and "ann-7" in e.value.details()
    assert "annotator-token" not in e.value.details()  # a token is never echoed


def test_health_and_reflection_stay_open(channel):
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    reply = next(iter(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                      timeout=30)))
    assert "rlhfkit.v1.Generation" in {s.name for s in reply.list_services_response.service}


def test_votes_are_recorded_under_the_token_name(server, channel):
    feedback = stubs(channel)["Feedback"]
    cid = comparison_id(channel)
    with pytest.raises(grpc.RpcError) as e:  # one person cannot vote as another
        feedback.SubmitVote(fb.SubmitVoteRequest(comparison_id=cid, choice=fb.CHOICE_LEFT, annotator_id="ann-8"),
                            metadata=auth("annotator"), timeout=30)
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and "ann-7" in e.value.details()
    feedback.SubmitVote(fb.SubmitVoteRequest(comparison_id=cid, choice=fb.CHOICE_LEFT, annotator_id="ann-7"),
                        metadata=auth("annotator"), timeout=30)
    feedback.SubmitVote(fb.SubmitVoteRequest(comparison_id=cid, choice=fb.CHOICE_RIGHT),
                        metadata=auth("annotator-token-abcdefghij"), timeout=30)
    store = FeedbackStore(server.server.config.feedback_db)
    try:
        voters = {r["annotator_id"]: r["choice"] for r in store.voted_comparisons() if r["comparison_id"] == cid}
    finally:
        store.close()
    assert voters == {"ann-7": "left", "ann-8": "right"}


def test_paths_only_for_admins(server, channel):
    s = stubs(channel)["Models"]
    as_client = s.ListModels(models.ListModelsRequest(), metadata=auth("client"), timeout=30)
    as_admin = s.ListModels(models.ListModelsRequest(), metadata=auth("admin"), timeout=30)
    policy_dir = str(server.server.config.policy)
    assert [m.name for m in as_client.models] == [m.name for m in as_admin.models]
    assert policy_dir in {m.path for m in as_admin.models}
    assert all(m.path == "" for m in as_client.models) and policy_dir not in str(as_client)


def test_malformed_bytes_are_invalid_argument_and_counted(server, channel):
    raw = channel.unary_unary("/rlhfkit.v1.Reward/Score", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as e:
        raw(b"\xff\xff\xff\xff\x0f", metadata=auth("client"), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Score" in e.value.details()
    counted = server.server.metrics.registry.get_sample_value(
        "rlhfkit:rpc_errors_total", {"method": "Score", "code": "INVALID_ARGUMENT"})
    assert counted >= 1
    with pytest.raises(grpc.RpcError) as e:  # without a token the bytes are not even parsed
        raw(b"\xff\xff\xff\xff\x0f", timeout=30)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_error_table_reads_by_isinstance():
    class ItemsError(InvalidArgumentError):
        pass

    class MissingThing(ModelNotFoundError):
        pass

    assert status_for(ItemsError("items", "bad")) == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(MissingThing("x")) == grpc.StatusCode.NOT_FOUND
    assert status_for(ZeroDivisionError()) == grpc.StatusCode.INTERNAL


def test_non_loopback_bind_needs_tokens_or_insecure_open(tiny_policy_dir, tmp_path):
    with pytest.raises(ValueError, match="--auth-tokens.*--insecure-open"):
        ServeConfig(policy=str(tiny_policy_dir), host="0.0.0.0")
    ServeConfig(policy=str(tiny_policy_dir), host="0.0.0.0", insecure_open=True)
    ServeConfig(policy=str(tiny_policy_dir), host="::1")
    (tmp_path / "t.json").write_text(json.dumps(TOKENS))
    ServeConfig(policy=str(tiny_policy_dir), host="0.0.0.0", auth_tokens=str(tmp_path / "t.json"))


def test_a_bad_tokens_file_is_refused_at_start(tiny_policy_dir, tmp_path):
    from rlhfkit.server.auth import Tokens

    for content, message in (("{", "not valid JSON"), ('{"short": {"name": "a", "role": "client"}}', "at least 16"),
                             ('{"0123456789abcdefgh": {"name": "a", "role": "root"}}', "role must be one of"),
                             ('{"0123456789abcdefgh": {"role": "client"}}', "name")):
        (tmp_path / "t.json").write_text(content)
        with pytest.raises(ValueError, match=message) as e:
            Tokens(str(tmp_path / "t.json"))
        assert "0123456789abcdefgh" not in str(e.value)


def test_the_tokens_file_is_re_read_and_a_deleted_one_revokes_every_token(tmp_path):
    from rlhfkit.server.auth import Tokens, add_token, remove_token
    from rlhfkit.server.errors import UnauthenticatedError

    path = tmp_path / "tokens.json"
    first = add_token(str(path), "ann-1", "annotator")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    tokens = Tokens(str(path))
    assert tokens.identify(f"Bearer {first}").name == "ann-1"
    second = add_token(str(path), "ann-2", "client")
    assert remove_token(str(path), "ann-1") == 1
    time.sleep(1.05)  # the file is looked at at most once a second
    assert tokens.identify(f"Bearer {second}").role == "client"
    with pytest.raises(UnauthenticatedError, match="unknown token"):
        tokens.identify(f"Bearer {first}")
    path.write_text("{")  # a half-edited file keeps the last good tokens
    time.sleep(1.05)
    assert tokens.identify(f"Bearer {second}").name == "ann-2"
    path.unlink()  # deleting the file locks everyone out
    time.sleep(1.05)
    with pytest.raises(UnauthenticatedError):
        tokens.identify(f"Bearer {second}")
