"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

Each example is prompt + completion + EOS, or a conversation rendered with the model's chat
template (rlhfkit.chat); only the completion (the assistant turns, each through its
end-of-turn token) is trained on: the prompt is given, not predicted. The loss is the mean negative log-prob per trained
token, computed by the shared kernel straight from the last hidden states and the LM head
weight, so the [tokens, vocab] logits never exist in full.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhfkit.hf import resolve_model

from . import distributed
from .common import TrainConfig, batched
from .data import read_jsonl
from .sequences import collate, pad_id_of, sft_loss, tokenize_sft, trained_tokens
from .skeleton import LossModule, Run


@dataclass(kw_only=True)
class SFTConfig(TrainConfig):
    """Fine-tune a causal LM on {"prompt", "completion"} JSONL."""

    model: str = field(metadata={"help": "checkpoint to start from: a local directory or a Hugging Face Hub id (see --revision)"})
    train_file: str = field(metadata={"help": "SFT JSONL: {\"prompt\", \"completion\"} per line (text), or conversations: {\"messages\"} or {\"prompt\": [msgs], \"completion\": [msgs]}"})
    output_dir: str = field(metadata={"help": "where to publish the fine-tuned checkpoint"})
    eval_file: str | None = field(default=None, metadata={"help": "held-out SFT JSONL for the eval loss"})
    max_length: int = field(default=256, metadata={"help": "truncate prompt + completion + EOS to this many tokens"})


def micro_loss(micro, batch, *, model, pad_id: int, device):
    """The micro-batch's summed NLL over the whole batch's trained tokens."""
    part, _ = sft_loss(model, {k: v.to(device) for k, v in collate(micro, pad_id).items()}, trained_tokens(batch))
    return part, {}


@torch.no_grad()
def evaluate(model, examples, batch_size: int, pad_id: int, device) -> float:
    """Mean NLL per completion token over `examples` (each rank scores its share)."""
    model.eval()
    total, count = 0.0, 0
    for chunk in batched(distributed.shard(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items()}
        loss, n = sft_loss(model, batch)
        total, count = total + loss.item() * n, count + n
    model.train()
    total, count = distributed.all_sum([total, count])
    return total / max(count, 1)


def train_sft(config: SFTConfig) -> dict:
    """Train, publish the checkpoint, return the final metrics. Under torchrun each rank
    trains on its slice of every batch of `batch_size` examples (see distributed.py)."""
    run = Run(config, "sft")
    model_path = resolve_model(config.model, config.revision)  # a directory or a Hub id
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = run.load(AutoModelForCausalLM, model_path)
    pad_id = pad_id_of(tokenizer)

    train = tokenize_sft(tokenizer, read_jsonl(config.train_file, "sft"), config.max_length)
    evals = tokenize_sft(tokenizer, read_jsonl(config.eval_file, "sft"), config.max_length) if config.eval_file else []
    if not train:
        raise ValueError(f"{config.train_file}: no example has a completion token within max_length={config.max_length}")
    run.prepare(LossModule(partial(micro_loss, pad_id=pad_id, device=run.device), model=model),
                config.total_steps(len(train)))
    run.metrics.update(train_examples=len(train), eval_examples=len(evals))
    run.metrics.setdefault("tokens", 0)

    run.fit(train, train_stats=lambda chunk, stats, metrics: {"tokens": metrics["tokens"]},
            evaluate=(lambda: {"eval_loss": evaluate(model, evals, config.batch_size, pad_id, run.device)}) if evals else None,
            on_batch=lambda chunk: run.metrics.update(tokens=run.metrics["tokens"] + trained_tokens(chunk)))
    run.publish(model, tokenizer, data_files=[config.train_file])
    return run.metrics
