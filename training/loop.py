"""The annotators' side of the loop on the bundled task: sample a policy, rank its samples
(InstructGPT's labeling step), and judge policies by the hidden utility the annotators
follow: gold utility, the annotators' win rate of one policy over another, and the KL
between them. `rlhfkit quickstart` (training/quickstart.py) strings these together with
the trainers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from . import task
from rlhfkit.chat import end_token_ids, prompt_ids
from rlhfkit.hf import resolve_model

from .common import batched, pick_device
from .data import read_jsonl, write_jsonl
from .sequences import decode_responses, generate, pad_id_of, response_logprobs, response_mask_of


def load_policy(policy_dir: str | Path, device="cpu"):
    """A policy directory or Hub id (rlhfkit.hf.resolve_model) and its tokenizer."""
    path = resolve_model(str(policy_dir))
    tokenizer = AutoTokenizer.from_pretrained(path)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return policy, tokenizer


@torch.no_grad()
def sample_batches(policy, tokenizer, prompts: list[str], temperature: float, generator, device,
                   max_new_tokens: int = 16, batch_size: int = 64):
    """Yield (prompts_text, prompt_ids, prompt_mask, response_ids, response_mask, texts) per batch:
    one response per prompt (repeat a prompt for more), sampled the way PPO's rollouts are
    (greedy at temperature 0)."""
    end_ids = end_token_ids(tokenizer, policy.generation_config)
    pad_id = pad_id_of(tokenizer)
    for chunk in batched(prompts, batch_size):
        ids, mask, responses = generate(policy, [prompt_ids(tokenizer, p) for p in chunk], max_new_tokens, temperature,
                                        end_ids, pad_id, generator, device)
        response_mask = response_mask_of(responses, end_ids)
        yield chunk, ids, mask, responses, response_mask, decode_responses(tokenizer, responses, response_mask)


def sample_texts(policy, tokenizer, prompts: list[str], temperature: float, seed: int, device, **kwargs) -> list[str]:
    generator = torch.Generator(device=device).manual_seed(seed)
    return [t for *_, texts in sample_batches(policy, tokenizer, prompts, temperature, generator, device, **kwargs)
            for t in texts]


def gold_utility(policy_dir: str | Path, prompts: list[str], temperature: float = 0.0, max_new_tokens: int = 16,
                 seed: int = 0, device="cpu") -> float:
    """Mean task.utility of the policy's responses (greedy at temperature 0)."""
    policy, tokenizer = load_policy(policy_dir, device)
    texts = sample_texts(policy, tokenizer, prompts, temperature, seed, device, max_new_tokens=max_new_tokens)
    return sum(task.utility(p, t) for p, t in zip(prompts, texts)) / len(prompts)


def win_rate(policy_dir: str | Path, baseline_dir: str | Path, prompts: list[str], samples_per_prompt: int = 4,
             temperature: float = 1.0, annotator_temperature: float = 0.1, seed: int = 0, device="cpu",
             max_new_tokens: int = 16) -> dict:
    """How often the annotators prefer the policy's response to the baseline's, the way
    InstructGPT reports its win rate over GPT-3: each prompt gets samples_per_prompt
    responses from each policy, paired in order, and each pair counts the probability that
    a noisy annotator picks the policy's response, σ((u_policy - u_baseline) / τ) (an exact
    tie is ½). That is the expected vote, so no coin flips add noise to the estimate.
    Also returns the noiseless wins / ties / losses, each policy's mean utility and the
    fraction of its responses wrapped in chatter."""
    repeated = [p for p in prompts for _ in range(samples_per_prompt)]
    texts, utilities, chatty = [], [], []
    for directory in (policy_dir, baseline_dir):
        policy, tokenizer = load_policy(directory, device)
        texts.append(sample_texts(policy, tokenizer, repeated, temperature, seed, device, max_new_tokens=max_new_tokens))
        utilities.append([task.utility(p, t) for p, t in zip(repeated, texts[-1])])
        chatty.append(sum(task.strip_chatter(t.split())[0] for t in texts[-1]) / len(repeated))
    votes = [task.preference_probability(p, a, b, annotator_temperature) for p, a, b in zip(repeated, *texts)]
    deltas = [a - b for a, b in zip(*utilities)]
    n = len(deltas)
    return {"win_rate": sum(votes) / n, "wins": sum(d > 0 for d in deltas), "ties": sum(d == 0 for d in deltas),
            "losses": sum(d < 0 for d in deltas), "pairs": n,
            "utility_policy": sum(utilities[0]) / n, "utility_baseline": sum(utilities[1]) / n,
            "chatty_policy": chatty[0], "chatty_baseline": chatty[1]}


@torch.no_grad()
def mean_kl(policy_dir: str | Path, reference_dir: str | Path, prompts: list[str], temperature: float = 1.0,
            seed: int = 0, device="cpu", max_new_tokens: int = 16) -> float:
    """KL(policy || reference) per response in nats: the mean over the policy's own samples of
    Σ_t log π(y_t) - log π_ref(y_t) (the k1 estimate PPO penalises, unbiased for the
    sequence KL), log-probs through the fused kernel."""
    policy, tokenizer = load_policy(policy_dir, device)
    reference, _ = load_policy(reference_dir, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    total = 0.0
    for _, ids, mask, responses, response_mask, _ in sample_batches(policy, tokenizer, prompts, temperature,
                                                                     generator, device, max_new_tokens):
        logprobs = response_logprobs(policy, ids, mask, responses, response_mask, temperature)
        ref_logprobs = response_logprobs(reference, ids, mask, responses, response_mask, temperature)
        total += ((logprobs - ref_logprobs) * response_mask).sum().item()
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


def label_policy_samples(config: LabelConfig) -> dict:
    """The InstructGPT labeling step: rankings of the policy's own samples, so the reward
    model learns on the distribution PPO will visit. Duplicate samples are merged; prompts
    left with one distinct response are skipped."""
    device = pick_device(config.device)
    policy, tokenizer = load_policy(config.policy, device)
    rng = random.Random(config.seed)
    prompts = [r["prompt"] for r in read_jsonl(config.prompts_file, "prompts")]
    texts = sample_texts(policy, tokenizer, [p for p in prompts for _ in range(config.k)], config.temperature,
                         config.seed, device, max_new_tokens=config.max_new_tokens)
    records = []
    for i, prompt in enumerate(prompts):
        distinct = list(dict.fromkeys(texts[i * config.k:(i + 1) * config.k]))
        if len(distinct) >= 2:
            ranking = task.annotator_ranking(prompt, distinct, rng, config.annotator_temperature)
            records.append({"prompt": prompt, "responses": ranking})
    write_jsonl(config.output_file, records)
    return {"rankings": len(records), "skipped": len(prompts) - len(records), "output_file": config.output_file}


