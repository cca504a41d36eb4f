"""What the trainers share about sequences: tokenized examples and their batches, token
log-probs through the shared kernel, rollouts (sampling with a KV cache, exactly as the
server samples), and reward-model scores read as the server's Reward.Score reads them.
Trainers import these; no trainer imports another.

Models here are Hugging Face models, with or without a peft adapter: `lm_parts` finds the
transformer body and the LM head under either.
"""

from __future__ import annotations

import torch

from rlhfkit.chat import prompt_ids, render_conversation, reply_ids, reward_ids
from rlhfkit.hf import cache_kwargs, output_cache
from rlhfkit.kernels import fused_linear_logprobs, sample_tokens

IGNORE = -100


def pad_id_of(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_right(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def hf_model(model):
    """The transformers model itself: `model`, or the one a peft adapter wraps."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def disable_dropout(model) -> None:
    """Dropout off everywhere in `model` (its nn.Dropout modules, LoRA's included, and the
    attention dropout transformers keeps as a float), as TRL's RL trainers do: the log-probs
    a rollout is scored with (eval mode) are then the ones its update starts from."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def lm_parts(model):
    """(transformer body, LM head weight) of a causal LM, peft-wrapped or not."""
    inner = hf_model(model)
    return inner.base_model, inner.get_output_embeddings().weight


# ---------------------------------------------------------------- SFT examples

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


def trained_tokens(examples) -> int:
    return sum(sum(label != IGNORE for label in labels[1:]) for _, labels in examples)


def token_logprobs(model, input_ids, attention_mask, labels) -> torch.Tensor:
    """log π(token_t | tokens_<t) for t >= 1, [B, T-1], 0 where labels[:, 1:] is IGNORE.
    From the last hidden states and the LM head (models that rescale or soft-cap their
    logits, e.g. Gemma 2, would need that applied here)."""
    body, weight = lm_parts(model)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return fused_linear_logprobs(hidden[:, :-1], weight, labels[:, 1:], ignore_index=IGNORE)


def sft_loss(model, batch, total_tokens: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed NLL of the batch's trained tokens over `total_tokens` (default: the batch's
    own count), so micro-batch losses add up to the mean over the whole batch."""
    logp = token_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    n_tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
    return -logp.sum() / max(total_tokens or n_tokens, 1), n_tokens


# ---------------------------------------------------------------- rollouts

def end_id_tensor(eos_id, device) -> torch.Tensor:
    """One end id, or the set of them (rlhfkit.chat.end_token_ids), as a 1-d tensor."""
    return torch.tensor(sorted({eos_id} if isinstance(eos_id, int) else set(eos_id)), device=device)


@torch.no_grad()
def generate(policy, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, eos_id, pad_id: int,
             generator: torch.Generator | None, device, num_samples: int = 1
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample responses with a KV cache. Prompts are left-padded (positions counted from
    each prompt's first real token). `eos_id`: the id, or the set of ids, that ends a
    response (the server's rule: rlhfkit.chat.end_token_ids). `num_samples` responses per
    prompt (rows i*num_samples ... of the outputs), the prompt prefilled once and its K/V
    repeated. Returns (prompt_ids [B, P] left-padded, prompt_mask, response_ids [B, R] with
    pad after the end id)."""
    width = max(len(p) for p in prompt_ids)
    prompts = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompt_ids], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    # logits_to_keep=1: the prefill's [B, P, V] logits would be the rollout's largest tensor
    out = policy(input_ids=prompts, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                 logits_to_keep=1)
    cache, logits = output_cache(out), out.logits[:, -1].float()
    if num_samples > 1:
        cache.batch_repeat_interleave(num_samples)
        prompts, prompt_mask, positions, logits = (t.repeat_interleave(num_samples, dim=0)
                                                   for t in (prompts, prompt_mask, positions, logits))
    B = prompts.shape[0]
    next_position = positions[:, -1] + 1
    temperatures = torch.full((B,), temperature, device=device)
    top_k, top_p = torch.zeros(B, dtype=torch.long, device=device), torch.ones(B, device=device)
    attention, tokens, done = prompt_mask, [], torch.zeros(B, dtype=torch.bool, device=device)
    ends = end_id_tensor(eos_id, device)
    for _ in range(max_new_tokens):
        token = sample_tokens(logits, temperatures, top_k, top_p, default_generator=generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        tokens.append(token)
        done = done | torch.isin(token, ends)
        if bool(done.all()):
            break
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
        out = policy(input_ids=token[:, None], attention_mask=attention, position_ids=next_position[:, None],
                     **cache_kwargs(hf_model(policy), cache), use_cache=True, logits_to_keep=1)
        cache, logits, next_position = output_cache(out), out.logits[:, -1].float(), next_position + 1
    return prompts, prompt_mask, torch.stack(tokens, dim=1)


def response_mask_of(responses: torch.Tensor, eos_id) -> torch.Tensor:
    """1 on response tokens up to and including the first end id (all of them if none)."""
    is_eos = torch.isin(responses, end_id_tensor(eos_id, responses.device)).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after_eos).long()


def _response_hidden(body, prompts, prompt_mask, responses, response_mask) -> torch.Tensor:
    """Hidden states of the positions that predict each response token, [B, R, H]."""
    input_ids = torch.cat([prompts, responses], dim=1)
    attention = torch.cat([prompt_mask, response_mask], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    hidden = body(input_ids=input_ids, attention_mask=attention, position_ids=positions).last_hidden_state
    return hidden[:, prompts.shape[1] - 1:-1]


def response_logprobs(policy, prompts, prompt_mask, responses, response_mask, temperature: float,
                      return_entropy: bool = False):
    """log π(response_t | prompt, response_<t) [B, R] (0 off the mask), from one forward pass
    over prompt + response through the shared kernel; with return_entropy, also the entropy."""
    body, weight = lm_parts(policy)
    hidden = _response_hidden(body, prompts, prompt_mask, responses, response_mask)
    labels = torch.where(response_mask.bool(), responses, torch.full_like(responses, IGNORE))
    return fused_linear_logprobs(hidden, weight, labels, temperature=temperature, ignore_index=IGNORE,
                                 return_entropy=return_entropy)


def response_values(value_model, prompts, prompt_mask, responses, response_mask) -> torch.Tensor:
    """V(state before response_t) [B, R]: the RM-shaped head read at every position."""
    inner = hf_model(value_model)
    hidden = _response_hidden(inner.base_model, prompts, prompt_mask, responses, response_mask)
    return inner.score(hidden).squeeze(-1).float() * response_mask


def decode_responses(tokenizer, responses, response_mask) -> list[str]:
    """The responses' text as the server returns it: special tokens (the end id) skipped."""
    return [tokenizer.decode([t for t, m in zip(row, mask) if m], skip_special_tokens=True)
            for row, mask in zip(responses.tolist(), response_mask.tolist())]


# ---------------------------------------------------------------- reward scores

def score_pairs(model, tokenizer, pairs: list[tuple], max_length: int, device) -> torch.Tensor:
    """Rewards [N] of (prompt, response) pairs, rendered by rlhfkit.chat.reward_ids as the
    server's Reward.Score renders them; right-padded so the model reads the last
    non-padding token, truncated keeping the end (where the reward is read)."""
    ids = [reward_ids(tokenizer, p, r)[-max_length:] for p, r in pairs]
    input_ids = pad_right(ids, tokenizer.pad_token_id).to(device)
    attention_mask = pad_right([[1] * len(x) for x in ids], 0).to(device)
    return model(input_ids=input_ids, attention_mask=attention_mask).logits.squeeze(-1).float()
