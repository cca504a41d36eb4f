"""The one import point for the math training shares with the server (rlhfkit.kernels).

Trainers call these names only, so the log-probs a trainer optimises are computed by the
same code as the log-probs a rollout reports.
"""

from __future__ import annotations

import rlhfkit.kernels as _kernels
from rlhfkit.kernels import SamplingParams, logprobs_from_logits, sample_tokens  # noqa: F401

if hasattr(_kernels, "fused_linear_logprobs"):
    fused_linear_logprobs = _kernels.fused_linear_logprobs
else:
    # Until the fused kernel lands (issue 3): materialise the logits, then the shared
    # log-prob kernel. Same values and gradients, more memory.
    def fused_linear_logprobs(hidden, weight, labels, temperature=1.0, ignore_index=-100, return_entropy=False):
        return logprobs_from_logits(hidden @ weight.t(), labels, temperature, ignore_index, return_entropy)
