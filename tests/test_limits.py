"""Bounded work per request, over a real socket: each request that used to stall the server
(issue #15's measurements) is refused with a status naming its limit, or runs without holding
up a small concurrent request beyond a stated bound."""

import concurrent.futures
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhfkit.clients import Client
from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.v1 import generation_pb2 as gen
from rlhfkit.v1 import generation_pb2_grpc, reward_pb2_grpc
from rlhfkit.v1 import reward_pb2 as reward


@pytest.fixture(scope="module")
def server(tiny_policy_dir, tiny_reward_dir):
    srv = ServerThread(ServeConfig(policy=str(tiny_policy_dir), reward=str(tiny_reward_dir), port=0,
                                   device="cpu")).wait_loaded()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as ch:
        yield ch


def refused(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call(*args, timeout=60, **kwargs)
    return e.value


def latencies_during(channel, work, probe, seconds_at_least: float = 0.0) -> tuple[list[float], float]:
    """Latencies of `probe()` called back to back while `work()` runs in another thread,
    and how long `work` took."""
    done = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        start = time.monotonic()
        job = pool.submit(lambda: (work(), done.append(time.monotonic() - start)))
        times = []
        while not job.done() or time.monotonic() - start < seconds_at_least:
            t = time.monotonic()
            probe()
            times.append(time.monotonic() - t)
        job.result()
    return times, done[0]


def test_a_long_prompt_is_refused_before_tokenizing(channel):
    stub = generation_pb2_grpc.GenerationStub(channel)
    start = time.monotonic()
    e = refused(stub.Generate, gen.GenerateRequest(prompt="word " * 200_000))  # 1 MB of text
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith("prompt:") and "--max-prompt-chars 400000" in e.details()
    assert time.monotonic() - start < 1.0


def test_tokenizing_a_long_prompt_does_not_stall_the_event_loop(channel):
    """A prompt within --max-prompt-chars but over the context: tokenized in a worker, then
    refused naming `prompt`. Health checks meanwhile answer within 0.25 s each (tokenizing
    it on the loop held them for the whole tokenization)."""
    stub = generation_pb2_grpc.GenerationStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    errors = []

    def work():
        for _ in range(3):
            try:
                stub.Generate(gen.GenerateRequest(prompt="the cat sat on the mat " * 16_000), timeout=60)
            except grpc.RpcError as e:
                errors.append(e)

    times, took = latencies_during(channel, work, lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=30))
    assert len(errors) == 3 and all(e.code() == grpc.StatusCode.INVALID_ARGUMENT for e in errors)
    assert errors[0].details().startswith("prompt: is ") and "whole context" in errors[0].details()
    print(f"3 tokenizations of 368,000 characters took {took:.2f} s; {len(times)} health checks, "
          f"slowest {max(times) * 1000:.0f} ms")
    assert max(times) < 0.25


def test_a_prompt_over_the_context_names_the_prompt(channel, server):
    context = server.server.state.registry.get("", "policy").context_length
    e = refused(generation_pb2_grpc.GenerationStub(channel).Generate,
                gen.GenerateRequest(prompt_token_ids=[5] * context, sampling=gen.SamplingParams(max_new_tokens=1)))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == (f"prompt: is {context} tokens, and the model's whole context is {context} tokens "
                           "(at least one must be left to generate); shorten the prompt")


@pytest.mark.parametrize("request_, field, option", [
    (gen.GenerateRequest(prompt="a", sampling=gen.SamplingParams(stop=["x"] * 100_000)), "sampling.stop", "--max-stop 16"),
    (gen.GenerateRequest(prompt="a", sampling=gen.SamplingParams(stop=["x" * 300])), "sampling.stop[0]",
     "--max-stop-chars 256"),
    (gen.GenerateRequest(prompt="a", sampling=gen.SamplingParams(stop_token_ids=[1] * 17)), "sampling.stop_token_ids",
     "--max-stop 16"),
    (gen.GenerateRequest(prompt="a", request_id="r" * 100_000), "request_id", "--max-id-chars 256"),
    (gen.GenerateRequest(prompt="a", model="m" * 20_000), "model", "--max-id-chars 256"),
])
def test_generate_requests_over_a_limit_are_refused_naming_it(channel, request_, field, option):
    e = refused(generation_pb2_grpc.GenerationStub(channel).Generate, request_)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith(field + ":") and option in e.details()
    assert len(e.details()) < 200  # the oversized value is not echoed


def test_an_unknown_long_model_name_is_shortened_in_not_found(channel):
    e = refused(generation_pb2_grpc.GenerationStub(channel).Generate, gen.GenerateRequest(prompt="a", model="m" * 200))
    assert e.code() == grpc.StatusCode.NOT_FOUND
    assert "m" * 64 + "...(200 characters)" in e.details() and "m" * 65 not in e.details()


def test_score_items_are_bounded(channel):
    stub = reward_pb2_grpc.RewardStub(channel)
    items = [reward.ScoreItem(prompt="the cat", response=" sat")] * 50_000
    start = time.monotonic()
    e = refused(stub.Score, reward.ScoreRequest(items=items))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == "items: has 50000 items, over --max-items 256; split the call"
    assert time.monotonic() - start < 2.0


def test_scoring_stops_when_the_deadline_passes(channel):
    """256 long items take the scoring worker seconds; with a 0.2 s deadline the call ends
    DEADLINE_EXCEEDED and the worker is free again within about one micro-batch, so the next
    small Score is answered at once instead of after the abandoned work."""
    stub = reward_pb2_grpc.RewardStub(channel)
    big = reward.ScoreRequest(items=[reward.ScoreItem(prompt="the cat sat on the mat " * 20, response=f" {i}")
                                     for i in range(256)])
    small = reward.ScoreRequest(items=[reward.ScoreItem(prompt="the cat", response=" sat")])
    start = time.monotonic()
    stub.Score(big, timeout=120)
    full = time.monotonic() - start
    with pytest.raises(grpc.RpcError) as e:
        stub.Score(big, timeout=0.2)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    start = time.monotonic()
    stub.Score(small, timeout=60)
    after = time.monotonic() - start
    print(f"256 items: {full:.2f} s; a small Score right after the abandoned one: {after * 1000:.0f} ms")
    assert after < max(0.25, full / 3)


def test_a_message_over_max_request_bytes_is_refused(channel):
    e = refused(reward_pb2_grpc.RewardStub(channel).Score,
                reward.ScoreRequest(items=[reward.ScoreItem(prompt="a", response="b" * (5 * 1024 * 1024))]))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_leaderboard_bootstrap_rounds_are_bounded(channel):
    from rlhfkit.v1 import feedback_pb2, feedback_pb2_grpc

    e = refused(feedback_pb2_grpc.FeedbackStub(channel).GetLeaderboard,
                feedback_pb2.GetLeaderboardRequest(bootstrap_rounds=10_000))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == "bootstrap_rounds: is 10000, over --max-bootstrap-rounds 1000"


def test_limits_are_options_and_checked(tiny_policy_dir, server):
    with pytest.raises(ValueError, match="max_items must be >= 1"):
        ServeConfig(policy=str(tiny_policy_dir), max_items=0)
    with Client(server.address, timeout=60) as c:  # a request inside every limit still works
        assert len(c.generate("the cat", max_new_tokens=3, stop=["zz"] * 16).completions[0].token_ids) <= 3


def test_token_ids_over_the_context_are_refused_before_they_are_scanned(channel, server):
    """A million prompt token ids (about 1 MB on the wire): refused on their count alone."""
    context = server.server.state.registry.get("", "policy").context_length
    start = time.monotonic()
    e = refused(generation_pb2_grpc.GenerationStub(channel).Generate,
                gen.GenerateRequest(prompt_token_ids=[5] * 1_000_000))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith(f"prompt: is 1000000 tokens, and the model's whole context is {context}")
    e = refused(reward_pb2_grpc.RewardStub(channel).LogProbs, reward.LogProbsRequest(items=[
        reward.LogProbsItem(prompt_token_ids=[5] * 500_000, response_token_ids=[6] * 500_000)]))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith("items[0]: prompt + response")
    assert time.monotonic() - start < 2.0


def test_conversations_have_a_bounded_number_of_turns(channel):
    from rlhfkit.v1 import chat_pb2

    turns = [chat_pb2.ChatMessage(role="user", content="")] * 2000
    e = refused(generation_pb2_grpc.GenerationStub(channel).Generate, gen.GenerateRequest(messages=turns))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details() == "messages: has 2000 turns, over --max-messages 1024"


def test_max_prompt_tokens_bounds_token_ids():
    from rlhfkit.server.limits import RequestLimits
    from rlhfkit.server.service import request_prompt_ids

    with pytest.raises(ValueError) as e:  # token ids need no model to count
        request_prompt_ids(None, "", [5] * 10, [], "", RequestLimits(max_prompt_tokens=4))
    assert str(e.value) == "prompt_token_ids: is 10 tokens, over --max-prompt-tokens 4"
    assert request_prompt_ids(None, "", [5] * 4, [], "", RequestLimits(max_prompt_tokens=4)) == ("", [5] * 4)
