"""GRPO / Dr. GRPO / RLOO advantages, the KL penalties, the loss aggregations and the
truncated importance weights against hand-computed values (and, for the KL gradients,
exact expectations over a small vocabulary in float64)."""

import math

import pytest
import torch

from rlhfkit.training.losses import (aggregate_loss, clipped_policy_loss_per_token, group_advantages, kl_penalty,
                                     rloo_advantages, truncated_importance_weights)


def close(tensor, expected):
    torch.testing.assert_close(tensor, torch.tensor(expected, dtype=tensor.dtype), rtol=1e-12, atol=1e-12)


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0], dtype=torch.float64)
    std = math.sqrt((4 + 1 + 0 + 9) / 3)  # unbiased std of 1, 2, 3, 6 (mean 3)
    expected = [-2 / (std + 1e-4), -1 / (std + 1e-4), 0.0, 3 / (std + 1e-4), 0.0, 0.0, 0.0, 0.0]
    assert group_advantages(rewards, 4).tolist() == pytest.approx(expected, abs=1e-12)
    # Dr. GRPO: centred only; a group that all scored alike gives no signal either way
    assert group_advantages(rewards, 4, scale=False).tolist() == pytest.approx([-2, -1, 0, 3, 0, 0, 0, 0], abs=1e-12)


def test_rloo_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 4.0], dtype=torch.float64)
    # groups of 3: each minus the mean of the other two
    expected = [1 - 2.5, 2 - 2.0, 3 - 1.5, 6 - 2.0, 0 - 5.0, 4 - 3.0]
    assert rloo_advantages(rewards, 3).tolist() == pytest.approx(expected, abs=1e-12)
    # groups of 2: the difference to the other sample
    assert rloo_advantages(rewards[:4], 2).tolist() == pytest.approx([-1, 1, -3, 3], abs=1e-12)
    with pytest.raises(ValueError, match="at least 2 samples"):
        rloo_advantages(rewards, 1)


def test_kl_penalties_by_hand():
    logp, ref, old = (torch.tensor([x], dtype=torch.float64) for x in (-1.0, -2.0, -1.5))
    assert kl_penalty(logp, ref, estimator="k1").item() == pytest.approx(1.0)
    assert kl_penalty(logp, ref, estimator="k2").item() == pytest.approx(0.5)
    k3 = math.exp(-1.0) - 1 + 1.0
    assert kl_penalty(logp, ref, estimator="k3").item() == pytest.approx(k3)
    assert kl_penalty(logp, ref, old, estimator="k3_unbiased").item() == pytest.approx(math.exp(0.5) * k3)
    with pytest.raises(ValueError, match="old_logprobs"):
        kl_penalty(logp, ref, estimator="k3_unbiased")
    with pytest.raises(ValueError, match="estimator must be one of"):
        kl_penalty(logp, ref, estimator="k4")


def test_k3_unbiased_has_the_kl_gradient_and_k3_does_not():
    """Exact expectations over a 5-token vocabulary: E_{y~π_old}[∇ penalty(y)] at θ = θ_old
    against ∇ KL(π_θ || ref) computed in closed form. k3_unbiased and k2 match it (k2 on
    policy); plain k3 does not."""
    torch.manual_seed(0)
    logits = torch.randn(5, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(5, dtype=torch.float64), -1)

    def exact_kl_grad():
        logp = torch.log_softmax(logits, -1)
        kl = (logp.exp() * (logp - ref)).sum()
        return torch.autograd.grad(kl, logits)[0]

    def expected_penalty_grad(estimator):
        logp = torch.log_softmax(logits, -1)
        old = logp.detach()
        weights = old.exp()  # E over y ~ π_old, exactly
        penalty = (weights * kl_penalty(logp, ref, old, estimator)).sum()
        return torch.autograd.grad(penalty, logits)[0]

    target = exact_kl_grad()
    assert torch.allclose(expected_penalty_grad("k3_unbiased"), target, atol=1e-12)
    assert torch.allclose(expected_penalty_grad("k2"), target, atol=1e-12)
    assert (expected_penalty_grad("k3") - target).abs().max() > 1e-3
    assert expected_penalty_grad("k1").abs().max() < 1e-12  # no expected gradient at all


def test_loss_aggregations_by_hand_and_in_parts():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate_loss(per_token, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate_loss(per_token, mask, "sequence-mean").item() == pytest.approx((6 / 3 + 4 / 1) / 2)
    assert aggregate_loss(per_token, mask, "token-sum", max_new_tokens=3).item() == pytest.approx(10 / (2 * 3))
    for aggregation in ("token-mean", "sequence-mean", "token-sum"):  # micro-batches add up with the batch's totals
        whole = aggregate_loss(per_token, mask, aggregation, max_new_tokens=3)
        parts = sum(aggregate_loss(per_token[i:i + 1], mask[i:i + 1], aggregation, max_new_tokens=3, n_sequences=2,
                                   n_tokens=4) for i in range(2))
        assert parts.item() == pytest.approx(whole.item())
    with pytest.raises(ValueError, match="max_new_tokens"):
        aggregate_loss(per_token, mask, "token-sum")
    with pytest.raises(ValueError, match="aggregation must be one of"):
        aggregate_loss(per_token, mask, "mean")


def test_clipped_policy_loss_per_token_by_hand():
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]], dtype=torch.float64))  # ratios 1.5, 0.5, 1.1
    loss, clipped = clipped_policy_loss_per_token(logp, old, torch.tensor([1.0], dtype=torch.float64), 0.2)
    # A > 0: min(ρ, clip(ρ)) A, negated: -1.2 (clipped), -0.5 (unclipped wins), -1.1
    close(loss, [[-1.2, -0.5, -1.1]])
    assert clipped.tolist() == [[1.0, 0.0, 0.0]]
    loss, clipped = clipped_policy_loss_per_token(logp, old, torch.tensor([[-1.0, -1.0, -1.0]], dtype=torch.float64))
    close(loss, [[1.5, 0.8, 1.1]])
    assert clipped.tolist() == [[0.0, 1.0, 0.0]]


def test_truncated_importance_weights_by_hand():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]], dtype=torch.float64)
    behaviour = torch.tensor([[-1.5, -1.0, -3.0], [-2.0, -1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    w, stats = truncated_importance_weights(old, behaviour, mask, cap=1.5, level="token")
    ratios = [math.exp(0.5), math.exp(-1.0), 1.0, math.exp(1.0), 1.0]
    close(w, [[1.5, math.exp(-1.0), 1.0], [1.5, 1.0, 0.0]])
    assert stats["is_ratio_max"].item() == pytest.approx(math.exp(1.0))
    assert stats["is_ratio_mean"].item() == pytest.approx(sum(ratios) / 5)
    assert stats["is_capped_fraction"].item() == pytest.approx(2 / 5)
    d = [0.5, -1.0, 0.0, 1.0, 0.0]  # log π_train - log π_behaviour; KL(behaviour || train) ≈ mean of e^d - 1 - d
    assert stats["mismatch_kl"].item() == pytest.approx(sum(math.expm1(x) - x for x in d) / 5)
    w, stats = truncated_importance_weights(old, behaviour, mask, cap=1.5, level="sequence")
    close(w, [[math.exp(-0.5)] * 3, [1.5, 1.5, 0.0]])
    assert stats["is_capped_fraction"].item() == pytest.approx(0.5)
    # the same engine: exactly 1 everywhere
    w, stats = truncated_importance_weights(old, old.clone(), mask, cap=2.0)
    assert torch.equal(w, mask.double()) and stats["mismatch_kl"].item() == 0.0 and stats["is_ratio_max"].item() == 1.0
