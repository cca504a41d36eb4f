"""The quickstart in miniature: every stage publishes into a store the server can read; the
gold utility, win rate and KL equal what transformers' own decoding and float64 give."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhfkit.clients import Client
from rlhfkit.clients.cli import main as cli_main
from rlhfkit.server.app import ServeConfig, ServerThread
from rlhfkit.training import task
from rlhfkit.training.checkpoint import read_info
from rlhfkit.training.cli import main as train_main
from rlhfkit.training.data import read_jsonl
from rlhfkit.training.loop import gold_utility, load_policy, mean_kl, sample_batches, win_rate


def test_quickstart_in_miniature(tmp_path, capsys):
    out = tmp_path / "qs"
    assert cli_main(["quickstart", "--out", str(out), "--algo", "ppo", "--hidden-size", "32", "--num-layers", "1", "--sft-steps", "3",
                     "--ppo-iterations", "1", "--batch-size", "16", "--n-sft", "48", "--n-pairs", "16",
                     "--n-prompts", "16", "--n-eval", "6", "--eval-samples", "2", "--dpo", "--device", "cpu",
                     "--no-progress", "--format", "text"]) == 0
    store = out / "store"
    stages = {name: read_info(store / name)["stage"] for name in ("sft-1", "rm-1", "ppo-1", "dpo-1")}
    assert stages == {"sft-1": "sft", "rm-1": "rm", "ppo-1": "ppo", "dpo-1": "dpo"}
    assert read_info(store / "ppo-1")["parent"] == str(store / "sft-1")
    report = json.loads((out / "report.json").read_text())
    assert 0.0 <= report["win_rate_ppo_vs_sft"] <= 1.0 and 0.0 <= report["rm_pairwise_accuracy"] <= 1.0
    assert report["elapsed_seconds"] > 0 and report["mean_kl"] == report["mean_kl"]  # not NaN
    assert report["checkpoints"] == {"sft": str(store / "sft-1"), "rm": str(store / "rm-1"),
                                     "ppo": str(store / "ppo-1"), "dpo": str(store / "dpo-1")}
    ppo = report["comparisons_vs_sft"]["ppo"]
    assert ppo["wins"] + ppo["ties"] + ppo["losses"] == ppo["pairs"] == 6 * 2
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{100 * report['win_rate_ppo_vs_sft']:.1f}%" in (out / "report.md").read_text()
    assert "rlhfkit serve --store" in capsys.readouterr().out

    # gold_utility against transformers' greedy decoding, prompt by prompt
    sft = store / "sft-1"
    prompts = [r["prompt"] for r in read_jsonl(out / "data" / "prompts_eval.jsonl", "prompts")]
    greedy = {name: hf_greedy_texts(store / name, prompts) for name in ("sft-1", "ppo-1")}
    expected = sum(task.utility(p, t) for p, t in zip(prompts, greedy["sft-1"])) / len(prompts)
    assert abs(gold_utility(sft, prompts) - expected) < 1e-9
    assert abs(report["gold_utility"]["sft"]["greedy"] - expected) < 1e-9
    assert train_main(["eval", "--policy", str(sft), "--prompts-file", str(out / "data" / "prompts_eval.jsonl"),
                       "--device", "cpu"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["gold_utility"] - expected) < 1e-9

    # the store serves as it is (real gRPC): roles by stage, each checkpoint greedy as transformers
    # decodes it, and the RM's reward as plain transformers reads it plus reward_bias
    greedy["dpo-1"] = hf_greedy_texts(store / "dpo-1", prompts[:2])
    rm = AutoModelForSequenceClassification.from_pretrained(store / "rm-1", dtype=torch.float32).eval()
    rm_tok = AutoTokenizer.from_pretrained(store / "rm-1")
    with torch.no_grad():
        expected_reward = rm(torch.tensor([rm_tok(prompts[0] + greedy["ppo-1"][0])["input_ids"]])).logits.item()
    expected_reward += read_info(store / "rm-1")["reward_bias"]
    srv = ServerThread(ServeConfig(store=str(store), port=0, device="cpu", reload_interval=0)).wait_loaded()
    try:
        with Client(srv.address, timeout=60) as client:
            assert {r: m.name for m in client.list_models() for r in m.roles} == {
                "policy": "ppo-1", "reference": "sft-1", "reward": "rm-1"}
            for name, model in (("ppo-1", ""), ("sft-1", "sft-1"), ("dpo-1", "dpo-1")):
                for i in range(2):
                    served = client.generate(prompts[i], model=model, max_new_tokens=16).completions[0].text
                    assert served == greedy[name][i], (name, i)
            assert abs(client.score([(prompts[0], greedy["ppo-1"][0])])[0] - expected_reward) < 1e-4
    finally:
        srv.stop()

    # win rate, greedy (so transformers can decode it too): the annotators' expected vote by hand
    deltas = [task.utility(p, a) - task.utility(p, b) for p, a, b in zip(prompts, greedy["ppo-1"], greedy["sft-1"])]
    result = win_rate(store / "ppo-1", sft, prompts, samples_per_prompt=1, temperature=0.0, annotator_temperature=0.1)
    assert abs(result["win_rate"] - sum(1 / (1 + math.exp(-d / 0.1)) for d in deltas) / len(deltas)) < 1e-12
    assert (result["wins"], result["ties"], result["losses"]) == (sum(d > 0 for d in deltas),
                                                                  sum(d == 0 for d in deltas),
                                                                  sum(d < 0 for d in deltas))
    # a policy against itself, same seed: identical samples, every pair a tie
    assert win_rate(sft, sft, prompts, samples_per_prompt=3)["win_rate"] == 0.5


def hf_greedy_texts(policy_dir, prompts, max_new_tokens=16):
    tok = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).eval()
    texts = []
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"]])
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)[0, ids.shape[1]:]
        texts.append(tok.decode(out, skip_special_tokens=True))
    return texts


def test_mean_kl_against_float64(tmp_path):
    """mean_kl's per-response Σ log π - log π_ref on the policy's own samples, recomputed
    from plain float64 log-softmax over transformers' logits."""
    from rlhfkit.training.tiny import make_tiny_checkpoint, sample_corpus, train_tokenizer

    tokenizer = train_tokenizer(sample_corpus() + task.all_task_texts(300))
    a = make_tiny_checkpoint(tmp_path / "a", tokenizer=tokenizer, hidden_size=32, num_layers=1, seed=1)
    b = make_tiny_checkpoint(tmp_path / "b", tokenizer=tokenizer, hidden_size=32, num_layers=1, seed=2)
    prompts = [r["prompt"] for r in task.prompt_records(5, seed=3)]
    policy, tok = load_policy(a)
    reference, _ = load_policy(b)
    generator = torch.Generator().manual_seed(7)
    (_, ids, mask, responses, response_mask, _), = sample_batches(policy, tok, prompts, 1.0, generator, "cpu", 6)
    total = 0.0
    for row in range(len(prompts)):
        prompt_ids, response = ids[row][mask[row].bool()], responses[row][response_mask[row].bool()]
        full = torch.cat([prompt_ids, response])[None]
        for model, sign in ((policy, 1.0), (reference, -1.0)):
            with torch.no_grad():
                logp = torch.log_softmax(model(full).logits[0].double(), -1)
            total += sign * logp[len(prompt_ids) - 1:-1].gather(-1, response[:, None]).sum().item()
    assert abs(mean_kl(a, b, prompts, seed=7, max_new_tokens=6) - total / len(prompts)) < 1e-4
    assert mean_kl(a, a, prompts) == 0.0


def test_label_ranks_the_policys_own_samples(tmp_path):
    from rlhfkit.training.data import write_jsonl
    from rlhfkit.training.tiny import make_tiny_checkpoint, sample_corpus, train_tokenizer

    tokenizer = train_tokenizer(sample_corpus() + task.all_task_texts(300))
    policy = make_tiny_checkpoint(tmp_path / "policy", tokenizer=tokenizer, hidden_size=32, num_layers=1)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", task.prompt_records(6, seed=4))
    out = tmp_path / "rankings.jsonl"
    assert train_main(["label", "--policy", str(policy), "--prompts-file", str(prompts), "--output-file", str(out),
                       "--k", "3", "--max-new-tokens", "4", "--annotator-temperature", "0", "--device", "cpu"]) == 0
    records = read_jsonl(out, "rankings")
    assert len(records) == 6  # a random policy never repeats itself over 4 tokens
    for r in records:
        assert len(set(r["responses"])) == len(r["responses"]) == 3
        u = [task.utility(r["prompt"], x) for x in r["responses"]]
        assert u == sorted(u, reverse=True)  # a noiseless annotator ranks by utility


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_quickstart_with_a_critic_free_algorithm(tmp_path, capsys, algo):
    """--algo grpo|rloo: the policy published as ALGO-1 takes the policy role, the report
    judges it against SFT, and its over-optimisation curves come from the run's evaluations."""
    out = tmp_path / "qs"
    assert cli_main(["quickstart", "--out", str(out), "--algo", algo, "--hidden-size", "32", "--num-layers", "1",
                     "--sft-steps", "3", "--critic-free-iterations", "4", "--rl-evals", "2", "--batch-size", "16",
                     "--n-sft", "48", "--n-pairs", "16", "--n-prompts", "16", "--n-eval", "6", "--eval-samples", "2",
                     "--device", "cpu", "--no-progress", "--format", "text"]) == 0
    store = out / "store"
    info = read_info(store / f"{algo}-1")
    assert info["stage"] == algo and info["parent"] == str(store / "sft-1")
    assert json.loads((store / "roles.json").read_text())["policy"] == f"{algo}-1"
    report = json.loads((out / "report.json").read_text())
    assert report["algo"] == algo and f"win_rate_{algo}_vs_sft" in report
    result = report["comparisons_vs_sft"][algo]
    assert result["wins"] + result["ties"] + result["losses"] == result["pairs"] == 6 * 2
    assert report["stage_seconds"][algo] > 0 and report["peak_rss_mib"] > 0 and report["cpu"]
    rows = [json.loads(line) for line in (out / "runs" / f"{algo}-1" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in rows if "eval_kl" in r]
    assert evals == [0, 2, 4]  # before the first iteration, every 4 // 2, and at the end
    assert report["selected_iteration"] in evals
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"{100 * report['win_rate_vs_sft']:.1f}%" in (out / "report.md").read_text()


def test_quickstart_rejects_bad_options_by_name(tmp_path, capsys):
    for flag, value, message in (("--k", "1", "k must be >= 2"), ("--chatter-rate", "1.5", "chatter_rate must be in [0, 1]"),
                                 ("--ppo-iterations", "0", "ppo_iterations must be >= 1"),
                                 ("--num-generations", "3", "num_generations must be >= 2 and divide batch_size (32)"),
                                 # (PPO and DPO sample one response per prompt: any batch size is theirs)
                                 ("--algo", "sac", "invalid choice: 'sac'")):
        with pytest.raises(SystemExit) as info:
            cli_main(["quickstart", "--out", str(tmp_path / "qs"), flag, value])
        assert info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "qs").exists()  # nothing started
