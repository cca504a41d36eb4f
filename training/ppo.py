"""PPO against a reward model (InstructGPT step 3), with the per-token KL penalty to the SFT
reference (Ziegler et al. 2019) and optionally the pretraining mix (PPO-ptx).

One iteration:
  1. rollout: sample responses to a batch of prompts (text, or conversations rendered by
     rlhfkit.chat as the server renders them) with the policy, through the same
     sample_tokens the server uses (temperature only: top-k/top-p would change the
     distribution the PPO ratio is taken against), ending at the server's end ids;
  2. score: the reward model reads prompt + response text the way the server's
     Reward.Score does (plus the RM's reward_bias); log-probs of the policy and the
     reference and the values come from one forward pass each;
  3. rewards per token: -kl_coef * KL_t, plus the score on the last token; GAE; whitened
     advantages;
  4. ppo_epochs passes of clipped policy and value updates over minibatches, plus
     ptx_coef * the SFT loss on demonstrations when a ptx file is given.
The value model starts from the reward model (InstructGPT) and reads a value at every token.

Under torchrun each rank samples rollouts for its share of every rollout batch (with its own
seed) and takes that share of every minibatch; advantages are whitened, and the KL
controller reads the KL, over all ranks' rollouts; the policy and the value model train
as one module in the training skeleton (DDP or FSDP2 over both).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhfkit.chat import end_token_ids, prompt_ids
from rlhfkit.hf import resolve_model
from rlhfkit.kernels import kl_from_logprobs

from . import distributed, task
from .checkpoint import read_info
from .common import TrainConfig, batched
from .data import read_jsonl
from .losses import gae, masked_mean, ppo_policy_loss, ppo_value_loss, whiten
from .sequences import (collate, decode_responses, end_id_tensor, generate, pad_id_of, response_logprobs,
                        response_mask_of, response_values, score_pairs, sft_loss, tokenize_sft, trained_tokens)
from .skeleton import Batches, LossModule, Run


@dataclass(kw_only=True)
class PPOConfig(TrainConfig):
    """Optimise a policy against a reward model with PPO, a KL penalty to the reference and optional PPO-ptx.

    A step is one iteration (a rollout batch, then ppo_epochs passes of minibatch updates):
    the schedule, log_every, eval_every and save_every count iterations; micro_batch_size
    splits each minibatch's forward/backward. With LoRA, the reference is the policy's
    base weights (its adapter disabled) unless --ref-model is given, and the reward model is
    the value model's (the value model is the reward model with an adapter), so no frozen
    copy is loaded twice."""

    model: str = field(metadata={"help": "policy to start from (the SFT checkpoint): a directory or a Hub id"})
    reward_model: str = field(metadata={"help": "reward model checkpoint (also the value model's starting point)"})
    prompts_file: str = field(metadata={"help": "prompts JSONL, one {\"prompt\"} per line: text, or a conversation (a list of messages)"})
    output_dir: str = field(metadata={"help": "where to publish the policy"})
    ref_model: str | None = field(default=None, metadata={"help": "reference policy for the KL penalty (default: --model)"})
    eval_prompts_file: str | None = field(default=None, metadata={"help": "held-out prompts: mean reward before and after"})
    ptx_file: str | None = field(default=None, metadata={"help": "SFT demonstrations mixed into the loss (PPO-ptx)"})
    ptx_coef: float = field(default=0.0, metadata={"help": "weight of the SFT loss on --ptx-file (InstructGPT's gamma)"})
    num_iterations: int = field(default=100, metadata={"help": "rollout + update iterations"})
    rollout_batch_size: int = field(default=32, metadata={"help": "prompts per rollout (over all processes under torchrun)"})
    minibatch_size: int = field(default=8, metadata={"help": "rollouts per gradient step (over all processes under torchrun)"})
    ppo_epochs: int = field(default=2, metadata={"help": "passes over each rollout batch"})
    max_new_tokens: int = field(default=32, metadata={"help": "response length limit"})
    max_prompt_length: int = field(default=128, metadata={"help": "prompts longer than this keep their last tokens"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts (and of their log-probs)"})
    kl_coef: float = field(default=0.05, metadata={"help": "initial weight of the per-token KL penalty"})
    kl_estimator: Literal["k1", "k2", "k3"] = field(default="k1", metadata={"help": "per-token KL estimate in the reward"})
    kl_target: float = field(default=0.0, metadata={"help": "adaptive KL controller target per sequence (0: fixed kl_coef)"})
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive KL controller horizon, in rollouts"})
    missing_eos_penalty: float = field(default=0.0, metadata={"help": "subtracted from the score of responses cut off without EOS"})
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    clip_range: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    clip_range_value: float = field(default=0.2, metadata={"help": "value clip"})
    vf_coef: float = field(default=0.1, metadata={"help": "value loss weight"})
    learning_rate: float = field(default=1e-6, metadata={"help": "peak learning rate (AdamW), policy and value"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay on matrices"})
    adam_eps: float = field(default=1e-5, metadata={"help": "AdamW's epsilon"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of iterations of linear warmup"})
    min_lr_ratio: float = field(default=1.0, metadata={"help": "cosine decays to this fraction of the peak LR (1: constant)"})
    log_every: int = field(default=1, metadata={"help": "log every N iterations"})
    eval_every: int = field(default=0, metadata={"help": "eval every N iterations (0: only at the end); with --eval-prompts-file also before the first"})
    seed: int = field(default=0, metadata={"help": "random seed (prompt order, sampling)"})
    micro_batch_size: int = field(default=0, metadata={"help": "rollouts per forward/backward in each process, gradients accumulated up to --minibatch-size (0: the whole minibatch at once)"})
    # TrainConfig's batching does not apply: PPO's batches are rollout_batch_size prompts
    # and minibatch_size rollouts, its length limits max_prompt_length + max_new_tokens.
    max_length: int = field(default=256, init=False, metadata={"cli": False})
    batch_size: int = field(default=16, init=False, metadata={"cli": False})
    num_epochs: float = field(default=1.0, init=False, metadata={"cli": False})
    max_steps: int = field(default=0, init=False, metadata={"cli": False})

    def __post_init__(self):
        super().__post_init__()
        for name in ("num_iterations", "rollout_batch_size", "minibatch_size", "ppo_epochs", "max_new_tokens",
                     "max_prompt_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (PPO needs a sampling distribution), got {self.temperature}")
        if self.ptx_coef > 0 and not self.ptx_file:
            raise ValueError("ptx_coef > 0 needs --ptx-file")
        if not 0 < self.lam <= 1 or not 0 < self.gamma <= 1:
            raise ValueError("gamma and lam must be in (0, 1]")

    def total_steps(self, n_examples: int = 0) -> int:
        return self.num_iterations


# ---------------------------------------------------------------- rewards

def shaped_rewards(scores, logprobs, ref_logprobs, response_mask, kl_coef: float, estimator: str):
    """-kl_coef * KL_t on every response token, plus the score on the last one.
    Returns (rewards [B, R], kl per token [B, R])."""
    kl = kl_from_logprobs(logprobs, ref_logprobs, estimator) * response_mask
    rewards = -kl_coef * kl
    last = response_mask.sum(-1).clamp(min=1) - 1
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def whiten_across_ranks(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """losses.whiten with the mean and (unbiased) variance of every rank's counted entries."""
    if distributed.world_size() == 1:
        return whiten(x, mask, eps=eps)
    m = mask.to(x.dtype)
    total, count = distributed.all_sum([(x * m).sum(), m.sum()])
    mean = total / max(count, 1)
    [squares] = distributed.all_sum([((x - mean) ** 2 * m).sum()])
    var = squares / max(count, 1) * count / max(count - 1, 1)
    return whiten(x, mask, eps=eps, stats=(torch.tensor(mean, dtype=x.dtype, device=x.device),
                                           torch.tensor(var, dtype=x.dtype, device=x.device)))


# ---------------------------------------------------------------- training

@contextlib.contextmanager
def frozen(model, adapted):
    """`model`, or when it is None (LoRA), `adapted` with its adapter disabled: the base weights."""
    if model is not None:
        yield model
    else:
        with adapted.disable_adapter():
            yield adapted


def _load(run: Run, config: PPOConfig):
    """Each model reference a local directory or a Hub id (rlhfkit.hf.resolve_model). With
    LoRA and no separate --ref-model, ref and reward_model are None: the adapters' base."""
    model = resolve_model(config.model, config.revision)
    rm_path = resolve_model(config.reward_model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    policy = run.load(AutoModelForCausalLM, model)
    ref = None
    if config.ref_model or not config.lora_r:
        ref = run.load(AutoModelForCausalLM, resolve_model(config.ref_model) if config.ref_model else model,
                       trainable=False)
    rm_tokenizer = AutoTokenizer.from_pretrained(rm_path)
    reward_model = None if config.lora_r else run.load(AutoModelForSequenceClassification, rm_path, trainable=False)
    value_model = run.load(AutoModelForSequenceClassification, rm_path)
    return tokenizer, policy, ref, rm_tokenizer, reward_model, value_model


@torch.no_grad()
def rollout_batch(prompts_text, tokenizer, policy, ref, rm_tokenizer, reward_model, value_model, config, kl_coef,
                  reward_bias, generator, device) -> dict:
    """Sample, score and value one rollout batch. `ref` / `reward_model` None: the policy's /
    value model's base weights (LoRA)."""
    end_ids = end_token_ids(tokenizer, policy.generation_config)
    pad_id = pad_id_of(tokenizer)
    ids = [prompt_ids(tokenizer, p)[-config.max_prompt_length:] for p in prompts_text]
    policy.eval()
    value_model.eval()
    prompts, prompt_mask, responses = generate(policy, ids, config.max_new_tokens, config.temperature, end_ids,
                                               pad_id, generator, device)
    mask = response_mask_of(responses, end_ids)
    logprobs = response_logprobs(policy, prompts, prompt_mask, responses, mask, config.temperature)
    with frozen(ref, policy) as reference:
        ref_logprobs = response_logprobs(reference, prompts, prompt_mask, responses, mask, config.temperature)
    values = response_values(value_model, prompts, prompt_mask, responses, mask)
    texts = decode_responses(tokenizer, responses, mask)
    with frozen(reward_model, value_model) as scorer:
        scores = score_pairs(scorer, rm_tokenizer, list(zip(prompts_text, texts)), 1 << 30, device)
    scores = scores + reward_bias
    ended = torch.isin(responses, end_id_tensor(end_ids, device)).any(-1)
    scores = scores - config.missing_eos_penalty * (~ended).float()
    rewards, kl = shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, config.kl_estimator)
    advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
    advantages = whiten_across_ranks(advantages, mask)
    policy.train()
    value_model.train()
    return {"prompts": prompts, "prompt_mask": prompt_mask, "responses": responses, "mask": mask,
            "logprobs": logprobs, "values": values, "advantages": advantages, "returns": returns,
            "scores": scores, "kl": kl.sum(-1), "ended": ended, "texts": texts}


@torch.no_grad()
def evaluate(prompts_text, tokenizer, policy, rm_tokenizer, reward_model, config, reward_bias, device,
             value_model=None) -> dict:
    """Mean RM score of sampled responses to held-out prompts (seeded: comparable across
    evals), and the bundled task's gold utility when the prompts are the task's.
    `reward_model` None: value_model's base weights (LoRA)."""
    generator = torch.Generator(device=device).manual_seed(config.seed + 12345 + distributed.rank())
    scores, utilities = [], []
    end_ids = end_token_ids(tokenizer, policy.generation_config)
    pad_id = pad_id_of(tokenizer)
    policy.eval()
    if value_model is not None:
        value_model.eval()  # with LoRA its base weights are the scorer
    for chunk in batched(distributed.shard(prompts_text), config.rollout_batch_size):
        ids = [prompt_ids(tokenizer, p)[-config.max_prompt_length:] for p in chunk]
        prompts, prompt_mask, responses = generate(policy, ids, config.max_new_tokens, config.temperature,
                                                   end_ids, pad_id, generator, device)
        texts = decode_responses(tokenizer, responses, response_mask_of(responses, end_ids))
        with frozen(reward_model, value_model) as scorer:
            scores += (score_pairs(scorer, rm_tokenizer, list(zip(chunk, texts)), 1 << 30, device)
                       + reward_bias).tolist()
        for p, t in zip(chunk, texts):
            try:
                utilities.append(task.utility(p, t))
            except ValueError:  # not a prompt of the bundled task
                pass
    policy.train()
    if value_model is not None:
        value_model.train()
    score_sum, n_scores, utility_sum, n_utilities = distributed.all_sum(
        [sum(scores), len(scores), sum(utilities), len(utilities)])
    result = {"eval_score": score_sum / n_scores}
    if n_utilities == n_scores:
        result["eval_task_utility"] = utility_sum / n_utilities
    return result


def micro_loss(rows, context, *, policy, value, config: PPOConfig, pad_id: int, device):
    """Clipped policy and value losses of rollout rows `rows`, weighted by their share of the
    minibatch's tokens over every rank; the first micro-batch also carries the minibatch's
    PPO-ptx term. Statistics are weighted the same way, so they add up to the minibatch's."""
    batch = context["batch"]
    idx = torch.tensor(rows, device=device)
    mb = {k: v[idx] for k, v in batch.items() if torch.is_tensor(v)}
    share = float(mb["mask"].sum()) / context["tokens"]
    logprobs, entropy = response_logprobs(policy, mb["prompts"], mb["prompt_mask"], mb["responses"], mb["mask"],
                                          config.temperature, return_entropy=True)
    values = response_values(value, mb["prompts"], mb["prompt_mask"], mb["responses"], mb["mask"])
    pg_loss, clipfrac, approx_kl = ppo_policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"],
                                                   config.clip_range)
    vf_loss, vf_clipfrac = ppo_value_loss(values, mb["values"], mb["returns"], mb["mask"], config.clip_range_value)
    loss = (pg_loss + config.vf_coef * vf_loss) * share
    stats = {name: value.detach().float() * share for name, value in (
        ("pg_loss", pg_loss), ("vf_loss", vf_loss), ("clipfrac", clipfrac), ("approx_kl", approx_kl),
        ("vf_clipfrac", vf_clipfrac), ("entropy", masked_mean(entropy.detach(), mb["mask"])))}
    if context["ptx"] is not None and rows[0] == context["first_row"]:
        mine, total = context["ptx"]
        ptx_loss, _ = sft_loss(policy, {k: v.to(device) for k, v in mine.items()}, total)
        loss = loss + config.ptx_coef * ptx_loss
        stats["ptx_loss"] = ptx_loss.detach()
    return loss, stats


def train_ppo(config: PPOConfig) -> dict:
    """Train, publish the policy, return the final metrics."""
    run = Run(config, "ppo")
    device, world = run.device, distributed.world_size()
    generator = torch.Generator(device=device).manual_seed(config.seed + distributed.rank())
    tokenizer, policy, ref, rm_tokenizer, reward_model, value_model = _load(run, config)
    reward_bias = float(read_info(resolve_model(config.reward_model)).get("reward_bias", 0.0))
    pad_id = pad_id_of(tokenizer)

    prompts = [r["prompt"] for r in read_jsonl(config.prompts_file, "prompts")]
    eval_prompts = [r["prompt"] for r in read_jsonl(config.eval_prompts_file, "prompts")] if config.eval_prompts_file else []
    ptx = tokenize_sft(tokenizer, read_jsonl(config.ptx_file, "sft"), config.max_prompt_length + config.max_new_tokens) \
        if config.ptx_file else []
    if config.rollout_batch_size % world or config.minibatch_size % world or len(prompts) < world or 0 < len(ptx) < world:
        raise ValueError(f"with {world} processes, rollout_batch_size and minibatch_size must be multiples of {world}, "
                         f"and the prompts (and ptx demonstrations) at least {world}")
    run.prepare(LossModule(partial(micro_loss, config=config, pad_id=pad_id, device=device), policy=policy,
                           value=value_model), config.num_iterations)
    generator = run.restore_generator("sampling", generator)
    run.metrics.setdefault("prompts", len(prompts))
    kl_coef = run.resumed_state("kl_coef", config.kl_coef)

    def evaluate_now():
        with run.inference():
            return evaluate(eval_prompts, tokenizer, policy, rm_tokenizer, reward_model, config, reward_bias, device,
                            value_model)

    if eval_prompts and run.step == 0:
        first = evaluate_now()
        run.log.log(0, **first)
        run.metrics.update({k + "_start": v for k, v in first.items()})

    stream = Batches(prompts, config.rollout_batch_size, run.rng)
    if run.resumed_state("stream"):
        stream.load_state_dict(run.resumed_state("stream"))

    def next_prompts() -> list:
        while True:
            chunk = next(stream)
            chunk = chunk[:len(chunk) - len(chunk) % world]  # as many prompts for every rank
            if chunk:
                return distributed.shard(chunk)

    bar = tqdm(total=config.num_iterations, initial=run.step, desc="ppo",
               disable=not config.progress or not distributed.is_main())
    while run.step < config.num_iterations:
        with run.inference():
            batch = rollout_batch(next_prompts(), tokenizer, policy, ref, rm_tokenizer, reward_model, value_model,
                                  config, kl_coef, reward_bias, generator, device)
        stats: dict[str, list[float]] = {}
        for _ in range(config.ppo_epochs):
            for rows in batched(list(range(len(batch["scores"]))), config.minibatch_size // world, run.rng):
                # The losses are means over the minibatch's tokens: each rank takes its share of them.
                tokens = distributed.all_sum([batch["mask"][rows].sum()])[0]
                ptx_batch = None
                if ptx and config.ptx_coef > 0:
                    demos = run.rng.sample(ptx, min(len(ptx), config.minibatch_size))
                    ptx_batch = (collate(distributed.shard(demos), pad_id), trained_tokens(demos))
                context = {"batch": batch, "tokens": tokens, "ptx": ptx_batch, "first_row": rows[0]}
                _, parts = run.accumulate(rows, context, shard=False)
                run.optimizer_step()
                for name in parts[0]:
                    stats.setdefault(name, []).append(sum(float(p[name]) for p in parts if name in p))
        stats = {k: distributed.all_sum(v) for k, v in stats.items()}  # the ranks' shares add up to the means
        run.end_step()
        iteration = run.step
        mean_kl = distributed.mean(batch["kl"])
        if config.kl_target > 0:  # Ziegler et al.'s proportional controller on the sequence KL
            error = max(-0.2, min(0.2, mean_kl / config.kl_target - 1))
            kl_coef *= 1 + error * len(batch["scores"]) * world / config.kl_horizon
        row = {"score": distributed.mean(batch["scores"]), "kl": mean_kl, "kl_coef": kl_coef,
               "response_length": distributed.mean(batch["mask"].sum(-1)),
               "eos_fraction": distributed.mean(batch["ended"]), "lr": run.scheduler.get_last_lr()[0],
               **{k: sum(v) / len(v) for k, v in stats.items()}}
        if eval_prompts and config.eval_every and iteration % config.eval_every == 0 and iteration < config.num_iterations:
            row.update(evaluate_now())
        if eval_prompts and iteration == config.num_iterations:
            last = evaluate_now()
            row.update(last)
            run.metrics.update(last)
        if iteration % config.log_every == 0 or iteration == config.num_iterations or "eval_score" in row:
            run.log.log(iteration, **row)
        run.metrics.update(score=row["score"], kl=row["kl"], kl_coef=kl_coef)
        run.maybe_save(stream=stream.state_dict(), kl_coef=kl_coef, generators={"sampling": generator})
        bar.update(1)
        bar.set_postfix(score=f"{row['score']:.3f}", kl=f"{mean_kl:.3f}")
    bar.close()
    run.metrics.update(iterations=config.num_iterations, seconds=run.seconds())
    run.publish(policy, tokenizer, data_files=[config.prompts_file] + ([config.ptx_file] if config.ptx_file else []),
                extra={"reference": str(config.ref_model or config.model), "reward_model": str(config.reward_model)})
    return run.metrics
