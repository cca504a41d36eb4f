"""The Python clients with conversations (`messages=`, or a list of messages where a prompt
goes) against a real server on loopback, checked against the chat template and plain
transformers: the prompt ids the server used, greedy tokens, rewards and log-probs."""

import asyncio

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhfkit.clients import AsyncClient, Client, generate_request
from rlhfkit.clients.client import comparison_request
from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.v1 import generation_pb2

CONVERSATION = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "count the red fish"},
                {"role": "assistant", "content": "one two"},
                {"role": "user", "content": "and the blue ones?"}]


def chat_tokenizer():
    from rlhfkit.training.tiny import add_chat_template, sample_corpus, train_tokenizer

    return add_chat_template(train_tokenizer(sample_corpus()))


@pytest.fixture(scope="session")
def chat_model_dirs(tmp_path_factory):
    """(policy, another policy, reward): random-weight tiny chat models (ChatML template,
    <|im_end|> ends the assistant's turn) and a non-chat policy for refusals."""
    from rlhfkit.training.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("chat")
    tok = chat_tokenizer()
    return {"policy": make_tiny_checkpoint(root / "policy", "policy", tok, seed=0),
            "other": make_tiny_checkpoint(root / "other", "policy", tok, seed=7),
            "reward": make_tiny_checkpoint(root / "reward", "reward", tok, seed=1)}


def template_ids(tok, messages, add_generation_prompt):
    out = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def end_ids(tok):
    return [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def hf_greedy_ids(model, tok, ids, max_new_tokens):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=end_ids(tok), pad_token_id=tok.pad_token_id)
    return out[0, len(ids):].tolist()


def hf_reward(rm, ids):
    with torch.no_grad():
        return rm(torch.tensor([ids])).logits[0, 0].item()


@pytest.fixture(scope="module")
def server(chat_model_dirs):
    """A chat policy, its reference and a chat reward model."""
    srv = ServerThread(ServeConfig(policy=str(chat_model_dirs["policy"]), reward=str(chat_model_dirs["reward"]),
                                   reference=str(chat_model_dirs["other"]), port=0, device="cpu")).wait_loaded()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def tok(chat_model_dirs):
    return AutoTokenizer.from_pretrained(chat_model_dirs["policy"])


@pytest.fixture(scope="module")
def hf_policy(chat_model_dirs):
    return AutoModelForCausalLM.from_pretrained(chat_model_dirs["policy"]).eval()


@pytest.fixture(scope="module")
def hf_rm(chat_model_dirs):
    return AutoModelForSequenceClassification.from_pretrained(chat_model_dirs["reward"]).eval()


def test_generate_messages_is_the_template_and_transformers_greedy(client, tok, hf_policy):
    head = template_ids(tok, CONVERSATION, add_generation_prompt=True)
    assert tok.decode(head).endswith("<|im_start|>assistant\n")  # the reference itself is a chat prompt
    resp = client.generate(messages=CONVERSATION, max_new_tokens=8)
    assert list(resp.prompt_token_ids) == head
    assert list(resp.completions[0].token_ids) == hf_greedy_ids(hf_policy, tok, head, 8)
    # The same conversation as the prompt argument, and from ChatMessage protos.
    as_prompt = client.generate(CONVERSATION, max_new_tokens=8)
    protos = client.generate(messages=list(generate_request(messages=CONVERSATION).messages), max_new_tokens=8)
    for other in (as_prompt, protos):
        assert list(other.prompt_token_ids) == head
        assert other.completions[0].token_ids == resp.completions[0].token_ids
    streamed = list(client.generate_stream(messages=CONVERSATION, max_new_tokens=8))
    assert "".join(c.text for c in streamed) == resp.completions[0].text
    assert [t for c in streamed for t in c.token_ids] == list(resp.completions[0].token_ids)


def test_stop_token_ids_and_include_stop_str(client):
    full = client.generate(messages=CONVERSATION, max_new_tokens=8, ignore_eos=True).completions[0]
    assert len(full.token_ids) == 8
    stop_at = full.token_ids[2]
    first = list(full.token_ids).index(stop_at)  # the first occurrence ends it
    c = client.generate(messages=CONVERSATION, max_new_tokens=8, ignore_eos=True,
                        stop_token_ids=[stop_at]).completions[0]
    assert c.finish_reason == generation_pb2.FINISH_REASON_STOP and c.stop_token_id == stop_at
    assert list(c.token_ids) == list(full.token_ids[:first + 1])
    # A stop string, kept in the output on request (vLLM's include_stop_str_in_output).
    stop = full.text[len(full.text) // 2:][:2]
    assert stop.strip()
    cut = full.text.index(stop)
    kept = client.generate(messages=CONVERSATION, max_new_tokens=8, ignore_eos=True, stop=[stop],
                           include_stop_str_in_output=True).completions[0]
    dropped = client.generate(messages=CONVERSATION, max_new_tokens=8, ignore_eos=True, stop=[stop]).completions[0]
    assert kept.finish_reason == dropped.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert (kept.text, dropped.text) == (full.text[:cut + len(stop)], full.text[:cut])
    req = generate_request(messages=CONVERSATION, stop_token_ids=[5, 9], include_stop_str_in_output=True)
    assert list(req.sampling.stop_token_ids) == [5, 9] and req.sampling.include_stop_str_in_output


def test_score_compare_log_probs_with_messages(client, tok, hf_rm, hf_policy):
    responses = [" one", " three blue fish"]
    expected = [hf_reward(hf_rm, template_ids(tok, CONVERSATION + [{"role": "assistant", "content": r}], False))
                for r in responses]
    text_expected = hf_reward(hf_rm, tok("the cat is red")["input_ids"])
    got = client.score([(CONVERSATION, responses[0]), ("the cat", " is red"), (CONVERSATION, responses[1])])
    assert got == pytest.approx([expected[0], text_expected, expected[1]], abs=1e-5)
    cmp = client.compare(CONVERSATION, *responses)
    assert (cmp.reward_a, cmp.reward_b) == pytest.approx(expected, abs=1e-5)
    assert client.compare(None, *responses, messages=CONVERSATION).reward_a == pytest.approx(expected[0], abs=1e-5)

    # LogProbs: the response is the assistant turn as the template writes it, through <|im_end|>.
    head = template_ids(tok, CONVERSATION, True)
    full = template_ids(tok, CONVERSATION + [{"role": "assistant", "content": responses[1]}], False)
    assert full[:len(head)] == head
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    reply = full[len(head):full.index(im_end, len(head)) + 1]
    with torch.no_grad():
        logits = hf_policy(torch.tensor([head + reply])).logits[0, len(head) - 1:-1]
    ref = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(reply)[:, None])[:, 0].tolist()
    res = client.log_probs([(CONVERSATION, responses[1]), (head, reply)], model="policy")
    by_messages, by_ids = res.results
    assert list(by_messages.token_ids) == reply == list(by_ids.token_ids)
    assert list(by_messages.logprobs) == pytest.approx(ref, abs=1e-4)
    assert list(by_ids.logprobs) == pytest.approx(list(by_messages.logprobs), abs=1e-6)


def test_async_client_with_messages(server, client, tok):
    sync = client.generate(messages=CONVERSATION, max_new_tokens=6)
    sync_scores = client.score([(CONVERSATION, " one")])

    async def go():
        async with AsyncClient(server.address, timeout=60) as c:
            resp = await c.generate(messages=CONVERSATION, max_new_tokens=6)
            chunks = [ch async for ch in c.generate_stream(CONVERSATION, max_new_tokens=6)]
            scores = await c.score([(CONVERSATION, " one")])
            cmp = await c.compare(CONVERSATION, " one", " two")
            lp = await c.log_probs([(CONVERSATION, " one")], model="policy")
            return resp, chunks, scores, cmp, lp

    resp, chunks, scores, cmp, lp = asyncio.run(go())
    assert list(resp.prompt_token_ids) == template_ids(tok, CONVERSATION, True)
    assert resp.completions[0].token_ids == sync.completions[0].token_ids
    assert "".join(ch.text for ch in chunks) == sync.completions[0].text
    assert scores == pytest.approx(sync_scores, abs=1e-6) and cmp.reward_a == pytest.approx(sync_scores[0], abs=1e-6)
    assert list(lp.results[0].token_ids) == list(client.log_probs([(CONVERSATION, " one")]).results[0].token_ids)


def test_comparison_request_takes_messages_either_way():
    a = comparison_request(CONVERSATION, samples_of="policy", temperature=1.0, stop_token_ids=[3])
    b = comparison_request(messages=CONVERSATION, samples_of="policy", temperature=1.0, stop_token_ids=[3])
    assert a == b and a.prompt == "" and [(m.role, m.content) for m in a.messages] == \
        [(m["role"], m["content"]) for m in CONVERSATION]
    assert list(a.sampling.stop_token_ids) == [3]
    assert comparison_request("the cat", samples_of="policy").prompt == "the cat"


def test_bad_messages(client):
    def status(fn):
        with pytest.raises(grpc.RpcError) as e:
            fn()
        return e.value.code(), e.value.details()

    # Caught by the client before anything is sent.
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        generate_request(messages=[{"role": "user", "content": "hi"}, {"role": "user"}])
    with pytest.raises(TypeError, match=r"messages\[0\]"):
        generate_request(messages=["hi"])
    with pytest.raises(ValueError, match="not both"):
        generate_request(CONVERSATION, messages=CONVERSATION)
    # Checked by the server, with the field named.
    code, msg = status(lambda: client.generate(messages=[{"role": "robot", "content": "hi"}]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "messages[0].role" in msg
    code, msg = status(lambda: client.generate("the cat", messages=CONVERSATION))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in msg and "messages" in msg
    code, msg = status(lambda: client.score([([{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}],
                                              " r")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "items[0].messages[1].role" in msg
    # (A model without a chat template: FAILED_PRECONDITION, in test_feedback.py and test_cli.py.)
