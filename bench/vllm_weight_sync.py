"""What pushing the trainer's weights into an in-process vLLM costs (VLLMRollouts.load_weights).

For the tests' tiny Llama and a 60,039,680-parameter Llama (random weights from a LlamaConfig:
vocabulary 32,000, hidden 512, 8 layers, 8 heads, MLP 1,536, untied embeddings, as in
bench/train.py), plain and LoRA-wrapped (r=8 on q_proj/v_proj, merged on the fly): the median
of --repeats load_weights calls after one warm-up call, float32 on CPU; beside it, the median time
to copy the weights once in torch into tensors allocated beforehand (this machine's memory bandwidth), and the largest difference
between vLLM's log-probs after the push and the trainer model's (that the weights landed).
Prints the JSON and writes bench/results/vllm_weight_sync_cpu.json.

Run it with the vLLM environment's Python (README, "The vLLM engine"):

    .venv-vllm/bin/python bench/vllm_weight_sync.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rlhfkit.training.tiny import sample_corpus, tiny_llama_config, train_tokenizer
from rlhfkit.training.vllm_rollouts import VLLMRollouts

RESULTS = Path(__file__).parent / "results" / "vllm_weight_sync_cpu.json"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def configs(tokenizer) -> dict[str, LlamaConfig]:
    return {
        "tiny (tests)": tiny_llama_config(tokenizer, hidden_size=128, num_heads=2, num_kv_heads=2, num_layers=2),
        "60M Llama": LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                                 num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                                 tie_word_embeddings=False),
    }


def logprob_diff(rollouts: VLLMRollouts, model) -> float:
    """That the weights landed: vLLM's log-probs of 16 sampled tokens against the trainer model's."""
    prompt = list(range(10, 30))
    [[(tokens, logprobs)]] = rollouts.sample([prompt], n=1, max_new_tokens=16, temperature=1.0, end_ids=[], seed=0)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].double()
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens).unsqueeze(-1)).squeeze(-1)
    return (torch.tensor(logprobs, dtype=torch.float64) - expected).abs().max().item()


def measure(name: str, config: LlamaConfig, tokenizer, workdir: Path, repeats: int) -> list[dict]:
    import peft

    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    path = workdir / name.replace(" ", "_").replace("(", "").replace(")", "")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    rollouts = VLLMRollouts(str(path), max_model_len=256, gpu_memory_utilization=0.2)
    lora = peft.get_peft_model(LlamaForCausalLM(config).eval(), peft.LoraConfig(
        r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    weights = list(model.state_dict().values())
    copies = [torch.empty_like(w) for w in weights]
    copy_seconds = []  # a yardstick for this machine's memory bandwidth: copy the weights once, in torch
    for _ in range(repeats + 1):
        start = time.perf_counter()
        for w, c in zip(weights, copies):
            c.copy_(w)
        copy_seconds.append(time.perf_counter() - start)
    del copies
    rows = []
    for variant, trainer_model in [("plain", model), ("lora r=8 q_proj,v_proj (merged)", lora)]:
        rollouts.load_weights(trainer_model)  # warm-up
        seconds = [rollouts.load_weights(trainer_model) for _ in range(repeats)]
        rows.append({"model": name, "variant": variant, "params": sum(p.numel() for p in model.parameters()),
                     "dtype": "float32", "seconds": seconds, "seconds_median": statistics.median(seconds),
                     "copy_weights_seconds_median": statistics.median(copy_seconds[1:]),
                     "logprob_max_abs_diff": logprob_diff(rollouts, trainer_model)})
    rollouts.close()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="load_weights calls per model (the median is reported)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import vllm

    tokenizer = train_tokenizer(sample_corpus())
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [row for name, config in configs(tokenizer).items()
                for row in measure(name, config, tokenizer, Path(tmp), args.repeats)]
    result = {"cpu_model": cpu_model(), "cpu_count": len(os.sched_getaffinity(0)),
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "vllm": vllm.__version__,
              "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},  # other work on the machine
              "repeats": args.repeats, "results": rows}
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
