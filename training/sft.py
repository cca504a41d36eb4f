"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

Each example is prompt + completion + EOS, or a conversation rendered with the model's chat
template (rlhfkit.chat); only the completion (the assistant turns, each through its
end-of-turn token) is trained on: the prompt is given, not predicted. The loss is the mean negative log-prob per trained
token, computed by the shared kernel straight from the last hidden states and the LM head
weight, so the [tokens, vocab] logits never exist in full.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhfkit.hf import resolve_model

from . import distributed
from .checkpoint import publish_checkpoint
from rlhfkit.chat import prompt_ids, render_conversation, reply_ids

from .common import TrainConfig, batched, pad_right, pick_device, seed_everything
from .data import fingerprint_files, read_jsonl
from .ops import fused_linear_logprobs

IGNORE = -100


@dataclass(kw_only=True)
class SFTConfig(TrainConfig):
    """Fine-tune a causal LM on {"prompt", "completion"} JSONL."""

    model: str = field(metadata={"help": "checkpoint to start from: a local directory or a Hugging Face Hub id (see --revision)"})
    train_file: str = field(metadata={"help": "SFT JSONL: {\"prompt\", \"completion\"} per line (text), or conversations: {\"messages\"} or {\"prompt\": [msgs], \"completion\": [msgs]}"})
    output_dir: str = field(metadata={"help": "where to publish the fine-tuned checkpoint"})
    eval_file: str | None = field(default=None, metadata={"help": "held-out SFT JSONL for the eval loss"})
    max_length: int = field(default=256, metadata={"help": "truncate prompt + completion + EOS to this many tokens"})


def tokenize_sft(tokenizer, records: list[dict], max_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per record, rendered by rlhfkit.chat as the server renders them:
    labels are IGNORE except on what the policy is to produce. Text: the prompt's tokens,
    then the completion's and EOS (encoded separately, as at generation time the completion
    follows the prompt's tokens). A conversation: every assistant turn (after the prompt,
    for prompt/completion records) through its end-of-turn token. Records whose trained
    tokens do not fit at all are dropped."""
    examples = []
    for r in records:
        if "messages" in r:
            ids, mask = render_conversation(tokenizer, r["messages"])
            labels = [t if m else IGNORE for t, m in zip(ids, mask)]
        else:
            prompt = prompt_ids(tokenizer, r["prompt"])
            reply = reply_ids(tokenizer, r["prompt"], r["completion"])
            ids, labels = prompt + reply, [IGNORE] * len(prompt) + reply
        ids, labels = ids[:max_length], labels[:max_length]
        if any(label != IGNORE for label in labels[1:]):
            examples.append((ids, labels))
    return examples


def collate(examples, pad_id: int) -> dict[str, torch.Tensor]:
    input_ids = pad_right([ids for ids, _ in examples], pad_id)
    labels = pad_right([lab for _, lab in examples], IGNORE)
    attention_mask = pad_right([[1] * len(ids) for ids, _ in examples], 0)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def token_logprobs(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """log π(token_t | tokens_<t) for t >= 1, [B, T-1], 0 where labels[:, 1:] is IGNORE.
    From the last hidden states and the LM head (models that rescale or soft-cap their
    logits, e.g. Gemma 2, would need that applied here)."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    weight = model.get_output_embeddings().weight
    return fused_linear_logprobs(hidden[:, :-1], weight, labels[:, 1:], ignore_index=IGNORE)


def sft_loss(model, batch, total_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed NLL of the batch's trained tokens over `total_tokens` (default: the batch's
    own count), so micro-batch losses add up to the mean over the whole batch."""
    logp = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    n_tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
    return -logp.sum() / max(total_tokens or n_tokens, 1), n_tokens


def trained_tokens(examples) -> int:
    return sum(sum(label != IGNORE for label in labels[1:]) for _, labels in examples)


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
    rng = seed_everything(config.seed)
    device = distributed.init(pick_device(config.device))
    model_path = resolve_model(config.model, config.revision)  # a directory or a Hub id
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    model.train()
    distributed.broadcast_parameters(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    train = tokenize_sft(tokenizer, read_jsonl(config.train_file, "sft"), config.max_length)
    evals = tokenize_sft(tokenizer, read_jsonl(config.eval_file, "sft"), config.max_length) if config.eval_file else []
    if not train:
        raise ValueError(f"{config.train_file}: no example has a completion token within max_length={config.max_length}")
    total_steps = config.total_steps(len(train))
    optimizer, scheduler = config.optimizer(model, total_steps)
    log = config.metrics_log()
    metrics: dict = {"train_examples": len(train), "eval_examples": len(evals)}

    step, tokens, start = 0, 0, time.time()
    bar = tqdm(total=total_steps, desc="sft", disable=not config.progress or not distributed.is_main())
    while step < total_steps:
        for chunk in batched(train, config.batch_size, rng):
            optimizer.zero_grad(set_to_none=True)
            total, loss = trained_tokens(chunk), 0.0  # the whole batch's tokens normalise every rank's loss
            for micro in batched(distributed.shard(chunk), config.micro_batch_size or len(chunk)):
                part, _ = sft_loss(model, {k: v.to(device) for k, v in collate(micro, pad_id).items()}, total)
                part.backward()
                loss = loss + part.detach()
            distributed.sum_gradients(model.parameters())
            [loss] = distributed.all_sum([loss])
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm or float("inf"))
            optimizer.step()
            scheduler.step()
            step, tokens = step + 1, tokens + total
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            row = {}
            if step % config.log_every == 0 or step == total_steps:
                row = {"loss": loss, "grad_norm": grad_norm.item(), "lr": scheduler.get_last_lr()[0],
                       "tokens": tokens}
                metrics["train_loss"] = loss
            if evals and ((config.eval_every and step % config.eval_every == 0) or step == total_steps):
                row["eval_loss"] = metrics["eval_loss"] = evaluate(model, evals, config.batch_size, pad_id, device)
            if row:
                log.log(step, **row)
            if step >= total_steps:
                break
    bar.close()
    metrics.update(steps=step, tokens=tokens, seconds=round(time.time() - start, 2))
    plot = log.close()
    if distributed.is_main():
        publish_checkpoint(model, tokenizer, config.output_dir, stage="sft", parent=config.model,
                           data_fingerprint=fingerprint_files([config.train_file]), metrics=metrics,
                           overwrite=config.overwrite,
                           extra={"config": asdict(config), "metrics_file": str(log.path), "plot": str(plot)})
    distributed.barrier()  # the other ranks return once the checkpoint is there
    return metrics
