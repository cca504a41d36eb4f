"""Conversations in training: the ids and assistant masks the trainers learn on, checked
against the chat template rendered piece by piece here, the same ids in SFT, PPO rollouts
and the server, every conversational format through its trainer into a store that serves
messages, and malformed records rejected with file:line."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhfkit.clients import Client, generate_request
from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.training.data import DataError, read_jsonl, write_jsonl
from rlhfkit.training.sequences import IGNORE, collate, sft_loss, tokenize_sft
from rlhfkit.training.tiny import make_tiny_checkpoint, sample_corpus, train_tokenizer
from rlhfkit.v1 import chat_pb2, reward_pb2

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SYSTEM = {"role": "system", "content": "answer in words"}
USER = {"role": "user", "content": "sort the numbers: 3 1 2"}
TWO_TURNS = [SYSTEM, USER, {"role": "assistant", "content": "1 2 3"},
             {"role": "user", "content": "reverse the words: cat dog"}, {"role": "assistant", "content": "dog cat"}]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tok():
    t = train_tokenizer(sample_corpus())
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = TEMPLATE
    return t


def by_hand(tok, messages):
    """ChatML's ids and the expected labels, turn by turn: headers and "\\n" separators are
    never trained; an assistant's content and its <|im_end|> are. (Special tokens split the
    byte-level BPE, so each piece encodes alone as it does inside the whole text.)"""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids, labels = [], []
    for m in messages:
        head, body = enc(f"<|im_start|>{m['role']}\n"), enc(m["content"]) + [end]
        ids += head + body + enc("\n")
        labels += [IGNORE] * len(head) + (body if m["role"] == "assistant" else [IGNORE] * len(body)) + [IGNORE]
    return ids, labels


def test_sft_trains_on_every_assistant_turn_and_nothing_else(tmp_path, tok):
    [(ids, labels)] = tokenize_sft(tok, [{"messages": TWO_TURNS}], 256)
    assert (ids, labels) == by_hand(tok, TWO_TURNS)
    assert tok.decode([y for y in labels if y != IGNORE]) == "1 2 3<|im_end|>dog cat<|im_end|>"
    # The loss is the mean NLL of exactly those tokens (float64 by hand).
    model = AutoModelForCausalLM.from_pretrained(
        make_tiny_checkpoint(tmp_path / "p", "policy", tok, hidden_size=32, num_layers=1)).eval()
    loss, n = sft_loss(model, collate([(ids, labels)], tok.pad_token_id))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    trained = [(t - 1, y) for t, y in enumerate(labels) if y != IGNORE]
    assert n == len(trained)
    assert loss.item() == pytest.approx(-sum(logp[t, y].item() for t, y in trained) / n, abs=1e-5)


def test_prompt_completion_messages_train_on_the_completion_only(tok):
    prompt, completion = TWO_TURNS[:4], TWO_TURNS[4:]
    [(ids, labels)] = tokenize_sft(tok, [{"prompt": prompt, "completion": completion}], 256)
    full_ids, full_labels = by_hand(tok, TWO_TURNS)
    head = list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
    # prompt (with its generation prompt) + the reply through <|im_end|>, as generation produces it
    assert ids == full_ids[:len(ids)] and ids[:len(head)] == head
    assert labels == [IGNORE] * len(head) + ids[len(head):]
    assert tok.decode(ids[len(head):]) == "dog cat<|im_end|>"
    assert [y for y in full_labels[len(head):] if y != IGNORE] == ids[len(head):]


def test_one_conversation_three_places_the_same_ids(tmp_path, tok):
    """The ids SFT trains on, the prompt ids PPO rollouts start from, and the prompt ids
    the server renders, for one conversation: all the template's own rendering."""
    from rlhfkit.training.ppo import PPOConfig, rollout_batch

    conversation = [SYSTEM, USER, assistant("1 2 3")]
    prompt = conversation[:2]
    expected = list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"])

    [(sft_ids, sft_labels)] = tokenize_sft(tok, [{"messages": conversation}], 256)
    assert sft_ids[:len(expected)] == expected and set(sft_labels[:len(expected)]) == {IGNORE}
    assert sft_labels[len(expected)] != IGNORE  # training starts where generation starts

    policy_dir = make_tiny_checkpoint(tmp_path / "policy", "policy", tok, hidden_size=32, num_layers=1)
    rm_dir = make_tiny_checkpoint(tmp_path / "rm", "reward", tok, hidden_size=32, num_layers=1)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    config = PPOConfig(model=str(policy_dir), reward_model=str(rm_dir), prompts_file="-", output_dir="-",
                       max_new_tokens=4)
    batch = rollout_batch([prompt, [user("count the words: cat")]], tok, policy, policy, tok, rm, rm, config, 0.05,
                          0.0, torch.Generator().manual_seed(0), "cpu")
    rollout_ids = batch["prompts"][0][batch["prompt_mask"][0].bool()].tolist()
    assert rollout_ids == expected

    srv = ServerThread(ServeConfig(policy=str(policy_dir), port=0, device="cpu")).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            req = generate_request(max_new_tokens=2)
            req.messages.extend(chat_pb2.ChatMessage(**m) for m in prompt)
            assert list(c.generation.Generate(req, timeout=60).prompt_token_ids) == expected
    finally:
        srv.stop()


@pytest.mark.parametrize("record, fmt, message", [
    ({"messages": [{"role": "robot", "content": "x"}]}, "sft", "messages[0].role: must be one of"),
    ({"messages": [{"role": "user", "content": "x"}]}, "sft", "no assistant turn"),
    ({"messages": "hi"}, "sft", "'messages' must be a list"),
    ({"prompt": [user("q")], "completion": [{"role": "assistant", "content": 5}]}, "sft", "completion[0].content"),
    ({"prompt": [user("q")], "completion": [user("again")]}, "sft", "'completion' has no assistant turn"),
    ({"chosen": [user("a"), assistant("b")], "rejected": [user("c"), assistant("d")]}, "preferences",
     "share no leading turns"),
    ({"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("b")]}, "preferences",
     "must differ after"),
    ({"prompt": [user("q")], "chosen": [assistant("a")], "rejected": 3}, "preferences",
     "'rejected' must be a string or a list of messages"),
    ({"prompt": [user("q")], "responses": [[assistant("a")], "b"]}, "rankings", "or of message lists"),
    ({"prompt": [user("q")], "responses": [[{"role": "bot", "content": "a"}], [assistant("b")]]}, "rankings",
     "responses[0][0].role"),
    ({"prompt": []}, "prompts", "prompt: is empty"),
])
def test_malformed_conversations_are_rejected_with_file_and_line(tmp_path, record, fmt, message):
    good = {"sft": {"messages": [user("q"), assistant("a")]},
            "preferences": {"chosen": [user("q"), assistant("a")], "rejected": [user("q"), assistant("b")]},
            "rankings": {"prompt": [user("q")], "responses": [[assistant("a")], [assistant("b")]]},
            "prompts": {"prompt": [user("q")]}}[fmt]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as info:
        read_jsonl(path, fmt)
    assert str(info.value).startswith(f"{path}:2: ") and message in str(info.value), str(info.value)


def test_implicit_prompt_preferences_split_at_the_shared_turns(tmp_path):
    shared = [SYSTEM, user("q"), assistant("first"), user("and now?")]
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": shared + [assistant("yes")],
                                              "rejected": shared + [assistant("no"), user("?"), assistant("no!")]}])
    [r] = read_jsonl(path, "preferences")
    assert r["prompt"] == shared and r["chosen"] == [assistant("yes")]
    assert r["rejected"] == [assistant("no"), user("?"), assistant("no!")]


def test_every_conversational_format_trains_and_the_store_serves_messages(tmp_path, tok):
    """SFT on messages and on prompt/completion lists, RM on explicit, implicit-prompt and
    ranking conversations, DPO on implicit-prompt pairs, PPO on conversation prompts: each a
    tiny run through `rlhfkit train`, whose checkpoints then answer messages over gRPC as
    plain transformers does on the template's ids."""
    from rlhfkit.training import task
    from rlhfkit.training.cli import main as train_main

    base = make_tiny_checkpoint(tmp_path / "base", "policy", tok, hidden_size=32, num_layers=1)
    data = {k: str(v) for k, v in task.write_task_data(tmp_path / "data", n_sft=16, n_pairs=8, n_rankings=8,
                                                         n_prompts=8, n_eval=4, data_format="chat").items()}
    sft_pc = write_jsonl(tmp_path / "sft_pc.jsonl", [{"prompt": r["messages"][:1], "completion": r["messages"][1:]}
                                                      for r in read_jsonl(data["sft"], "sft")])
    implicit = write_jsonl(tmp_path / "implicit.jsonl", [{"chosen": r["prompt"] + r["chosen"],
                                                          "rejected": r["prompt"] + r["rejected"]}
                                                         for r in read_jsonl(data["preferences"], "preferences")])
    store = tmp_path / "store"
    run = ["--device", "cpu", "--no-progress", "--batch-size", "4", "--max-steps", "2"]
    assert train_main(["sft", "--model", str(base), "--train-file", data["sft"], "--eval-file", data["sft_eval"],
                       "--output-dir", str(store / "sft-1"), *run]) == 0
    assert train_main(["sft", "--model", str(base), "--train-file", str(sft_pc),
                       "--output-dir", str(store / "sft-2"), *run]) == 0
    for i, train_file in enumerate((data["preferences"], str(implicit), data["rankings"]), 1):
        assert train_main(["rm", "--model", str(store / "sft-1"), "--train-file", train_file,
                           "--sft-file", data["sft_eval"], "--output-dir", str(store / f"rm-{i}"), *run]) == 0
    assert train_main(["dpo", "--model", str(store / "sft-1"), "--train-file", str(implicit),
                       "--output-dir", str(store / "dpo-1"), *run]) == 0
    assert train_main(["ppo", "--model", str(store / "sft-1"), "--reward-model", str(store / "rm-1"),
                       "--prompts-file", data["prompts"], "--output-dir", str(store / "ppo-1"), "--device", "cpu",
                       "--no-progress", "--num-iterations", "1", "--rollout-batch-size", "4",
                       "--minibatch-size", "2", "--max-new-tokens", "4"]) == 0
    (store / "roles.json").write_text(json.dumps({"policy": "ppo-1", "reference": "sft-1", "reward": "rm-1",
                                                  "serve": ["sft-2", "dpo-1", "rm-2", "rm-3"]}))

    conversation = read_jsonl(data["prompts_eval"], "prompts")[0]["prompt"]
    ids = list(tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)["input_ids"])
    ends = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    srv = ServerThread(ServeConfig(store=str(store), port=0, device="cpu", reload_interval=0)).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as c:
            for name in ("ppo-1", "sft-1", "sft-2", "dpo-1"):
                model = AutoModelForCausalLM.from_pretrained(store / name).eval()
                with torch.no_grad():
                    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=ends,
                                         pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
                req = generate_request(model=name, max_new_tokens=8)
                req.messages.extend(chat_pb2.ChatMessage(**m) for m in conversation)
                assert list(c.generation.Generate(req, timeout=60).completions[0].token_ids) == out, name
            reply = [assistant("1 2 3")]
            scored = list(tok.apply_chat_template(conversation + reply, tokenize=True)["input_ids"])
            for name in ("rm-1", "rm-2", "rm-3"):
                rm = AutoModelForSequenceClassification.from_pretrained(store / name).eval()
                bias = json.loads((store / name / "rlhfkit.json").read_text())["reward_bias"]
                with torch.no_grad():
                    expected = rm(torch.tensor([scored])).logits[0, 0].item() + bias
                req = reward_pb2.ScoreRequest(model=name, items=[reward_pb2.ScoreItem(
                    messages=[chat_pb2.ChatMessage(**m) for m in conversation], response="1 2 3")])
                assert c.reward.Score(req, timeout=60).rewards[0] == pytest.approx(expected, abs=1e-4), name
    finally:
        srv.stop()


def test_conversational_data_on_a_model_without_a_template_says_what_to_do(tmp_path, tiny_policy_dir):
    from rlhfkit.training.cli import main as train_main

    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [user("q"), assistant("a")]}])
    with pytest.raises(ValueError, match="no chat template.*--format text"):
        train_main(["sft", "--model", str(tiny_policy_dir), "--train-file", str(data), "--output-dir",
                    str(tmp_path / "out"), "--device", "cpu", "--no-progress", "--max-steps", "1"])
    assert AutoTokenizer.from_pretrained(tiny_policy_dir).chat_template is None


def test_a_template_that_rewrites_earlier_turns_is_refused_not_mis_masked(tok):
    """Like templates that strip an earlier reply's reasoning: the conversation up to an
    assistant turn is not a prefix of the whole, so that turn's tokens cannot be located."""
    from copy import deepcopy

    from rlhfkit.chat import ChatFormatError

    forgetful = deepcopy(tok)
    forgetful.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                               "{% if m['role'] != 'assistant' or loop.last %}{{ m['content'] }}{% endif %}"
                               "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(ChatFormatError, match=r"messages\[2\]: the chat template does not render"):
        tokenize_sft(forgetful, [{"messages": TWO_TURNS}], 256)
    assert tokenize_sft(forgetful, [{"messages": TWO_TURNS[:3]}], 256)  # one assistant turn: fine
