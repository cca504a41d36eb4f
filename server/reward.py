"""Scalar rewards: prompt + response as one text, scored at its last real token."""

from __future__ import annotations

import torch

from rlhfkit.kernels import SamplingParamsError
from rlhfkit.server.models import LoadedModel


def score_texts(rm: LoadedModel, prompts: list[str], responses: list[str], batch_size: int = 32) -> list[float]:
    """Rewards for (prompt, response) pairs, batched with right padding. The model reads
    the reward at the last non-padding token (AutoModelForSequenceClassification's rule),
    so padding does not change a score."""
    tok = rm.tokenizer
    encoded = [tok(p + r).input_ids for p, r in zip(prompts, responses)]
    for i, ids in enumerate(encoded):
        if not ids:
            raise SamplingParamsError(f"items[{i}]", "prompt and response are both empty")
        if len(ids) > rm.context_length:
            raise SamplingParamsError(
                f"items[{i}]", f"prompt + response is {len(ids)} tokens, over the reward model's "
                f"context of {rm.context_length}; shorten it")
    rewards: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            L = max(map(len, chunk))
            ids = torch.full((len(chunk), L), rm.model.config.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), L), dtype=torch.long)
            for i, x in enumerate(chunk):
                ids[i, :len(x)] = torch.tensor(x)
                mask[i, :len(x)] = 1
            out = rm.model(input_ids=ids.to(rm.device), attention_mask=mask.to(rm.device))
            rewards += out.logits[:, 0].float().tolist()
    return rewards
