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


def test_loop_in_miniature(tmp_path):
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
