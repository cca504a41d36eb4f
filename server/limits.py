"""Bounded work per request: the limits `rlhfkit serve` enforces, as options, checked here
before the work they bound starts (token counts, which need the model, where the model is
known). Each refusal is INVALID_ARGUMENT naming the field and the
option to raise (LimitExceededError). A request inside the limits can still be refused by
the model (its context length), by the engine (its queue) or by the kernels' SamplingParams.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from rlhfkit.errors import shortened
from rlhfkit.server.errors import LimitExceededError


@dataclass
class RequestLimits:
    max_request_bytes: int = field(default=4 * 1024 * 1024, metadata={"help": "largest request message (gRPC) or body (HTTP JSON API) in bytes; larger: RESOURCE_EXHAUSTED / 413"})
    max_prompt_chars: int = field(default=400_000, metadata={"help": "longest prompt, in characters (a conversation: all its contents together)"})
    max_prompt_tokens: int = field(default=0, metadata={"help": "longest prompt in tokens (0: the model's context length)"})
    max_items: int = field(default=256, metadata={"help": "most items in one Score or LogProbs call"})
    max_messages: int = field(default=1024, metadata={"help": "most turns in one conversation"})
    max_stop: int = field(default=16, metadata={"help": "most stop strings, and most stop token ids, in one request"})
    max_stop_chars: int = field(default=256, metadata={"help": "longest stop string, in characters"})
    max_id_chars: int = field(default=256, metadata={"help": "longest request_id, model, comparison or annotator name, in characters"})
    max_bootstrap_rounds: int = field(default=1000, metadata={"help": "most bootstrap rounds one GetLeaderboard may ask for (a plain round costs about 1 ms of CPU; the style-controlled fit uses at most 100, each refitting every battle: 10 ms at 10,000 votes)"})
    max_http_connections: int = field(default=64, metadata={"help": "most HTTP connections served at once; more wait for a free one"})
    http_read_timeout: float = field(default=10.0, metadata={"help": "seconds an HTTP client may take to send its request before the connection is closed"})

    def __post_init__(self):
        for f in fields(RequestLimits):
            v = getattr(self, f.name)
            low = 0 if f.name == "max_prompt_tokens" else 1
            if not v >= low:
                raise ValueError(f"{f.name} must be >= {low}, got {v}")


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_chars(field_name: str, value: str, limit: int, limit_name: str):
    if len(value) > limit:
        raise LimitExceededError(field_name, f"is {len(value)} characters, over {option(limit_name)} {limit}")


def check_id(field_name: str, value: str, limits: RequestLimits):
    """A name or id the server may echo: bounded, so no reply or error repeats megabytes."""
    if len(value) > limits.max_id_chars:
        raise LimitExceededError(field_name, f"{shortened(value, 32)!r} is {len(value)} characters, "
                                 f"over --max-id-chars {limits.max_id_chars}")


def check_prompt(prefix: str, text: str, messages, limits: RequestLimits):
    """A prompt's text or conversation within --max-prompt-chars, before it is tokenized."""
    if messages:
        if len(messages) > limits.max_messages:
            raise LimitExceededError(prefix + "messages", f"has {len(messages)} turns, over --max-messages "
                                     f"{limits.max_messages}")
        total = sum(len(m.content) + len(m.role) for m in messages)
        if total > limits.max_prompt_chars:
            raise LimitExceededError(prefix + "messages", f"are {total} characters together, over "
                                     f"--max-prompt-chars {limits.max_prompt_chars}")
    check_chars(prefix + "prompt", text, limits.max_prompt_chars, "max_prompt_chars")


def check_scored_item(prefix: str, text: str, messages, response: str, limits: RequestLimits):
    """One {prompt or messages, response} item of Score, Compare or LogProbs."""
    check_prompt(prefix, text, messages, limits)
    check_chars(prefix + "response", response, limits.max_prompt_chars, "max_prompt_chars")


def check_prompt_tokens(field_name: str, n_tokens: int, limits: RequestLimits):
    if limits.max_prompt_tokens and n_tokens > limits.max_prompt_tokens:
        raise LimitExceededError(field_name, f"is {n_tokens} tokens, over --max-prompt-tokens {limits.max_prompt_tokens}")


def check_items(items, limits: RequestLimits):
    if len(items) > limits.max_items:
        raise LimitExceededError("items", f"has {len(items)} items, over --max-items {limits.max_items}; "
                                 "split the call")


def check_sampling(prefix: str, sampling, limits: RequestLimits):
    """Stop strings and stop token ids of a SamplingParams proto."""
    if len(sampling.stop) > limits.max_stop:
        raise LimitExceededError(prefix + "stop", f"has {len(sampling.stop)} strings, over --max-stop {limits.max_stop}")
    if len(sampling.stop_token_ids) > limits.max_stop:
        raise LimitExceededError(prefix + "stop_token_ids", f"has {len(sampling.stop_token_ids)} ids, over "
                                 f"--max-stop {limits.max_stop}")
    for i, s in enumerate(sampling.stop):
        check_chars(f"{prefix}stop[{i}]", s, limits.max_stop_chars, "max_stop_chars")


def check_generate(request, limits: RequestLimits):
    """Everything a GenerateRequest can make the server do too much of."""
    check_id("request_id", request.request_id, limits)
    check_id("model", request.model, limits)
    check_prompt("", request.prompt, request.messages, limits)
    check_sampling("sampling.", request.sampling, limits)
