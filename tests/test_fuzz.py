"""Property-based fuzz of the request messages over real gRPC on loopback (hypothesis).

One server with a tokens file (so every call also passes the auth interceptor), a tiny
policy with a chat template (messages reach the template), a tiny reward model and a
reference. Every call, whatever its fields, token or raw bytes, must end OK or with one of
the request-error statuses and a short message: never UNKNOWN or INTERNAL (a bug), never a
hang; undecodable bytes get INVALID_ARGUMENT; and the server keeps serving afterwards.

Calls go through a raw channel (bytes in, bytes out), so the test decides what is on the
wire. Sizes are capped for CI (a few KB of text, a few new tokens): the large hostile cases
(MB prompts, 50,000 items) are bench/load.py's.
"""

import json
import math
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.v1 import chat_pb2, feedback_pb2, generation_pb2, models_pb2, reward_pb2

TOKENS = {"admin": "fuzz-admin-0123456789abcdef", "annotator": "fuzz-annotator-0123456789abcdef",
          "client": "fuzz-client-0123456789abcdef"}
RANK = {"client": 0, "annotator": 1, "admin": 2}
S = grpc.StatusCode
# What a request may legitimately end with. UNKNOWN / INTERNAL / UNAVAILABLE mean a bug.
EXPECTED = {S.OK, S.INVALID_ARGUMENT, S.NOT_FOUND, S.FAILED_PRECONDITION, S.PERMISSION_DENIED, S.UNAUTHENTICATED,
            S.ALREADY_EXISTS, S.RESOURCE_EXHAUSTED, S.DEADLINE_EXCEEDED, S.OUT_OF_RANGE}
TIMEOUT_S = 30  # the client deadline of a normal call
HANG_S = 20  # a call that takes this long counts as a hang
KNOWN = "<known comparison>"  # stands for the fixture's comparison id in drawn SubmitVote requests

G, R, M, F = "/rlhfkit.v1.Generation/", "/rlhfkit.v1.Reward/", "/rlhfkit.v1.Models/", "/rlhfkit.v1.Feedback/"
# method -> (request type, reply type (of a chunk, when streaming), role needed, server-streaming)
METHODS = {
    G + "Generate": (generation_pb2.GenerateRequest, generation_pb2.GenerateResponse, "client", False),
    G + "GenerateStream": (generation_pb2.GenerateRequest, generation_pb2.GenerateChunk, "client", True),
    R + "Score": (reward_pb2.ScoreRequest, reward_pb2.ScoreResponse, "client", False),
    R + "Compare": (reward_pb2.CompareRequest, reward_pb2.CompareResponse, "client", False),
    R + "LogProbs": (reward_pb2.LogProbsRequest, reward_pb2.LogProbsResponse, "client", False),
    M + "ListModels": (models_pb2.ListModelsRequest, models_pb2.ListModelsResponse, "client", False),
    M + "SetRole": (models_pb2.SetRoleRequest, models_pb2.SetRoleResponse, "admin", False),
    F + "CreateComparison": (feedback_pb2.CreateComparisonRequest, feedback_pb2.Comparison, "client", False),
    F + "SubmitVote": (feedback_pb2.SubmitVoteRequest, feedback_pb2.SubmitVoteResponse, "annotator", False),
    F + "GetLeaderboard": (feedback_pb2.GetLeaderboardRequest, feedback_pb2.Leaderboard, "client", False),
}

FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    from rlhfkit.training.tiny import add_chat_template, make_tiny_checkpoint, sample_corpus, train_tokenizer

    tmp = tmp_path_factory.mktemp("fuzz")
    tokenizer = add_chat_template(train_tokenizer(sample_corpus()))
    policy = make_tiny_checkpoint(tmp / "policy", "policy", tokenizer, seed=0)
    reward = make_tiny_checkpoint(tmp / "reward", "reward", tokenizer, seed=1)
    (tmp / "tokens.json").write_text(json.dumps({t: {"name": f"fuzz-{r}", "role": r} for r, t in TOKENS.items()}))
    srv = ServerThread(ServeConfig(policy=str(policy), reward=str(reward), reference=str(policy), port=0,
                                   device="cpu", auth_tokens=str(tmp / "tokens.json"), reload_interval=0,
                                   feedback_db=f"sqlite:///{tmp / 'feedback.db'}")).wait_loaded()
    channel = grpc.insecure_channel(srv.address)
    # A comparison to vote on, so drawn votes reach the store, not only NOT_FOUND.
    req = feedback_pb2.CreateComparisonRequest(prompt="the cat", models=feedback_pb2.ModelPair(model_a="policy",
                                                                                               model_b="reference"))
    code, reply, _ = call(channel, F + "CreateComparison", req.SerializeToString(),
                          bearer(TOKENS["admin"]), TIMEOUT_S)
    assert code == S.OK, reply
    srv.comparison_id = reply[0].comparison_id
    srv.channel = channel
    yield srv
    channel.close()
    srv.stop()


def bearer(token):
    return f"Bearer {token}"


def call(channel, method: str, payload: bytes, authorization: str | None, timeout: float):
    """(status, replies or the error message, seconds), with the payload on the wire exactly as
    given (no serializer) and each reply decoded (a unary call has one, a stream one per chunk)."""
    _, reply_type, _, streaming = METHODS[method]
    metadata = [("authorization", authorization)] if authorization is not None else None
    t0 = time.monotonic()
    try:
        if streaming:
            replies = list(channel.unary_stream(method)(payload, metadata=metadata, timeout=timeout))
        else:
            replies = [channel.unary_unary(method)(payload, metadata=metadata, timeout=timeout)]
        return S.OK, [reply_type.FromString(r) for r in replies], time.monotonic() - t0
    except grpc.RpcError as e:
        return e.code(), e.details() or "", time.monotonic() - t0


def check(code, reply, seconds, method):
    assert code in EXPECTED, f"{method} -> {code.name}: {reply!r}"
    if code != S.OK:
        assert 0 < len(reply) < 2000, f"{method} -> {code.name} with a message of {len(reply)} characters"
    assert seconds < HANG_S, f"{method} took {seconds:.1f}s ({code.name})"


# ---- strategies --------------------------------------------------------------------------
# Each RPC gets "anything" (every field drawn from everything) and "plausible" (one prompt
# source, served model names, short texts: requests that get past validation into the
# engines, the scorer and the store, with odd numbers and odd text there).

SPECIAL_TEXT = ["", " ", "policy", "reward", "reference", "nope", "../../etc/passwd", "\x00", "é", "🙂",
                "<|im_start|>", "<|im_end|>", "</s>", "<s>", "{{ 7*7 }}", "\n" * 50, "x" * 257]
short_texts = st.one_of(st.sampled_from(["the cat", "one two three", "a"]), st.text(min_size=1, max_size=30))
texts = st.one_of(
    st.sampled_from(SPECIAL_TEXT),
    st.text(max_size=40),  # any unicode (hypothesis leaves out lone surrogates, which protobuf cannot encode)
    st.builds(lambda piece, k: piece * k, st.text(min_size=1, max_size=8), st.integers(100, 500)),  # a few KB
)
names = st.one_of(st.sampled_from(["", "policy", "reward", "reference", "nope"]), texts)
policies = st.sampled_from(["", "policy", "reference"])
floats32 = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.7, 1e-30, 1e30, -1e30, math.nan, math.inf, -math.inf]),
                     st.floats(width=32))
uint32 = st.one_of(st.integers(0, 8), st.sampled_from([255, 256, 257, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
uint64 = st.one_of(st.integers(0, 8), st.sampled_from([2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
# Few new tokens unless so many that the context refuses them: generation stays cheap.
new_tokens = st.one_of(st.integers(0, 6), st.sampled_from([256, 257, 10**6, 2**32 - 1]))
counts = st.one_of(st.integers(0, 3), st.sampled_from([64, 65, 2**32 - 1]))
token_ids = st.lists(st.one_of(st.integers(0, 600), st.sampled_from([2**31, 2**32 - 1])), max_size=30)
small_ids = st.lists(st.integers(0, 511), min_size=1, max_size=20)
many = st.builds(lambda x, k: [x] * k, texts, st.integers(17, 300))  # over --max-stop / --max-items
roles = st.one_of(st.sampled_from(["user", "assistant", "system", "tool", "", "USER"]), texts)
messages = st.lists(st.builds(chat_pb2.ChatMessage, role=roles, content=texts), max_size=4)
chats = st.lists(st.builds(chat_pb2.ChatMessage, role=st.sampled_from(["user", "assistant", "system"]),
                           content=short_texts), min_size=1, max_size=3)


def optional(strategy):
    return st.one_of(st.none(), strategy)


def message(cls, **fields):
    """cls(**fields) with the None fields left unset (proto3 optional / oneof members)."""
    return st.builds(lambda **kw: cls(**{k: v for k, v in kw.items() if v is not None}), **fields)


def one_prompt(ids=small_ids):
    """Exactly one of prompt / prompt_token_ids / messages, as keyword arguments."""
    return st.one_of(short_texts.map(lambda t: {"prompt": t}), ids.map(lambda i: {"prompt_token_ids": i}),
                     chats.map(lambda m: {"messages": m}))


def with_prompt(cls, prompts, **fields):
    """message(cls, **fields) with one_prompt()'s field set too."""
    return st.builds(lambda prompt, rest: cls(**prompt, **rest), prompts, message(dict, **fields))


sampling = message(generation_pb2.SamplingParams, temperature=floats32, top_k=uint32, top_p=optional(floats32),
                   seed=optional(uint64), max_new_tokens=new_tokens, n=counts,
                   stop=st.one_of(st.lists(texts, max_size=20), many), logprobs=counts, ignore_eos=st.booleans(),
                   stop_token_ids=token_ids, include_stop_str_in_output=st.booleans())


def mostly(usual, odd):
    """usual three times in four."""
    return st.one_of(usual, usual, usual, odd)


plausible_sampling = message(
    generation_pb2.SamplingParams, temperature=mostly(st.sampled_from([0.0, 0.7, 1.0]), floats32),
    top_k=mostly(st.integers(0, 600), uint32),
    top_p=optional(mostly(st.floats(0, 1, width=32, exclude_min=True), floats32)),
    seed=optional(uint64), max_new_tokens=st.integers(0, 6), n=mostly(st.integers(0, 1), st.integers(2, 3)),
    stop=st.lists(short_texts, max_size=4), logprobs=mostly(st.integers(0, 5), uint32), ignore_eos=st.booleans(),
    stop_token_ids=st.lists(mostly(st.integers(0, 511), uint32), max_size=4), include_stop_str_in_output=st.booleans())
generate = st.one_of(
    message(generation_pb2.GenerateRequest, model=names, prompt=texts, prompt_token_ids=token_ids,
            sampling=optional(sampling), request_id=texts, messages=messages),
    with_prompt(generation_pb2.GenerateRequest, one_prompt(st.one_of(small_ids, token_ids)), model=policies,
                sampling=plausible_sampling, request_id=optional(short_texts)),
)
score_items = st.lists(message(reward_pb2.ScoreItem, prompt=texts, response=texts, messages=messages), max_size=6)
plausible_score_items = st.lists(st.one_of(message(reward_pb2.ScoreItem, prompt=short_texts, response=texts),
                                           message(reward_pb2.ScoreItem, messages=chats, response=short_texts)),
                                 min_size=1, max_size=6)
log_probs_items = st.lists(message(reward_pb2.LogProbsItem, prompt=texts, response=texts, prompt_token_ids=token_ids,
                                   response_token_ids=token_ids, messages=messages), max_size=4)
plausible_log_probs_items = st.lists(st.one_of(
    message(reward_pb2.LogProbsItem, prompt=short_texts, response=short_texts),
    message(reward_pb2.LogProbsItem, messages=chats, response=short_texts),
    message(reward_pb2.LogProbsItem, prompt_token_ids=st.one_of(small_ids, token_ids),
            response_token_ids=st.one_of(small_ids, token_ids))), min_size=1, max_size=4)
REQUESTS = {
    G + "Generate": generate,
    G + "GenerateStream": generate,
    R + "Score": st.one_of(
        message(reward_pb2.ScoreRequest, model=names, items=score_items),
        message(reward_pb2.ScoreRequest, model=st.sampled_from(["", "reward"]), items=plausible_score_items),
        message(reward_pb2.ScoreRequest, model=names, items=st.builds(
            lambda item, k: [item] * k, message(reward_pb2.ScoreItem, prompt=texts, response=texts),
            st.integers(257, 400)))),
    R + "Compare": st.one_of(
        message(reward_pb2.CompareRequest, model=names, prompt=texts, response_a=texts, response_b=texts,
                messages=messages),
        with_prompt(reward_pb2.CompareRequest, one_prompt(st.nothing()), model=st.sampled_from(["", "reward"]),
                    response_a=texts, response_b=short_texts)),
    R + "LogProbs": st.one_of(
        message(reward_pb2.LogProbsRequest, model=names, reference_model=names, items=log_probs_items,
                temperature=optional(floats32)),
        message(reward_pb2.LogProbsRequest, model=policies, reference_model=policies, items=plausible_log_probs_items,
                temperature=optional(st.one_of(st.sampled_from([0.5, 1.0]), floats32)))),
    M + "ListModels": st.just(models_pb2.ListModelsRequest()),
    M + "SetRole": message(models_pb2.SetRoleRequest, name=names, role=names),
    F + "CreateComparison": st.one_of(
        message(feedback_pb2.CreateComparisonRequest, prompt=texts, messages=messages, sampling=optional(sampling),
                models=optional(message(feedback_pb2.ModelPair, model_a=names, model_b=names)),
                samples_of=optional(names)),  # both set: the oneof keeps the later one
        with_prompt(feedback_pb2.CreateComparisonRequest, one_prompt(st.nothing()), sampling=plausible_sampling,
                    models=message(feedback_pb2.ModelPair, model_a=policies, model_b=policies)),
        with_prompt(feedback_pb2.CreateComparisonRequest, one_prompt(st.nothing()), sampling=plausible_sampling,
                    samples_of=policies)),
    F + "SubmitVote": st.one_of(
        message(feedback_pb2.SubmitVoteRequest, comparison_id=st.one_of(st.just(KNOWN), texts),
                choice=st.one_of(st.integers(0, 5), st.integers(-2**31, 2**31 - 1)),
                annotator_id=st.one_of(st.sampled_from(["fuzz-admin", "fuzz-annotator", "fuzz-client"]), texts),
                rationale=optional(texts)),
        # Votes that get recorded (or, a different choice again, ALREADY_EXISTS).
        message(feedback_pb2.SubmitVoteRequest, comparison_id=st.just(KNOWN), choice=st.integers(1, 4),
                annotator_id=st.sampled_from(["", "fuzz-admin"]), rationale=optional(short_texts))),
    F + "GetLeaderboard": message(
        feedback_pb2.GetLeaderboardRequest, seed=optional(uint64),
        # Few rounds: each costs ~1 ms per round of CPU (10,000, the most allowed, takes 7-16 s;
        # bench/load.py measures that), 0 means 100. Over the limit is refused before any work.
        bootstrap_rounds=st.one_of(st.integers(1, 20), st.sampled_from([0, 10001, 2**32 - 1]))),
}
# (authorization header, role it carries or None): mostly admin, so most calls get past auth.
good_auths = [(bearer(t), r) for r, t in TOKENS.items()] + [(bearer(TOKENS["admin"]), "admin")] * 3
auths = st.one_of(st.sampled_from(good_auths),
                  st.sampled_from([(None, None), ("", None), ("Bearer ", None), ("Basic " + TOKENS["admin"], None),
                                   (bearer("not-a-token"), None), (TOKENS["admin"], None)]))
# Mostly a normal deadline; some that expire while the server works (abandoned calls).
timeouts = st.sampled_from([TIMEOUT_S] * 6 + [0.001, 0.05])


# ---- properties --------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS), ids=lambda m: m.rsplit("/", 1)[-1])
@FUZZ
@given(data=st.data())
def test_fields_fuzz_gets_request_statuses(fuzz_server, method, data):
    request = data.draw(REQUESTS[method], label="request")
    authorization, role = data.draw(auths, label="auth")
    timeout = data.draw(timeouts, label="timeout")
    if getattr(request, "comparison_id", None) == KNOWN:
        request.comparison_id = fuzz_server.comparison_id
    code, reply, seconds = call(fuzz_server.channel, method, request.SerializeToString(), authorization, timeout)
    check(code, reply, seconds, method)
    if code == S.DEADLINE_EXCEEDED and timeout < TIMEOUT_S:
        return  # the client gave up first, perhaps before auth was even looked at
    # The ARCHITECTURE.md table: no known token -> UNAUTHENTICATED, a lesser role -> PERMISSION_DENIED.
    needed = METHODS[method][2]
    if role is None:
        assert code == S.UNAUTHENTICATED, (code, reply)
    elif RANK[role] < RANK[needed]:
        assert code == S.PERMISSION_DENIED, (code, reply)


def splice(valid: bytes, at: int, junk: bytes, truncate: bool) -> bytes:
    at = at % (len(valid) + 1)
    return valid[:at] if truncate else valid[:at] + junk + valid[at:]


@pytest.mark.parametrize("method", list(METHODS), ids=lambda m: m.rsplit("/", 1)[-1])
@settings(FUZZ, max_examples=30)
@given(data=st.data())
def test_raw_bytes_fuzz_malformed_is_invalid_argument(fuzz_server, method, data):
    # Bytes that break a message: a bad tag, an 11-byte varint, invalid UTF-8 in a string, a
    # length past the end, end-group / start-group wire types, a UTF-16 surrogate.
    junk = st.one_of(st.binary(max_size=64), st.sampled_from([b"\xff", b"\x80" * 11, b"\x12\x05\xc3\x28",
                                                              b"\x0a\xff\xff\xff\xff\x0f", b"\x07", b"\x0b",
                                                              b"\x12\x02\xed\xa0"]))
    payload = data.draw(st.one_of(
        st.binary(max_size=256),  # random bytes
        # a drawn message cut short or with junk spliced in (its KNOWN stays a string: NOT_FOUND)
        st.builds(splice, REQUESTS[method].map(lambda r: r.SerializeToString()), st.integers(0, 10**6), junk,
                  st.booleans()),
    ), label="payload")
    request_type = METHODS[method][0]
    try:
        request_type.FromString(payload)
        malformed = False
    except Exception:  # DecodeError: what the server's own deserializer raises on these bytes
        malformed = True
    code, reply, seconds = call(fuzz_server.channel, method, payload, bearer(TOKENS["admin"]), TIMEOUT_S)
    check(code, reply, seconds, method)
    if malformed:
        assert code == S.INVALID_ARGUMENT, (code, reply)


def test_server_still_healthy_after_the_fuzz(fuzz_server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(fuzz_server.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    req = generation_pb2.GenerateRequest(prompt="the cat", sampling=generation_pb2.SamplingParams(max_new_tokens=4,
                                                                                                  ignore_eos=True))
    t0 = time.monotonic()
    code, reply, _ = call(fuzz_server.channel, G + "Generate", req.SerializeToString(),
                          bearer(TOKENS["client"]), 10)
    assert code == S.OK, reply
    assert len(reply[0].completions[0].token_ids) == 4
    assert time.monotonic() - t0 < 5
    engine = fuzz_server.server.state.registry.get("", "policy").engine
    deadline = time.monotonic() + 10
    while engine.num_running or engine.num_waiting:  # abandoned calls were aborted, nothing left decoding
        assert time.monotonic() < deadline, "engine still busy after the fuzz"
        time.sleep(0.05)
