"""The server follows training: model store roles, hot reload under load, corrupt
checkpoints kept out, and Reward.LogProbs against a float64 transformers computation."""

import shutil
import threading
import time
import urllib.request

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, LlamaForSequenceClassification

from rlhfkit.clients import Client
from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.training.checkpoint import publish_checkpoint
from rlhfkit.training.tiny import tiny_llama_config
from rlhfkit.v1 import models_pb2

PROMPT = "the quick cat and the slow dog"


def publish(store, name, stage, tokenizer, seed, parent=None, version=None):
    """A random-weight checkpoint published the way the trainers publish (atomic rename)."""
    torch.manual_seed(seed)
    config = tiny_llama_config(tokenizer)
    if stage == "rm":
        config.num_labels = 1
        model = LlamaForSequenceClassification(config)
    else:
        model = LlamaForCausalLM(config)
    return publish_checkpoint(model, tokenizer, store / name, stage=stage, parent=parent,
                              metrics={"seed": seed}, extra={"version": version or name})


def greedy(path, tokenizer, prompt, n):
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture()
def store(tmp_path, tiny_tokenizer):
    root = tmp_path / "store"
    sft = publish(root, "sft-1", "sft", tiny_tokenizer, seed=0)
    publish(root, "rm-1", "rm", tiny_tokenizer, seed=1, parent=sft)
    publish(root, "ppo-1", "ppo", tiny_tokenizer, seed=2, parent=sft)
    return root


def roles(client):
    return {r: m.name for m in client.list_models() for r in m.roles}


# ---- Reward.LogProbs -------------------------------------------------------------------


def float64_token_scores(policy_dir, reference_dir, prompt_ids, response_ids, temperature=1.0):
    pol = AutoModelForCausalLM.from_pretrained(policy_dir).double().eval()
    ref = AutoModelForCausalLM.from_pretrained(reference_dir).double().eval()
    ids = torch.tensor([prompt_ids + response_ids])
    P, R = len(prompt_ids), len(response_ids)
    with torch.no_grad():
        lp = torch.log_softmax(pol(ids).logits[0, P - 1:P - 1 + R] / temperature, -1)
        lq = torch.log_softmax(ref(ids).logits[0, P - 1:P - 1 + R] / temperature, -1)
    y = torch.tensor(response_ids)
    logp, ref_logp = lp[torch.arange(R), y], lq[torch.arange(R), y]
    d = logp - ref_logp
    return {
        "logprobs": logp, "ref_logprobs": ref_logp,
        "kl_k1": d, "kl_k2": 0.5 * d ** 2, "kl_k3": torch.exp(-d) - 1 + d,
        "kl_full": (lp.exp() * (lp - lq)).sum(-1), "entropy": -(lp.exp() * lp).sum(-1),
    }


def test_log_probs_equal_a_float64_transformers_computation(store, tiny_tokenizer):
    srv = ServerThread(ServeConfig(policy=str(store / "ppo-1"), reference=str(store / "sft-1"), port=0,
                                   device="cpu", reload_interval=0)).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            items = [(PROMPT, " is red and blue"), ("a", " b c d e f g h i j k"), ("count 1 2 3", " 4")]
            for temperature in (None, 0.7):
                resp = c.log_probs(items, temperature=temperature)
                assert resp.model_version == "policy@ppo-1" and resp.reference_version == "reference@sft-1"
                for (p, r), got in zip(items, resp.results):
                    p_ids = tiny_tokenizer(p).input_ids
                    r_ids = tiny_tokenizer(r, add_special_tokens=False).input_ids
                    assert list(got.token_ids) == r_ids
                    ref = float64_token_scores(store / "ppo-1", store / "sft-1", p_ids, r_ids, temperature or 1.0)
                    for key, expected in ref.items():
                        assert torch.allclose(torch.tensor(list(getattr(got, key)), dtype=torch.float64), expected,
                                              atol=1e-4, rtol=1e-4), key
                    assert got.kl_k3_sum == pytest.approx(ref["kl_k3"].sum().item(), abs=1e-3)
                    assert got.logprob_sum == pytest.approx(ref["logprobs"].sum().item(), abs=1e-3)
                    assert got.entropy_sum == pytest.approx(ref["entropy"].sum().item(), abs=1e-3)
            # Bad inputs name the field.
            for bad, field in [([], "items"), ([("", " x")], "items[0]"), ([(PROMPT, "")], "items[0]"),
                               ([([1, 2], [10**6])], "items[0]")]:
                with pytest.raises(grpc.RpcError) as e:
                    c.log_probs(bad)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                c.log_probs([(PROMPT, " x")], temperature=0.0)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                c.log_probs([(PROMPT, " x")], reference_model="nope")
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        srv.stop()


def test_generate_logprobs_equal_log_probs_for_the_same_tokens(store):
    """Rollout and scoring agree. Generate computes each log-prob from one decode step over
    the KV cache (batched with whatever else runs); LogProbs from one full forward pass. Both
    are float32 with different reduction orders, so they agree to ~1e-5, not bit for bit."""
    srv = ServerThread(ServeConfig(policy=str(store / "ppo-1"), reference=str(store / "sft-1"), port=0,
                                   device="cpu", reload_interval=0)).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            gen = c.generate(PROMPT, temperature=1.0, top_p=0.9, seed=5, max_new_tokens=40, n=3, ignore_eos=True)
            items = [(list(gen.prompt_token_ids), list(comp.token_ids)) for comp in gen.completions]
            scored = c.log_probs(items)
            for comp, res in zip(gen.completions, scored.results):
                assert list(res.token_ids) == list(comp.token_ids)
                assert torch.allclose(torch.tensor(list(comp.logprobs)), torch.tensor(list(res.logprobs)), atol=1e-4)
    finally:
        srv.stop()


# ---- the store -------------------------------------------------------------------------


def test_roles_follow_the_newest_stage_and_move_on_request(store, tiny_tokenizer, tiny_policy_dir):
    srv = ServerThread(ServeConfig(store=str(store), port=0, device="cpu", reload_interval=0.2)).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            assert roles(c) == {"policy": "ppo-1", "reference": "sft-1", "reward": "rm-1"}
            info = {m.name: m for m in c.list_models()}
            assert info["ppo-1"].stage == "ppo" and info["ppo-1"].parent == str(store / "sft-1")
            assert info["rm-1"].parent == str(store / "sft-1") and info["ppo-1"].base_model == str(store / "sft-1")
            assert info["ppo-1"].metrics["seed"] == 2.0 and info["ppo-1"].created_at
            assert c.generate(PROMPT, max_new_tokens=4).model_version == "ppo-1@ppo-1"
            # Any served checkpoint answers by name too.
            assert c.generate(PROMPT, model="sft-1", max_new_tokens=4).model_version == "sft-1@sft-1"

            c.set_role("sft-1", "policy")
            assert roles(c)["policy"] == "sft-1"
            resp = c.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
            assert resp.model_version == "sft-1@sft-1"
            assert list(resp.completions[0].token_ids) == greedy(store / "sft-1", tiny_tokenizer, PROMPT, 8)

            for name, role, code in [("nope", "policy", grpc.StatusCode.NOT_FOUND),
                                     ("rm-1", "policy", grpc.StatusCode.INVALID_ARGUMENT),
                                     ("sft-1", "judge", grpc.StatusCode.INVALID_ARGUMENT)]:
                with pytest.raises(grpc.RpcError) as e:
                    c.set_role(name, role)
                assert e.value.code() == code, e.value.details()
            assert roles(c)["policy"] == "sft-1"
    finally:
        srv.stop()
    plain = ServerThread(ServeConfig(policy=str(tiny_policy_dir), port=0, device="cpu")).wait_loaded()
    try:
        with Client(plain.address, timeout=60) as c, pytest.raises(grpc.RpcError) as e:
            c.set_role("x", "policy")
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "--store" in e.value.details()
    finally:
        plain.stop()


def test_publishing_while_streams_run_drops_nothing(store, tiny_tokenizer):
    n_tokens = 60
    expected = {"ppo-1": greedy(store / "ppo-1", tiny_tokenizer, PROMPT, n_tokens)}
    srv = ServerThread(ServeConfig(store=str(store), port=0, device="cpu", reload_interval=0.1)).wait_loaded()
    results, errors, stop = [], [], threading.Event()

    def stream_forever():
        with Client(srv.address, timeout=60) as c:
            while not stop.is_set():
                try:
                    t0 = time.monotonic()
                    chunks = list(c.generate_stream(PROMPT, max_new_tokens=n_tokens, ignore_eos=True))
                    results.append((t0, time.monotonic(), chunks[-1].model_version,
                                    [t for ch in chunks for t in ch.token_ids], chunks[-1].finish_reason))
                except grpc.RpcError as e:
                    errors.append(e)

    threads = [threading.Thread(target=stream_forever) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(results) >= 8, what="streams before the publish")
        publish(store, "ppo-2", "ppo", tiny_tokenizer, seed=3, parent=store / "sft-1")
        switched_at = None
        with Client(srv.address, timeout=60) as c:
            wait_for(lambda: roles(c).get("policy") == "ppo-2", what="the reload")
            switched_at = time.monotonic()
            after = c.generate(PROMPT, max_new_tokens=n_tokens, ignore_eos=True)
            n_before = len(results)
            wait_for(lambda: len(results) >= n_before + 8, what="streams after the reload")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        srv.stop()
    expected["ppo-2"] = greedy(store / "ppo-2", tiny_tokenizer, PROMPT, n_tokens)
    assert not errors, errors
    assert after.model_version == "ppo-2@ppo-2" and list(after.completions[0].token_ids) == expected["ppo-2"]
    versions = set()
    for start, end, version, tokens, finish in results:
        name = version.split("@")[0]
        versions.add(name)
        assert tokens == expected[name], f"{version} answered with another model's tokens"
        assert len(tokens) == n_tokens and finish
        if start > switched_at:
            assert name == "ppo-2"
    assert versions == {"ppo-1", "ppo-2"}


def test_corrupt_or_half_written_checkpoints_never_serve(store, tiny_tokenizer):
    srv = ServerThread(ServeConfig(store=str(store), port=0, device="cpu", reload_interval=0.1,
                                   metrics_port=0)).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            expected = greedy(store / "ppo-1", tiny_tokenizer, PROMPT, 10)
            # A checkpoint still being written under its temporary name: never looked at.
            shutil.copytree(store / "ppo-1", store / ".ppo-9.tmp-1234")
            # A newer checkpoint whose weights file is truncated (corrupted before it appears).
            staging = publish(store.parent, "ppo-bad", "ppo", tiny_tokenizer, seed=4, parent=store / "sft-1")
            weights = staging / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
            bad = staging.rename(store / "ppo-bad")
            wait_for(lambda: {f.name for f in c.models.ListModels(models_pb2.ListModelsRequest()).load_failures}
                     == {"ppo-bad"}, what="the failed load to be reported")
            # A newer checkpoint with no weights at all.
            empty = store / "ppo-empty"
            empty.mkdir()
            shutil.copy(bad / "config.json", empty / "config.json")
            shutil.copy(bad / "rlhfkit.json", empty / "rlhfkit.json")
            wait_for(lambda: {f.name for f in c.models.ListModels(models_pb2.ListModelsRequest()).load_failures}
                     >= {"ppo-bad", "ppo-empty"}, what="both failed loads to be reported")
            time.sleep(0.5)  # several reload checks
            listing = c.models.ListModels(models_pb2.ListModelsRequest())
            assert {m.name for m in listing.models} == {"ppo-1", "sft-1", "rm-1"}
            failures = {f.name: f.error for f in listing.load_failures}
            assert "no weights" in failures["ppo-empty"]
            resp = c.generate(PROMPT, max_new_tokens=10, ignore_eos=True)
            assert resp.model_version == "ppo-1@ppo-1" and list(resp.completions[0].token_ids) == expected
            text = urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics").read().decode()
            assert 'rlhfkit:model_loads_total{result="failed"}' in text
    finally:
        srv.stop()


def test_plain_policy_directory_reloads_when_republished(store, tiny_tokenizer):
    target = store.parent / "served-policy"
    shutil.copytree(store / "ppo-1", target)
    srv = ServerThread(ServeConfig(policy=str(target), port=0, device="cpu", reload_interval=0.1)).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            assert c.generate(PROMPT, max_new_tokens=3).model_version == "policy@ppo-1"
            torch.manual_seed(7)
            publish_checkpoint(LlamaForCausalLM(tiny_llama_config(tiny_tokenizer)), tiny_tokenizer, target,
                               stage="ppo", parent=store / "sft-1", extra={"version": "ppo-1b"}, overwrite=True)
            wait_for(lambda: c.generate(PROMPT, max_new_tokens=3).model_version == "policy@ppo-1b",
                     what="the republished directory to serve")
            resp = c.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
            assert list(resp.completions[0].token_ids) == greedy(target, tiny_tokenizer, PROMPT, 12)
    finally:
        srv.stop()


def test_reward_bias_from_rlhfkit_json_is_added(store, tiny_tokenizer):
    """`rlhfkit train rm` keeps its centring offset in rlhfkit.json (Llama's score head has
    no bias term); Score must add it to the plain forward, as PPO training does."""
    torch.manual_seed(5)
    config = tiny_llama_config(tiny_tokenizer)
    config.num_labels = 1
    rm = LlamaForSequenceClassification(config).eval()
    path = publish_checkpoint(rm, tiny_tokenizer, store.parent / "rm-biased", stage="rm", parent=store / "sft-1",
                              extra={"reward_bias": -1.25})
    with torch.no_grad():
        plain = rm(torch.tensor([tiny_tokenizer(PROMPT + " yes").input_ids])).logits[0, 0].item()
    srv = ServerThread(ServeConfig(reward=str(path), port=0, device="cpu", reload_interval=0)).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            assert c.score([(PROMPT, " yes")])[0] == pytest.approx(plain - 1.25, abs=1e-5)
    finally:
        srv.stop()
