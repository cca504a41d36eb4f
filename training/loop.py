"""The whole InstructGPT loop on the bundled task, in one command, with the gold score.

    data -> SFT -> label SFT samples -> RM -> PPO (and DPO) -> a model store the server can serve

Each policy is judged by the task's hidden utility (what the simulated annotators prefer),
greedy and sampled, on held-out prompts, so one can see what each stage buys. The store's
layout is the server's (ARCHITECTURE.md, Checkpoints): <store>/sft-1, rm-1, ppo-1, dpo-1.
Without --model, a tiny random Llama is built first (nothing is downloaded).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import task
from .common import batched, encode, pick_device
from .data import read_jsonl, write_jsonl
from .dpo import DPOConfig, train_dpo
from .ppo import PPOConfig, decode_responses, generate, response_mask_of, train_ppo
from .rm import RMConfig, train_rm
from .sft import SFTConfig, train_sft


@dataclass
class LoopConfig:
    """Run data -> SFT -> label -> RM -> PPO (-> DPO) on the bundled task and report the gold utility of each policy."""

    workdir: str = field(metadata={"help": "data/, store/ (the checkpoints) and runs/ (metrics) go here"})
    model: str | None = field(default=None, metadata={"help": "policy to start from (default: build a tiny random Llama)"})
    hidden_size: int = field(default=128, metadata={"help": "tiny model width (without --model)"})
    num_layers: int = field(default=4, metadata={"help": "tiny model depth (without --model)"})
    sft_steps: int = field(default=300, metadata={"help": "SFT steps"})
    sft_learning_rate: float = field(default=2e-3, metadata={"help": "SFT peak learning rate"})
    rm_epochs: float = field(default=1.0, metadata={"help": "reward model epochs over the preference pairs"})
    rm_learning_rate: float = field(default=3e-4, metadata={"help": "reward model peak learning rate"})
    ppo_iterations: int = field(default=200, metadata={"help": "PPO iterations (0: skip PPO)"})
    ppo_learning_rate: float = field(default=1e-4, metadata={"help": "PPO learning rate"})
    kl_coef: float = field(default=0.1, metadata={"help": "PPO KL penalty"})
    dpo: bool = field(default=True, metadata={"help": "also train a DPO policy from the SFT one"})
    dpo_learning_rate: float = field(default=1e-4, metadata={"help": "DPO peak learning rate"})
    beta: float = field(default=0.1, metadata={"help": "DPO beta"})
    k: int = field(default=4, metadata={"help": "SFT samples ranked per prompt for the reward model"})
    batch_size: int = field(default=32, metadata={"help": "batch size of every stage"})
    n_sft: int = field(default=2000, metadata={"help": "demonstrations"})
    n_pairs: int = field(default=2000, metadata={"help": "preference pairs"})
    n_prompts: int = field(default=500, metadata={"help": "PPO prompts"})
    n_eval: int = field(default=200, metadata={"help": "held-out prompts for the gold utility"})
    seed: int = field(default=0, metadata={"help": "seed of the data and the runs"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})


@torch.no_grad()
def gold_utility(policy_dir: str | Path, prompts: list[str], temperature: float = 0.0, max_new_tokens: int = 16,
                 seed: int = 0, device="cpu") -> float:
    """Mean task.utility of the policy's responses (greedy at temperature 0)."""
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32).to(device).eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    total = 0.0
    for chunk in batched(prompts, 64):
        _, _, responses = generate(policy, [encode(tokenizer, p) for p in chunk], max_new_tokens, temperature, eos_id,
                                   pad_id, generator, device)
        texts = decode_responses(tokenizer, responses, response_mask_of(responses, eos_id), eos_id)
        total += sum(task.utility(p, t) for p, t in zip(chunk, texts))
    return total / len(prompts)


@dataclass
class EvalConfig:
    """Score a policy on the bundled task's prompts with the hidden gold utility."""

    policy: str = field(metadata={"help": "policy checkpoint"})
    prompts_file: str = field(metadata={"help": "prompts JSONL of the bundled task"})
    temperature: float = field(default=0.0, metadata={"help": "0: greedy; else sampled with this temperature"})
    max_new_tokens: int = field(default=16, metadata={"help": "response length limit"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})


def evaluate_policy(config: EvalConfig) -> dict:
    prompts = [r["prompt"] for r in read_jsonl(config.prompts_file, "prompts")]
    score = gold_utility(config.policy, prompts, config.temperature, config.max_new_tokens, config.seed,
                         str(pick_device(config.device)))
    return {"gold_utility": score, "prompts": len(prompts), "temperature": config.temperature}


@dataclass
class LabelConfig:
    """Sample K responses per prompt from a policy and have the bundled task's annotators rank them."""

    policy: str = field(metadata={"help": "policy checkpoint to sample from (usually the SFT one)"})
    prompts_file: str = field(metadata={"help": "prompts JSONL of the bundled task"})
    output_file: str = field(metadata={"help": "rankings JSONL to write, {prompt, responses: [best, ..., worst]}"})
    k: int = field(default=4, metadata={"help": "responses per prompt (InstructGPT: 4 to 9)"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature"})
    max_new_tokens: int = field(default=16, metadata={"help": "response length limit"})
    annotator_temperature: float = field(default=0.1, metadata={"help": "annotator noise (0: noiseless)"})
    seed: int = field(default=0, metadata={"help": "seed of the samples and the annotators"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})

    def __post_init__(self):
        if self.k < 2:
            raise ValueError(f"k must be >= 2 to rank, got {self.k}")


@torch.no_grad()
def label_policy_samples(config: LabelConfig) -> dict:
    """The InstructGPT labeling step: rankings of the policy's own samples, so the reward
    model learns on the distribution PPO will visit. Duplicate samples are merged; prompts
    left with one distinct response are skipped."""
    device = pick_device(config.device)
    tokenizer = AutoTokenizer.from_pretrained(config.policy)
    policy = AutoModelForCausalLM.from_pretrained(config.policy, dtype=torch.float32).to(device).eval()
    generator = torch.Generator(device=device).manual_seed(config.seed)
    rng = random.Random(config.seed)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    prompts = [r["prompt"] for r in read_jsonl(config.prompts_file, "prompts")]
    records = []
    for chunk in batched(prompts, max(1, 64 // config.k)):
        repeated = [p for p in chunk for _ in range(config.k)]
        _, _, responses = generate(policy, [encode(tokenizer, p) for p in repeated], config.max_new_tokens,
                                   config.temperature, eos_id, pad_id, generator, device)
        texts = decode_responses(tokenizer, responses, response_mask_of(responses, eos_id), eos_id)
        for i, prompt in enumerate(chunk):
            distinct = list(dict.fromkeys(texts[i * config.k:(i + 1) * config.k]))
            if len(distinct) >= 2:
                ranking = task.annotator_ranking(prompt, distinct, rng, config.annotator_temperature)
                records.append({"prompt": prompt, "responses": ranking})
    write_jsonl(config.output_file, records)
    return {"rankings": len(records), "skipped": len(prompts) - len(records), "output_file": config.output_file}


def run_loop(config: LoopConfig) -> dict:
    work = Path(config.workdir)
    store, runs = work / "store", work / "runs"
    device = str(pick_device(config.device))
    files = {k: str(v) for k, v in task.write_task_data(
        work / "data", n_sft=config.n_sft, n_pairs=config.n_pairs, n_rankings=100, n_prompts=config.n_prompts,
        n_eval=config.n_eval, seed=config.seed).items()}
    base = config.model
    if base is None:
        from .tiny import make_tiny_checkpoint, sample_corpus, train_tokenizer

        tokenizer = train_tokenizer(sample_corpus() + task.all_task_texts(2000))
        base = str(make_tiny_checkpoint(work / "base", tokenizer=tokenizer, seed=config.seed,
                                        hidden_size=config.hidden_size, num_layers=config.num_layers))
    common = dict(batch_size=config.batch_size, seed=config.seed, device=config.device, progress=config.progress,
                  overwrite=True)
    eval_prompts = [r["prompt"] for r in read_jsonl(files["prompts_eval"], "prompts")]
    report: dict = {"stages": {}}

    def judge(name: str, policy_dir: str, metrics: dict, seconds: float):
        report["stages"][name] = {
            "checkpoint": policy_dir, "seconds": round(seconds, 1), "metrics": metrics,
            "gold_greedy": gold_utility(policy_dir, eval_prompts, 0.0, device=device),
            "gold_sampled": gold_utility(policy_dir, eval_prompts, 1.0, seed=config.seed, device=device)}
        print(f"[loop] {name}: gold utility greedy {report['stages'][name]['gold_greedy']:.3f}, "
              f"sampled {report['stages'][name]['gold_sampled']:.3f}", flush=True)

    start = time.time()
    sft = str(store / "sft-1")
    metrics = train_sft(SFTConfig(model=base, train_file=files["sft"], eval_file=files["sft_eval"], output_dir=sft,
                                  max_steps=config.sft_steps, learning_rate=config.sft_learning_rate,
                                  log_every=25, log_dir=str(runs / "sft-1"), **common))
    judge("sft", sft, metrics, time.time() - start)

    # Labeling (InstructGPT): the annotators rank K samples of the SFT policy per prompt, so
    # the RM learns on what PPO will visit; the task's synthetic pairs are mixed in as
    # rankings of two. Held out: noiseless rankings of SFT samples for other prompts.
    start = time.time()
    label = dict(policy=sft, k=config.k, seed=config.seed, device=config.device)
    label_policy_samples(LabelConfig(prompts_file=files["prompts"], output_file=str(work / "data" / "sft_rankings.jsonl"),
                                     **label))
    label_policy_samples(LabelConfig(prompts_file=files["prompts_eval"], annotator_temperature=0.0,
                                     output_file=str(work / "data" / "sft_rankings_eval.jsonl"), **label))
    rm_train = work / "data" / "rm_train.jsonl"
    write_jsonl(rm_train, read_jsonl(work / "data" / "sft_rankings.jsonl", "rankings")
                + [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]]}
                   for r in read_jsonl(files["preferences"], "preferences")])
    rm = str(store / "rm-1")
    metrics = train_rm(RMConfig(model=sft, train_file=str(rm_train), eval_file=str(work / "data" / "sft_rankings_eval.jsonl"),
                                data_format="rankings", sft_file=files["sft_eval"], output_dir=rm,
                                num_epochs=config.rm_epochs, learning_rate=config.rm_learning_rate, log_every=10,
                                log_dir=str(runs / "rm-1"), **common))
    report["stages"]["rm"] = {"checkpoint": rm, "seconds": round(time.time() - start, 1), "metrics": metrics}
    print(f"[loop] rm: pairwise accuracy on held-out SFT samples {metrics.get('eval_accuracy', float('nan')):.3f} "
          "(noiseless labels; tied pairs count ½)", flush=True)

    if config.ppo_iterations > 0:
        start = time.time()
        ppo = str(store / "ppo-1")
        ppo_common = {k: v for k, v in common.items() if k != "batch_size"}
        metrics = train_ppo(PPOConfig(model=sft, reward_model=rm, prompts_file=files["prompts"],
                                      eval_prompts_file=files["prompts_eval"], output_dir=ppo,
                                      num_iterations=config.ppo_iterations, rollout_batch_size=config.batch_size,
                                      minibatch_size=max(1, config.batch_size // 2), max_new_tokens=16,
                                      learning_rate=config.ppo_learning_rate, kl_coef=config.kl_coef,
                                      log_dir=str(runs / "ppo-1"), **ppo_common))
        judge("ppo", ppo, metrics, time.time() - start)

    if config.dpo:
        start = time.time()
        dpo = str(store / "dpo-1")
        metrics = train_dpo(DPOConfig(model=sft, train_file=files["preferences"], eval_file=files["preferences_eval"],
                                      output_dir=dpo, num_epochs=1.0, learning_rate=config.dpo_learning_rate,
                                      beta=config.beta, log_every=10, log_dir=str(runs / "dpo-1"), **common))
        judge("dpo", dpo, metrics, time.time() - start)

    (work / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return {name: {k: v for k, v in stage.items() if k != "metrics"} for name, stage in report["stages"].items()}

