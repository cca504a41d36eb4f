"""The server over a real gRPC socket on loopback, checked against plain transformers."""

import asyncio
import concurrent.futures
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhfkit.clients import AsyncClient, Client, generate_request
from rlhfkit.kernels import SamplingParams
from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.v1 import generation_pb2

PROMPTS = [
    "the cat",
    "one two three four five six seven eight nine ten red green blue small large",
    "a",
    "what is the large blue river and why is it",
    "count 17 stones",
]


@pytest.fixture(scope="module")
def server(tiny_policy_dir, tiny_reward_dir):
    srv = ServerThread(ServeConfig(policy=str(tiny_policy_dir), reward=str(tiny_reward_dir), port=0,
                                   metrics_port=0, device="cpu")).wait_loaded()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def hf_policy(tiny_policy_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_policy_dir).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_policy_dir):
    return AutoTokenizer.from_pretrained(tiny_policy_dir)


def hf_greedy(model, tokenizer, prompt, max_new_tokens):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def engine(server):
    return server.server.state.registry.get("", "policy").engine


def wait_idle(server, timeout=10):
    deadline = time.monotonic() + timeout
    while engine(server).num_running or engine(server).num_waiting:
        assert time.monotonic() < deadline, "engine did not go idle"
        time.sleep(0.01)


# ---- generation ----------------------------------------------------------------------


def test_greedy_matches_transformers_for_a_batch_of_mixed_lengths(client, hf_policy, tokenizer):
    expected = [hf_greedy(hf_policy, tokenizer, p, 24) for p in PROMPTS]
    # Alone, one at a time.
    for p, exp in zip(PROMPTS, expected):
        assert list(client.generate(p, max_new_tokens=24).completions[0].token_ids) == exp
    # Together: concurrent calls are decoded in one batch.
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda p: client.generate(p, max_new_tokens=24), PROMPTS))
    for resp, exp in zip(got, expected):
        assert list(resp.completions[0].token_ids) == exp
        ended_by_eos = exp[-1] == tokenizer.eos_token_id
        assert resp.completions[0].finish_reason == (generation_pb2.FINISH_REASON_EOS if ended_by_eos
                                                     else generation_pb2.FINISH_REASON_LENGTH)


def test_greedy_parity_when_requests_join_a_running_batch(server, client, hf_policy, tokenizer):
    # A long request is already decoding when the others arrive and join it mid-flight.
    expected = {p: hf_greedy(hf_policy, tokenizer, p, n) for p, n in zip(PROMPTS, (120, 10, 30, 5, 60))}
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = {}
        for p, n in zip(PROMPTS, (120, 10, 30, 5, 60)):
            futures[p] = pool.submit(client.generate, p, max_new_tokens=n)
            time.sleep(0.02)
        for p, f in futures.items():
            assert list(f.result().completions[0].token_ids) == expected[p]


def test_text_prompt_and_token_ids_prompt_agree(client, tokenizer):
    ids = tokenizer(PROMPTS[3]).input_ids
    a = client.generate(PROMPTS[3], max_new_tokens=12, ignore_eos=True)
    b = client.generate(prompt_token_ids=ids, max_new_tokens=12, ignore_eos=True)
    assert list(a.completions[0].token_ids) == list(b.completions[0].token_ids)
    assert list(a.prompt_token_ids) == ids
    assert a.usage.prompt_tokens == len(ids) and a.usage.completion_tokens == 12
    assert a.model_version == "policy@policy"


def test_logprobs_equal_a_float64_forward_pass(client, hf_policy, tokenizer):
    resp = client.generate(PROMPTS[1], temperature=0.8, top_k=50, seed=3, max_new_tokens=16, logprobs=3)
    c = resp.completions[0]
    ids = torch.tensor([list(resp.prompt_token_ids) + list(c.token_ids)])
    with torch.no_grad():
        logits = hf_policy.double()(ids).logits[0].double()
    hf_policy.float()
    P = len(resp.prompt_token_ids)
    ref = torch.log_softmax(logits[P - 1:-1], -1)
    expected = ref.gather(-1, torch.tensor(c.token_ids).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(torch.tensor(list(c.logprobs), dtype=torch.float64), expected, atol=2e-5)
    assert len(c.top_logprobs) == 16
    for pos, top in enumerate(c.top_logprobs):
        ref_v, ref_i = ref[pos].topk(3)
        assert [x.token_id for x in top.candidates] == ref_i.tolist()
        assert [x.logprob for x in top.candidates] == pytest.approx(ref_v.tolist(), abs=2e-5)


def test_n_completions_share_one_prefill_and_each_is_right(client, hf_policy, tokenizer):
    # The prompt is prefilled once and its K/V copied to n rows; every completion's log-probs
    # must still be those of a float64 forward pass over its own prompt + completion.
    resp = client.generate(PROMPTS[4], temperature=1.0, seed=11, max_new_tokens=12, n=4, ignore_eos=True)
    P = len(resp.prompt_token_ids)
    assert len({tuple(c.token_ids) for c in resp.completions}) > 1  # distinct samples
    with torch.no_grad():
        for c in resp.completions:
            ids = torch.tensor([list(resp.prompt_token_ids) + list(c.token_ids)])
            ref = torch.log_softmax(hf_policy.double()(ids).logits[0, P - 1:-1], -1)
            expected = ref.gather(-1, torch.tensor(c.token_ids).unsqueeze(-1)).squeeze(-1)
            assert torch.allclose(torch.tensor(list(c.logprobs), dtype=torch.float64), expected, atol=2e-5)
    hf_policy.float()
    greedy = client.generate(PROMPTS[0], max_new_tokens=20, n=3)
    expected = hf_greedy(hf_policy, tokenizer, PROMPTS[0], 20)
    assert [list(c.token_ids) for c in greedy.completions] == [expected] * 3


def test_stream_chunks_add_up_to_the_unary_response(client):
    kwargs = dict(temperature=1.0, top_p=0.9, seed=11, max_new_tokens=20, n=2)
    whole = client.generate(PROMPTS[0], **kwargs)
    text, ids, finish = ["", ""], [[], []], [None, None]
    for chunk in client.generate_stream(PROMPTS[0], **kwargs):
        assert finish[chunk.index] is None, "no chunk after the final one"
        text[chunk.index] += chunk.text
        ids[chunk.index] += list(chunk.token_ids)
        if chunk.finish_reason:
            finish[chunk.index] = chunk.finish_reason
    for c in whole.completions:
        assert ids[c.index] == list(c.token_ids)
        assert text[c.index] == c.text
        assert finish[c.index] == c.finish_reason
    assert whole.completions[0].token_ids != whole.completions[1].token_ids


def test_seed_reproduces_whatever_else_is_in_the_batch(server, client):
    kwargs = dict(temperature=1.0, top_k=40, top_p=0.9, seed=1234, max_new_tokens=30, n=2)
    alone = client.generate(PROMPTS[2], **kwargs)
    assert len({tuple(c.token_ids) for c in alone.completions}) == 2  # n samples differ
    for batch_mates in (3, 9):
        with concurrent.futures.ThreadPoolExecutor(batch_mates + 1) as pool:
            noise = [pool.submit(client.generate, PROMPTS[i % len(PROMPTS)], temperature=1.3,
                                 max_new_tokens=5 + 7 * i) for i in range(batch_mates)]
            time.sleep(0.01)
            again = pool.submit(client.generate, PROMPTS[2], **kwargs).result()
            [f.result() for f in noise]
        assert [list(c.token_ids) for c in again.completions] == [list(c.token_ids) for c in alone.completions]
    other_seed = client.generate(PROMPTS[2], **{**kwargs, "seed": 4321})
    assert [list(c.token_ids) for c in other_seed.completions] != [list(c.token_ids) for c in alone.completions]


def test_stop_string_ends_generation_and_is_not_returned(client):
    full = client.generate(PROMPTS[1], max_new_tokens=40, ignore_eos=True).completions[0].text
    printable = [i for i in range(8, len(full) - 3) if full[i:i + 3].isprintable() and "\ufffd" not in full[i:i + 3]]
    assert printable, full
    stop = full[printable[0]:printable[0] + 3]
    c = client.generate(PROMPTS[1], max_new_tokens=40, ignore_eos=True, stop=["zzzz-never", stop]).completions[0]
    assert c.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert c.stop_reason == stop
    assert c.text == full[:full.find(stop)]
    streamed = "".join(ch.text for ch in
                       client.generate_stream(PROMPTS[1], max_new_tokens=40, ignore_eos=True, stop=[stop]))
    assert streamed == c.text


def test_eos_ends_generation_like_transformers(tmp_path, tiny_policy_dir, tokenizer):
    # Make a token that greedy decoding produces at step 4 the model's EOS.
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    plain = hf_greedy(model, tokenizer, PROMPTS[0], 20)
    eos = plain[3]
    model.generation_config.eos_token_id = eos
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    expected = hf_greedy(model, tokenizer, PROMPTS[0], 20)
    assert expected[-1] == eos and len(expected) == plain.index(eos) + 1
    srv = ServerThread(ServeConfig(policy=str(tmp_path), port=0, device="cpu")).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            out = c.generate(PROMPTS[0], max_new_tokens=20).completions[0]
            assert list(out.token_ids) == expected
            assert out.finish_reason == generation_pb2.FINISH_REASON_EOS
            longer = c.generate(PROMPTS[0], max_new_tokens=20, ignore_eos=True).completions[0]
            assert list(longer.token_ids) == plain
    finally:
        srv.stop()


def test_async_client(server, tokenizer, hf_policy):
    async def go():
        async with AsyncClient(server.address, timeout=60) as c:
            results = await asyncio.gather(*[c.generate(p, max_new_tokens=8) for p in PROMPTS])
            chunks = [ch async for ch in c.generate_stream(PROMPTS[0], max_new_tokens=8)]
            rewards = await c.score([(PROMPTS[0], " yes")])
            models = await c.list_models()
            return results, chunks, rewards, models, await c.health()

    results, chunks, rewards, models, health = asyncio.run(go())
    for p, r in zip(PROMPTS, results):
        assert list(r.completions[0].token_ids) == hf_greedy(hf_policy, tokenizer, p, 8)
    assert [t for ch in chunks for t in ch.token_ids] == list(results[0].completions[0].token_ids)
    assert len(rewards) == 1 and {m.role for m in models} == {"policy", "reward"} and health == "SERVING"


# ---- reward --------------------------------------------------------------------------


def test_score_equals_a_plain_transformers_forward(client, tiny_reward_dir):
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_reward_dir)
    items = [(PROMPTS[0], " is red."), (PROMPTS[1], " and more words here than before"), ("", "x"), (PROMPTS[3], "")]
    expected = []
    with torch.no_grad():
        for p, r in items:  # one at a time: no padding at all
            expected.append(rm(torch.tensor([tok(p + r).input_ids])).logits[0, 0].item())
    got = client.score(items)
    assert got == pytest.approx(expected, abs=1e-5)
    cmp = client.compare(PROMPTS[0], " is red.", " is blue.")
    ra, rb = client.score([(PROMPTS[0], " is red."), (PROMPTS[0], " is blue.")])
    assert cmp.reward_a == pytest.approx(ra, abs=1e-6) and cmp.reward_b == pytest.approx(rb, abs=1e-6)
    assert cmp.prob_a_preferred == pytest.approx(1 / (1 + torch.exp(torch.tensor(rb - ra)).item()), abs=1e-6)


# ---- models, health, reflection, metrics -----------------------------------------------


def test_list_models(client, tiny_policy_dir, tiny_reward_dir):
    models = {m.role: m for m in client.list_models()}
    assert set(models) == {"policy", "reward"}
    assert models["policy"].path == str(tiny_policy_dir) and models["reward"].path == str(tiny_reward_dir)
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_policy_dir).parameters())
    assert models["policy"].num_parameters == n
    assert models["policy"].context_length == 256
    assert models["policy"].architecture == "LlamaForCausalLM"
    assert models["reward"].architecture == "LlamaForSequenceClassification"


def test_health_and_reflection(server, client):
    assert client.health() == "SERVING"
    assert client.health("rlhfkit.v1.Generation") == "SERVING"
    stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
    resp = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"rlhfkit.v1.Generation", "rlhfkit.v1.Reward", "rlhfkit.v1.Models", "grpc.health.v1.Health"} <= names


def _metric(server, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics").read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
              or line.startswith(name + "{")]
    return sum(values), text


def test_metrics(server, client):
    before, _ = _metric(server, "rlhfkit:generation_tokens_total")
    prompt_before, _ = _metric(server, "rlhfkit:prompt_tokens_total")
    resp = client.generate(PROMPTS[1], max_new_tokens=7, n=3, temperature=1.0, ignore_eos=True)
    client.score([("a", "b")])
    wait_idle(server)
    after, text = _metric(server, "rlhfkit:generation_tokens_total")
    prompt_after, _ = _metric(server, "rlhfkit:prompt_tokens_total")
    assert after - before == sum(len(c.token_ids) for c in resp.completions) == 21
    assert prompt_after - prompt_before == len(resp.prompt_token_ids)
    for name in ("rlhfkit:time_to_first_token_seconds_count", "rlhfkit:inter_token_latency_seconds_count",
                 "rlhfkit:request_queue_time_seconds_count", "rlhfkit:e2e_request_latency_seconds_count",
                 "rlhfkit:num_requests_running", "rlhfkit:num_requests_waiting",
                 "rlhfkit:score_latency_seconds_count"):
        assert name in text, name
    assert _metric(server, "rlhfkit:num_requests_running")[0] == 0


def test_not_serving_and_unavailable_while_loading(tiny_policy_dir):
    srv = ServerThread(ServeConfig(policy=str(tiny_policy_dir), port=0, device="cpu"))
    try:
        with Client(srv.address, timeout=10) as c:
            assert c.health() == "NOT_SERVING"
            with pytest.raises(grpc.RpcError) as e:
                c.generate("the cat")
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in e.value.details()
            srv.wait_loaded()
            assert c.health() == "SERVING"
    finally:
        srv.stop()


# ---- errors --------------------------------------------------------------------------


def _status(call):
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


@pytest.mark.parametrize("kwargs,code,field", [
    (dict(temperature=-0.5), "INVALID_ARGUMENT", "temperature"),
    (dict(temperature=float("nan")), "INVALID_ARGUMENT", "temperature"),
    (dict(temperature=float("inf")), "INVALID_ARGUMENT", "temperature"),
    (dict(top_p=0.0), "INVALID_ARGUMENT", "top_p"),
    (dict(top_p=1.5), "INVALID_ARGUMENT", "top_p"),
    (dict(n=17), "INVALID_ARGUMENT", "n"),
    (dict(max_new_tokens=300), "INVALID_ARGUMENT", "max_new_tokens"),
    (dict(stop=[""]), "INVALID_ARGUMENT", "stop"),
    (dict(logprobs=21), "INVALID_ARGUMENT", "logprobs"),
    (dict(model="no-such-model"), "NOT_FOUND", "no-such-model"),
    (dict(model="reward"), "NOT_FOUND", "reward"),
])
def test_invalid_generate_parameters(client, kwargs, code, field):
    for call in (lambda: client.generate("the cat", **kwargs), lambda: list(client.generate_stream("the cat", **kwargs))):
        got, details = _status(call)
        assert got.name == code and field in details, details


def test_invalid_prompts(client, tokenizer):
    for kwargs, field in [(dict(), "prompt"), (dict(prompt_token_ids=[1, 2]), "prompt"),
                          (dict(prompt_token_ids=[3, 10**6]), "prompt_token_ids")]:
        prompt = "the cat" if "prompt_token_ids" in kwargs and kwargs["prompt_token_ids"] == [1, 2] else None
        got, details = _status(lambda: client.generate(prompt, **kwargs))
        assert got == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field), details
    long_prompt = " ".join(["one"] * 250)
    got, details = _status(lambda: client.generate(long_prompt, max_new_tokens=16))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "context of 256" in details
    # The boundary itself is allowed.
    n = len(tokenizer(long_prompt).input_ids)
    assert len(client.generate(long_prompt, max_new_tokens=256 - n).completions[0].token_ids) == 256 - n


def test_invalid_score_requests(client):
    assert _status(lambda: client.score([]))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert _status(lambda: client.score([("a", "b")], model="policy"))[0] == grpc.StatusCode.NOT_FOUND
    assert _status(lambda: client.score([("a", "b")], model="nope"))[0] == grpc.StatusCode.NOT_FOUND
    code, details = _status(lambda: client.score([("one " * 300, "b")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "items[0]" in details


def test_deadline_cancels_the_decoding(server, client):
    wait_idle(server)
    before, _ = _metric(server, "rlhfkit:generation_tokens_total")
    code, _ = _status(lambda: client.generate("the cat", max_new_tokens=250, ignore_eos=True, timeout=0.15))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(server, timeout=5)
    time.sleep(0.2)
    produced = _metric(server, "rlhfkit:generation_tokens_total")[0] - before
    assert produced < 250, "the request kept decoding after its deadline"
    # A stream the client cancels is freed too.
    call = client.generation.GenerateStream(generate_request("the cat", max_new_tokens=250, ignore_eos=True))
    next(call)
    call.cancel()
    wait_idle(server, timeout=5)


def test_full_queue_is_resource_exhausted(tiny_policy_dir):
    srv = ServerThread(ServeConfig(policy=str(tiny_policy_dir), port=0, device="cpu", max_num_seqs=1,
                                   max_waiting=1)).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            running = c.generation.Generate.future(generate_request("a", max_new_tokens=200, ignore_eos=True))
            deadline = time.monotonic() + 5
            while srv.server.state.registry.get("", "policy").engine.num_running == 0:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            waiting = c.generation.Generate.future(generate_request("b", max_new_tokens=2))
            while srv.server.state.registry.get("", "policy").engine.num_waiting == 0:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            code, details = _status(lambda: c.generate("c", max_new_tokens=2))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max-waiting" in details
            assert len(running.result().completions[0].token_ids) == 200
            assert len(waiting.result().completions[0].token_ids) == 2
    finally:
        srv.stop()


def test_bfloat16_serving_matches_transformers_in_bfloat16(tiny_policy_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.bfloat16).eval()
    expected = [hf_greedy(model, tokenizer, p, 16) for p in PROMPTS[:3]]
    srv = ServerThread(ServeConfig(policy=str(tiny_policy_dir), port=0, device="cpu", dtype="bfloat16")).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            assert {m.dtype for m in c.list_models()} == {"bfloat16"}
            for p, exp in zip(PROMPTS[:3], expected):
                assert list(c.generate(p, max_new_tokens=16).completions[0].token_ids) == exp
    finally:
        srv.stop()


def test_prefill_budget_groups_waiting_requests_in_arrival_order(tiny_policy_dir, hf_policy, tokenizer):
    # Five requests wait together (queued while the engine thread is held off); with a budget
    # of the longest prompt, they are prefilled in arrival-order groups that fit it, each
    # prompt whole, and greedy output is unchanged.
    prompt_ids = [tokenizer(p).input_ids for p in PROMPTS]
    lens = [len(ids) for ids in prompt_ids]
    budget = max(lens)
    expected_groups, group = [], []
    for n in lens:  # first fit, in order, by hand
        if group and sum(group) + n > budget:
            expected_groups.append(group)
            group = []
        group.append(n)
    expected_groups.append(group)
    assert 1 < len(expected_groups) < len(lens)

    srv = ServerThread(ServeConfig(policy=str(tiny_policy_dir), port=0, device="cpu",
                                   max_prefill_tokens=budget)).wait_loaded()
    try:
        eng = srv.server.state.registry.get("", "policy").engine
        groups = []
        real_prefill = eng._prefill
        eng._prefill = lambda requests: (groups.append([len(r.prompt_ids) for r in requests]), real_prefill(requests))
        tokens = [[] for _ in PROMPTS]
        finished = threading.Semaphore(0)

        def collect(i):
            def on_output(outs):
                for o in outs:
                    tokens[i] += o.token_ids
                    if o.finish_reason:
                        finished.release()
            return on_output

        with eng._cv:  # the engine thread cannot admit until all five are queued
            for i, ids in enumerate(prompt_ids):
                eng.add_request(ids, SamplingParams(temperature=0, max_new_tokens=12), collect(i))
        for _ in PROMPTS:
            assert finished.acquire(timeout=30)
        assert groups == expected_groups
        assert tokens == [hf_greedy(hf_policy, tokenizer, p, 12) for p in PROMPTS]
    finally:
        srv.stop()


def test_long_prompt_is_prefilled_in_chunks_between_decode_steps(tiny_policy_dir, hf_policy, tokenizer):
    # Budget 8: a long prompt is prefilled 8 tokens at a time, and a request already decoding
    # takes a step between its chunks instead of stalling for the whole prefill.
    srv = ServerThread(ServeConfig(policy=str(tiny_policy_dir), port=0, device="cpu",
                                   max_prefill_tokens=8)).wait_loaded()
    long_prompt = " ".join([PROMPTS[1], PROMPTS[3], PROMPTS[1]])
    n_prompt = len(tokenizer(long_prompt).input_ids)
    try:
        eng = srv.server.state.registry.get("", "policy").engine
        steps = []
        for name in ("_prefill", "_prefill_chunk", "_decode"):
            real = getattr(eng, name)
            setattr(eng, name, lambda *a, _real=real, _name=name: (steps.append(_name), _real(*a)))
        expected_long = hf_greedy(hf_policy, tokenizer, long_prompt, 10)
        expected_short = hf_greedy(hf_policy, tokenizer, PROMPTS[2], 60)
        with Client(srv.address, timeout=60) as c, concurrent.futures.ThreadPoolExecutor(2) as pool:
            short = pool.submit(c.generate, PROMPTS[2], max_new_tokens=60, ignore_eos=True)
            deadline = time.monotonic() + 10
            while "_decode" not in steps:
                assert time.monotonic() < deadline
                time.sleep(0.002)
            long = pool.submit(c.generate, long_prompt, max_new_tokens=10)
            assert list(long.result().completions[0].token_ids) == expected_long
            assert list(short.result().completions[0].token_ids)[:len(expected_short)] == expected_short
        chunks = [i for i, s in enumerate(steps) if s == "_prefill_chunk"]
        assert n_prompt > 16 and len(chunks) == -(-n_prompt // 8)
        # Between consecutive chunks the running request decoded once.
        assert all(steps[a + 1:b] == ["_decode"] for a, b in zip(chunks, chunks[1:]))
    finally:
        srv.stop()


def test_deadline_stops_a_chunked_prefill(tiny_policy_dir, tokenizer):
    # Budget 1: a 200-token prompt takes 200 forward passes; a 50 ms deadline ends the call
    # and the remaining chunks are never run.
    srv = ServerThread(ServeConfig(policy=str(tiny_policy_dir), port=0, device="cpu",
                                   max_prefill_tokens=1)).wait_loaded()
    try:
        eng = srv.server.state.registry.get("", "policy").engine
        chunks = []
        real_chunk = eng._prefill_chunk
        eng._prefill_chunk = lambda: (chunks.append(1), real_chunk())
        ids = (tokenizer(PROMPTS[1]).input_ids * 20)[:200]
        with Client(srv.address, timeout=60) as c:
            code, _ = _status(lambda: c.generate(prompt_token_ids=ids, max_new_tokens=4, timeout=0.05))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_idle(srv, timeout=5)
        time.sleep(0.1)
        assert 0 < len(chunks) < 200 and eng.num_running == 0
    finally:
        srv.stop()
