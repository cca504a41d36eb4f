"""The losses against hand-computed values and plain float64 Python loops."""

import itertools
import math

import pytest
import torch

from rlhfkit.training.losses import (dpo_loss, gae, masked_mean, masked_var, pairwise_rm_loss,
                                     ppo_policy_loss, ppo_value_loss, ranking_rm_loss, whiten)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---------------------------------------------------------------- reward model

def test_pairwise_rm_loss_hand_values():
    # -log σ(0) = log 2; -log σ(2 - 1) = log(1 + e^-1)
    loss = pairwise_rm_loss(torch.tensor([0.0, 2.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert loss.item() == pytest.approx((math.log(2) + math.log1p(math.exp(-1))) / 2, rel=1e-12)


def test_pairwise_rm_loss_margin_and_centring():
    rc, rr = torch.tensor([3.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)
    # the margin asks for a gap of 2 more: σ(3 - 1 - 2) = ½
    assert pairwise_rm_loss(rc, rr, margin=2.0).item() == pytest.approx(math.log(2), rel=1e-12)
    with_centre = pairwise_rm_loss(rc, rr, center_coef=0.01).item()
    assert with_centre == pytest.approx(-log_sigmoid(2.0) + 0.01 * 16, rel=1e-12)


def test_ranking_loss_equals_mean_over_its_pairs():
    torch.manual_seed(0)
    rewards = torch.randn(3, 4, dtype=torch.float64)
    expected = 0.0
    for row in rewards.tolist():
        pairs = list(itertools.combinations(range(4), 2))
        expected += sum(-log_sigmoid(row[i] - row[j]) for i, j in pairs) / len(pairs)
    expected /= 3
    assert ranking_rm_loss(rewards).item() == pytest.approx(expected, rel=1e-12)


def test_ranking_loss_k2_is_pairwise_and_padding_is_ignored():
    rewards = torch.tensor([[1.0, 0.5, 0.0], [2.0, -1.0, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    row0 = (-log_sigmoid(0.5) - log_sigmoid(1.0) - log_sigmoid(0.5)) / 3
    row1 = -log_sigmoid(3.0)  # one pair; the padded 99 must not count
    assert ranking_rm_loss(rewards, mask).item() == pytest.approx((row0 + row1) / 2, rel=1e-12)
    two = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
    assert ranking_rm_loss(two).item() == pytest.approx(pairwise_rm_loss(two[:, 0], two[:, 1]).item(), rel=1e-12)
    with pytest.raises(ValueError):
        ranking_rm_loss(rewards, torch.tensor([[True, False, False], [True, True, False]]))


# ---------------------------------------------------------------- PPO

def test_ppo_policy_loss_hand_values():
    eps = 0.2
    old = torch.zeros(4, dtype=torch.float64)
    # ratios 1.5 (A>0: clipped to 1.2), 1.5 (A<0: unclipped, pessimistic), 0.5 (A<0: clipped to 0.8), 1.0
    new = torch.log(torch.tensor([1.5, 1.5, 0.5, 1.0], dtype=torch.float64)).requires_grad_()
    adv = torch.tensor([1.0, -1.0, -2.0, 3.0], dtype=torch.float64)
    loss, clipfrac, approx_kl = ppo_policy_loss(new, old, adv, clip_range=eps)
    assert loss.item() == pytest.approx((-1.2 + 1.5 + 2 * 0.8 - 3.0) / 4, rel=1e-12)
    assert clipfrac.item() == pytest.approx(0.5)
    logs = [math.log(1.5), math.log(1.5), math.log(0.5), 0.0]
    assert approx_kl.item() == pytest.approx(sum(0.5 * l * l for l in logs) / 4, rel=1e-12)
    loss.backward()
    # clipped tokens get no gradient; the others d(-A ρ)/d log π = -A ρ / n
    assert new.grad.tolist() == pytest.approx([0.0, 1.5 / 4, 0.0, -3.0 / 4], abs=1e-12)


@pytest.mark.parametrize("adv", [1.0, -1.0])
def test_ppo_clipping_at_the_boundaries(adv):
    eps, tiny = 0.2, 1e-9
    old = torch.zeros(6, dtype=torch.float64)
    ratios = torch.tensor([1 + eps - tiny, 1 + eps, 1 + eps + tiny * 1e3, 1 - eps + tiny, 1 - eps, 1 - eps - tiny * 1e3],
                          dtype=torch.float64)
    new = torch.log(ratios).requires_grad_()
    loss, clipfrac, _ = ppo_policy_loss(new, old, torch.full((6,), adv, dtype=torch.float64), clip_range=eps)
    loss.backward()
    # The gradient vanishes only strictly beyond the boundary the advantage pushes towards:
    # above 1+ε for A>0, below 1-ε for A<0. At the boundary itself both terms agree.
    outside = [2] if adv > 0 else [5]
    for i in range(6):
        expected = 0.0 if i in outside else -adv * ratios[i].item() / 6
        assert new.grad[i].item() == pytest.approx(expected, abs=1e-9), i
    assert clipfrac.item() == pytest.approx(1 / 6)


def test_ppo_policy_loss_mask():
    old = torch.zeros(2, 3, dtype=torch.float64)
    new = torch.log(torch.tensor([[1.1, 9.0, 9.0], [0.9, 1.0, 9.0]], dtype=torch.float64))
    adv = torch.ones(2, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 0, 0], [1, 1, 0]])
    loss, clipfrac, _ = ppo_policy_loss(new, old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-(1.1 + 0.9 + 1.0) / 3, rel=1e-12)
    assert clipfrac.item() == 0.0


def test_ppo_value_loss_hand_values():
    old = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    values = torch.tensor([0.5, 0.1, 1.0], dtype=torch.float64)
    returns = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    loss, clipfrac = ppo_value_loss(values, old, returns, clip_range_value=0.2)
    # token 0: V=0.5 → (0.5-1)²=0.25; clipped V=0.2 → 0.64 (larger, wins)
    # token 1: V=0.1 within the clip: 0.81 both; token 2: V=old: 1 both
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81 + 1.0) / 3, rel=1e-12)
    assert clipfrac.item() == pytest.approx(1 / 3)


# ---------------------------------------------------------------- GAE and whitening

def gae_plain(rewards, values, gamma, lam):
    """The textbook recursion on one sequence of counted tokens, in Python floats."""
    advantages, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        next_value = values[t + 1] if t + 1 < len(rewards) else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        last = delta + gamma * lam * last
        advantages[t] = last
    return advantages


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_plain_loop_with_mask(gamma, lam):
    torch.manual_seed(1)
    B, T = 4, 7
    rewards = torch.randn(B, T, dtype=torch.float64)
    values = torch.randn(B, T, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False  # right padding
    mask[1, :2] = False  # left padding
    mask[2, 3] = False  # a hole
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    for b in range(B):
        idx = [t for t in range(T) if mask[b, t]]
        expected = gae_plain([rewards[b, t].item() for t in idx], [values[b, t].item() for t in idx], gamma, lam)
        for t, e in zip(idx, expected):
            assert advantages[b, t].item() == pytest.approx(e, rel=1e-10, abs=1e-12)
            assert returns[b, t].item() == pytest.approx(e + values[b, t].item(), rel=1e-10, abs=1e-12)
        for t in set(range(T)) - set(idx):
            assert advantages[b, t].item() == 0.0 and returns[b, t].item() == 0.0


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.2, 0.4, 0.6]], dtype=torch.float64)
    advantages, returns = gae(rewards, values, gamma=1.0, lam=1.0)
    assert advantages.tolist()[0] == pytest.approx([0.8, 0.6, 0.4])
    assert returns.tolist()[0] == pytest.approx([1.0, 1.0, 1.0])


def test_whiten_and_masked_stats():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0], dtype=torch.float64)
    mask = torch.tensor([1, 1, 1, 0])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert masked_var(x, mask).item() == pytest.approx(1.0)  # unbiased: (1 + 0 + 1) / 2
    w = whiten(x, mask)
    assert w.tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)
    w_no_shift = whiten(x, mask, shift_mean=False)
    assert w_no_shift.tolist()[:3] == pytest.approx([1.0, 2.0, 3.0], abs=1e-6)


# ---------------------------------------------------------------- DPO

def test_dpo_loss_variants_hand_values():
    pc, pr = torch.tensor([-1.0], dtype=torch.float64), torch.tensor([-3.0], dtype=torch.float64)
    rc, rr = torch.tensor([-2.0], dtype=torch.float64), torch.tensor([-2.5], dtype=torch.float64)
    beta, h = 0.5, (-1.0 + 3.0) - (-2.0 + 2.5)  # h = 1.5
    loss, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=beta)
    assert loss.item() == pytest.approx(-log_sigmoid(beta * h), rel=1e-12)
    assert chosen_r.item() == pytest.approx(0.5 * 1.0) and rejected_r.item() == pytest.approx(0.5 * -0.5)
    smoothed, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(-0.9 * log_sigmoid(0.75) - 0.1 * log_sigmoid(-0.75), rel=1e-12)
    ipo, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    assert ipo.item() == pytest.approx((1.5 - 1.0) ** 2, rel=1e-12)
    hinge, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge")
    assert hinge.item() == pytest.approx(1 - 0.75, rel=1e-12)
    with pytest.raises(ValueError):
        dpo_loss(pc, pr, rc, rr, loss_type="nope")
