"""PPO against a reward model (InstructGPT step 3), with the per-token KL penalty to the SFT
reference (Ziegler et al. 2019) and optionally the pretraining mix (PPO-ptx).

One iteration:
  1. rollout: sample responses to a batch of prompts (text, or conversations rendered by
     rlhfkit.chat as the server renders them) with the policy, through the same
     sample_tokens the server uses (temperature only: top-k/top-p would change the
     distribution the PPO ratio is taken against), ending at the server's end ids;
  2. score: every reward source (rlhfkit.training.rewards: the reward model reads prompt +
     response text the way the server's Reward.Score does, plus its reward_bias; a server's
     Score RPC; Python functions); log-probs of the policy and the reference and the values
     come from one forward pass each;
  3. rewards per token: -kl_coef * KL_t, plus the score on the last token; GAE; whitened
     advantages;
  4. ppo_epochs passes of clipped policy and value updates over minibatches, plus
     ptx_coef * the SFT loss on demonstrations when a ptx file is given; with
     --rollout-engine vllm each token's policy loss is weighted by the truncated ratio
     min(π_old / π_behaviour, is_cap).
The value model starts from the reward model (InstructGPT), or --value-model, and reads a
value at every token. With --eval-prompts-file and --select-best the published policy is the
evaluated one with the best held-out reward - kl_coef · KL.

Under torchrun each rank samples rollouts for its share of every rollout batch (with its own
seed) and takes that share of every minibatch; advantages are whitened, and the KL
controller reads the KL, over all ranks' rollouts; the policy and the value model train
as one module in the training skeleton (DDP or FSDP2 over both).
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
from .common import TrainConfig, batched
from .data import read_jsonl
from .losses import (clipped_policy_loss_per_token, gae, masked_mean, ppo_value_loss,
                     truncated_importance_weights, whiten)
from .rewards import RewardOptions, Rewards, column_names, columns_of
from .rollouts import (PromptStream, RLOptions, Sampler, add_minibatch_stats, end_iteration, end_rl_run, frozen,
                       held_out_evaluation, is_statistics, log_first_evaluation, minibatch_means, start_sampler)
from .sequences import (collate, decode_responses, disable_dropout, end_id_tensor, pad_id_of, response_logprobs,
                        response_mask_of, response_values, sft_loss, tokenize_sft, trained_tokens)
from .skeleton import LossModule, Run


@dataclass(kw_only=True)
class PPOConfig(RLOptions, RewardOptions, TrainConfig):
    """Optimise a policy against a reward model with PPO, a KL penalty to the reference and optional PPO-ptx.

    A step is one iteration (a rollout batch, then ppo_epochs passes of minibatch updates):
    the schedule, log_every, eval_every and save_every count iterations; micro_batch_size
    splits each minibatch's forward/backward. With LoRA, the reference is the policy's
    base weights (its adapter disabled) unless --ref-model is given, and the reward model is
    the value model's (the value model is the reward model with an adapter), so no frozen
    copy is loaded twice."""

    value_model: str | None = field(default=None, metadata={"help": "the value model's starting point (default: --reward-model; without one, the policy with a new value head)"})
    ptx_file: str | None = field(default=None, metadata={"help": "SFT demonstrations mixed into the loss (PPO-ptx)"})
    ptx_coef: float = field(default=0.0, metadata={"help": "weight of the SFT loss on --ptx-file (InstructGPT's gamma)"})
    rollout_batch_size: int = field(default=32, metadata={"help": "prompts per rollout (over all processes under torchrun)"})
    minibatch_size: int = field(default=8, metadata={"help": "rollouts per gradient step (over all processes under torchrun)"})
    ppo_epochs: int = field(default=2, metadata={"help": "passes over each rollout batch"})
    kl_coef: float = field(default=0.05, metadata={"help": "initial weight of the per-token KL penalty"})
    kl_estimator: Literal["k1", "k2", "k3"] = field(default="k1", metadata={"help": "per-token KL estimate in the reward"})
    gamma: float = field(default=1.0, metadata={"help": "discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    clip_range: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    clip_range_value: float = field(default=0.2, metadata={"help": "value clip"})
    vf_coef: float = field(default=0.1, metadata={"help": "value loss weight"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay on matrices"})
    adam_eps: float = field(default=1e-5, metadata={"help": "AdamW's epsilon"})
    seed: int = field(default=0, metadata={"help": "random seed (prompt order, sampling)"})

    def __post_init__(self):
        super().__post_init__()
        for name in ("rollout_batch_size", "minibatch_size", "ppo_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.ptx_coef > 0 and not self.ptx_file:
            raise ValueError("ptx_coef > 0 needs --ptx-file")
        if not 0 < self.lam <= 1 or not 0 < self.gamma <= 1:
            raise ValueError("gamma and lam must be in (0, 1]")


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

def _load(run: Run, config: PPOConfig):
    """Each model reference a local directory or a Hub id (rlhfkit.hf.resolve_model). With
    LoRA and no separate --ref-model, ref is None: the policy's base. With LoRA and the value
    model started from the reward model, that model's base weights are the scorer."""
    model = resolve_model(config.model, config.revision)
    tokenizer = AutoTokenizer.from_pretrained(model)
    policy = run.load(AutoModelForCausalLM, model)
    disable_dropout(policy)
    ref = None
    if config.ref_model or not config.lora_r:
        ref = run.load(AutoModelForCausalLM, resolve_model(config.ref_model) if config.ref_model else model,
                       trainable=False)
    rm_path = resolve_model(config.reward_model) if config.reward_model else None
    value_path = resolve_model(config.value_model) if config.value_model else rm_path or model
    value_model = run.load(AutoModelForSequenceClassification, value_path, num_labels=1)
    disable_dropout(value_model)
    scorer = rm_tokenizer = None
    bias = 0.0
    if rm_path:
        rm_tokenizer = AutoTokenizer.from_pretrained(rm_path)
        bias = float(read_info(rm_path).get("reward_bias", 0.0))
        if config.lora_r and value_path == rm_path:
            scorer = partial(frozen, None, value_model)
        else:
            scorer = run.load(AutoModelForSequenceClassification, rm_path, trainable=False).eval()
    rewards = Rewards(config, reward_model=scorer, rm_tokenizer=rm_tokenizer, reward_bias=bias, device=run.device)
    return tokenizer, policy, ref, rewards, value_model


@torch.no_grad()
def rollout_batch(prompts_text, tokenizer, policy, ref, rm_tokenizer, reward_model, value_model, config, kl_coef,
                  reward_bias, generator, device, *, rewards: Rewards | None = None, columns: dict | None = None,
                  sampler: Sampler | None = None) -> dict:
    """Sample, score and value one rollout batch. `ref` None: the policy's base weights
    (LoRA). `rewards`: the run's reward sources (default: `reward_model` alone, or with
    None the value model's base weights); `columns`: the prompts' other columns, for reward
    functions; `sampler`: where rollouts are sampled (default: the policy itself)."""
    end_ids = end_token_ids(tokenizer, policy.generation_config)
    pad_id = pad_id_of(tokenizer)
    ids = [prompt_ids(tokenizer, p)[-config.max_prompt_length:] for p in prompts_text]
    if rewards is None:
        rewards = Rewards(config, reward_model=partial(frozen, reward_model, value_model), rm_tokenizer=rm_tokenizer,
                          reward_bias=reward_bias, device=device)
    policy.eval()
    value_model.eval()
    prompts, prompt_mask, responses, behaviour = (sampler or Sampler()).sample(
        policy, ids, 1, config.max_new_tokens, config.temperature, end_ids, pad_id, generator, device)
    mask = response_mask_of(responses, end_ids)
    logprobs = response_logprobs(policy, prompts, prompt_mask, responses, mask, config.temperature)
    with frozen(ref, policy) as reference:
        ref_logprobs = response_logprobs(reference, prompts, prompt_mask, responses, mask, config.temperature)
    values = response_values(value_model, prompts, prompt_mask, responses, mask)
    texts = decode_responses(tokenizer, responses, mask)
    scores, parts = rewards(prompts_text, texts, columns, device)
    ended = torch.isin(responses, end_id_tensor(end_ids, device)).any(-1)
    scores = scores - config.missing_eos_penalty * (~ended).float()
    shaped, kl = shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, config.kl_estimator)
    advantages, returns = gae(shaped, values, mask, config.gamma, config.lam)
    advantages = whiten_across_ranks(advantages, mask)
    # In-process rollouts: the behaviour is the trainer's old policy, and the weights are exactly 1.
    is_weights, is_stats = truncated_importance_weights(logprobs, logprobs if behaviour is None else behaviour, mask,
                                                        config.is_cap, config.is_level)
    policy.train()
    value_model.train()
    return {"prompts": prompts, "prompt_mask": prompt_mask, "responses": responses, "mask": mask,
            "logprobs": logprobs, "values": values, "advantages": advantages, "returns": returns,
            "is_weights": is_weights, "scores": scores, "kl": kl.sum(-1), "ended": ended, "texts": texts,
            "parts": parts, "is_stats": is_stats}


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
    per_token, clipped = clipped_policy_loss_per_token(logprobs, mb["logprobs"], mb["advantages"], config.clip_range)
    pg_loss = masked_mean(per_token * mb["is_weights"], mb["mask"])
    clipfrac = masked_mean(clipped, mb["mask"])
    approx_kl = masked_mean(0.5 * (logprobs.detach() - mb["logprobs"]) ** 2, mb["mask"])
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
    tokenizer, policy, ref, rewards, value_model = _load(run, config)
    pad_id = pad_id_of(tokenizer)
    end_ids = end_token_ids(tokenizer, policy.generation_config)

    records = read_jsonl(config.prompts_file, "prompts")
    names = column_names(records)
    eval_records = read_jsonl(config.eval_prompts_file, "prompts") if config.eval_prompts_file else []
    ptx = tokenize_sft(tokenizer, read_jsonl(config.ptx_file, "sft"), config.max_prompt_length + config.max_new_tokens) \
        if config.ptx_file else []
    if config.rollout_batch_size % world or config.minibatch_size % world or len(records) < world or 0 < len(ptx) < world:
        raise ValueError(f"with {world} processes, rollout_batch_size and minibatch_size must be multiples of {world}, "
                         f"and the prompts (and ptx demonstrations) at least {world}")
    run.prepare(LossModule(partial(micro_loss, config=config, pad_id=pad_id, device=device), policy=policy,
                           value=value_model), config.num_iterations)
    generator = run.restore_generator("sampling", generator)
    run.metrics.setdefault("prompts", len(records))
    kl_coef = run.resumed_state("kl_coef", config.kl_coef)
    sampler = start_sampler(run, config, policy)
    select = config.select_best and bool(eval_records)

    def evaluate_now() -> dict:
        value_model.eval()  # with LoRA its base weights may be the scorer
        result = held_out_evaluation(run, eval_records, select=select, column_names=names, tokenizer=tokenizer,
                                     policy=policy, ref=ref, rewards=rewards, config=config, end_ids=end_ids,
                                     device=device)
        value_model.train()
        return result

    if eval_records and run.step == 0:
        log_first_evaluation(run, evaluate_now())

    stream = PromptStream(run, list(range(len(records))), config.rollout_batch_size)  # by index: columns follow
    bar = tqdm(total=config.num_iterations, initial=run.step, desc="ppo",
               disable=not config.progress or not distributed.is_main())
    while run.step < config.num_iterations:
        with run.inference():
            chosen = [records[i] for i in next(stream)]
            batch = rollout_batch([r["prompt"] for r in chosen], tokenizer, policy, ref, None, None, value_model,
                                  config, kl_coef, 0.0, generator, device, rewards=rewards, columns=columns_of(chosen, names),
                                  sampler=sampler)
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
                add_minibatch_stats(stats, parts)
        mean_kl, kl_coef = end_iteration(run, sampler, policy, batch, kl_coef, config)
        iteration = run.step
        row = {"score": distributed.mean(batch["scores"]), "kl": mean_kl, "kl_coef": kl_coef,
               "response_length": distributed.mean(batch["mask"].sum(-1)),
               "eos_fraction": distributed.mean(batch["ended"]), "lr": run.scheduler.get_last_lr()[0],
               **({k: distributed.mean(v) for k, v in batch["parts"].items()} if len(batch["parts"]) > 1 else {}),
               **is_statistics(batch["is_stats"], batch["mask"]),
               **minibatch_means(stats)}
        if sampler.sync_seconds:
            row["weight_sync_seconds"] = sampler.sync_seconds[-1]
        if eval_records and ((config.eval_every and iteration % config.eval_every == 0)
                             or iteration == config.num_iterations):
            row.update(evaluate_now())
        if iteration % config.log_every == 0 or iteration == config.num_iterations or "eval_score" in row:
            run.log.log(iteration, **row)
        run.metrics.update(score=row["score"], kl=row["kl"], kl_coef=kl_coef)
        run.maybe_save(stream=stream.state_dict(), kl_coef=kl_coef, generators={"sampling": generator})
        bar.update(1)
        bar.set_postfix(score=f"{row['score']:.3f}", kl=f"{mean_kl:.3f}")
    bar.close()
    end_rl_run(run, sampler, rewards, select)
    run.publish(policy, tokenizer, data_files=[config.prompts_file] + ([config.ptx_file] if config.ptx_file else []),
                extra={"reference": str(config.ref_model or config.model), "reward_model": config.reward_model,
                       "rewards": rewards.names, "selected_iteration": run.metrics.get("selected_iteration")})
    return run.metrics
