"""Critic-free policy gradients: GRPO (Shao et al. 2024, with Dr. GRPO's options) and RLOO
(Ahmadian et al. 2024). No value model: the baseline of each response is the other
responses to its prompt, so G responses are sampled per prompt (the prompt prefilled once).

One iteration:
  1. rollout: G samples for each of prompts_per_iteration prompts, by the native sampler
     or an in-process vLLM (--rollout-engine vllm, weights pushed after every update);
  2. the trainer recomputes the old policy's log-probs with its own kernels (and the
     reference's when there is a KL term); rewards from every source (rlhfkit.training.rewards);
  3. advantages per group: GRPO (r - mean) / std (Dr. GRPO: no std), RLOO r - mean of the
     others; with --kl-in reward the sequence KL is subtracted from the reward first;
  4. ppo_epochs passes of the clipped surrogate over minibatches, each token weighted by
     the truncated importance ratio min(π_old / π_behaviour, is_cap) when the rollouts came
     from another engine, plus beta · the per-token KL with --kl-in loss; aggregated as
     --loss-aggregation says.
Evaluation on held-out prompts logs the reward, the KL to the reference and (the bundled
task) the gold utility; with --select-best the published policy is the evaluated one with
the best reward − kl_coef · KL, the objective the run optimises, so a late policy that games
its reward model at a large KL is not the one served.

Under torchrun each rank samples whole groups for its share of the prompts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhfkit.chat import end_token_ids, prompt_ids
from rlhfkit.hf import resolve_model
from rlhfkit.kernels import kl_from_logprobs

from . import distributed
from .checkpoint import read_info
from .common import TrainConfig
from .data import read_jsonl
from .losses import (KL_PENALTIES, LOSS_AGGREGATIONS, aggregate_loss, clipped_policy_loss_per_token,
                     group_advantages, kl_penalty, masked_mean, rloo_advantages, truncated_importance_weights)
from .rewards import RewardOptions, Rewards, column_names, columns_of
from .rollouts import (PromptStream, RLOptions, add_minibatch_stats, end_iteration, end_rl_run, frozen,
                       held_out_evaluation, is_statistics, log_first_evaluation, minibatch_means, sequence_kl,
                       start_sampler)
from .sequences import decode_responses, disable_dropout, end_id_tensor, pad_id_of, response_logprobs, response_mask_of
from .skeleton import LossModule, Run


@dataclass(kw_only=True)
class CriticFreeConfig(RLOptions, RewardOptions, TrainConfig):
    """What GRPO and RLOO share. A step is one iteration (a rollout batch, then ppo_epochs passes of minibatch updates)."""

    prompts_per_iteration: int = field(default=8, metadata={"help": "prompts per rollout (over all processes under torchrun)"})
    num_generations: int = field(default=8, metadata={"help": "samples per prompt, G (the group of its baseline)"})
    minibatch_size: int = field(default=0, metadata={"help": "responses per gradient step, whole groups (over all processes; 0: the whole rollout)"})
    ppo_epochs: int = field(default=1, metadata={"help": "passes over each rollout (1: on-policy, the ratio stays 1 but for the importance correction)"})
    clip_range: float = field(default=0.2, metadata={"help": "policy ratio clip epsilon"})
    kl_coef: float = field(default=0.04, metadata={"help": "beta, the weight of the KL to the reference (0: no reference model is loaded)"})
    kl_estimator: Literal["k1", "k2", "k3", "k3_unbiased"] = field(default="k3", metadata={"help": "per-token KL estimator: in the loss k2, k3 (GRPO) or k3_unbiased (importance-weighted, unbiased gradient); in the reward k1, k2 or k3 (no gradient flows)"})
    kl_in: Literal["loss", "reward"] = field(default="loss", metadata={"help": "where the KL goes: a loss term (GRPO) or subtracted from each response's reward before the advantages (RLOO, PPO)"})
    loss_aggregation: Literal["token-mean", "sequence-mean", "token-sum"] = field(default="token-mean", metadata={"help": "token-mean (DAPO), sequence-mean (GRPO's paper) or token-sum over max_new_tokens per response (Dr. GRPO)"})

    def __post_init__(self):
        super().__post_init__()
        for name in ("prompts_per_iteration", "num_generations", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (the group is the baseline), got {self.num_generations}")
        if self.minibatch_size < 0 or self.minibatch_size % self.num_generations:
            raise ValueError(f"minibatch_size must be 0 (the whole rollout) or a multiple of num_generations "
                             f"({self.num_generations}), got {self.minibatch_size}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_estimator not in KL_PENALTIES:
            raise ValueError(f"kl_estimator must be one of {KL_PENALTIES}, got {self.kl_estimator!r}")
        if self.kl_in == "loss" and self.kl_estimator == "k1" and self.kl_coef > 0:
            raise ValueError("kl_estimator k1 has no expected gradient as a loss term: use k2, k3 or k3_unbiased "
                             "with --kl-in loss, or put k1 in the reward (--kl-in reward)")
        if self.kl_in == "reward" and self.kl_estimator == "k3_unbiased":
            raise ValueError("k3_unbiased is a loss term (its importance weight carries the gradient): use k1, k2 "
                             "or k3 with --kl-in reward")
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_aggregation must be one of {LOSS_AGGREGATIONS}, got {self.loss_aggregation!r}")


@dataclass(kw_only=True)
class GRPOConfig(CriticFreeConfig):
    """GRPO: G samples per prompt, advantages normalised within each group, clipped ratio, KL to the reference in the loss.

    Dr. GRPO is --no-scale-rewards --loss-aggregation token-sum."""

    scale_rewards: bool = field(default=True, metadata={"help": "divide each group's centred rewards by its std (GRPO); --no-scale-rewards: Dr. GRPO"})


@dataclass(kw_only=True)
class RLOOConfig(CriticFreeConfig):
    """RLOO: G samples per prompt, each one's baseline the mean reward of the other G-1, KL to the reference in the reward."""

    num_generations: int = field(default=4, metadata={"help": "samples per prompt, G (each one's baseline: the other G-1)"})
    kl_coef: float = field(default=0.05, metadata={"help": "beta, the weight of the KL to the reference (0: no reference model is loaded)"})
    kl_estimator: Literal["k1", "k2", "k3", "k3_unbiased"] = field(default="k1", metadata={"help": "per-token KL estimator: in the loss k2, k3 (GRPO) or k3_unbiased (importance-weighted, unbiased gradient); in the reward k1, k2 or k3 (no gradient flows)"})
    kl_in: Literal["loss", "reward"] = field(default="reward", metadata={"help": "where the KL goes: subtracted from each response's reward (RLOO) or a loss term"})


# ---------------------------------------------------------------- one rollout

def _load(run: Run, config: CriticFreeConfig):
    model = resolve_model(config.model, config.revision)
    tokenizer = AutoTokenizer.from_pretrained(model)
    policy = run.load(AutoModelForCausalLM, model)
    disable_dropout(policy)
    ref = None  # None: no KL term, or LoRA's adapter disabled
    # the reference: for the KL term, and for the held-out KL that checkpoint selection reads
    if (config.kl_coef > 0 or config.eval_prompts_file) and (config.ref_model or not config.lora_r):
        ref = run.load(AutoModelForCausalLM, resolve_model(config.ref_model) if config.ref_model else model,
                       trainable=False)
    reward_model = rm_tokenizer = None
    bias = 0.0
    if config.reward_model:
        rm_path = resolve_model(config.reward_model)
        rm_tokenizer = AutoTokenizer.from_pretrained(rm_path)
        reward_model = run.load(AutoModelForSequenceClassification, rm_path, trainable=False).eval()
        bias = float(read_info(rm_path).get("reward_bias", 0.0))
    rewards = Rewards(config, reward_model=reward_model, rm_tokenizer=rm_tokenizer, reward_bias=bias, device=run.device)
    return tokenizer, policy, ref, rewards


@torch.no_grad()
def rollout(records, *, tokenizer, policy, ref, rewards, sampler, config, advantages_of, kl_coef, generator,
            device, column_names: list[str]) -> dict:
    """G samples per prompt of `records`, their log-probs, rewards and advantages."""
    G = config.num_generations
    end_ids = end_token_ids(tokenizer, policy.generation_config)
    pad_id = pad_id_of(tokenizer)
    prompts_in = [r["prompt"] for r in records]
    ids = [prompt_ids(tokenizer, p)[-config.max_prompt_length:] for p in prompts_in]
    policy.eval()
    prompts, prompt_mask, responses, behaviour = sampler.sample(policy, ids, G, config.max_new_tokens,
                                                                config.temperature, end_ids, pad_id, generator, device)
    mask = response_mask_of(responses, end_ids)
    # The trainer's own log-probs of the old policy, whoever sampled (the ratio's denominator).
    old_logprobs = response_logprobs(policy, prompts, prompt_mask, responses, mask, config.temperature)
    ref_logprobs = None
    if ref is not None or config.lora_r:  # a reference to measure the KL against (LoRA: the base weights)
        with frozen(ref, policy) as reference:
            ref_logprobs = response_logprobs(reference, prompts, prompt_mask, responses, mask, config.temperature)
    policy.train()
    texts = decode_responses(tokenizer, responses, mask)
    columns = {k: [v for v in values for _ in range(G)] for k, values in columns_of(records, column_names).items()}
    scores, parts = rewards([p for p in prompts_in for _ in range(G)], texts, columns, device)
    ended = torch.isin(responses, end_id_tensor(end_ids, device)).any(-1)
    scores = scores - config.missing_eos_penalty * (~ended).float()
    kl = torch.zeros_like(scores) if ref_logprobs is None else sequence_kl(old_logprobs, ref_logprobs, mask)
    shaped = scores
    if config.kl_in == "reward" and ref_logprobs is not None:
        shaped = scores - kl_coef * (kl_from_logprobs(old_logprobs, ref_logprobs, config.kl_estimator) * mask).sum(-1)
    # In-process rollouts: the behaviour is the trainer's old policy, and the weights are exactly 1.
    is_weights, is_stats = truncated_importance_weights(old_logprobs, old_logprobs if behaviour is None else behaviour,
                                                        mask, config.is_cap, config.is_level)
    return {"prompts": prompts, "prompt_mask": prompt_mask, "responses": responses, "mask": mask,
            "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs, "advantages": advantages_of(shaped, G),
            "is_weights": is_weights, "scores": scores, "parts": parts, "kl": kl, "ended": ended,
            "is_stats": is_stats}


def micro_loss(rows, context, *, policy, config: CriticFreeConfig, device):
    """The clipped surrogate (times the importance weights) plus, with --kl-in loss, beta
    times the per-token KL, aggregated with the minibatch's totals over every rank so the
    micro-batches add up to the minibatch's loss."""
    batch, kl_coef = context["batch"], context["kl_coef"]
    idx = torch.tensor(rows, device=device)
    mb = {k: v[idx] for k, v in batch.items() if torch.is_tensor(v)}
    logprobs, entropy = response_logprobs(policy, mb["prompts"], mb["prompt_mask"], mb["responses"], mb["mask"],
                                          config.temperature, return_entropy=True)
    pg, clipped = clipped_policy_loss_per_token(logprobs, mb["old_logprobs"], mb["advantages"], config.clip_range)
    per_token = pg * mb["is_weights"]
    kl_term = None
    if config.kl_in == "loss" and kl_coef > 0:
        # weighted like the policy term: samples from another engine make π_old a proposal too
        kl_term = kl_penalty(logprobs, mb["ref_logprobs"], mb["old_logprobs"], config.kl_estimator) * mb["is_weights"]
        per_token = per_token + kl_coef * kl_term
    agg = partial(aggregate_loss, mask=mb["mask"], aggregation=config.loss_aggregation,
                  max_new_tokens=config.max_new_tokens, n_sequences=context["sequences"], n_tokens=context["tokens"])
    loss = agg(per_token)
    share = float(mb["mask"].sum()) / context["tokens"]  # statistics: token means over the minibatch
    stats = {"pg_loss": agg(pg.detach() * mb["is_weights"]).float(), "clipfrac": masked_mean(clipped, mb["mask"]) * share,
             "entropy": masked_mean(entropy.detach(), mb["mask"]).float() * share}
    if kl_term is not None:
        stats["kl_loss"] = agg(kl_term.detach()).float()
    return loss, stats


# ---------------------------------------------------------------- training

def _train(config: CriticFreeConfig, stage: str, advantages_of) -> dict:
    run = Run(config, stage)
    device, world = run.device, distributed.world_size()
    generator = torch.Generator(device=device).manual_seed(config.seed + distributed.rank())
    tokenizer, policy, ref, rewards = _load(run, config)
    end_ids = end_token_ids(tokenizer, policy.generation_config)
    records = read_jsonl(config.prompts_file, "prompts")
    names = column_names(records)
    eval_records = read_jsonl(config.eval_prompts_file, "prompts") if config.eval_prompts_file else []
    if config.prompts_per_iteration % world or len(records) < world:
        raise ValueError(f"with {world} processes, prompts_per_iteration must be a multiple of {world} and the "
                         f"prompts at least {world}")
    minibatch = config.minibatch_size or config.prompts_per_iteration * config.num_generations
    if minibatch // config.num_generations % world:
        raise ValueError(f"with {world} processes, minibatch_size / num_generations ({minibatch} / "
                         f"{config.num_generations}) must be a multiple of {world}: each process takes whole groups")
    groups_per_step = minibatch // config.num_generations // world
    run.prepare(LossModule(partial(micro_loss, config=config, device=device), policy=policy), config.num_iterations)
    generator = run.restore_generator("sampling", generator)
    kl_coef = run.resumed_state("kl_coef", config.kl_coef)
    sampler = start_sampler(run, config, policy)
    run.metrics.setdefault("prompts", len(records))
    select = config.select_best and bool(eval_records)

    def evaluate_now() -> dict:
        return held_out_evaluation(run, eval_records, select=select, column_names=names, tokenizer=tokenizer,
                                   policy=policy, ref=ref, rewards=rewards, config=config, end_ids=end_ids, device=device)

    if eval_records and run.step == 0:
        log_first_evaluation(run, evaluate_now())

    stream = PromptStream(run, records, config.prompts_per_iteration)
    bar = tqdm(total=config.num_iterations, initial=run.step, desc=stage,
               disable=not config.progress or not distributed.is_main())
    while run.step < config.num_iterations:
        with run.inference():
            batch = rollout(next(stream), tokenizer=tokenizer, policy=policy, ref=ref, rewards=rewards,
                            sampler=sampler, config=config, advantages_of=advantages_of, kl_coef=kl_coef,
                            generator=generator, device=device, column_names=names)
        G = config.num_generations
        groups = list(range(len(batch["scores"]) // G))
        stats: dict[str, list[float]] = {}
        grad_norms = []
        for _ in range(config.ppo_epochs):
            order = run.rng.sample(groups, len(groups))
            for i in range(0, len(order), groups_per_step):
                rows = [g * G + j for g in order[i:i + groups_per_step] for j in range(G)]
                tokens, sequences = distributed.all_sum([batch["mask"][rows].sum(), len(rows)])
                context = {"batch": batch, "tokens": tokens, "sequences": sequences, "kl_coef": kl_coef}
                _, parts = run.accumulate(rows, context, shard=False)
                grad_norms.append(run.optimizer_step())
                add_minibatch_stats(stats, parts)
        mean_kl, kl_coef = end_iteration(run, sampler, policy, batch, kl_coef, config)
        iteration = run.step
        row = {"reward": distributed.mean(batch["scores"]), "kl": mean_kl, "kl_coef": kl_coef,
               "reward_std_in_group": distributed.mean(batch["scores"].view(-1, G).std(-1)),
               "response_length": distributed.mean(batch["mask"].sum(-1).float()),
               "eos_fraction": distributed.mean(batch["ended"].float()), "lr": run.scheduler.get_last_lr()[0],
               "grad_norm": sum(grad_norms) / len(grad_norms),
               **{k: distributed.mean(v) for k, v in batch["parts"].items()},
               **is_statistics(batch["is_stats"], batch["mask"]),
               **minibatch_means(stats)}
        if sampler.sync_seconds:
            row["weight_sync_seconds"] = sampler.sync_seconds[-1]
        if eval_records and ((config.eval_every and iteration % config.eval_every == 0)
                             or iteration == config.num_iterations):
            row.update(evaluate_now())
        if iteration % config.log_every == 0 or iteration == config.num_iterations or "eval_score" in row:
            run.log.log(iteration, **row)
        run.metrics.update(reward=row["reward"], kl=mean_kl, kl_coef=kl_coef)
        run.maybe_save(stream=stream.state_dict(), kl_coef=kl_coef, generators={"sampling": generator})
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward']:.3f}", kl=f"{mean_kl:.3f}")
    bar.close()
    end_rl_run(run, sampler, rewards, select)
    run.publish(policy, tokenizer, data_files=[config.prompts_file],
                extra={"reference": str(config.ref_model or config.model), "rewards": rewards.names,
                       "selected_iteration": run.metrics.get("selected_iteration")})
    return run.metrics


def train_grpo(config: GRPOConfig) -> dict:
    """Train with GRPO (or Dr. GRPO), publish the policy, return the final metrics."""
    return _train(config, "grpo", partial(group_advantages, scale=config.scale_rewards))


def train_rloo(config: RLOOConfig) -> dict:
    """Train with RLOO, publish the policy, return the final metrics."""
    return _train(config, "rloo", rloo_advantages)
