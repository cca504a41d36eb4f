"""The losses of RLHF, as plain functions of tensors (no models, no optimizers).

Reward model (InstructGPT, Ouyang et al. 2022): a Bradley-Terry pairwise loss and its
K-wise form, all C(K,2) pairs of one ranking in one go, normalised by 1/C(K,2) so a
prompt with more responses does not outweigh one with fewer.
PPO (Schulman et al. 2017, as in TRL/OpenAI lm-human-preferences): clipped policy and
value losses, GAE, whitening. DPO (Rafailov et al. 2023) with its sigmoid, IPO and hinge
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

def ppo_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor | None = None,
                    clip_range: float = 0.2) -> tuple[Tensor, Tensor, Tensor]:
    """Clipped surrogate: mean of max(-A·ρ, -A·clip(ρ, 1-ε, 1+ε)), ρ = π/π_old per token.

    Returns (loss, clip_fraction, approx_kl). clip_fraction counts tokens where the clipped
    term won strictly (a ratio exactly at 1±ε is not clipped: both terms are equal);
    approx_kl = mean(½ (log ρ)²), the estimator TRL and OpenAI's baselines log.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approx_kl = masked_mean(0.5 * log_ratio ** 2, mask)
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
