"""What the RL trainers (PPO, GRPO, RLOO) share about rollouts: the engine that samples them
(the policy itself, through the sampler the server uses, or an in-process vLLM whose weights
follow the trainer's), the policy's and the reference's log-probs of them, and the
held-out evaluation that checkpoint selection reads (reward, KL to the reference, and the
bundled task's gold utility where the prompts are the task's).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal

import torch

from rlhfkit.chat import prompt_ids
from rlhfkit.hf import resolve_model

from . import distributed, task
from .common import batched
from .losses import IS_LEVELS
from .rewards import columns_of
from .skeleton import Batches
from .sequences import decode_responses, end_id_tensor, generate, pad_id_of, response_logprobs, response_mask_of

ROLLOUT_ENGINES = ("native", "vllm")


@dataclass(kw_only=True)
class RLOptions:
    """What the RL trainers (PPO, GRPO, RLOO) share: the rollouts (length, temperature, the
    engine that samples them and the importance correction when it is not the trainer's own
    model), the KL controller, held-out checkpoint selection, and an RL run's schedule (a
    step is one iteration)."""

    model: str = field(metadata={"help": "policy to start from (the SFT checkpoint): a directory or a Hub id"})
    prompts_file: str = field(metadata={"help": "prompts JSONL, one {\"prompt\"} per line (text or a conversation); other columns go to --reward-fn"})
    output_dir: str = field(metadata={"help": "where to publish the policy"})
    ref_model: str | None = field(default=None, metadata={"help": "reference policy of the KL (default: --model; with LoRA, the policy's adapter disabled)"})
    eval_prompts_file: str | None = field(default=None, metadata={"help": "held-out prompts: reward, KL and gold utility before the first iteration, every --eval-every and at the end"})
    num_iterations: int = field(default=100, metadata={"help": "rollout + update iterations"})
    max_new_tokens: int = field(default=32, metadata={"help": "response length limit"})
    max_prompt_length: int = field(default=128, metadata={"help": "prompts longer than this keep their last tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts (and of their log-probs)"})
    missing_eos_penalty: float = field(default=0.0, metadata={"help": "subtracted from the reward of responses cut off without an end token"})
    kl_target: float = field(default=0.0, metadata={"help": "adaptive KL controller (Ziegler et al.): the sequence KL per response to hold (0: a fixed kl_coef)"})
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive KL controller horizon, in responses"})
    rollout_engine: Literal["native", "vllm"] = field(default="native", metadata={"help": "native: the policy samples (as the server does); vllm: an in-process vLLM updated from the trainer after every iteration (README: the vLLM engine)"})
    vllm_gpu_memory_utilization: float = field(default=0.2, metadata={"help": "vLLM rollouts: the fraction of GPU memory (of RAM on CPU) vLLM reserves"})
    is_cap: float = field(default=2.0, metadata={"help": "truncated importance sampling: cap of π_trainer_old / π_behaviour when another engine sampled"})
    is_level: Literal["token", "sequence"] = field(default="token", metadata={"help": "importance ratio per token or per sequence (the product of its tokens')"})
    select_best: bool = field(default=True, metadata={"help": "with --eval-prompts-file, publish the evaluated policy with the best held-out reward - kl_coef * KL"})
    eval_batch_size: int = field(default=64, metadata={"help": "held-out prompts per evaluation forward"})
    learning_rate: float = field(default=1e-6, metadata={"help": "peak learning rate (AdamW; PPO: of the policy and the value model)"})
    micro_batch_size: int = field(default=0, metadata={"help": "responses per forward/backward in each process, gradients accumulated up to --minibatch-size (0: the whole minibatch at once)"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of iterations of linear warmup"})
    min_lr_ratio: float = field(default=1.0, metadata={"help": "cosine decays to this fraction of the peak LR (1: constant)"})
    log_every: int = field(default=1, metadata={"help": "log every N iterations"})
    eval_every: int = field(default=0, metadata={"help": "eval every N iterations (0: only at the end); with --eval-prompts-file also before the first"})
    # TrainConfig's batching does not apply: RL batches are rollouts, their length limits
    # max_prompt_length + max_new_tokens.
    max_length: int = field(default=256, init=False, metadata={"cli": False})
    batch_size: int = field(default=16, init=False, metadata={"cli": False})
    num_epochs: float = field(default=1.0, init=False, metadata={"cli": False})
    max_steps: int = field(default=0, init=False, metadata={"cli": False})

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_iterations", "max_new_tokens", "max_prompt_length", "eval_batch_size", "kl_horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (policy gradients need a sampling distribution), got "
                             f"{self.temperature}")
        if self.kl_target < 0:
            raise ValueError(f"kl_target must be >= 0 (0: a fixed kl_coef), got {self.kl_target}")
        if self.rollout_engine not in ROLLOUT_ENGINES:
            raise ValueError(f"rollout_engine must be one of {ROLLOUT_ENGINES}, got {self.rollout_engine!r}")
        if self.is_cap < 1:
            raise ValueError(f"is_cap must be >= 1 (a cap below 1 shrinks every weight), got {self.is_cap}")
        if self.is_level not in IS_LEVELS:
            raise ValueError(f"is_level must be one of {IS_LEVELS}, got {self.is_level!r}")
        if self.rollout_engine == "vllm" and self.fsdp:
            raise ValueError("--rollout-engine vllm with --fsdp is not supported: vLLM takes whole weights in one "
                             "process; use the native sampler")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"vllm_gpu_memory_utilization must be in (0, 1], got {self.vllm_gpu_memory_utilization}")

    def total_steps(self, n_examples: int = 0) -> int:
        return self.num_iterations


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

    def __init__(self, engine: str = "native", model_path: str | None = None, *, dtype: str = "float32", seed: int = 0,
                 max_model_len: int = 0, gpu_memory_utilization: float = 0.2):
        if engine not in ROLLOUT_ENGINES:
            raise ValueError(f"rollout_engine must be one of {ROLLOUT_ENGINES}, got {engine!r}")
        self.vllm = None
        self.sync_seconds: list[float] = []
        if engine == "vllm":
            from .vllm_rollouts import VLLMRollouts

            if distributed.world_size() > 1:
                raise ValueError("--rollout-engine vllm runs one in-process vLLM: under torchrun use the native "
                                 "sampler (vLLM's external launcher is not wired in yet)")

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


def start_sampler(run, config: RLOptions, policy) -> Sampler:
    """The run's rollout engine, holding the policy's current weights (a resumed run's too)."""
    sampler = Sampler(config.rollout_engine, resolve_model(config.model, config.revision), dtype=config.dtype,
                      seed=config.seed, max_model_len=config.max_prompt_length + config.max_new_tokens + 8,
                      gpu_memory_utilization=config.vllm_gpu_memory_utilization)
    with run.gathered():
        sampler.sync(policy)  # a no-op for the native sampler
    return sampler


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t log π/ref over each response [B]: an unbiased estimate of the sequence KL(π || ref)
    on the policy's own samples (what the KL-vs-reward curves put on their x axis)."""
    return ((logprobs - ref_logprobs) * mask).sum(-1)


@torch.no_grad()
def evaluate_on_prompts(prompts: list, columns: dict[str, list], *, tokenizer, policy, ref, rewards, config, end_ids,
                        device) -> dict:
    """One sampled response per held-out prompt (seeded: comparable across evals), scored by
    the run's rewards. Returns eval_score (the weighted total), eval_kl (sequence KL to the
    reference, k1 on the samples), and eval_task_utility when the prompts are the bundled
    task's. `ref` None: the policy with its adapter disabled (LoRA)."""
    temperature = config.temperature
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
        ended = torch.isin(responses, end_id_tensor(end_ids, device)).any(-1)
        scores += (total - config.missing_eos_penalty * (~ended).float()).tolist()  # the training reward's
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


def held_out_evaluation(run, records: list[dict], *, select: bool, config, column_names: list[str] | None = None,
                        **kwargs) -> dict:
    """evaluate_on_prompts on the held-out `records` (kwargs: its own), plus the objective
    the run optimises, eval_score - kl_coef * eval_kl with the configured kl_coef (fixed, so
    that evaluations under an adaptive controller compare); with `select`, the run keeps the
    weights whose objective is the best so far (eval_best: 1 in the result when these are).
    `column_names`: the training prompts' columns, so reward functions get the same arguments
    (None where the held-out file lacks one). The latest evaluation is kept in run.metrics
    (end_rl_run swaps in the selected one's)."""
    with run.inference():
        result = evaluate_on_prompts([r["prompt"] for r in records], columns_of(records, column_names), config=config,
                                     **kwargs)
    result["eval_objective"] = result["eval_score"] - config.kl_coef * result["eval_kl"]
    run.metrics.update(result)
    if select and run.keep_if_best(result["eval_objective"], result):
        result["eval_best"] = 1.0
    return result


def is_statistics(stats: dict, mask: torch.Tensor) -> dict[str, float]:
    """truncated_importance_weights' statistics over every rank: token-weighted means (the
    ratio's over its units), the largest ratio of any rank."""
    tokens, units = float(mask.sum()), float(stats["is_units"])
    kl, ratio, capped, total_tokens, total_units = distributed.all_sum(
        [stats["mismatch_kl"] * tokens, stats["is_ratio_mean"] * units, stats["is_capped_fraction"] * units,
         tokens, units])
    return {"mismatch_kl": kl / max(total_tokens, 1), "is_ratio_mean": ratio / total_units if total_units else 1.0,
            "is_ratio_max": distributed.all_max(float(stats["is_ratio_max"])),
            "is_capped_fraction": capped / max(total_units, 1)}


def log_first_evaluation(run, result: dict) -> None:
    """The evaluation before the first iteration: logged at step 0, kept as eval_*_start."""
    run.log.log(0, **result)
    run.metrics.update({k + "_start": v for k, v in result.items() if k != "eval_best"})


class PromptStream:
    """The prompts of each iteration, `per_iteration` at a time over every rank, shuffled
    epoch after epoch; next() is this rank's share (a short last batch trimmed so every
    rank gets as many). Resumes where a save left it (state_dict)."""

    def __init__(self, run, items: list, per_iteration: int):
        self.batches = Batches(items, per_iteration, run.rng)
        if run.resumed_state("stream"):
            self.batches.load_state_dict(run.resumed_state("stream"))

    def __next__(self) -> list:
        world = distributed.world_size()
        while True:
            chunk = next(self.batches)
            chunk = chunk[:len(chunk) - len(chunk) % world]
            if chunk:
                return distributed.shard(chunk)

    def state_dict(self) -> dict:
        return self.batches.state_dict()


def adapted_kl_coef(kl_coef: float, mean_kl: float, config, responses: int) -> float:
    """Ziegler et al.'s proportional controller: move kl_coef toward holding the sequence KL
    at config.kl_target (a no-op without one), by at most 20% of the error per horizon."""
    if config.kl_target <= 0:
        return kl_coef
    error = max(-0.2, min(0.2, mean_kl / config.kl_target - 1))
    return kl_coef * (1 + error * responses / config.kl_horizon)


def add_minibatch_stats(stats: dict[str, list[float]], parts: list[dict]) -> None:
    """Append one minibatch's statistics to stats[name]: its micro-batches' shares (of the
    minibatch's means over every rank) summed on this rank."""
    for name in parts[0]:
        stats.setdefault(name, []).append(sum(float(p[name]) for p in parts if name in p))


def minibatch_means(stats: dict[str, list[float]]) -> dict[str, float]:
    """The iteration's statistics: each minibatch's shares added over the ranks, then the
    mean over the minibatches."""
    summed = {k: distributed.all_sum(v) for k, v in stats.items()}
    return {k: sum(v) / len(v) for k, v in summed.items()}


def end_iteration(run, sampler: Sampler, policy, batch: dict, kl_coef: float, config) -> tuple[float, float]:
    """The iteration's updates are done: the schedule moves on, the rollout engine takes the
    new weights, and the KL controller reads this rollout's sequence KL over every rank.
    Returns (that mean KL, the next kl_coef)."""
    run.end_step()
    with run.gathered():
        sampler.sync(policy)
    mean_kl = distributed.mean(batch["kl"])
    return mean_kl, adapted_kl_coef(kl_coef, mean_kl, config, len(batch["scores"]) * distributed.world_size())


def end_rl_run(run, sampler: Sampler, rewards, select: bool) -> None:
    """Put the selected weights back (with `select`), record the run's totals, free the
    rollout engine and the reward sources; publishing comes next."""
    if select and run.best is not None:
        # the published policy is the selected one: its evaluation is the run's, the last one's beside it
        last = {k: v for k, v in run.metrics.items() if k.startswith("eval_") and not k.endswith("_start")}
        run.metrics.update({f"final_{k}": v for k, v in last.items()})
        run.metrics.update(run.best.get("evaluation", {}))
        run.metrics["selected_iteration"] = run.restore_best()
    run.metrics.update(iterations=run.config.num_iterations, seconds=run.seconds())
    sampler.close()
    rewards.close()
