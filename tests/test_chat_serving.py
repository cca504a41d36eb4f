"""Conversations over real gRPC on loopback: a tiny ChatML model whose template is written
here, checked against the tokenizer's own apply_chat_template and plain transformers."""

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhfkit.clients import Client, generate_request
from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.training.tiny import make_tiny_checkpoint, sample_corpus, train_tokenizer
from rlhfkit.v1 import chat_pb2, generation_pb2, reward_pb2

# Written here rather than imported, so the test does not share the code's template.
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATION = [{"role": "system", "content": "answer in words"},
                {"role": "user", "content": "count the stones"},
                {"role": "assistant", "content": "three stones"},
                {"role": "user", "content": "and the trees?"}]


def pb_messages(messages):
    return [chat_pb2.ChatMessage(**m) for m in messages]


def template_ids(tok, messages, add_generation_prompt):
    return list(tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)["input_ids"])


@pytest.fixture(scope="module")
def chat_tokenizer():
    tok = train_tokenizer(sample_corpus())
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def chat_dirs(tmp_path_factory, chat_tokenizer):
    """A chat policy whose greedy reply to CONVERSATION ends with <|im_end|> after a few
    tokens (the end-of-turn row of the LM head swapped with the row of the 4th greedy
    token), and a chat reward model."""
    root = tmp_path_factory.mktemp("chat")
    policy_dir = make_tiny_checkpoint(root / "policy", "policy", chat_tokenizer, seed=3)
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    ids = torch.tensor([template_ids(chat_tokenizer, CONVERSATION, True)])
    plain = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)[0, ids.shape[1]:].tolist()
    eot = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        w = model.lm_head.weight
        w[[eot, plain[3]]] = w[[plain[3], eot]]
    model.save_pretrained(policy_dir)
    reward_dir = make_tiny_checkpoint(root / "reward", "reward", chat_tokenizer, seed=4)
    return policy_dir, reward_dir


@pytest.fixture(scope="module")
def server(chat_dirs):
    policy_dir, reward_dir = chat_dirs
    srv = ServerThread(ServeConfig(policy=str(policy_dir), reward=str(reward_dir), reference=str(policy_dir),
                                   port=0, device="cpu")).wait_loaded()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


def generate(client, **kwargs):
    messages = kwargs.pop("messages", None)
    stop_ids, include = kwargs.pop("stop_token_ids", []), kwargs.pop("include_stop_str_in_output", False)
    req = generate_request(kwargs.pop("prompt", None), **kwargs)
    req.sampling.stop_token_ids.extend(stop_ids)
    req.sampling.include_stop_str_in_output = include
    if messages:
        req.messages.extend(pb_messages(messages))
    return client.generation.Generate(req, timeout=60)


def test_generate_with_messages_renders_the_template_and_ends_at_end_of_turn(client, chat_dirs, chat_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(chat_dirs[0]).eval()
    prompt = template_ids(chat_tokenizer, CONVERSATION, True)
    eot = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                             eos_token_id=[eot, chat_tokenizer.eos_token_id])
    expected = out[0, len(prompt):].tolist()
    assert expected[-1] == eot and len(expected) > 1, "the fixture must end the reply with <|im_end|> after some tokens"

    resp = generate(client, messages=CONVERSATION, max_new_tokens=20)
    c = resp.completions[0]
    assert list(resp.prompt_token_ids) == prompt
    assert list(c.token_ids) == expected
    assert c.finish_reason == generation_pb2.FINISH_REASON_EOS
    assert c.text == chat_tokenizer.decode(expected[:-1]) and "<|im_end|>" not in c.text
    # The stream says the same.
    req = generate_request(max_new_tokens=20)
    req.messages.extend(pb_messages(CONVERSATION))
    chunks = list(client.generation.GenerateStream(req, timeout=60))
    assert [t for ch in chunks for t in ch.token_ids] == expected
    assert "".join(ch.text for ch in chunks) == c.text
    assert chunks[-1].finish_reason == generation_pb2.FINISH_REASON_EOS


def test_score_and_compare_with_messages_equal_a_plain_forward(client, chat_dirs, chat_tokenizer):
    rm = AutoModelForSequenceClassification.from_pretrained(chat_dirs[1]).eval()

    def plain(response):
        ids = template_ids(chat_tokenizer, CONVERSATION + [{"role": "assistant", "content": response}], False)
        with torch.no_grad():
            return rm(torch.tensor([ids])).logits[0, 0].item()

    responses = ["five trees", "no trees at all, only stones"]
    req = reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(messages=pb_messages(CONVERSATION), response=r)
                                         for r in responses])
    rewards = client.reward.Score(req, timeout=60).rewards
    assert rewards == pytest.approx([plain(r) for r in responses], abs=1e-5)
    cmp = client.reward.Compare(reward_pb2.CompareRequest(messages=pb_messages(CONVERSATION), response_a=responses[0],
                                                          response_b=responses[1]), timeout=60)
    assert (cmp.reward_a, cmp.reward_b) == pytest.approx(tuple(rewards), abs=1e-5)
    assert cmp.prob_a_preferred == pytest.approx(torch.sigmoid(torch.tensor(rewards[0] - rewards[1])).item(), abs=1e-5)


def test_log_probs_with_messages_equal_a_float64_forward(client, chat_dirs, chat_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(chat_dirs[0], dtype=torch.float64).eval()
    response = "five trees"
    prompt = template_ids(chat_tokenizer, CONVERSATION, True)
    whole = template_ids(chat_tokenizer, CONVERSATION + [{"role": "assistant", "content": response}], False)
    eot = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    reply = whole[len(prompt):whole.index(eot, len(prompt)) + 1]  # the turn, through its end-of-turn token
    req = reward_pb2.LogProbsRequest(items=[reward_pb2.LogProbsItem(messages=pb_messages(CONVERSATION),
                                                                    response=response)])
    r = client.reward.LogProbs(req, timeout=60).results[0]
    assert list(r.token_ids) == reply
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt + reply])).logits[0], -1)
    expected = [logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(reply)]
    assert list(r.logprobs) == pytest.approx(expected, abs=1e-5)
    assert list(r.kl_k1) == pytest.approx([0.0] * len(reply), abs=1e-6)  # the reference is the same checkpoint


def test_stop_token_ids_and_include_stop_str_in_output(client, chat_tokenizer):
    plain = generate(client, prompt="the cat", max_new_tokens=8, ignore_eos=True).completions[0]
    tokens = list(plain.token_ids)
    stop = tokens[2]
    cut = tokens[:tokens.index(stop) + 1]
    c = generate(client, prompt="the cat", max_new_tokens=8, stop_token_ids=[stop]).completions[0]
    assert list(c.token_ids) == cut
    assert c.finish_reason == generation_pb2.FINISH_REASON_STOP and c.stop_token_id == stop
    assert c.text == chat_tokenizer.decode(cut[:-1], skip_special_tokens=True)
    c = generate(client, prompt="the cat", max_new_tokens=8, stop_token_ids=[stop],
                 include_stop_str_in_output=True).completions[0]
    assert c.text == chat_tokenizer.decode(cut, skip_special_tokens=True)
    # A stop string kept in the text: the text ends with it, nothing after it.
    text = chat_tokenizer.decode(tokens, skip_special_tokens=True)
    stop_str = text.strip()[3:6]
    c = generate(client, prompt="the cat", max_new_tokens=8, stop=[stop_str], include_stop_str_in_output=True,
                 ignore_eos=True).completions[0]
    assert c.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert c.text == text[:text.index(stop_str) + len(stop_str)]


@pytest.mark.parametrize("make, code, words", [
    (lambda: generate_request("hi"), grpc.StatusCode.INVALID_ARGUMENT, ["prompt", "messages"]),
    (lambda: generate_request(prompt_token_ids=[5]), grpc.StatusCode.INVALID_ARGUMENT, ["prompt_token_ids", "messages"]),
    (lambda: generate_request(), grpc.StatusCode.INVALID_ARGUMENT, ["messages[1].role", "robot"]),
    (lambda: generate_request(max_new_tokens=3).__class__(sampling=generation_pb2.SamplingParams(
        stop_token_ids=[10**6])), grpc.StatusCode.INVALID_ARGUMENT, ["stop_token_ids", "out of range"]),
])
def test_invalid_chat_requests(client, make, code, words):
    req = make()
    req.messages.extend(pb_messages([{"role": "user", "content": "hi"}]))
    if "messages[1].role" in words:
        req.messages.append(chat_pb2.ChatMessage(role="robot", content="beep"))
    with pytest.raises(grpc.RpcError) as e:
        client.generation.Generate(req, timeout=60)
    assert e.value.code() == code
    for w in words:
        assert w in e.value.details()


def test_invalid_chat_score_items_name_the_item(client):
    item = reward_pb2.ScoreItem(prompt="text too", messages=pb_messages(CONVERSATION), response="x")
    with pytest.raises(grpc.RpcError) as e:
        client.reward.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(prompt="a", response="b"), item]),
                            timeout=60)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "items[1].prompt" in e.value.details() and "items[1].messages" in e.value.details()


def test_messages_to_a_model_without_a_chat_template_fail_precondition(tiny_policy_dir, tiny_reward_dir):
    srv = ServerThread(ServeConfig(policy=str(tiny_policy_dir), reward=str(tiny_reward_dir), port=0,
                                   device="cpu")).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            req = generate_request()
            req.messages.extend(pb_messages(CONVERSATION))
            with pytest.raises(grpc.RpcError) as e:
                c.generation.Generate(req, timeout=60)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "'policy'" in e.value.details() and "chat template" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:
                c.reward.Score(reward_pb2.ScoreRequest(items=[reward_pb2.ScoreItem(
                    messages=pb_messages(CONVERSATION), response="x")]), timeout=60)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "'reward'" in e.value.details()
            assert c.generate("the cat", max_new_tokens=2).completions[0].token_ids  # text still works
    finally:
        srv.stop()
