"""The `rlhfkit` command line as a user runs it: `rlhfkit serve` in its own process,
`rlhfkit generate / score / models --json` against it; `rlhfkit chat` and `--messages FILE`
against a chat model's server, checked against direct calls and the chat template."""

import json
import math
import re
import signal
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from test_client_chat import chat_model_dirs, template_ids  # noqa: F401 - a fixture and a helper

RLHFKIT = [sys.executable, "-m", "rlhfkit.clients.cli"]


def run(*args, check=True, stdin=None):
    out = subprocess.run(RLHFKIT + list(args), capture_output=True, text=True, timeout=120, input=stdin)
    if check:
        assert out.returncode == 0, out.stderr
    return out


@pytest.fixture(scope="module")
def served(tiny_policy_dir, tiny_reward_dir):
    proc = subprocess.Popen(RLHFKIT + ["serve", "--policy", str(tiny_policy_dir), "--reward", str(tiny_reward_dir),
                                       "--port", "0", "--metrics-port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    m = re.search(r"gRPC on (\S+):(\d+)", line)
    assert m, line
    address = f"{m.group(1)}:{m.group(2)}"
    from rlhfkit.clients import Client

    with Client(address) as c:
        c.wait_ready(120)
    yield address
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def test_generate_json_matches_transformers(served, tiny_policy_dir):
    out = json.loads(run("generate", "the cat is", "--address", served, "--max-new-tokens", "10",
                         "--ignore-eos", "--json").stdout)
    tok = AutoTokenizer.from_pretrained(tiny_policy_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    ids = tok("the cat is", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10)[0, ids.shape[1]:]
    assert out["completions"][0]["token_ids"] == ref.tolist()
    assert out["completions"][0]["finish_reason"] == "FINISH_REASON_LENGTH"


def test_generate_stream_and_plain_text(served):
    plain = run("generate", "the cat is", "--address", served, "--max-new-tokens", "6", "--ignore-eos").stdout
    streamed = run("generate", "the cat is", "--address", served, "--max-new-tokens", "6", "--ignore-eos",
                   "--stream").stdout
    assert plain == streamed and plain.strip()


def test_score_and_models_json(served, tiny_reward_dir):
    out = json.loads(run("score", "the cat", " is red", " is blue", "--address", served, "--json").stdout)
    tok = AutoTokenizer.from_pretrained(tiny_reward_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_reward_dir)
    with torch.no_grad():
        ref = [rm(torch.tensor([tok("the cat" + r).input_ids])).logits[0, 0].item() for r in (" is red", " is blue")]
    assert out["rewards"] == pytest.approx(ref, abs=1e-5)
    models = json.loads(run("models", "--address", served, "--json").stdout)
    assert sorted(m["role"] for m in models) == ["policy", "reward"]


def test_errors_are_one_clear_line(served):
    out = run("generate", "the cat", "--address", served, "--top-p", "1.5", check=False)
    assert out.returncode != 0
    assert out.stderr.strip() == "rlhfkit generate: INVALID_ARGUMENT: top_p: must be in (0, 1] (1 disables top-p), got 1.5"
    out = run("serve", check=False)
    assert out.returncode != 0 and "nothing to serve" in out.stderr
    out = run("serve", "--policy", "x", "--max-prefill-tokens", "0", check=False)
    assert out.returncode != 0 and "max_prefill_tokens must be >= 1, got 0" in out.stderr


def test_help_explains_each_command():
    top = run("--help").stdout
    for cmd in ("serve", "generate", "score", "compare", "chat", "models", "train"):
        assert cmd in top
    serve = run("serve", "--help").stdout
    assert "--policy" in serve and "--metrics-port" in serve and "--max-num-seqs" in serve
    for cmd in ("generate", "score", "compare"):
        text = run(cmd, "--help").stdout
        assert "(PROMPT | --messages FILE)" in text and '"role"' in text and "chat template" in text
    chat = run("chat", "--help").stdout
    for flag in ("/system TEXT", "/reset", "/exit", "--temperature", "--max-new-tokens", "--stop", "--address"):
        assert flag in chat


# ---- conversations: `rlhfkit chat` and --messages FILE, against a chat model's server

CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "count the red fish"},
                {"role": "assistant", "content": "one two"}, {"role": "user", "content": "and the blue ones?"}]


@pytest.fixture(scope="module")
def chat_server(chat_model_dirs):  # noqa: F811
    from rlhfkit.server.app import ServeConfig, ServerThread

    srv = ServerThread(ServeConfig(policy=str(chat_model_dirs["policy"]), reward=str(chat_model_dirs["reward"]),
                                   port=0, device="cpu")).wait_loaded()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def chat_client(chat_server):
    from rlhfkit.clients import Client

    with Client(chat_server.address, timeout=60) as c:
        yield c


def test_chat_keeps_the_conversation(chat_server, chat_client, chat_model_dirs):  # noqa: F811
    """Each reply streamed by `rlhfkit chat` is the greedy reply to the whole conversation so
    far, sent directly; a refused turn is reported and not kept; /reset keeps the system prompt."""
    too_long = " ".join(["fish"] * 300)  # over the tiny model's 256-token context
    lines = ["/system be brief", "hello", too_long, "again", "/reset", "hi", "/exit", "never sent"]
    out = run("chat", "--address", chat_server.address, "--max-new-tokens", "8", stdin="\n".join(lines) + "\n")
    tok = AutoTokenizer.from_pretrained(chat_model_dirs["policy"])
    system = {"role": "system", "content": "be brief"}
    turn1 = [system, {"role": "user", "content": "hello"}]

    def direct(messages):
        resp = chat_client.generate(messages=messages, max_new_tokens=8)
        assert list(resp.prompt_token_ids) == template_ids(tok, messages, True)  # the conversation the server saw
        return resp.completions[0].text

    r1 = direct(turn1)
    r2 = direct(turn1 + [{"role": "assistant", "content": r1}, {"role": "user", "content": "again"}])
    r3 = direct([system, {"role": "user", "content": "hi"}])
    assert r1 and r2 != r1
    assert out.stdout == f"{r1}\n{r2}\n{r3}\n"
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: INVALID_ARGUMENT: ") and "context" in errors[0]
    assert "(system prompt: be brief)" in out.stderr and "system prompt kept" in out.stderr


def test_chat_json_history_and_sampling_options(chat_server, chat_client):
    lines = ["hello", "/history", "/system", "again"]
    out = run("chat", "--address", chat_server.address, "--system", "be brief", "--json", "--temperature", "1.0",
              "--seed", "5", "--top-k", "20", "--top-p", "0.9", "--max-new-tokens", "6", stdin="\n".join(lines))
    replies = [json.loads(line) for line in out.stdout.splitlines()]
    sampling = dict(temperature=1.0, seed=5, top_k=20, top_p=0.9, max_new_tokens=6)
    turn1 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    first = chat_client.generate(messages=turn1, **sampling)
    assert replies[0]["role"] == "assistant" and replies[0]["content"] == first.completions[0].text
    assert replies[0]["model_version"] == first.model_version and replies[0]["finish_reason"].startswith("FINISH_")
    history = json.loads(out.stderr[out.stderr.index("["):out.stderr.rindex("]") + 1])
    assert history == turn1 + [{"role": "assistant", "content": first.completions[0].text}]
    # `/system` alone removed the system prompt: the second turn is sent without it.
    second = chat_client.generate(messages=history[1:] + [{"role": "user", "content": "again"}], **sampling)
    assert replies[1]["content"] == second.completions[0].text and len(replies) == 2


def test_chat_reports_server_errors_and_goes_on(served):
    """The plain tiny policy has no chat template: every turn is refused, the chat goes on."""
    out = run("chat", "--address", served, stdin="hello\n/help\nagain\n")
    assert out.stdout == ""
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and all(e.startswith("error: FAILED_PRECONDITION: ") and "chat template" in e
                                    for e in errors)
    assert "/reset" in out.stderr  # /help answered between the two


def test_generate_score_compare_with_messages(chat_server, chat_client, chat_model_dirs, tmp_path):  # noqa: F811
    path = tmp_path / "conversation.json"
    path.write_text(json.dumps(CONVERSATION))
    tok = AutoTokenizer.from_pretrained(chat_model_dirs["policy"])
    head = template_ids(tok, CONVERSATION, True)
    out = json.loads(run("generate", "--messages", str(path), "--address", chat_server.address,
                         "--max-new-tokens", "8", "--json").stdout)
    assert out["prompt_token_ids"] == head
    direct = chat_client.generate(messages=CONVERSATION, max_new_tokens=8).completions[0]
    assert out["completions"][0]["token_ids"] == list(direct.token_ids)
    streamed = run("generate", "--messages", "-", "--address", chat_server.address, "--max-new-tokens", "8",
                   "--stream", stdin=json.dumps(CONVERSATION)).stdout
    assert streamed == direct.text + "\n"

    rm = AutoModelForSequenceClassification.from_pretrained(chat_model_dirs["reward"]).eval()
    responses = [" one", " three blue fish"]
    with torch.no_grad():
        ref = [rm(torch.tensor([template_ids(tok, CONVERSATION + [{"role": "assistant", "content": r}], False)]))
               .logits[0, 0].item() for r in responses]
    scored = json.loads(run("score", "--messages", str(path), *responses, "--address", chat_server.address,
                            "--json").stdout)
    assert scored["rewards"] == pytest.approx(ref, abs=1e-5)
    cmp = json.loads(run("compare", "--messages", "-", *responses, "--address", chat_server.address, "--json",
                         stdin=json.dumps(CONVERSATION)).stdout)
    assert (cmp["reward_a"], cmp["reward_b"]) == pytest.approx(ref, abs=1e-5)
    assert cmp["prob_a_preferred"] == pytest.approx(1 / (1 + math.exp(ref[1] - ref[0])), abs=1e-6)


@pytest.mark.parametrize("argv, content, message", [
    (["generate"], None, "give a PROMPT (text) or --messages FILE (a conversation)"),
    (["generate", "the cat", "--messages", "{file}"], "[]", "give a PROMPT or --messages FILE, not both"),
    (["compare", "--messages", "{file}", "a", "b", "c"], json.dumps(CONVERSATION),
     "with --messages FILE, give RESPONSE_A RESPONSE_B only (the file is the prompt), got 3 argument(s)"),
    (["compare", "the cat", "a"], None, "give PROMPT RESPONSE_A RESPONSE_B, or --messages FILE RESPONSE_A RESPONSE_B"),
    (["score", "the cat"], None, "give PROMPT RESPONSE ..., or --messages FILE RESPONSE ..."),
    (["generate", "--messages", "{file}"], '[{"role": "user", "content": "hi"}', "--messages {file}: not valid JSON"),
    (["score", "--messages", "{file}", "r"], '{"role": "user", "content": "hi"}',
     '--messages {file}: expected a JSON list of {"role", "content"} messages, got a JSON object'),
    (["generate", "--messages", "{file}"], '[{"role": "user", "text": "hi"}]',
     '--messages {file}: messages[0] must be an object with exactly the keys "role" and "content"'),
    (["generate", "--messages", "{file}"], '[{"role": "user", "content": 3}]',
     "--messages {file}: messages[0].content: must be a string, got int"),
    (["generate", "--messages", "{file}"], '[]', "--messages {file}: messages: is empty"),
    (["generate", "--messages", "{missing}"], None, "--messages {missing}: cannot read it: No such file"),
])
def test_messages_argument_errors(tmp_path, capsys, argv, content, message):
    from rlhfkit.clients.cli import main as cli_main

    path, missing = tmp_path / "conv.json", tmp_path / "nope.json"
    if content is not None:
        path.write_text(content)
    def fill(text):
        return text.replace("{file}", str(path)).replace("{missing}", str(missing))

    argv = [fill(a) for a in argv]
    with pytest.raises(SystemExit) as e:
        cli_main(argv + ["--address", "127.0.0.1:1"])  # nothing listens there: these fail before any call
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: rlhfkit {argv[0]} (PROMPT | --messages FILE)")
    assert f"rlhfkit {argv[0]}: error: {fill(message)}" in err
