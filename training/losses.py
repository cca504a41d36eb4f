"""The losses of RLHF, as plain functions of tensors (no models, no optimizers).

Reward model (InstructGPT, Ouyang et al. 2022): a Bradley-Terry pairwise loss and its
K-wise form, all C(K,2) pairs of one ranking in one go, normalised by 1/C(K,2) so a
prompt with more responses does not outweigh one with fewer.
PPO (Schulman et al. 2017, as in TRL/OpenAI lm-human-preferences): clipped policy and
value losses, GAE, whitening. Critic-free policy gradients: GRPO's group-normalised
advantages (Shao et al. 2024) and Dr. GRPO's unscaled ones (Liu et al. 2025), RLOO's
leave-one-out baseline (Ahmadian et al. 2024), the KL to the reference as a loss term, the
loss aggregations, and truncated importance sampling for rollouts whose log-probs came from
another engine (Yao et al. 2025). DPO (Rafailov et al. 2023) with its sigmoid, IPO and hinge
variants. Every mask is 1 (or True) where a token counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def masked_mean(x: Tensor, mask: Tensor | None = None, dim=None) -> Tensor:
    if mask is None:
        return x.mean() if dim is None else x.mean(dim)
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor | None = None, unbiased: bool = True) -> Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = float(x.numel()) if mask is None else float(mask.sum())
        var = var * n / max(n - 1.0, 1.0)
    return var


def whiten(x: Tensor, mask: Tensor | None = None, shift_mean: bool = True, eps: float = 1e-8,
           stats: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Scale to unit variance over the counted entries (and centre unless `shift_mean` is
    False: PPO whitens rewards without shifting them, so their sign survives). `stats`
    gives the (mean, unbiased variance) to use instead of x's own, e.g. over every rank."""
    mean, var = stats if stats is not None else (masked_mean(x, mask), masked_var(x, mask))
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out if mask is None else out * mask.to(x.dtype)


# ---------------------------------------------------------------- reward model

def pairwise_rm_loss(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | float | None = None,
                     center_coef: float = 0.0) -> Tensor:
    """-log σ(r_chosen - r_rejected - margin), averaged over pairs.

    `margin` (Llama 2) asks for a larger gap where annotators were surer. `center_coef`
    adds coef * mean((r_chosen + r_rejected)^2) (TRL's center_rewards_coefficient): the
    Bradley-Terry loss only sees differences, this keeps the rewards' offset near 0.
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


def ranking_rm_loss(rewards: Tensor, mask: Tensor | None = None) -> Tensor:
    """InstructGPT's K-wise loss. `rewards[B, K]` holds each prompt's responses ordered
    best to worst; every pair (i < j) contributes -log σ(r_i - r_j), averaged per prompt
    over its C(k, 2) pairs, then over prompts. `mask[B, K]` marks the real responses when
    prompts have different k (padding at the end of a row)."""
    B, K = rewards.shape
    if mask is None:
        mask = torch.ones(B, K, dtype=torch.bool, device=rewards.device)
    mask = mask.bool()
    better_first = torch.triu(torch.ones(K, K, dtype=torch.bool, device=rewards.device), diagonal=1)
    pair_mask = better_first & mask[:, :, None] & mask[:, None, :]  # [B, K, K], pair (i, j), i better
    pair_loss = -F.logsigmoid(rewards[:, :, None] - rewards[:, None, :])
    pairs_per_prompt = pair_mask.sum(dim=(1, 2))
    if (pairs_per_prompt == 0).any():
        raise ValueError("every ranking needs at least two responses")
    per_prompt = (pair_loss * pair_mask).sum(dim=(1, 2)) / pairs_per_prompt
    return per_prompt.mean()


# ---------------------------------------------------------------- PPO

def clipped_policy_loss_per_token(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
                                  clip_range: float = 0.2) -> tuple[Tensor, Tensor]:
    """max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)) per token, ρ = π/π_old; `advantages` per token [B, T]
    or per sequence [B]. Returns (loss per token, clipped: 1 where the clipped term won
    strictly; a ratio exactly at 1±ε is not clipped, both terms being equal)."""
    if advantages.dim() == logprobs.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).detach().to(logprobs.dtype)


def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor | None = None,
                    clip_range: float = 0.2) -> tuple[Tensor, Tensor, Tensor]:
    """Clipped surrogate: mean of max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)), ρ = π/π_old per token.

    Returns (loss, clip_fraction, approx_kl). clip_fraction counts tokens where the clipped
    term won strictly; approx_kl = mean(½ (log ρ)²), the estimator TRL and OpenAI's baselines log.
    """
    per_token, clipped = clipped_policy_loss_per_token(logprobs, old_logprobs, advantages, clip_range)
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        clip_fraction = masked_mean(clipped, mask)
        approx_kl = masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask)
    return loss, clip_fraction, approx_kl


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor | None = None,
                   clip_range_value: float = 0.2) -> tuple[Tensor, Tensor]:
    """½ mean of max((V - R)², (V_clipped - R)²), V_clipped = V_old + clip(V - V_old, ±ε).
    Returns (loss, clip_fraction)."""
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask)
    return loss, clip_fraction


def gae(rewards: Tensor, values: Tensor, mask: Tensor | None = None, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over [B, T] per-token rewards and values.

    Positions with mask 0 are skipped: the recursion carries the next counted token's
    value and advantage across them, so left or right padding (or holes) change nothing.
    The value after a row's last counted token is 0 (the episode ends there).
    Returns (advantages, returns = advantages + values), both 0 where mask is 0.
    """
    if mask is None:
        mask = torch.ones_like(rewards)
    mask = mask.bool()
    B, T = rewards.shape
    next_value = torch.zeros(B, dtype=values.dtype, device=values.device)
    next_advantage = torch.zeros(B, dtype=values.dtype, device=values.device)
    advantages = torch.zeros_like(values)
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage_t = delta + gamma * lam * next_advantage
        counted = mask[:, t]
        advantages[:, t] = torch.where(counted, advantage_t, torch.zeros_like(advantage_t))
        next_value = torch.where(counted, values[:, t], next_value)
        next_advantage = torch.where(counted, advantage_t, next_advantage)
    returns = (advantages + values) * mask.to(values.dtype)
    return advantages, returns


# ---------------------------------------------------------------- critic-free (GRPO, RLOO)

def group_advantages(rewards: Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO: each reward minus the mean of its group, over the group's (unbiased) std + eps;
    `rewards` [N] holds N / group_size groups of consecutive samples of one prompt.
    scale=False is Dr. GRPO's: no division by the std, which weighs prompts whose samples
    all score alike (too easy or too hard) as much as the informative ones."""
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(-1, keepdim=True)
    if scale:
        centred = centred / (groups.std(-1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """RLOO: each reward minus the mean of the other group_size - 1 rewards of its prompt
    (an unbiased baseline: it does not depend on the sample it is subtracted from)."""
    if group_size < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got {group_size}")
    groups = rewards.view(-1, group_size)
    others = (groups.sum(-1, keepdim=True) - groups) / (group_size - 1)
    return (groups - others).reshape(-1)


KL_PENALTIES = ("k1", "k2", "k3", "k3_unbiased")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, old_logprobs: Tensor | None = None,
               estimator: str = "k3") -> Tensor:
    """Per-token KL(π || ref) estimate for the loss, differentiable in `logprobs`.

    k1 = log π/ref has zero expected gradient (E_π[∇ log π] = 0): use it in the reward, not
    the loss. k2 = ½ (log π/ref)²: its gradient is the reverse KL's on-policy. k3 =
    ref/π - 1 - log ref/π (GRPO's): unbiased in value, biased in gradient. k3_unbiased =
    (π/π_old)·k3 (DeepSeek-V3.2): the importance weight makes E_π_old of it equal KL(π || ref)
    for every θ, so its gradient is the KL's gradient; needs `old_logprobs`."""
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator not in ("k3", "k3_unbiased"):
        raise ValueError(f"estimator must be one of {KL_PENALTIES}, got {estimator!r}")
    k3 = torch.expm1(log_ratio) - log_ratio
    if estimator == "k3":
        return k3
    if old_logprobs is None:
        raise ValueError("k3_unbiased needs old_logprobs (the sampling policy's)")
    return torch.exp(logprobs - old_logprobs) * k3


LOSS_AGGREGATIONS = ("token-mean", "sequence-mean", "token-sum")


def aggregate_loss(per_token: Tensor, mask: Tensor, aggregation: str, *, max_new_tokens: int | None = None,
                   n_sequences: int | None = None, n_tokens: int | None = None) -> Tensor:
    """One loss from per-token terms [B, T]:
      token-mean     sum over every counted token / their count (DAPO; long responses weigh more),
      sequence-mean  the mean over sequences of each one's token mean (GRPO's paper),
      token-sum      sum / (sequences · max_new_tokens), a constant (Dr. GRPO: no length bias).
    `n_sequences` / `n_tokens` are the whole batch's (every micro-batch, every rank) when this
    is a part of it, so the parts add up to the batch's loss; default: this batch's own."""
    mask = mask.to(per_token.dtype)
    n_sequences = n_sequences or per_token.shape[0]
    if aggregation == "token-mean":
        return (per_token * mask).sum() / max(n_tokens or float(mask.sum()), 1.0)
    if aggregation == "sequence-mean":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_sequences
    if aggregation == "token-sum":
        if not max_new_tokens:
            raise ValueError("token-sum aggregation needs max_new_tokens")
        return (per_token * mask).sum() / (n_sequences * max_new_tokens)
    raise ValueError(f"aggregation must be one of {LOSS_AGGREGATIONS}, got {aggregation!r}")


IS_LEVELS = ("token", "sequence")


@torch.no_grad()
def truncated_importance_weights(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, cap: float,
                                 level: str = "token") -> tuple[Tensor, dict[str, Tensor]]:
    """Truncated importance sampling for rollouts sampled by another engine or precision:
    w = min(π_train_old / π_behaviour, cap) per token, or one weight per sequence from the
    product of its tokens' ratios; the policy loss is multiplied by w. Returns (w [B, T],
    stats): the mismatch KL(behaviour || trainer) per token (k3, on the behaviour's samples),
    the ratio's mean and max and the fraction of weights capped, over counted tokens
    (sequences, at sequence level; how many: is_units)."""
    m = mask.to(old_logprobs.dtype)
    log_ratio = (old_logprobs - behaviour_logprobs) * m
    if level == "token":
        ratio, counted = torch.exp(log_ratio), mask.bool()
    elif level == "sequence":
        ratio = torch.exp(log_ratio.sum(-1, keepdim=True)).expand_as(log_ratio)
        counted = torch.zeros_like(mask, dtype=torch.bool)
        counted[:, 0] = mask.bool().any(-1)
    else:
        raise ValueError(f"level must be one of {IS_LEVELS}, got {level!r}")
    weights = ratio.clamp(max=cap) * m
    r = ratio[counted]
    stats = {"mismatch_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
             "is_ratio_mean": r.mean() if r.numel() else ratio.new_tensor(1.0),
             "is_ratio_max": r.max() if r.numel() else ratio.new_tensor(1.0),
             "is_capped_fraction": (r > cap).to(ratio.dtype).mean() if r.numel() else ratio.new_tensor(0.0),
             "is_units": ratio.new_tensor(float(r.numel()))}  # tokens (sequences) the ratio stats are over
    return weights, stats


# ---------------------------------------------------------------- DPO

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """DPO on summed sequence log-probs. h = (π_c - π_r) - (ref_c - ref_r).

    sigmoid: -(1-s)·log σ(βh) - s·log σ(-βh)  (s = label_smoothing: the conservative DPO
             of Mitchell 2023, for labels flipped with probability s)
    ipo:     (h - 1/(2β))²  (Azar et al. 2023; pass length-averaged log-probs, as TRL does)
    hinge:   max(0, 1 - βh)  (SLiC)
    Returns (loss averaged over pairs, chosen_rewards, rejected_rewards), the implicit
    rewards β(π - ref) detached for logging.
    """
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    chosen_rewards = (beta * (policy_chosen_logps - ref_chosen_logps)).detach()
    rejected_rewards = (beta * (policy_rejected_logps - ref_rejected_logps)).detach()
    return losses.mean(), chosen_rewards, rejected_rewards
