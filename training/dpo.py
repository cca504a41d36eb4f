"""Direct preference optimisation (Rafailov et al. 2023): the policy learns from preference
pairs directly, with the SFT model as the reference and no reward model or rollouts.

A response's log-prob is the sum over its tokens and EOS (encoded after the prompt, as in
SFT), computed with the shared kernel for both policy and reference. The reference's
log-probs are computed once, before training, for the pairs the run will draw, so the
reference model is freed before the policy's first step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhfkit.hf import resolve_model

from . import distributed
from .common import TrainConfig, batched
from .data import read_jsonl
from .losses import dpo_loss
from .sequences import IGNORE, collate, pad_id_of, token_logprobs, tokenize_sft
from .skeleton import LossModule, Run


@dataclass(kw_only=True)
class DPOConfig(TrainConfig):
    """Fine-tune a policy on preference pairs with DPO (sigmoid, IPO or hinge loss)."""

    model: str = field(metadata={"help": "policy to start from (usually the SFT checkpoint): a directory or a Hub id"})
    train_file: str = field(metadata={"help": "preferences JSONL, one {prompt, chosen, rejected} per line"})
    output_dir: str = field(metadata={"help": "where to publish the policy"})
    ref_model: str | None = field(default=None, metadata={"help": "reference policy (default: --model)"})
    eval_file: str | None = field(default=None, metadata={"help": "held-out preferences: implicit-reward accuracy"})
    beta: float = field(default=0.1, metadata={"help": "strength of the KL to the reference (higher: stay closer)"})
    loss_type: Literal["sigmoid", "ipo", "hinge"] = field(default="sigmoid", metadata={"help": "sigmoid (DPO), ipo, hinge (SLiC)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "assumed label-flip rate (conservative DPO; sigmoid only)"})
    max_length: int = field(default=256, metadata={"help": "truncate prompt + response + EOS to this many tokens"})
    batch_size: int = field(default=16, metadata={"help": "pairs per step (over all processes under torchrun)"})
    learning_rate: float = field(default=5e-6, metadata={"help": "peak learning rate (AdamW)"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "fraction of steps of linear warmup"})

    def __post_init__(self):
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


def tokenize_pairs(tokenizer, records: list[dict], max_length: int) -> list[dict]:
    """Per pair: the chosen and rejected (input_ids, labels), prompt masked. Pairs where
    either response is cut away entirely are dropped."""
    pairs = []
    for r in records:
        chosen = tokenize_sft(tokenizer, [{"prompt": r["prompt"], "completion": r["chosen"]}], max_length)
        rejected = tokenize_sft(tokenizer, [{"prompt": r["prompt"], "completion": r["rejected"]}], max_length)
        if chosen and rejected:
            pairs.append({"chosen": chosen[0], "rejected": rejected[0]})
    return pairs


def sequence_logps(model, pairs: list[dict], pad_id: int, device, average: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (or, for IPO, per-token averaged) response log-probs, chosen and rejected
    in one forward pass: ([B], [B])."""
    batch = {k: v.to(device) for k, v in collate([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                                                  pad_id).items()}
    logp = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    total = logp.sum(-1)
    if average:
        total = total / (batch["labels"][:, 1:] != IGNORE).sum(-1).clamp(min=1)
    return total[:len(pairs)], total[len(pairs):]


@torch.no_grad()
def add_reference_logps(ref_model, pairs: list[dict], batch_size: int, pad_id: int, device, average: bool) -> None:
    """Each rank scores its share of the pairs; then every rank has them all."""
    ref_model.eval()
    chosen_logps, rejected_logps = [0.0] * len(pairs), [0.0] * len(pairs)
    for rows in batched(distributed.shard(list(range(len(pairs)))), batch_size):
        chosen, rejected = sequence_logps(ref_model, [pairs[i] for i in rows], pad_id, device, average)
        for i, c, r in zip(rows, chosen.tolist(), rejected.tolist()):
            chosen_logps[i], rejected_logps[i] = c, r
    summed = distributed.all_sum(chosen_logps + rejected_logps)  # each pair is scored on one rank, 0 on the others
    for p, c, r in zip(pairs, summed[:len(pairs)], summed[len(pairs):]):
        p["ref_chosen"], p["ref_rejected"] = c, r


def pair_loss(model, chunk, config: DPOConfig, pad_id: int, device):
    chosen, rejected = sequence_logps(model, chunk, pad_id, device, average=config.loss_type == "ipo")
    ref_chosen = torch.tensor([p["ref_chosen"] for p in chunk], device=device)
    ref_rejected = torch.tensor([p["ref_rejected"] for p in chunk], device=device)
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, config.beta, config.loss_type, config.label_smoothing)


@torch.no_grad()
def evaluate(model, pairs, config: DPOConfig, pad_id: int, device) -> dict:
    model.eval()
    loss_sum, correct, margin_sum = 0.0, 0.0, 0.0
    for chunk in batched(distributed.shard(pairs), config.batch_size):
        loss, chosen_r, rejected_r = pair_loss(model, chunk, config, pad_id, device)
        loss_sum += loss.item() * len(chunk)
        correct += (chosen_r > rejected_r).float().sum().item()
        margin_sum += (chosen_r - rejected_r).sum().item()
    model.train()
    loss_sum, correct, margin_sum = distributed.all_sum([loss_sum, correct, margin_sum])
    n = len(pairs)
    return {"eval_loss": loss_sum / n, "eval_reward_accuracy": correct / n, "eval_reward_margin": margin_sum / n}


def micro_loss(micro, batch, *, model, config: DPOConfig, pad_id: int, device):
    """The micro-batch's share of the batch's mean loss, and its implicit rewards."""
    part, chosen_r, rejected_r = pair_loss(model, micro, config, pad_id, device)
    return part * len(micro) / len(batch), {"chosen": chosen_r.detach(), "rejected": rejected_r.detach()}


def train_stats(batch, stats: list[dict], metrics: dict) -> dict:
    """Implicit-reward accuracy and margins over every rank's pairs of the step's batch."""
    chosen_r = torch.cat(distributed.gather([s["chosen"] for s in stats]))
    rejected_r = torch.cat(distributed.gather([s["rejected"] for s in stats]))
    row = {"reward_accuracy": (chosen_r > rejected_r).float().mean().item(),
           "reward_margin": (chosen_r - rejected_r).mean().item(), "reward_chosen": chosen_r.mean().item(),
           "reward_rejected": rejected_r.mean().item()}
    metrics["train_reward_accuracy"] = row["reward_accuracy"]
    return row


def train_dpo(config: DPOConfig) -> dict:
    """Train, publish the policy, return the final metrics. Under torchrun each rank trains
    on its slice of every batch of `batch_size` pairs (see distributed.py)."""
    run = Run(config, "dpo")
    model_path = resolve_model(config.model, config.revision)  # a directory or a Hub id
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    pad_id = pad_id_of(tokenizer)
    average = config.loss_type == "ipo"  # IPO's target 1/(2β) is on a per-token scale (as in TRL)

    train = tokenize_pairs(tokenizer, read_jsonl(config.train_file, "preferences"), config.max_length)
    evals = tokenize_pairs(tokenizer, read_jsonl(config.eval_file, "preferences"), config.max_length) if config.eval_file else []
    if not train:
        raise ValueError(f"{config.train_file}: no pair fits in max_length={config.max_length}")
    ref_path = config.ref_model or config.model
    # The reference scores, before training, only the pairs the run will draw (max_steps may
    # stop it long before an epoch) and the eval pairs.
    scored = [train[i] for i in run.upcoming(train)] + evals
    start = time.time()
    if config.lora_r and not config.ref_model:
        # The reference is the base weights: the policy itself, its adapter not yet trained.
        model = run.load(AutoModelForCausalLM, model_path)
        with model.disable_adapter(), run.autocast():
            add_reference_logps(model, scored, config.batch_size, pad_id, run.device, average)
        model.train()
    else:
        ref_model = run.load(AutoModelForCausalLM, resolve_model(config.ref_model) if config.ref_model else model_path,
                             trainable=False)
        with run.inference():
            add_reference_logps(ref_model, scored, config.batch_size, pad_id, run.device, average)
        del ref_model
        model = run.load(AutoModelForCausalLM, model_path)
    reference_seconds = round(time.time() - start, 2)
    run.prepare(LossModule(partial(micro_loss, config=config, pad_id=pad_id, device=run.device), model=model),
                config.total_steps(len(train)))
    run.metrics.update(train_pairs=len(train), eval_pairs=len(evals), reference_pairs=len(scored))

    run.fit(train, train_stats=train_stats,
            evaluate=(lambda: evaluate(model, evals, config, pad_id, run.device)) if evals else None)
    # `seconds` counts the reference pass too: it is training work (TRL does it inside its steps)
    run.metrics["seconds"] = round(run.metrics["seconds"] + reference_seconds, 2)
    run.publish(model, tokenizer, data_files=[config.train_file],
                extra={"reference": str(ref_path), "reference_seconds": reference_seconds})
    return run.metrics
