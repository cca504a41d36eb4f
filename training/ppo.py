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
controller reads the KL, over all ranks' rollouts; policy and value gradients are summed
across ranks (distributed.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhfkit.chat import end_token_ids, prompt_ids
from rlhfkit.hf import cache_kwargs, output_cache, resolve_model

from . import distributed, task
from .checkpoint import publish_checkpoint, read_info
from .common import MetricsLog, batched, default_log_dir, pick_device, seed_everything, warmup_cosine
from .data import fingerprint_files, read_jsonl
from .losses import gae, masked_mean, ppo_policy_loss, ppo_value_loss, whiten
from .ops import fused_linear_logprobs, kl_from_logprobs, sample_tokens
from .rm import score_pairs
from .sft import IGNORE, collate, sft_loss, tokenize_sft, trained_tokens


@dataclass
class PPOConfig:
    """Optimise a policy against a reward model with PPO, a KL penalty to the reference and optional PPO-ptx."""

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
    warmup_ratio: float = field(default=0.0, metadata={"help": "fraction of iterations of linear warmup"})
    min_lr_ratio: float = field(default=1.0, metadata={"help": "cosine decays to this fraction of the peak LR (1: constant)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm (0: no clipping)"})
    eval_every: int = field(default=0, metadata={"help": "eval every N iterations (0: at the start and the end)"})
    log_dir: str | None = field(default=None, metadata={"help": "metrics.jsonl and curves.png (default: runs/ beside the output)"})
    seed: int = field(default=0, metadata={"help": "random seed (prompt order, sampling)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output directory"})
    revision: str | None = field(default=None, metadata={"help": "branch, tag or commit of --model when it is a Hugging Face Hub id (read through the Hub cache; HF_HUB_OFFLINE=1 is honoured)"})

    def __post_init__(self):
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


# ---------------------------------------------------------------- rollouts

def end_id_tensor(eos_id, device) -> torch.Tensor:
    """One end id, or the set of them (rlhfkit.chat.end_token_ids), as a 1-d tensor."""
    return torch.tensor(sorted({eos_id} if isinstance(eos_id, int) else set(eos_id)), device=device)


@torch.no_grad()
def generate(policy, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float, eos_id, pad_id: int,
             generator: torch.Generator | None, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample responses with a KV cache. Prompts are left-padded (positions counted from
    each prompt's first real token). `eos_id`: the id, or the set of ids, that ends a
    response (the server's rule: rlhfkit.chat.end_token_ids). Returns (prompt_ids [B, P]
    left-padded, prompt_mask, response_ids [B, R] with pad after the end id)."""
    B = len(prompt_ids)
    width = max(len(p) for p in prompt_ids)
    prompts = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompt_ids], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    out = policy(input_ids=prompts, attention_mask=prompt_mask, position_ids=positions, use_cache=True)
    cache, logits = output_cache(out), out.logits[:, -1].float()
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
                     **cache_kwargs(policy, cache), use_cache=True)
        cache, logits, next_position = output_cache(out), out.logits[:, -1].float(), next_position + 1
    return prompts, prompt_mask, torch.stack(tokens, dim=1)


def response_mask_of(responses: torch.Tensor, eos_id) -> torch.Tensor:
    """1 on response tokens up to and including the first end id (all of them if none)."""
    is_eos = torch.isin(responses, end_id_tensor(eos_id, responses.device)).long()
    after_eos = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after_eos).long()


def response_logprobs(policy, prompts, prompt_mask, responses, response_mask, temperature: float,
                      return_entropy: bool = False):
    """log π(response_t | prompt, response_<t) [B, R] (0 off the mask), from one forward pass
    over prompt + response through the shared kernel; with return_entropy, also the entropy."""
    input_ids = torch.cat([prompts, responses], dim=1)
    attention = torch.cat([prompt_mask, response_mask], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    hidden = policy.base_model(input_ids=input_ids, attention_mask=attention, position_ids=positions).last_hidden_state
    P = prompts.shape[1]
    labels = torch.where(response_mask.bool(), responses, torch.full_like(responses, IGNORE))
    return fused_linear_logprobs(hidden[:, P - 1:-1], policy.get_output_embeddings().weight, labels,
                                 temperature=temperature, ignore_index=IGNORE, return_entropy=return_entropy)


def response_values(value_model, prompts, prompt_mask, responses, response_mask) -> torch.Tensor:
    """V(state before response_t) [B, R]: the RM-shaped head read at every position."""
    input_ids = torch.cat([prompts, responses], dim=1)
    attention = torch.cat([prompt_mask, response_mask], dim=1)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    hidden = value_model.base_model(input_ids=input_ids, attention_mask=attention, position_ids=positions).last_hidden_state
    P = prompts.shape[1]
    return value_model.score(hidden[:, P - 1:-1]).squeeze(-1).float() * response_mask


def decode_responses(tokenizer, responses, response_mask) -> list[str]:
    """The responses' text as the server returns it: special tokens (the end id) skipped."""
    return [tokenizer.decode([t for t, m in zip(row, mask) if m], skip_special_tokens=True)
            for row, mask in zip(responses.tolist(), response_mask.tolist())]


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

def _load(config: PPOConfig, device):
    """Each model reference a local directory or a Hub id (rlhfkit.hf.resolve_model)."""
    model = resolve_model(config.model, config.revision)
    ref_path = resolve_model(config.ref_model) if config.ref_model else model
    rm_path = resolve_model(config.reward_model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(device)
    ref = AutoModelForCausalLM.from_pretrained(ref_path, dtype=torch.float32).to(device).eval()
    rm_tokenizer = AutoTokenizer.from_pretrained(rm_path)
    reward_model = AutoModelForSequenceClassification.from_pretrained(rm_path, dtype=torch.float32).to(device).eval()
    value_model = AutoModelForSequenceClassification.from_pretrained(rm_path, dtype=torch.float32).to(device)
    for model in (ref, reward_model):
        model.requires_grad_(False)
    return tokenizer, policy, ref, rm_tokenizer, reward_model, value_model


@torch.no_grad()
def rollout_batch(prompts_text, tokenizer, policy, ref, rm_tokenizer, reward_model, value_model, config, kl_coef,
                  reward_bias, generator, device) -> dict:
    end_ids = end_token_ids(tokenizer, policy.generation_config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = [prompt_ids(tokenizer, p)[-config.max_prompt_length:] for p in prompts_text]
    policy.eval()
    prompts, prompt_mask, responses = generate(policy, ids, config.max_new_tokens, config.temperature, end_ids,
                                               pad_id, generator, device)
    mask = response_mask_of(responses, end_ids)
    logprobs = response_logprobs(policy, prompts, prompt_mask, responses, mask, config.temperature)
    ref_logprobs = response_logprobs(ref, prompts, prompt_mask, responses, mask, config.temperature)
    values = response_values(value_model, prompts, prompt_mask, responses, mask)
    texts = decode_responses(tokenizer, responses, mask)
    scores = score_pairs(reward_model, rm_tokenizer, list(zip(prompts_text, texts)), 1 << 30, device)
    scores = scores + reward_bias
    ended = torch.isin(responses, end_id_tensor(end_ids, device)).any(-1)
    scores = scores - config.missing_eos_penalty * (~ended).float()
    rewards, kl = shaped_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, config.kl_estimator)
    advantages, returns = gae(rewards, values, mask, config.gamma, config.lam)
    advantages = whiten_across_ranks(advantages, mask)
    policy.train()
    return {"prompts": prompts, "prompt_mask": prompt_mask, "responses": responses, "mask": mask,
            "logprobs": logprobs, "values": values, "advantages": advantages, "returns": returns,
            "scores": scores, "kl": kl.sum(-1), "ended": ended, "texts": texts}


@torch.no_grad()
def evaluate(prompts_text, tokenizer, policy, rm_tokenizer, reward_model, config, reward_bias, device) -> dict:
    """Mean RM score of sampled responses to held-out prompts (seeded: comparable across
    evals), and the bundled task's gold utility when the prompts are the task's."""
    generator = torch.Generator(device=device).manual_seed(config.seed + 12345 + distributed.rank())
    scores, utilities = [], []
    end_ids = end_token_ids(tokenizer, policy.generation_config)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    policy.eval()
    for chunk in batched(distributed.shard(prompts_text), config.rollout_batch_size):
        ids = [prompt_ids(tokenizer, p)[-config.max_prompt_length:] for p in chunk]
        prompts, prompt_mask, responses = generate(policy, ids, config.max_new_tokens, config.temperature,
                                                   end_ids, pad_id, generator, device)
        texts = decode_responses(tokenizer, responses, response_mask_of(responses, end_ids))
        scores += (score_pairs(reward_model, rm_tokenizer, list(zip(chunk, texts)), 1 << 30, device)
                   + reward_bias).tolist()
        for p, t in zip(chunk, texts):
            try:
                utilities.append(task.utility(p, t))
            except ValueError:  # not a prompt of the bundled task
                pass
    policy.train()
    score_sum, n_scores, utility_sum, n_utilities = distributed.all_sum(
        [sum(scores), len(scores), sum(utilities), len(utilities)])
    result = {"eval_score": score_sum / n_scores}
    if n_utilities == n_scores:
        result["eval_task_utility"] = utility_sum / n_utilities
    return result


def train_ppo(config: PPOConfig) -> dict:
    """Train, publish the policy, return the final metrics."""
    rng = seed_everything(config.seed)
    device = distributed.init(pick_device(config.device))
    world = distributed.world_size()
    generator = torch.Generator(device=device).manual_seed(config.seed + distributed.rank())
    tokenizer, policy, ref, rm_tokenizer, reward_model, value_model = _load(config, device)
    distributed.broadcast_parameters(policy, value_model)
    reward_bias = float(read_info(resolve_model(config.reward_model)).get("reward_bias", 0.0))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    prompts = [r["prompt"] for r in read_jsonl(config.prompts_file, "prompts")]
    eval_prompts = [r["prompt"] for r in read_jsonl(config.eval_prompts_file, "prompts")] if config.eval_prompts_file else []
    ptx = tokenize_sft(tokenizer, read_jsonl(config.ptx_file, "sft"), config.max_prompt_length + config.max_new_tokens) \
        if config.ptx_file else []
    if config.rollout_batch_size % world or config.minibatch_size % world or len(prompts) < world or 0 < len(ptx) < world:
        raise ValueError(f"with {world} processes, rollout_batch_size and minibatch_size must be multiples of {world}, "
                         f"and the prompts (and ptx demonstrations) at least {world}")
    params = [p for p in list(policy.parameters()) + list(value_model.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(0.9, 0.95), eps=1e-5)
    warmup = int(round(config.warmup_ratio * config.num_iterations))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: warmup_cosine(it, config.num_iterations, warmup, config.min_lr_ratio))
    log = MetricsLog(config.log_dir or default_log_dir(config.output_dir))
    metrics: dict = {"prompts": len(prompts)}
    kl_coef = config.kl_coef

    if eval_prompts:
        first = evaluate(eval_prompts, tokenizer, policy, rm_tokenizer, reward_model, config, reward_bias, device)
        log.log(0, **first)
        metrics.update({k + "_start": v for k, v in first.items()})

    def prompt_stream():
        while True:
            order = list(prompts)
            rng.shuffle(order)
            for chunk in batched(order, config.rollout_batch_size):
                chunk = chunk[:len(chunk) - len(chunk) % world]  # as many prompts for every rank
                if chunk:
                    yield distributed.shard(chunk)

    stream, start = prompt_stream(), time.time()
    bar = tqdm(total=config.num_iterations, desc="ppo", disable=not config.progress or not distributed.is_main())
    for iteration in range(1, config.num_iterations + 1):
        batch = rollout_batch(next(stream), tokenizer, policy, ref, rm_tokenizer, reward_model, value_model, config,
                              kl_coef, reward_bias, generator, device)
        stats: dict[str, list[float]] = {}
        for _ in range(config.ppo_epochs):
            for rows in batched(list(range(len(batch["scores"]))), config.minibatch_size // world, rng):
                idx = torch.tensor(rows, device=device)
                mb = {k: v[idx] for k, v in batch.items() if torch.is_tensor(v)}
                # The losses are means over the minibatch's tokens: each rank takes its share of them.
                share = float(mb["mask"].sum()) / distributed.all_sum([mb["mask"].sum()])[0]
                logprobs, entropy = response_logprobs(policy, mb["prompts"], mb["prompt_mask"], mb["responses"],
                                                      mb["mask"], config.temperature, return_entropy=True)
                values = response_values(value_model, mb["prompts"], mb["prompt_mask"], mb["responses"], mb["mask"])
                pg_loss, clipfrac, approx_kl = ppo_policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"],
                                                               config.clip_range)
                vf_loss, vf_clipfrac = ppo_value_loss(values, mb["values"], mb["returns"], mb["mask"],
                                                      config.clip_range_value)
                loss = (pg_loss + config.vf_coef * vf_loss) * share
                if ptx and config.ptx_coef > 0:
                    demos = rng.sample(ptx, min(len(ptx), config.minibatch_size))
                    mine = collate(distributed.shard(demos), pad_id)
                    ptx_loss, _ = sft_loss(policy, {k: v.to(device) for k, v in mine.items()}, trained_tokens(demos))
                    loss = loss + config.ptx_coef * ptx_loss
                    stats.setdefault("ptx_loss", []).append(ptx_loss.item())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                distributed.sum_gradients(params)
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
                optimizer.step()
                for name, value in (("pg_loss", pg_loss), ("vf_loss", vf_loss), ("clipfrac", clipfrac),
                                    ("approx_kl", approx_kl), ("vf_clipfrac", vf_clipfrac),
                                    ("entropy", masked_mean(entropy.detach(), mb["mask"]))):
                    stats.setdefault(name, []).append(value.item() * share)
        stats = {k: distributed.all_sum(v) for k, v in stats.items()}  # the ranks' shares add up to the means
        scheduler.step()
        mean_kl = distributed.mean(batch["kl"])
        if config.kl_target > 0:  # Ziegler et al.'s proportional controller on the sequence KL
            error = max(-0.2, min(0.2, mean_kl / config.kl_target - 1))
            kl_coef *= 1 + error * len(batch["scores"]) * world / config.kl_horizon
        row = {"score": distributed.mean(batch["scores"]), "kl": mean_kl, "kl_coef": kl_coef,
               "response_length": distributed.mean(batch["mask"].sum(-1)),
               "eos_fraction": distributed.mean(batch["ended"]), "lr": scheduler.get_last_lr()[0],
               **{k: sum(v) / len(v) for k, v in stats.items()}}
        if eval_prompts and config.eval_every and iteration % config.eval_every == 0 and iteration < config.num_iterations:
            row.update(evaluate(eval_prompts, tokenizer, policy, rm_tokenizer, reward_model, config, reward_bias, device))
        if eval_prompts and iteration == config.num_iterations:
            last = evaluate(eval_prompts, tokenizer, policy, rm_tokenizer, reward_model, config, reward_bias, device)
            row.update(last)
            metrics.update(last)
        log.log(iteration, **row)
        metrics.update(score=row["score"], kl=row["kl"], kl_coef=kl_coef)
        bar.update(1)
        bar.set_postfix(score=f"{row['score']:.3f}", kl=f"{mean_kl:.3f}")
    bar.close()
    metrics.update(iterations=config.num_iterations, seconds=round(time.time() - start, 2))
    plot = log.close()
    if distributed.is_main():
        publish_checkpoint(policy, tokenizer, config.output_dir, stage="ppo", parent=config.model,
                           data_fingerprint=fingerprint_files([config.prompts_file] + ([config.ptx_file] if config.ptx_file else [])),
                           metrics=metrics, overwrite=config.overwrite,
                           extra={"reference": str(config.ref_model or config.model), "reward_model": str(config.reward_model),
                                  "config": asdict(config), "metrics_file": str(log.path), "plot": str(plot)})
    distributed.barrier()  # the other ranks return once the checkpoint is there
    return metrics
