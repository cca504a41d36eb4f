"""The `rlhfkit` command line as a user runs it: `rlhfkit serve` in its own process,
`rlhfkit generate / score / models --json` against it."""

import json
import re
import signal
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

RLHFKIT = [sys.executable, "-m", "rlhfkit.clients.cli"]


def run(*args, check=True):
    out = subprocess.run(RLHFKIT + list(args), capture_output=True, text=True, timeout=120)
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
    for cmd in ("serve", "generate", "score", "compare", "models", "train"):
        assert cmd in top
    serve = run("serve", "--help").stdout
    assert "--policy" in serve and "--metrics-port" in serve and "--max-num-seqs" in serve
