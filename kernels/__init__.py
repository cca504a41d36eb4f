"""rlhfkit.kernels: the math the server and the trainers share.

Sampling (temperature / top-k / top-p with per-row seeds) and the fused functions over
logits: chosen-token log-probs, entropy, KL to a reference (ARCHITECTURE.md, Kernels).
"""

from rlhfkit.kernels.backend import use_backend
from rlhfkit.kernels.fused_linear import fused_linear_logprobs
from rlhfkit.kernels.kl import KL_ESTIMATORS, full_kl_from_logits, kl_from_logprobs
from rlhfkit.kernels.logprobs import logprobs_from_logits
from rlhfkit.kernels.sampling import (
    MAX_LOGPROBS,
    MAX_N,
    SAMPLING_EPS,
    SamplingParams,
    SamplingParamsError,
    filter_logits,
    sample_tokens,
    sampling_tensors,
)

__all__ = [
    "KL_ESTIMATORS",
    "MAX_LOGPROBS",
    "MAX_N",
    "SAMPLING_EPS",
    "SamplingParams",
    "SamplingParamsError",
    "filter_logits",
    "full_kl_from_logits",
    "fused_linear_logprobs",
    "kl_from_logprobs",
    "logprobs_from_logits",
    "sample_tokens",
    "sampling_tensors",
    "use_backend",
]
