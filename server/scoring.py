"""Scoring given text: scalar rewards from the reward model, and per-token log-probs,
entropy and KL of a response under the policy and the reference."""

from __future__ import annotations

from typing import Callable

import torch

from rlhfkit.chat import Prompt, reward_ids
from rlhfkit.errors import InvalidArgumentError
from rlhfkit.kernels import (KL_ESTIMATORS, full_kl_from_logits, kl_from_logprobs,
                             logprobs_from_logits)
from rlhfkit.server.errors import DeadlineExceededError
from rlhfkit.server.models import LoadedModel


def right_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [len(rows), longest], real tokens first."""
    L = max(map(len, rows))
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.long)
    for i, x in enumerate(rows):
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return ids, mask


def stop_if_abandoned(should_stop: Callable[[], bool] | None):
    if should_stop is not None and should_stop():
        raise DeadlineExceededError("the call was cancelled or its deadline passed; scoring stopped")


def score_texts(rm: LoadedModel, items: list[tuple[Prompt, str]], batch_size: int = 32,
                should_stop: Callable[[], bool] | None = None) -> list[float]:
    """Rewards for (prompt, response) pairs, the prompt text or a conversation, rendered by
    rlhfkit.chat.reward_ids as the RM trainer renders them; batched with right padding. The
    model reads the reward at the last non-padding token (AutoModelForSequenceClassification's
    rule), so padding does not change a score; plus the checkpoint's reward_bias, if any.
    `should_stop` is asked between micro-batches (the call was cancelled or ran past its
    deadline)."""
    encoded = []
    for p, r in items:  # tokenizing 256 long texts takes seconds: stop between them too
        stop_if_abandoned(should_stop)
        encoded.append(reward_ids(rm.tokenizer, p, r))
    for i, ids in enumerate(encoded):
        if not ids:
            raise InvalidArgumentError(f"items[{i}]", "prompt and response are both empty")
        if len(ids) > rm.context_length:
            raise InvalidArgumentError(
                f"items[{i}]", f"prompt + response is {len(ids)} tokens, over the reward model's "
                f"context of {rm.context_length}; shorten it")
    # `rlhfkit train rm` centres rewards after training (SFT demonstrations score 0 on
    # average); score heads without a bias term keep that offset in rlhfkit.json.
    bias = float(rm.meta.get("reward_bias", 0.0))
    rewards: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            stop_if_abandoned(should_stop)
            ids, mask = right_padded(encoded[start:start + batch_size], rm.model.config.pad_token_id)
            out = rm.model(input_ids=ids.to(rm.device), attention_mask=mask.to(rm.device))
            rewards += (out.logits[:, 0].float() + bias).tolist()
    return rewards


def token_scores(policy: LoadedModel, reference: LoadedModel | None,
                 items: list[tuple[list[int], list[int]]], temperature: float = 1.0,
                 batch_size: int = 16, should_stop: Callable[[], bool] | None = None) -> list[dict[str, list[float]]]:
    """Per response token: log-prob under the policy (and reference), entropy, the k1/k2/k3
    KL estimates and the exact full-vocabulary KL, through rlhfkit.kernels (the functions
    PPO training uses). `items` are (prompt_ids, response_ids); the logits at position t
    predict token t + 1, so response token j is scored at position len(prompt) - 1 + j."""
    results = []
    pad = policy.tokenizer.pad_token_id or 0
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            stop_if_abandoned(should_stop)
            chunk = items[start:start + batch_size]
            ids, mask = right_padded([p + r for p, r in chunk], pad)
            labels = torch.full(ids.shape, -100, dtype=torch.long)
            for i, (p, r) in enumerate(chunk):
                labels[i, len(p) - 1:len(p) - 1 + len(r)] = torch.tensor(r)
            logits = policy.model(input_ids=ids.to(policy.device), attention_mask=mask.to(policy.device)).logits
            labels = labels.to(logits.device)
            logp, entropy = logprobs_from_logits(logits, labels, temperature, return_entropy=True)
            out = {"logprobs": logp, "entropy": entropy}
            if reference is not None:
                ref_logits = reference.model(input_ids=ids.to(reference.device),
                                             attention_mask=mask.to(reference.device)).logits.to(logits.device)
                ref_logp = logprobs_from_logits(ref_logits, labels, temperature)
                out["ref_logprobs"] = ref_logp
                for k in KL_ESTIMATORS:
                    out[f"kl_{k}"] = kl_from_logprobs(logp, ref_logp, k)
                out["kl_full"] = full_kl_from_logits(logits, ref_logits, temperature)
            for i, (p, r) in enumerate(chunk):
                sl = slice(len(p) - 1, len(p) - 1 + len(r))
                results.append({k: v[i, sl].float().tolist() for k, v in out.items()})
    return results
