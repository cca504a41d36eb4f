"""PPO: rollouts against transformers, reward shaping by hand, and a tiny run through the CLI."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhfkit.training import task
from rlhfkit.training.checkpoint import read_info
from rlhfkit.training.cli import main as train_main
from rlhfkit.training.data import write_jsonl
from rlhfkit.training.ppo import shaped_rewards
from rlhfkit.training.sequences import generate, response_logprobs, response_mask_of, response_values
from rlhfkit.training.tiny import make_tiny_checkpoint, sample_corpus, train_tokenizer

PROMPTS = ["count the words: cat\nanswer:", "sort the numbers: 3 1 2 9 9 4\nanswer:", "reverse the words: a b\nanswer:"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tokenizer = train_tokenizer(sample_corpus() + task.all_task_texts(500))
    policy = make_tiny_checkpoint(root / "policy", tokenizer=tokenizer, seed=1)
    reward = make_tiny_checkpoint(root / "reward", kind="reward", tokenizer=tokenizer, seed=2)
    return policy, reward


def test_response_mask_by_hand():
    responses = torch.tensor([[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert response_mask_of(responses, eos_id=2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_batched_left_padded_generation_matches_transformers_greedy(models):
    policy_dir, _ = models
    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    _, _, responses = generate(policy, ids, 6, 0.0, tok.eos_token_id, tok.pad_token_id, None, "cpu")
    for i, p in enumerate(ids):  # reference: transformers' own greedy decoding, one unpadded prompt at a time
        ref = policy.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                              eos_token_id=tok.eos_token_id)[0, len(p):].tolist()
        assert responses[i, :len(ref)].tolist() == ref


def test_response_logprobs_and_values_against_unpadded_float64(models):
    policy_dir, reward_dir = models
    tok = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    value_model = AutoModelForSequenceClassification.from_pretrained(reward_dir, dtype=torch.float32).eval()
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        prompts, prompt_mask, responses = generate(policy, ids, 5, 1.0, tok.eos_token_id, tok.pad_token_id, gen, "cpu")
        mask = response_mask_of(responses, tok.eos_token_id)
        logprobs = response_logprobs(policy, prompts, prompt_mask, responses, mask, temperature=0.7)
        values = response_values(value_model, prompts, prompt_mask, responses, mask)
        for i, p in enumerate(ids):
            r = responses[i][mask[i].bool()].tolist()
            full = torch.tensor([p + r])
            logits = policy(input_ids=full).logits[0].double() / 0.7
            expected = [torch.log_softmax(logits[len(p) - 1 + t], -1)[r[t]].item() for t in range(len(r))]
            assert logprobs[i, :len(r)].tolist() == pytest.approx(expected, abs=1e-4)
            assert logprobs[i, len(r):].abs().sum().item() == 0.0
            hidden = value_model.model(input_ids=full).last_hidden_state[0]
            expected_v = value_model.score(hidden[len(p) - 1:len(p) - 1 + len(r)]).squeeze(-1)
            assert values[i, :len(r)].tolist() == pytest.approx(expected_v.tolist(), abs=1e-4)


def test_shaped_rewards_by_hand():
    scores = torch.tensor([2.0, -1.0])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards, kl = shaped_rewards(scores, logprobs, ref, mask, kl_coef=0.1, estimator="k1")
    assert kl.flatten().tolist() == pytest.approx([0.5, 0.0, -1.0, 0.5, 0.0, 0.0])
    assert rewards.flatten().tolist() == pytest.approx([-0.05, 0.0, 0.1 + 2.0, -0.05 - 1.0, 0.0, 0.0])


def test_ppo_end_to_end_through_the_cli(models, tmp_path):
    policy_dir, reward_dir = models
    prompts = write_jsonl(tmp_path / "prompts.jsonl", task.prompt_records(16, seed=1))
    eval_prompts = write_jsonl(tmp_path / "prompts_eval.jsonl", task.prompt_records(8, seed=2))
    ptx = write_jsonl(tmp_path / "sft.jsonl", task.sft_records(16, seed=3))
    out = tmp_path / "ppo"
    assert train_main(["ppo", "--model", str(policy_dir), "--reward-model", str(reward_dir), "--prompts-file", str(prompts),
                       "--eval-prompts-file", str(eval_prompts), "--ptx-file", str(ptx), "--ptx-coef", "0.5",
                       "--output-dir", str(out), "--num-iterations", "3", "--rollout-batch-size", "8",
                       "--minibatch-size", "4", "--max-new-tokens", "5", "--learning-rate", "1e-4",
                       "--log-dir", str(tmp_path / "log"), "--no-progress"]) == 0
    info = read_info(out)
    assert info["stage"] == "ppo" and info["parent"] == str(policy_dir) and info["reward_model"] == str(reward_dir)
    AutoModelForCausalLM.from_pretrained(out)
    rows = [json.loads(line) for line in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert "eval_score" in rows[0] and "eval_task_utility" in rows[0] and "eval_score" in rows[-1]
    # The first rollout comes from the reference itself: its KL is exactly 0; later ones move.
    assert rows[1]["kl"] == 0.0 and rows[1]["approx_kl"] >= 0.0
    assert all(math.isfinite(r[k]) for r in rows[1:] for k in ("pg_loss", "vf_loss", "ptx_loss", "entropy"))
    assert rows[3]["kl"] != 0.0


def cat_fraction(policy_dir, prompts, seed=0) -> float:
    """Fraction of transformers-sampled responses that say 'cat' (independent of the trainer)."""
    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    hits = 0
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([tok(p)["input_ids"]])
            out = model.generate(ids, max_new_tokens=6, do_sample=True, top_k=0, top_p=1.0, num_return_sequences=4,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            hits += sum("cat" in tok.decode(o[ids.shape[1]:], skip_special_tokens=True) for o in out)
    return hits / (4 * len(prompts))


def test_ppo_climbs_a_reward_model(tmp_path):
    """SFT a tiny policy on the task, train an RM that likes responses ending in 'cat', and
    PPO must make the policy say 'cat' more often (as judged by transformers' sampling)."""
    import random

    from rlhfkit.training.tiny import make_tiny_checkpoint as make

    tokenizer = train_tokenizer(sample_corpus() + task.all_task_texts(500))
    base = make(tmp_path / "base", tokenizer=tokenizer)
    sft_file = write_jsonl(tmp_path / "sft.jsonl", task.sft_records(128, seed=0))
    assert train_main(["sft", "--model", str(base), "--train-file", str(sft_file), "--output-dir", str(tmp_path / "sft"),
                       "--max-steps", "30", "--batch-size", "16", "--learning-rate", "3e-3",
                       "--log-dir", str(tmp_path / "log-sft"), "--no-progress"]) == 0
    rng = random.Random(0)
    prefs = []
    for _ in range(96):
        body = "".join(" " + rng.choice(task.WORDS) for _ in range(rng.randint(0, 4)))
        prefs.append({"prompt": task.make_example(rng).prompt, "chosen": body + " cat",
                      "rejected": body + " " + rng.choice([w for w in task.WORDS if w != "cat"])})
    prefs_file = write_jsonl(tmp_path / "prefs.jsonl", prefs)
    assert train_main(["rm", "--model", str(base), "--train-file", str(prefs_file), "--output-dir", str(tmp_path / "rm"),
                       "--max-steps", "20", "--batch-size", "8", "--learning-rate", "1e-3",
                       "--log-dir", str(tmp_path / "log-rm"), "--no-progress"]) == 0
    prompts = task.prompt_records(64, seed=1)
    eval_prompts = [r["prompt"] for r in task.prompt_records(16, seed=2)]
    prompts_file = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    eval_file = write_jsonl(tmp_path / "prompts_eval.jsonl", [{"prompt": p} for p in eval_prompts])
    assert train_main(["ppo", "--model", str(tmp_path / "sft"), "--reward-model", str(tmp_path / "rm"),
                       "--prompts-file", str(prompts_file), "--eval-prompts-file", str(eval_file),
                       "--output-dir", str(tmp_path / "ppo"), "--num-iterations", "10", "--rollout-batch-size", "16",
                       "--minibatch-size", "8", "--max-new-tokens", "6", "--learning-rate", "2e-3",
                       "--kl-coef", "0.02", "--log-dir", str(tmp_path / "log-ppo"), "--no-progress"]) == 0
    before, after = cat_fraction(tmp_path / "sft", eval_prompts), cat_fraction(tmp_path / "ppo", eval_prompts)
    assert after > before + 0.2, (before, after)
    metrics = read_info(tmp_path / "ppo")["metrics"]
    assert metrics["eval_score"] > metrics["eval_score_start"] + 0.3


def test_ppo_with_a_reward_function_and_no_reward_model(models, tmp_path):
    """PPO from a Python reward function alone: the value model starts from the policy with a
    new value head, and the logged score is the function's mean on the rollouts."""
    policy_dir, _ = models
    (tmp_path / "length_reward.py").write_text(
        "def short(prompts, completions, **columns):\n"
        "    return [-float(len(c.split())) for c in completions]\n")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", task.prompt_records(8, seed=1))
    out = tmp_path / "ppo"
    assert train_main(["ppo", "--model", str(policy_dir), "--reward-fn", f"{tmp_path / 'length_reward.py'}:short",
                       "--prompts-file", str(prompts), "--output-dir", str(out), "--num-iterations", "2",
                       "--rollout-batch-size", "8", "--minibatch-size", "4", "--max-new-tokens", "5",
                       "--log-dir", str(tmp_path / "log"), "--no-progress", "--device", "cpu"]) == 0
    info = read_info(out)
    assert info["rewards"] == ["reward_fn_short"] and info["reward_model"] is None
    rows = [json.loads(line) for line in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:  # at most 5 tokens, so at most 5 words; random tiny models say something
        assert -5.0 <= r["score"] < 0.0 and r["is_ratio_max"] == 1.0 and r["mismatch_kl"] == 0.0
