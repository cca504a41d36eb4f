"""Prometheus metrics, named after vLLM's where the meaning is the same (rlhfkit: prefix)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets in seconds, from sub-millisecond decode steps to minute-long requests.
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
_SLOW = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class ServerMetrics:
    """One set per server, in its own registry (tests run several servers in one process)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.time_to_first_token = Histogram(
            "rlhfkit:time_to_first_token_seconds", "Time from request arrival to its first token.",
            buckets=_FAST, registry=r)
        self.inter_token_latency = Histogram(
            "rlhfkit:inter_token_latency_seconds", "Time between consecutive tokens of one completion.",
            buckets=_FAST, registry=r)
        self.request_queue_time = Histogram(
            "rlhfkit:request_queue_time_seconds", "Time a request waited before its prefill.",
            buckets=_SLOW, registry=r)
        self.e2e_request_latency = Histogram(
            "rlhfkit:e2e_request_latency_seconds", "Time from arrival to the last token of the request.",
            buckets=_SLOW, registry=r)
        self.num_requests_running = Gauge(
            "rlhfkit:num_requests_running", "Requests being decoded.", registry=r)
        self.num_requests_waiting = Gauge(
            "rlhfkit:num_requests_waiting", "Requests waiting for a slot in the batch.", registry=r)
        self.prompt_tokens = Counter(
            "rlhfkit:prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.prefix_cache_queries = Counter(
            "rlhfkit:prefix_cache_queries", "Prompt tokens looked up in the prefix cache (vLLM's meaning).", registry=r)
        self.prefix_cache_hits = Counter(
            "rlhfkit:prefix_cache_hits", "Prompt tokens found in the prefix cache, not prefilled again.", registry=r)
        self.generation_tokens = Counter(
            "rlhfkit:generation_tokens", "Tokens generated.", registry=r)
        self.request_success = Counter(
            "rlhfkit:request_success", "Finished generate requests by finish reason.",
            ["finished_reason"], registry=r)
        self.score_latency = Histogram(
            "rlhfkit:score_latency_seconds", "Time to score one Score/Compare request.",
            buckets=_FAST, registry=r)
        self.scored_items = Counter(
            "rlhfkit:scored_items", "Prompt/response pairs scored by the reward model.", registry=r)
        self.model_loads = Counter(
            "rlhfkit:model_loads", "Checkpoint loads by result (ok, failed); a failed load keeps the old model.",
            ["result"], registry=r)
        self.rpc_errors = Counter(
            "rlhfkit:rpc_errors", "RPCs that ended with an error status.", ["method", "code"], registry=r)
        self.feedback_comparisons = Counter(
            "rlhfkit:feedback_comparisons", "A/B comparisons created, by source (models, samples_of, arena: server-chosen).",
            ["source"], registry=r)
        self.feedback_votes = Counter(
            "rlhfkit:feedback_votes", "Votes recorded, by choice (left, right, tie, both_bad).", ["choice"], registry=r)
