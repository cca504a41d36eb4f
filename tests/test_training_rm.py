"""Reward model training end to end on tiny data, read back the way the server reads it."""

import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhfkit.training import task
from rlhfkit.training.checkpoint import read_info
from rlhfkit.training.cli import main as train_main
from rlhfkit.training.data import write_jsonl
from rlhfkit.training.rm import group_rewards, pair_accuracy, read_rankings, rm_loss
from rlhfkit.training.tiny import make_tiny_checkpoint, sample_corpus, train_tokenizer


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tokenizer = train_tokenizer(sample_corpus() + task.all_task_texts(500))
    return make_tiny_checkpoint(tmp_path_factory.mktemp("base") / "policy", tokenizer=tokenizer)


def server_score(checkpoint, prompt_response_pairs) -> list[float]:
    """How the server's Reward.Score reads a reward: plain transformers, one text at a time."""
    tok = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        return [model(**tok(p + r, return_tensors="pt")).logits[0, 0].item() for p, r in prompt_response_pairs]


def easy_preferences(n, seed):
    """Separable: the rejected response is the chosen one with junk appended."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        e = task.make_example(rng)
        records.append({"prompt": e.prompt, "chosen": e.answer, "rejected": e.answer + " ! ! !"})
    return records


def test_one_forward_pass_matches_unpadded_scoring(base, tmp_path):
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).eval()
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    groups = [{"prompt": "count the words: cat\nanswer:", "responses": [" 1", " 2 2 2 2 2", " 3"]},
              {"prompt": "sort the numbers: 2 1\nanswer:", "responses": [" 1 2", " 2"]}]
    with torch.no_grad():
        rewards, mask = group_rewards(model, tok, groups, 256, "cpu")
    assert mask.tolist() == [[True, True, True], [True, True, False]]
    flat = [(g["prompt"], r) for g in groups for r in g["responses"]]
    expected = server_score(tmp_path / "rm", flat)
    got = [rewards[i, j].item() for i, g in enumerate(groups) for j in range(len(g["responses"]))]
    assert got == pytest.approx(expected, abs=1e-5)


def test_pair_accuracy_and_loss_dispatch_by_hand():
    rewards = torch.tensor([[3.0, 1.0, 2.0], [0.0, 0.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    acc, n = pair_accuracy(rewards, mask)
    assert n == 4 and acc == pytest.approx((1 + 1 + 0 + 0.5) / 4)
    pairs = torch.tensor([[2.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    full = torch.ones(2, 2, dtype=torch.bool)
    # a margin of 1 on the first pair turns σ(1) into σ(0)
    loss = rm_loss(pairs, full, [1.0, None], 0.0)
    assert loss.item() == pytest.approx((torch.log(torch.tensor(2.0)) + torch.nn.functional.softplus(torch.tensor(1.0))).item() / 2)


def test_read_rankings_both_formats(tmp_path):
    prefs = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 0.5}])
    ranks = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", "b", "c"]}])
    assert read_rankings(str(prefs), "auto") == [{"prompt": "p", "responses": ["a", "b"], "margin": 0.5}]
    assert read_rankings(str(ranks), "auto") == [{"prompt": "p", "responses": ["a", "b", "c"], "margin": None}]


def test_rm_end_to_end_above_chance_with_sft_bias(base, tmp_path, capsys):
    train_file = write_jsonl(tmp_path / "prefs.jsonl", easy_preferences(64, seed=1))
    eval_records = easy_preferences(32, seed=2)
    eval_file = write_jsonl(tmp_path / "prefs_eval.jsonl", eval_records)
    demos = task.sft_records(16, seed=3)
    sft_file = write_jsonl(tmp_path / "sft.jsonl", demos)
    out = tmp_path / "rm"
    assert train_main(["rm", "--model", str(base), "--train-file", str(train_file), "--eval-file", str(eval_file),
                       "--sft-file", str(sft_file), "--output-dir", str(out), "--max-steps", "15",
                       "--batch-size", "8", "--learning-rate", "1e-3", "--log-dir", str(tmp_path / "log"),
                       "--no-progress"]) == 0
    info = read_info(out)
    assert info["stage"] == "rm" and info["parent"] == str(base)
    # Held-out accuracy, read the server's way, independent of the trainer's own eval.
    chosen = server_score(out, [(r["prompt"], r["chosen"]) for r in eval_records])
    rejected = server_score(out, [(r["prompt"], r["rejected"]) for r in eval_records])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(eval_records)
    assert accuracy >= 0.9
    assert info["metrics"]["eval_accuracy"] == pytest.approx(accuracy)
    # The bias makes the demonstrations score 0 on average.
    demo_scores = server_score(out, [(r["prompt"], r["completion"]) for r in demos])
    assert sum(demo_scores) / len(demo_scores) + info["reward_bias"] == pytest.approx(0.0, abs=1e-4)


def test_rm_trains_on_rankings(base, tmp_path):
    # K=3 rankings: clean answer > one junk token > three junk tokens.
    rng = random.Random(5)
    records = []
    for _ in range(48):
        e = task.make_example(rng)
        records.append({"prompt": e.prompt, "responses": [e.answer, e.answer + " !", e.answer + " ! ! !"]})
    train_file = write_jsonl(tmp_path / "rank.jsonl", records[:32])
    eval_file = write_jsonl(tmp_path / "rank_eval.jsonl", records[32:])
    out = tmp_path / "rm"
    assert train_main(["rm", "--model", str(base), "--train-file", str(train_file), "--eval-file", str(eval_file),
                       "--output-dir", str(out), "--max-steps", "12", "--batch-size", "8", "--learning-rate", "1e-3",
                       "--log-dir", str(tmp_path / "log"), "--no-progress"]) == 0
    scores = server_score(out, [(r["prompt"], x) for r in records[32:] for x in r["responses"]])
    ordered = [scores[i] > scores[i + 1] > scores[i + 2] for i in range(0, len(scores), 3)]
    assert sum(ordered) / len(ordered) > 0.75  # chance is 1/6


def test_rm_micro_batches_accumulate_to_the_full_batch_step(base, tmp_path):
    from test_training_sft import assert_same_weights, trained_weights

    from rlhfkit.training.rm import RMConfig, train_rm

    records = [{"prompt": p["prompt"], "responses": [p["chosen"], p["rejected"]]} for p in easy_preferences(3, seed=7)]
    records += task.ranking_records(3, k=4, seed=8)  # mixed K: pairs and rankings of up to four
    train_file = write_jsonl(tmp_path / "mixed.jsonl", records)
    args = dict(model=str(base), train_file=str(train_file), data_format="rankings", batch_size=6, learning_rate=1e-2,
                warmup_steps=1, seed=0)
    assert_same_weights(trained_weights(train_rm, RMConfig, tmp_path, "whole", **args),
                        trained_weights(train_rm, RMConfig, tmp_path, "micro", micro_batch_size=4, **args))
