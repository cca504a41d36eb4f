"""Token sampling shared by the server and PPO rollouts.

One batch mixes requests freely: every row carries its own temperature, top-k, top-p
and (optionally) its own seeded generator. The filtering is vectorized over the batch;
the only Python loop is over rows to draw one uniform number each from that row's
generator, so a seeded row's draws never depend on what else is in the batch.

Semantics follow vLLM: temperature scales the logits, top-k keeps the k largest, top-p
then keeps the smallest prefix (by probability, after top-k) whose mass reaches top_p.
A temperature below SAMPLING_EPS means greedy (argmax of the raw logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from rlhfkit.errors import InvalidArgumentError

SAMPLING_EPS = 1e-5  # below this temperature, decoding is greedy (as in vLLM)
MAX_N = 16
MAX_LOGPROBS = 20
# Rows with top-k / top-p look at their most likely SORT_CANDIDATES tokens (topk) and sort
# the whole vocabulary only when their kept set reaches past them.
SORT_CANDIDATES = 1024


class SamplingParamsError(InvalidArgumentError):
    """A sampling parameter is out of range; `field` names it."""


@dataclass
class SamplingParams:
    """How to decode one request. Validated in one place, here (vLLM's model).

    temperature: >= 0 and finite; < 1e-5 is greedy.
    top_k: >= 0; 0 disables it.
    top_p: in (0, 1]; 1 disables it.
    seed: makes the draws reproducible whatever else is in the batch.
    max_new_tokens: >= 1 (the context-length check needs the model: the engine does it).
    n: completions per prompt, 1..16.
    stop: strings that end generation; each non-empty.
    logprobs: top alternatives per position to return, 0..20.
    ignore_eos: keep going after EOS (the model's end ids).
    stop_token_ids: token ids that end generation (finish "stop"), EOS or not; each >= 0
        (the vocabulary bound needs the model: the engine checks it).
    include_stop_str_in_output: keep the stop string (or stop token's text) in the text.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 16
    n: int = 1
    stop: list[str] = field(default_factory=list)
    logprobs: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False

    def __post_init__(self):
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise SamplingParamsError("temperature", f"must be finite and >= 0 (0 is greedy), got {t}")
        if self.top_k < 0:
            raise SamplingParamsError("top_k", f"must be >= 0 (0 disables top-k), got {self.top_k}")
        p = self.top_p
        if not isinstance(p, (int, float)) or not math.isfinite(p) or not 0.0 < p <= 1.0:
            raise SamplingParamsError("top_p", f"must be in (0, 1] (1 disables top-p), got {p}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise SamplingParamsError("seed", f"must be in [0, 2^64), got {self.seed}")
        if self.max_new_tokens < 1:
            raise SamplingParamsError("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if not 1 <= self.n <= MAX_N:
            raise SamplingParamsError("n", f"must be in [1, {MAX_N}], got {self.n}")
        if any(not s for s in self.stop):
            raise SamplingParamsError("stop", "stop strings must be non-empty")
        bad = [t for t in self.stop_token_ids if not isinstance(t, int) or t < 0]
        if bad:
            raise SamplingParamsError("stop_token_ids", f"token ids must be integers >= 0, got {bad[0]!r}")
        if not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise SamplingParamsError("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def generator(self, sample_index: int, device: torch.device | str = "cpu") -> torch.Generator | None:
        """The generator for completion `sample_index` of this request (None when unseeded)."""
        if self.seed is None or self.greedy:
            return None
        g = torch.Generator(device=device)
        # Distinct, reproducible streams for the n completions of one seeded request.
        g.manual_seed((self.seed * 1_000_003 + sample_index) % (2**63))
        return g


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, candidates: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Temperature, top-k and top-p applied per row, in descending-probability order.

    logits [B, V]; temperature [B] (greedy rows should pass 1); top_k [B] int (0 = off);
    top_p [B] float (1 = off). Returns (sorted_logits, sorted_index, complete): the scaled
    logits sorted descending with filtered entries set to -inf, the vocabulary index of
    each sorted position, and per row whether its kept set is all there. Without
    `candidates` the whole vocabulary is sorted and every row is complete; with it only
    the `candidates` most likely tokens are (topk, much cheaper than a sort), and a row is
    complete when its top-k lies within them or they carry at least top_p of its
    probability. Float32 throughout.
    """
    x = logits.float() / temperature.float().unsqueeze(-1)
    V = x.shape[-1]
    if candidates is not None and candidates < V:
        sorted_logits, sorted_index = x.topk(candidates, dim=-1)
    else:
        sorted_logits, sorted_index = x.sort(dim=-1, descending=True)
    C = sorted_logits.shape[-1]
    positions = torch.arange(C, device=x.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k, V).clamp(max=V)
    sorted_logits = sorted_logits.masked_fill(positions >= k.unsqueeze(-1), float("-inf"))
    # Normalise over what top-k keeps: the k logits kept here, or the whole vocabulary.
    k_here = k <= C
    log_total = sorted_logits.logsumexp(dim=-1)
    if C < V:
        log_total = torch.where(k_here, log_total, x.logsumexp(dim=-1))
    probs = (sorted_logits - log_total.unsqueeze(-1)).exp()
    mass_before = probs.cumsum(dim=-1) - probs
    # Keep a token while the mass of the more likely tokens is still below top_p;
    # the most likely token is always kept (mass_before = 0 < top_p).
    drop = mass_before >= top_p.float().unsqueeze(-1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    complete = k_here | ((k >= V) & (probs.sum(dim=-1) >= top_p.float()))
    return sorted_logits, sorted_index, complete


def draw_uniforms(generators: Sequence[torch.Generator | None], device: torch.device | str,
                  default_generator: torch.Generator | None = None) -> torch.Tensor:
    """One uniform in [0, 1) per row: from the row's own generator when it has one."""
    u = torch.rand(len(generators), device=device, generator=default_generator)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand((), device=g.device, generator=g).to(device)
    return u


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, generators: Sequence[torch.Generator | None] | None = None,
                  default_generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of logits [B, V]: greedy where temperature < SAMPLING_EPS, else a
    draw from the temperature/top-k/top-p-filtered distribution (inverse CDF with one
    uniform per row, so seeded rows are reproducible in any batch). Returns int64 [B].

    Sorting is what sampling costs (64 rows: 3.7 / 87 / 381 ms for vocabularies of 1.7k /
    32k / 128k on 2 CPU cores), so temperature-only rows invert the CDF in vocabulary
    order, and top-k / top-p rows rank only their SORT_CANDIDATES most likely tokens
    unless their kept set reaches past them. Which way a row goes depends on its own
    logits and parameters only, so seeded rows stay batch-independent.
    """
    B, V = logits.shape
    greedy = temperature < SAMPLING_EPS
    tokens = logits.argmax(dim=-1)
    if bool(greedy.all()):
        return tokens
    u = draw_uniforms(generators if generators is not None else [None] * B, logits.device,
                      default_generator)
    filtered = ~greedy & (((top_k > 0) & (top_k < V)) | (top_p < 1.0))
    plain = ~greedy & ~filtered
    if bool(plain.any()):
        rows = plain.nonzero().squeeze(-1)
        probs = (logits[rows].float() / temperature[rows].float().unsqueeze(-1)).softmax(dim=-1)
        tokens[rows] = _invert_cdf(probs, u[rows])
    if bool(filtered.any()):
        rows = filtered.nonzero().squeeze(-1)
        # The most likely SORT_CANDIDATES tokens first; a full sort only for rows whose
        # kept set reaches past them (flat distributions, large top-k).
        sorted_logits, sorted_index, complete = filter_logits(
            logits[rows], temperature[rows], top_k[rows], top_p[rows], SORT_CANDIDATES)
        if not bool(complete.all()):
            rest = rows[~complete]
            full_logits, full_index, _ = filter_logits(logits[rest], temperature[rest], top_k[rest], top_p[rest])
            tokens[rest] = _sample_sorted(full_logits, full_index, u[rest])
            rows, sorted_logits, sorted_index = rows[complete], sorted_logits[complete], sorted_index[complete]
        tokens[rows] = _sample_sorted(sorted_logits, sorted_index, u[rows])
    return tokens


def _sample_sorted(sorted_logits: torch.Tensor, sorted_index: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    pos = _invert_cdf(sorted_logits.softmax(dim=-1), u)
    return sorted_index.gather(-1, pos.unsqueeze(-1)).squeeze(-1)


def _invert_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first position where the cumulative probability passes u * total."""
    cdf = probs.cumsum(dim=-1)
    pos = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)
    # Rounding may push the draw past the last token with any mass (a zero-probability
    # token can only be landed on that way): move it back onto that token.
    pos = pos.clamp(max=probs.shape[-1] - 1)
    missed = probs.gather(-1, pos.unsqueeze(-1)).squeeze(-1) == 0
    if bool(missed.any()):
        pos[missed] = (probs[missed] > 0).cumsum(dim=-1).argmax(dim=-1)
    return pos


def sampling_tensors(params: Sequence[SamplingParams], device: torch.device | str = "cpu"):
    """Per-row (temperature, top_k, top_p) tensors for a list of SamplingParams."""
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    return temperature, top_k, top_p
