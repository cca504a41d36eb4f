"""Reward model training (InstructGPT step 2).

The RM starts from the SFT policy with its unembedding replaced by a scalar head
(AutoModelForSequenceClassification, num_labels=1: TRL's RewardTrainer format). It reads
prompt + response as one string, or a conversation ending with the response's assistant
turn rendered with the chat template (rlhfkit.chat.reward_ids), and its reward is the
head at the last non-padding token: exactly how the server's Reward.Score reads it.

Preferences are rankings of two. All responses of a batch's prompts go through one
forward pass, and a ranking of K contributes all its C(K,2) pairs as one element
(InstructGPT: this trains on each comparison once per epoch instead of K-1 times, which
overfits). After training, a bias is measured so SFT demonstrations score 0 on average,
which keeps PPO's reward on a known scale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhfkit.hf import resolve_model

from . import distributed
from .common import TrainConfig, batched
from .data import read_jsonl, sft_pair
from .losses import masked_mean, pairwise_rm_loss, ranking_rm_loss
from .sequences import score_pairs
from .skeleton import LossModule, Run


@dataclass(kw_only=True)
class RMConfig(TrainConfig):
    """Train a reward model on preference pairs or K-wise rankings (JSONL)."""

    model: str = field(metadata={"help": "SFT checkpoint to start from (a directory or a Hub id); its LM head is replaced by a scalar head"})
    train_file: str = field(metadata={"help": "preferences {prompt, chosen, rejected[, margin]} or rankings {prompt, responses: [best, ..., worst]}, text or conversations (TRL's formats, the implicit-prompt {chosen, rejected} too)"})
    output_dir: str = field(metadata={"help": "where to publish the reward model"})
    eval_file: str | None = field(default=None, metadata={"help": "held-out preferences or rankings: pairwise accuracy"})
    data_format: Literal["auto", "preferences", "rankings"] = field(default="auto", metadata={"help": "format of the data files (auto: by the first line's keys)"})
    sft_file: str | None = field(default=None, metadata={"help": "SFT demonstrations; after training, set the bias so they score 0 on average"})
    max_length: int = field(default=256, metadata={"help": "truncate prompt + response to this many tokens (keeping the end, where the reward is read)"})
    batch_size: int = field(default=16, metadata={"help": "prompts (pairs or rankings) per step (over all processes under torchrun)"})
    learning_rate: float = field(default=5e-5, metadata={"help": "peak learning rate (AdamW)"})
    use_margin: bool = field(default=True, metadata={"help": "use a preference line's 'margin' (Llama 2) when present"})
    center_coef: float = field(default=0.0, metadata={"help": "penalise the rewards' offset: coef * mean((r_c + r_r)^2) (TRL center_rewards_coefficient)"})

def read_rankings(path: str, data_format: str) -> list[dict]:
    """Either format as {"prompt", "responses": [best, ...], "margin": float | None}; the
    prompt text or a conversation, each response text or a list of messages."""
    if data_format == "auto":
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
        data_format = "rankings" if '"responses"' in first else "preferences"
    records = read_jsonl(path, data_format)
    if data_format == "rankings":
        return [{"prompt": r["prompt"], "responses": r["responses"], "margin": None} for r in records]
    return [{"prompt": r["prompt"], "responses": [r["chosen"], r["rejected"]], "margin": r.get("margin")}
            for r in records]


def group_rewards(model, tokenizer, groups: list[dict], max_length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over every response of every group: rewards [B, Kmax] and mask."""
    flat = score_pairs(model, tokenizer, [(g["prompt"], r) for g in groups for r in g["responses"]], max_length, device)
    k_max = max(len(g["responses"]) for g in groups)
    rewards = torch.zeros(len(groups), k_max, device=device)
    mask = torch.zeros(len(groups), k_max, dtype=torch.bool, device=device)
    start = 0
    for i, g in enumerate(groups):
        k = len(g["responses"])
        rewards[i, :k], mask[i, :k] = flat[start:start + k], True
        start += k
    return rewards, mask


def rm_loss(rewards: torch.Tensor, mask: torch.Tensor, margins: list, center_coef: float) -> torch.Tensor:
    if mask.shape[1] == 2 and bool(mask.all()):  # all pairs: the pairwise loss, with margins
        margin = None
        if any(m is not None for m in margins):
            margin = torch.tensor([m or 0.0 for m in margins], dtype=rewards.dtype, device=rewards.device)
        return pairwise_rm_loss(rewards[:, 0], rewards[:, 1], margin, center_coef)
    loss = ranking_rm_loss(rewards, mask)
    if center_coef:
        loss = loss + center_coef * masked_mean(rewards ** 2, mask)
    return loss


def pair_accuracy(rewards: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """(fraction of ordered pairs i < j with r_i > r_j, ties counting ½; number of pairs)."""
    k = mask.shape[1]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=mask.device), diagonal=1)
    pairs = upper & mask[:, :, None] & mask[:, None, :]
    diff = rewards[:, :, None] - rewards[:, None, :]
    wins = (diff > 0).float() + 0.5 * (diff == 0).float()
    n = int(pairs.sum())
    return float((wins * pairs).sum()) / max(n, 1), n


@torch.no_grad()
def evaluate(model, tokenizer, groups, config: RMConfig, device) -> dict:
    model.eval()
    correct, pairs, loss_sum = 0.0, 0, 0.0
    for chunk in batched(distributed.shard(groups), config.batch_size):
        rewards, mask = group_rewards(model, tokenizer, chunk, config.max_length, device)
        acc, n = pair_accuracy(rewards, mask)
        correct, pairs = correct + acc * n, pairs + n
        loss_sum += ranking_rm_loss(rewards, mask).item() * len(chunk)
    model.train()
    correct, pairs, loss_sum = distributed.all_sum([correct, pairs, loss_sum])
    return {"eval_accuracy": correct / max(pairs, 1), "eval_loss": loss_sum / len(groups)}


@torch.no_grad()
def mean_reward(model, tokenizer, records: list[dict], config: RMConfig, device) -> float:
    model.eval()
    pairs = [sft_pair(r) for r in records]
    total = sum(score_pairs(model, tokenizer, chunk, config.max_length, device).sum().item()
                for chunk in batched(distributed.shard(pairs), config.batch_size))
    [total] = distributed.all_sum([total])
    return total / len(pairs)


def micro_loss(micro, batch, *, model, tokenizer, config: RMConfig, device):
    """The micro-batch's share of the batch's mean loss, and its rewards for the log."""
    rewards, mask = group_rewards(model, tokenizer, micro, config.max_length, device)
    part = rm_loss(rewards, mask, [g["margin"] for g in micro], config.center_coef) * len(micro) / len(batch)
    return part, {"rewards": rewards.detach(), "mask": mask}


def train_stats(batch, stats: list[dict], metrics: dict) -> dict:
    """Pairwise accuracy and rewards over every rank's groups of the step's batch."""
    counted = [pair_accuracy(s["rewards"], s["mask"]) for s in stats]
    correct, pairs = distributed.all_sum([sum(a * n for a, n in counted), sum(n for _, n in counted)])
    acc = correct / max(1, pairs)
    best = torch.cat(distributed.gather([s["rewards"][:, 0] for s in stats]))
    scored = torch.cat(distributed.gather([s["rewards"][s["mask"]] for s in stats]))
    metrics["train_accuracy"] = acc
    return {"accuracy": acc, "reward_best": best.mean().item(), "reward_mean": scored.mean().item()}


def train_rm(config: RMConfig) -> dict:
    """Train, publish the reward model, return the final metrics. Under torchrun each rank
    trains on its slice of every batch of `batch_size` groups (see distributed.py)."""
    run = Run(config, "rm")
    model_path = resolve_model(config.model, config.revision)  # a directory or a Hub id
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token_id is None:
        raise ValueError(f"{config.model}: the tokenizer has no pad token; the RM finds the last token by padding")
    model = run.load(AutoModelForSequenceClassification, model_path, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id

    train = read_rankings(config.train_file, config.data_format)
    evals = read_rankings(config.eval_file, config.data_format) if config.eval_file else []
    if not config.use_margin:
        for g in train:
            g["margin"] = None
    run.prepare(LossModule(partial(micro_loss, tokenizer=tokenizer, config=config, device=run.device), model=model),
                config.total_steps(len(train)))
    run.metrics.update(train_groups=len(train), eval_groups=len(evals))

    run.fit(train, train_stats=train_stats,
            evaluate=(lambda: evaluate(model, tokenizer, evals, config, run.device)) if evals else None)

    # Llama's score head has no bias parameter, so the offset travels as metadata:
    # served or PPO rewards are `reward + reward_bias` (0 when no SFT file is given).
    reward_bias = 0.0
    if config.sft_file:
        with run.inference():
            reward_bias = -mean_reward(model, tokenizer, read_jsonl(config.sft_file, "sft"), config, run.device)
    model.config.reward_bias = reward_bias
    run.metrics.update(reward_bias=reward_bias)
    run.publish(model, tokenizer, data_files=[config.train_file] + ([config.sft_file] if config.sft_file else []),
                extra={"reward_bias": reward_bias})
    return run.metrics
