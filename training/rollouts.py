"""What the RL trainers (PPO, GRPO, RLOO) share about rollouts: the engine that samples them
(the policy itself, through the sampler the server uses, or an in-process vLLM whose weights
follow the trainer's), the policy's and the reference's log-probs of them, and the
held-out evaluation that checkpoint selection reads (reward, KL to the reference, and the
bundled task's gold utility where the prompts are the task's).
"""

from __future__ import annotations

import contextlib

import torch

from rlhfkit.chat import prompt_ids

from . import distributed, task
from .common import batched
from .sequences import decode_responses, generate, pad_id_of, response_logprobs, response_mask_of

ROLLOUT_ENGINES = ("native", "vllm")


@contextlib.contextmanager
def frozen(model, adapted):
    """`model`, or when it is None (LoRA), `adapted` with its adapter disabled: the base weights."""
    if model is not None:
        yield model
    else:
        with adapted.disable_adapter():
            yield adapted


class Sampler:
    """Samples rollouts for a trainer. "native": the policy itself, with a KV cache, exactly
    as the server samples; its log-probs are the trainer's (no behaviour log-probs: the
    importance ratio is exactly 1). "vllm": an in-process vllm.LLM loaded from `model_path`
    and updated from the policy by sync() after every optimizer phase; it reports the
    behaviour log-probs the importance correction needs."""

    def __init__(self, engine: str, model_path: str, *, dtype: str, seed: int, max_model_len: int,
                 gpu_memory_utilization: float = 0.2):
        if engine not in ROLLOUT_ENGINES:
            raise ValueError(f"rollout_engine must be one of {ROLLOUT_ENGINES}, got {engine!r}")
        self.vllm = None
        self.sync_seconds: list[float] = []
        if engine == "vllm":
            from .vllm_rollouts import VLLMRollouts

            self.vllm = VLLMRollouts(model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                                     gpu_memory_utilization=gpu_memory_utilization)

    @torch.no_grad()
    def sample(self, policy, ids: list[list[int]], n: int, max_new_tokens: int, temperature: float, end_ids,
               pad_id: int, generator: torch.Generator, device):
        """`n` responses per prompt (rows i*n ... i*n+n-1). Returns (prompts [B·n, P]
        left-padded, prompt_mask, responses [B·n, R] padded after the end id, behaviour
        log-probs [B·n, R] or None when the trainer's own model sampled)."""
        if self.vllm is None:
            return (*generate(policy, ids, max_new_tokens, temperature, end_ids, pad_id, generator, device,
                              num_samples=n), None)
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator, device=generator.device))
        samples = [s for group in self.vllm.sample(ids, n, max_new_tokens, temperature, end_ids, seed=seed)
                   for s in group]
        rows = [p for p in ids for _ in range(n)]
        width, length = max(len(p) for p in rows), max(max(len(t) for t, _ in samples), 1)
        prompts = torch.tensor([[pad_id] * (width - len(p)) + p for p in rows], device=device)
        prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows], device=device)
        responses = torch.tensor([t + [pad_id] * (length - len(t)) for t, _ in samples], device=device)
        behaviour = torch.tensor([lp + [0.0] * (length - len(lp)) for _, lp in samples], device=device)
        return prompts, prompt_mask, responses, behaviour

    def sync(self, policy) -> None:
        """Push the policy's current weights into vLLM (nothing to do for the native sampler)."""
        if self.vllm is not None:
            self.sync_seconds.append(self.vllm.load_weights(policy))

    def close(self):
        if self.vllm is not None:
            self.vllm.close()


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t log π/ref over each response [B]: an unbiased estimate of the sequence KL(π || ref)
    on the policy's own samples (what the KL-vs-reward curves put on their x axis)."""
    return ((logprobs - ref_logprobs) * mask).sum(-1)


@torch.no_grad()
def evaluate_on_prompts(prompts: list, columns: dict[str, list], *, tokenizer, policy, ref, rewards, config, end_ids,
                        device, temperature: float | None = None) -> dict:
    """One sampled response per held-out prompt (seeded: comparable across evals), scored by
    the run's rewards. Returns eval_score (the weighted total), eval_kl (sequence KL to the
    reference, k1 on the samples), and eval_task_utility when the prompts are the bundled
    task's. `ref` None: the policy with its adapter disabled (LoRA)."""
    temperature = temperature or config.temperature
    generator = torch.Generator(device=device).manual_seed(config.seed + 12345 + distributed.rank())
    pad_id = pad_id_of(tokenizer)
    indices = distributed.shard(list(range(len(prompts))))
    was_training = policy.training
    policy.eval()
    scores, kls, utilities = [], [], []
    for chunk in batched(indices, config.eval_batch_size):
        texts_in = [prompts[i] for i in chunk]
        ids = [prompt_ids(tokenizer, p)[-config.max_prompt_length:] for p in texts_in]
        prompt_tokens, prompt_mask, responses = generate(policy, ids, config.max_new_tokens, temperature, end_ids,
                                                         pad_id, generator, device)
        mask = response_mask_of(responses, end_ids)
        texts = decode_responses(tokenizer, responses, mask)
        total, _ = rewards(texts_in, texts, {k: [v[i] for i in chunk] for k, v in columns.items()}, device)
        scores += total.tolist()
        logprobs = response_logprobs(policy, prompt_tokens, prompt_mask, responses, mask, temperature)
        with frozen(ref, policy) as reference:
            ref_logprobs = response_logprobs(reference, prompt_tokens, prompt_mask, responses, mask, temperature)
        kls += sequence_kl(logprobs, ref_logprobs, mask).tolist()
        for p, t in zip(texts_in, texts):
            try:
                utilities.append(task.utility(p, t))
            except ValueError:  # not a prompt of the bundled task
                pass
    policy.train(was_training)
    score_sum, kl_sum, n, utility_sum, n_utilities = distributed.all_sum(
        [sum(scores), sum(kls), len(scores), sum(utilities), len(utilities)])
    result = {"eval_score": score_sum / n, "eval_kl": kl_sum / n}
    if n_utilities == n:
        result["eval_task_utility"] = utility_sum / n_utilities
    return result
