"""The whole loop on the bundled task in miniature: every stage publishes into a store the
server can read, and the gold utility is what transformers' own decoding scores."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhfkit.training import task
from rlhfkit.training.checkpoint import read_info
from rlhfkit.training.cli import main as train_main
from rlhfkit.training.data import read_jsonl
from rlhfkit.training.loop import gold_utility


def test_loop_in_miniature(tmp_path, capsys):
    work = tmp_path / "work"
    assert train_main(["loop", "--workdir", str(work), "--hidden-size", "32", "--num-layers", "1",
                       "--sft-steps", "3", "--ppo-iterations", "1", "--batch-size", "16", "--n-sft", "48",
                       "--n-pairs", "16", "--n-prompts", "16", "--n-eval", "6", "--device", "cpu",
                       "--no-progress"]) == 0
    stages = {name: read_info(work / "store" / name)["stage"] for name in ("sft-1", "rm-1", "ppo-1", "dpo-1")}
    assert stages == {"sft-1": "sft", "rm-1": "rm", "ppo-1": "ppo", "dpo-1": "dpo"}
    assert read_info(work / "store" / "ppo-1")["parent"] == str(work / "store" / "sft-1")
    report = json.loads((work / "report.json").read_text())
    assert set(report["stages"]) == {"sft", "rm", "ppo", "dpo"}
    for name in ("sft", "ppo", "dpo"):
        assert 0.0 <= report["stages"][name]["gold_greedy"] <= 1.0

    # gold_utility against transformers' greedy decoding, prompt by prompt
    sft = work / "store" / "sft-1"
    prompts = [r["prompt"] for r in read_jsonl(work / "data" / "prompts_eval.jsonl", "prompts")]
    tok = AutoTokenizer.from_pretrained(sft)
    model = AutoModelForCausalLM.from_pretrained(sft, dtype=torch.float32).eval()
    expected = 0.0
    for p in prompts:
        ids = torch.tensor([tok(p)["input_ids"]])
        out = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)[0, ids.shape[1]:]
        expected += task.utility(p, tok.decode(out, skip_special_tokens=True))
    assert abs(gold_utility(sft, prompts) - expected / len(prompts)) < 1e-9
    assert abs(report["stages"]["sft"]["gold_greedy"] - expected / len(prompts)) < 1e-9
    capsys.readouterr()
    assert train_main(["eval", "--policy", str(sft), "--prompts-file", str(work / "data" / "prompts_eval.jsonl"),
                       "--device", "cpu"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["gold_utility"] - expected / len(prompts)) < 1e-9


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
