"""`rlhfkit serve --engine vllm`: the same API semantics as the native engine, over gRPC.

Runs only where vLLM is installed (README: the vllm extra); skipped otherwise.
"""

import concurrent.futures
import importlib.util
import time

import grpc
import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from rlhfkit.clients import Client, generate_request
from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.training.tiny import tiny_llama_config
from rlhfkit.v1 import generation_pb2

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")]

PROMPTS = ["the cat", "one two three four five six seven eight nine ten", "a", "what is the large blue river and why"]


@pytest.fixture(scope="module")
def peaky_policy_dir(tmp_path_factory, tiny_tokenizer):
    """vLLM's CPU attention needs head_dim >= 32; a scaled LM head gives clear argmax gaps,
    so greedy decoding compares across two implementations without near-ties."""
    torch.manual_seed(0)
    config = tiny_llama_config(tiny_tokenizer, hidden_size=128, num_heads=2, num_kv_heads=2, num_layers=2)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    path = tmp_path_factory.mktemp("vllm") / "policy"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(peaky_policy_dir):
    srv = ServerThread(ServeConfig(policy=str(peaky_policy_dir), port=0, device="cpu", engine="vllm",
                                   gpu_memory_utilization=0.1)).wait_loaded(timeout=300)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=120) as c:
        yield c


def hf_greedy(path, prompt, n):
    tok = AutoTokenizer.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()


def test_greedy_matches_transformers_batched(client, peaky_policy_dir):
    expected = [hf_greedy(peaky_policy_dir, p, 20) for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(lambda p: client.generate(p, max_new_tokens=20, ignore_eos=True), PROMPTS))
    for resp, exp in zip(got, expected):
        assert list(resp.completions[0].token_ids) == exp
        assert resp.completions[0].finish_reason == generation_pb2.FINISH_REASON_LENGTH


def test_logprobs_match_a_float64_forward(client, peaky_policy_dir):
    resp = client.generate(PROMPTS[1], temperature=0.9, seed=3, max_new_tokens=12, logprobs=2, ignore_eos=True)
    c = resp.completions[0]
    model = LlamaForCausalLM.from_pretrained(peaky_policy_dir).double().eval()
    ids = torch.tensor([list(resp.prompt_token_ids) + list(c.token_ids)])
    P = len(resp.prompt_token_ids)
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits[0, P - 1:-1], -1)
    expected = ref.gather(-1, torch.tensor(c.token_ids).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(torch.tensor(list(c.logprobs), dtype=torch.float64), expected, atol=1e-3)
    assert len(c.top_logprobs) == 12
    for pos, top in enumerate(c.top_logprobs):
        assert [x.token_id for x in top.candidates] == ref[pos].topk(2).indices.tolist()


def test_seeds_n_and_streaming(client):
    kwargs = dict(temperature=1.0, top_p=0.95, seed=77, max_new_tokens=16, n=2, ignore_eos=True)
    alone = client.generate(PROMPTS[0], **kwargs)
    assert len({tuple(c.token_ids) for c in alone.completions}) == 2
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        noise = [pool.submit(client.generate, p, temperature=1.2, max_new_tokens=10) for p in PROMPTS]
        again = pool.submit(client.generate, PROMPTS[0], **kwargs).result()
        [f.result() for f in noise]
    assert [list(c.token_ids) for c in again.completions] == [list(c.token_ids) for c in alone.completions]
    chunks = list(client.generate_stream(PROMPTS[0], **kwargs))
    for c in alone.completions:
        assert [t for ch in chunks if ch.index == c.index for t in ch.token_ids] == list(c.token_ids)
        assert "".join(ch.text for ch in chunks if ch.index == c.index) == c.text


def test_stop_string(client):
    full = client.generate(PROMPTS[3], max_new_tokens=30, ignore_eos=True).completions[0].text
    candidates = [i for i in range(4, len(full) - 2) if full[i:i + 2].isprintable() and "\ufffd" not in full[i:i + 2]]
    assert candidates, full
    stop = full[candidates[0]:candidates[0] + 2]
    c = client.generate(PROMPTS[3], max_new_tokens=30, ignore_eos=True, stop=[stop]).completions[0]
    assert c.finish_reason == generation_pb2.FINISH_REASON_STOP and c.stop_reason == stop
    assert c.text == full[:full.find(stop)]


def test_same_validation_and_cancellation(server, client):
    for kwargs, code in [(dict(temperature=-1.0), "INVALID_ARGUMENT"), (dict(top_p=0.0), "INVALID_ARGUMENT"),
                         (dict(n=17), "INVALID_ARGUMENT"), (dict(max_new_tokens=1000), "INVALID_ARGUMENT"),
                         (dict(model="nope"), "NOT_FOUND")]:
        with pytest.raises(grpc.RpcError) as e:
            client.generate("the cat", **kwargs)
        assert e.value.code().name == code
    engine = server.server.state.registry.get("", "policy").engine
    tokens = server.server.metrics.generation_tokens
    before = tokens._value.get()
    call = client.generation.GenerateStream(generate_request("the cat", max_new_tokens=250, ignore_eos=True))
    next(call)
    call.cancel()
    deadline = time.monotonic() + 10
    while engine.num_running:
        assert time.monotonic() < deadline, "the cancelled request is still in vLLM"
        time.sleep(0.01)
    time.sleep(0.3)
    assert tokens._value.get() - before < 250, "vLLM kept decoding a cancelled request"
    with pytest.raises(grpc.RpcError) as e:
        client.generate("the cat", max_new_tokens=250, ignore_eos=True, timeout=0.02)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_messages_render_the_template_and_end_at_end_of_turn(tmp_path, tiny_tokenizer):
    """The chat path through vLLM: prompt ids as apply_chat_template gives them, and the
    template's <|im_end|> (not vLLM's EOS) ends the reply as FINISH_REASON_EOS."""
    from copy import deepcopy

    from rlhfkit.training.tiny import add_chat_template
    from rlhfkit.v1 import chat_pb2

    tok = add_chat_template(deepcopy(tiny_tokenizer))
    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_llama_config(tok, hidden_size=128, num_heads=2, num_kv_heads=2, num_layers=2)).eval()
    messages = [{"role": "user", "content": "count the words: cat dog"}]
    prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"])
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
        plain = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None)
        fourth = plain[0, len(prompt) + 3].item()
        w = model.lm_head.weight
        w[[eot, fourth]] = w[[fourth, eot]]  # the 4th greedy token's logits now belong to <|im_end|>
        out = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                             eos_token_id=[eot, tok.eos_token_id])
    expected = out[0, len(prompt):].tolist()
    assert expected[-1] == eot
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    srv = ServerThread(ServeConfig(policy=str(tmp_path), port=0, device="cpu", engine="vllm",
                                   gpu_memory_utilization=0.1)).wait_loaded(timeout=300)
    try:
        with Client(srv.address, timeout=120) as c:
            req = generate_request(max_new_tokens=20)
            req.messages.extend(chat_pb2.ChatMessage(**m) for m in messages)
            resp = c.generation.Generate(req, timeout=120)
    finally:
        srv.stop()
    assert list(resp.prompt_token_ids) == prompt
    comp = resp.completions[0]
    assert list(comp.token_ids) == expected
    assert comp.finish_reason == generation_pb2.FINISH_REASON_EOS
    assert comp.text == tok.decode(expected[:-1], skip_special_tokens=True)
