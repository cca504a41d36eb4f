"""The one import point for the math training shares with the server (rlhfkit.kernels).

Trainers call these names only, so the log-probs a trainer optimises are computed by the
same code as the log-probs a rollout reports, and PPO samples exactly as the server does.
"""

from rlhfkit.kernels import (  # noqa: F401
    SamplingParams,
    full_kl_from_logits,
    fused_linear_logprobs,
    kl_from_logprobs,
    logprobs_from_logits,
    sample_tokens,
)
