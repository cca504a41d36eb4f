"""DPO: sequence log-probs against transformers, the loss at the reference by hand, and a
tiny end-to-end run judged by transformers' own log-probs."""

import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhfkit.training import task
from rlhfkit.training.checkpoint import read_info
from rlhfkit.training.cli import main as train_main
from rlhfkit.training.data import write_jsonl
from rlhfkit.training.dpo import DPOConfig, add_reference_logps, pair_loss, sequence_logps, tokenize_pairs
from rlhfkit.training.tiny import make_tiny_checkpoint, sample_corpus, train_tokenizer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tokenizer = train_tokenizer(sample_corpus() + task.all_task_texts(500))
    return make_tiny_checkpoint(tmp_path_factory.mktemp("base") / "policy", tokenizer=tokenizer)


def easy_preferences(n, seed):
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        e = task.make_example(rng)
        records.append({"prompt": e.prompt, "chosen": e.answer, "rejected": e.answer + " ! ! !"})
    return records


def hf_response_logp(model, tok, prompt, response) -> float:
    """Sum of log p(response tokens + EOS | prompt) by transformers' cross-entropy."""
    p = tok(prompt)["input_ids"]
    c = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([p + c]), labels=torch.tensor([[-100] * len(p) + c])).loss.item()
    return -loss * len(c)


def test_sequence_logps_match_transformers(base):
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    records = task.preference_records(4, seed=3)
    with torch.no_grad():
        chosen, rejected = sequence_logps(model, tokenize_pairs(tok, records, 256), tok.pad_token_id, "cpu")
    for r, c, j in zip(records, chosen.tolist(), rejected.tolist()):
        assert c == pytest.approx(hf_response_logp(model, tok, r["prompt"], r["chosen"]), rel=1e-5)
        assert j == pytest.approx(hf_response_logp(model, tok, r["prompt"], r["rejected"]), rel=1e-5)


@pytest.mark.parametrize("loss_type,beta,expected", [("sigmoid", 0.1, math.log(2)), ("ipo", 0.5, 1.0),
                                                      ("hinge", 0.1, 1.0)])
def test_loss_at_the_reference_by_hand(base, loss_type, beta, expected):
    # policy == reference: h = 0, so sigmoid gives log 2, IPO (1/(2β))², hinge 1.
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = DPOConfig(model=str(base), train_file="x", output_dir="y", beta=beta, loss_type=loss_type)
    pairs = tokenize_pairs(tok, task.preference_records(6, seed=4), 256)
    add_reference_logps(model, pairs, 4, tok.pad_token_id, "cpu", average=loss_type == "ipo")
    model.train()  # no dropout in the tiny Llama, so train mode changes nothing
    loss, chosen_r, rejected_r = pair_loss(model, pairs, config, tok.pad_token_id, "cpu")
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert chosen_r.abs().max().item() < 1e-5 and rejected_r.abs().max().item() < 1e-5


def test_dpo_end_to_end_prefers_chosen_held_out(base, tmp_path):
    train_file = write_jsonl(tmp_path / "prefs.jsonl", easy_preferences(64, seed=1))
    eval_records = easy_preferences(24, seed=2)
    eval_file = write_jsonl(tmp_path / "prefs_eval.jsonl", eval_records)
    out = tmp_path / "dpo"
    assert train_main(["dpo", "--model", str(base), "--train-file", str(train_file), "--eval-file", str(eval_file),
                       "--output-dir", str(out), "--max-steps", "12", "--batch-size", "8", "--learning-rate", "1e-3",
                       "--beta", "0.1", "--log-dir", str(tmp_path / "log"), "--no-progress"]) == 0
    info = read_info(out)
    assert info["stage"] == "dpo" and info["parent"] == str(base) and info["reference"] == str(base)
    tok = AutoTokenizer.from_pretrained(out)
    ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    policy = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    # implicit reward margin β[(π_c - ref_c) - (π_r - ref_r)] > 0 on held-out pairs
    wins = 0
    for r in eval_records:
        h = (hf_response_logp(policy, tok, r["prompt"], r["chosen"]) - hf_response_logp(ref, tok, r["prompt"], r["chosen"])
             - hf_response_logp(policy, tok, r["prompt"], r["rejected"]) + hf_response_logp(ref, tok, r["prompt"], r["rejected"]))
        wins += h > 0
    assert wins / len(eval_records) >= 0.9
    assert info["metrics"]["eval_reward_accuracy"] == pytest.approx(wins / len(eval_records))


def test_dpo_micro_batches_accumulate_to_the_full_batch_step(base, tmp_path):
    from test_training_sft import assert_same_weights, trained_weights

    from rlhfkit.training.dpo import train_dpo

    train_file = write_jsonl(tmp_path / "prefs.jsonl", task.preference_records(6, seed=9))
    args = dict(model=str(base), train_file=str(train_file), batch_size=6, learning_rate=1e-2, warmup_steps=1,
                dtype="float64")  # see assert_same_weights
    assert_same_weights(trained_weights(train_dpo, DPOConfig, tmp_path, "whole", **args),
                        trained_weights(train_dpo, DPOConfig, tmp_path, "micro", micro_batch_size=4, **args))
