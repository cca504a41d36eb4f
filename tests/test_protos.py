"""The protos are the public API: the committed stubs are current, and a client built
from protos/ alone (no rlhfkit package) can call every RPC."""

import filecmp
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path


from rlhfkit.server.app import ServeConfig, ServerThread

ROOT = Path(__file__).resolve().parents[1]
PROTOS = ROOT / "protos"


def test_committed_stubs_match_regeneration(tmp_path):
    subprocess.run(["bash", str(PROTOS / "generate.sh"), str(tmp_path)], check=True)
    generated = sorted(p.name for p in (tmp_path / "rlhfkit" / "v1").iterdir())
    assert generated, "protoc produced nothing"
    committed = PROTOS / "rlhfkit" / "v1"
    for name in generated:
        assert filecmp.cmp(tmp_path / "rlhfkit" / "v1" / name, committed / name, shallow=False), (
            f"{name} is stale: run protos/generate.sh and commit the result")


CLIENT = textwrap.dedent("""
    import sys
    import grpc
    from rlhfkit.v1 import generation_pb2, generation_pb2_grpc, reward_pb2, reward_pb2_grpc
    from rlhfkit.v1 import models_pb2, models_pb2_grpc, feedback_pb2, feedback_pb2_grpc
    assert generation_pb2.__file__.startswith(sys.argv[2]), generation_pb2.__file__

    ch = grpc.insecure_channel(sys.argv[1])
    gen = generation_pb2_grpc.GenerationStub(ch)
    req = generation_pb2.GenerateRequest(prompt="the cat", sampling=generation_pb2.SamplingParams(max_new_tokens=5))
    resp = gen.Generate(req, timeout=60)
    assert len(resp.completions[0].token_ids) == 5
    chunks = list(gen.GenerateStream(req, timeout=60))
    assert [t for c in chunks for t in c.token_ids] == list(resp.completions[0].token_ids)
    rew = reward_pb2_grpc.RewardStub(ch)
    score = rew.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt="a", response="b")]), timeout=60)
    assert len(score.rewards) == 1
    cmp = rew.Compare(reward_pb2.CompareRequest(prompt="a", response_a="b", response_b="c"), timeout=60)
    assert 0 < cmp.prob_a_preferred < 1
    models = models_pb2_grpc.ModelsStub(ch).ListModels(models_pb2.ListModelsRequest(), timeout=60)
    assert {m.role for m in models.models} == {"policy", "reward"}
    try:
        gen.Generate(generation_pb2.GenerateRequest(prompt="x", sampling=generation_pb2.SamplingParams(top_p=2.0)))
        raise SystemExit("bad top_p accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    fb = feedback_pb2_grpc.FeedbackStub(ch)
    comp = fb.CreateComparison(feedback_pb2.CreateComparisonRequest(
        prompt="the cat", samples_of="policy",
        sampling=generation_pb2.SamplingParams(temperature=1.0, max_new_tokens=3)), timeout=60)
    vote = fb.SubmitVote(feedback_pb2.SubmitVoteRequest(comparison_id=comp.comparison_id,
                                                        choice=feedback_pb2.CHOICE_LEFT, annotator_id="a"), timeout=60)
    assert vote.left_model == vote.right_model == "policy"
    assert fb.GetLeaderboard(feedback_pb2.GetLeaderboardRequest(), timeout=60).num_votes == 1
    try:
        fb.SubmitVote(feedback_pb2.SubmitVoteRequest(comparison_id=comp.comparison_id,
                                                     choice=feedback_pb2.CHOICE_RIGHT, annotator_id="a"), timeout=60)
        raise SystemExit("changed vote accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.ALREADY_EXISTS, e
    print("every RPC answered")
""")


def test_client_from_protos_alone(tmp_path, tiny_policy_dir, tiny_reward_dir):
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    subprocess.run(["bash", str(PROTOS / "generate.sh"), str(stubs)], check=True)
    # -S: no site-packages .pth processing, so the installed (editable) rlhfkit is invisible;
    # grpc and protobuf come from site-packages put on the path explicitly.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(stubs)] + site.getsitepackages()))
    srv = ServerThread(ServeConfig(policy=str(tiny_policy_dir), reward=str(tiny_reward_dir), port=0,
                                   device="cpu", feedback_db=f"sqlite:///{tmp_path / 'feedback.db'}")).wait_loaded()
    try:
        out = subprocess.run([sys.executable, "-S", "-c", CLIENT, srv.address, str(stubs)], env=env,
                             capture_output=True, text=True, timeout=120)
    finally:
        srv.stop()
    assert out.returncode == 0, out.stderr
    assert "every RPC answered" in out.stdout
