"""Rewards from anywhere, for the RL trainers (PPO, GRPO, RLOO): a reward-model checkpoint
scored in process, a running rlhfkit server's Reward.Score over gRPC, and Python functions;
several at once, combined with weights and each logged on its own.

A reward function has TRL's signature:

    def my_reward(prompts: list, completions: list[str], **columns) -> list[float]

`prompts` are the prompts file's `prompt` values (text, or a conversation: a list of
messages), `completions` the sampled responses' text (as the server returns it), and
`columns` every other column of the prompts file, one list per column, aligned with the
prompts (e.g. a reference answer to check against). It returns one float per completion.
`--reward-fn module:function` imports it (the current directory is on the path), or
`--reward-fn path/to/file.py:function` loads it from a file.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(kw_only=True)
class RewardOptions:
    """Where the rewards of an RL run come from (at least one source; several are summed with weights)."""

    reward_model: str | None = field(default=None, metadata={"help": "reward model checkpoint (a directory or a Hub id), scored in process"})
    reward_server: str | None = field(default=None, metadata={"help": "HOST:PORT of a running `rlhfkit serve` whose Reward.Score scores the responses"})
    reward_server_model: str = field(default="", metadata={"help": "which of the server's reward models scores (default: its reward role)"})
    # A file, not the token itself: the run's options are written into its checkpoints and resume state.
    reward_server_token_file: str | None = field(default=None, metadata={"help": "file holding the bearer token for a --reward-server started with --auth-tokens (a client role suffices; default: the RLHFKIT_TOKEN environment variable)"})
    reward_server_tls_ca: str | None = field(default=None, metadata={"help": "PEM CA certificate that signed the --reward-server's certificate: score over TLS"})
    reward_server_tls_cert: str | None = field(default=None, metadata={"help": "PEM client certificate for a --reward-server with --tls-client-ca (mutual TLS; with --reward-server-tls-key)"})
    reward_server_tls_key: str | None = field(default=None, metadata={"help": "PEM private key of --reward-server-tls-cert"})
    reward_fn: list[str] = field(default_factory=list, metadata={"help": "Python reward functions, module:function or file.py:function: f(prompts, completions, **columns) -> list[float]"})
    reward_weights: list[float] = field(default_factory=list, metadata={"help": "one weight per reward source, in the order --reward-model, --reward-server, then each --reward-fn (default: all 1)"})

    def __post_init__(self):
        super().__post_init__()
        n = self.reward_sources()
        if n == 0:
            raise ValueError("no reward source: give --reward-model, --reward-server or --reward-fn")
        if self.reward_weights and len(self.reward_weights) != n:
            raise ValueError(f"reward_weights: {len(self.reward_weights)} given for {n} reward sources (one per "
                             "source, in the order --reward-model, --reward-server, then each --reward-fn)")
        for spec in self.reward_fn:
            if spec.count(":") != 1 or not all(spec.split(":")):
                raise ValueError(f"reward_fn must be module:function or file.py:function, got {spec!r}")
        access = [name for name in ("reward_server_token_file", "reward_server_tls_ca", "reward_server_tls_cert",
                                    "reward_server_tls_key") if getattr(self, name)]
        if access and not self.reward_server:
            raise ValueError(f"{access[0]} is for --reward-server HOST:PORT, which is not given")
        if bool(self.reward_server_tls_cert) != bool(self.reward_server_tls_key):
            raise ValueError("give reward_server_tls_cert and reward_server_tls_key together (the client certificate "
                             "and its key)")

    def reward_sources(self) -> int:
        return bool(self.reward_model) + bool(self.reward_server) + len(self.reward_fn)


def load_reward_function(spec: str):
    """`module:function` or `path/to/file.py:function` -> the function."""
    where, name = spec.split(":")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise FileNotFoundError(f"--reward-fn {spec}: no file {path}")
        module_spec = importlib.util.spec_from_file_location(f"rlhfkit_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and "." not in sys.path:
            sys.path.insert(0, "")  # the current directory, as `python -m` has it
        module = importlib.import_module(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--reward-fn {spec}: {where} has no function {name!r}")
    return fn


def read_token_file(path: str, option: str) -> str:
    """The token in a file (surrounding whitespace dropped); ValueError naming `option`."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{option} {path}: cannot read it: {getattr(e, 'strerror', None) or e}") from None
    if not token:
        raise ValueError(f"{option} {path}: the file is empty")
    return token


class ServerRewards:
    """Reward.Score of a running server, one RPC per batch. `token` (default: the
    RLHFKIT_TOKEN environment variable) and the TLS files (PEM paths) go to the Client."""

    def __init__(self, address: str, model: str = "", timeout: float = 120.0, *, token: str | None = None,
                 tls_ca: str | None = None, tls_cert: str | None = None, tls_key: str | None = None):
        from rlhfkit.clients import Client
        from rlhfkit.clients.client import read_pem

        self.address, self.model = address, model
        self.client = Client(address, timeout=timeout, token=token,
                             tls_ca=read_pem(tls_ca, "--reward-server-tls-ca"),
                             tls_cert=read_pem(tls_cert, "--reward-server-tls-cert"),
                             tls_key=read_pem(tls_key, "--reward-server-tls-key"))

    @classmethod
    def from_options(cls, options: RewardOptions) -> "ServerRewards":
        token = (read_token_file(options.reward_server_token_file, "--reward-server-token-file")
                 if options.reward_server_token_file else None)
        return cls(options.reward_server, options.reward_server_model, token=token,
                   tls_ca=options.reward_server_tls_ca, tls_cert=options.reward_server_tls_cert,
                   tls_key=options.reward_server_tls_key)

    def __call__(self, prompts: list, completions: list[str], **columns) -> list[float]:
        import grpc

        try:
            return self.client.score(list(zip(prompts, completions)), model=self.model)
        except grpc.RpcError as e:
            code = e.code()
            if code == grpc.StatusCode.UNAUTHENTICATED:
                hint = ("the server wants a token with the client role: give --reward-server-token-file FILE or set "
                        "RLHFKIT_TOKEN")
            elif code == grpc.StatusCode.PERMISSION_DENIED:
                hint = "the token's role may not call Score: ask the server's admin for a client token"
            elif code == grpc.StatusCode.UNAVAILABLE:
                hint = ("is `rlhfkit serve` running there? A server with --tls-cert needs --reward-server-tls-ca "
                        "(and --reward-server-tls-cert/--reward-server-tls-key with mutual TLS)")
            else:
                hint = "is `rlhfkit serve` running there with a reward model?"
            raise RuntimeError(f"--reward-server {self.address}: Score failed ({code.name}: {e.details()}); "
                               f"{hint}") from None

    def close(self):
        self.client.close()


class Rewards:
    """Every reward source of a run. Calling it scores (prompt, completion) pairs and returns
    (the weighted total [N], each source's scores by name). `reward_model` is the loaded
    scorer of --reward-model (or a context manager yielding it: PPO with LoRA scores with
    the value model's base weights), with its tokenizer and the checkpoint's reward_bias."""

    def __init__(self, options: RewardOptions, *, reward_model=None, rm_tokenizer=None, reward_bias: float = 0.0,
                 device=None):
        self.sources: list[tuple[str, object]] = []
        if options.reward_model:
            self.sources.append(("reward_model", self._model_scorer(reward_model, rm_tokenizer, reward_bias, device)))
        if options.reward_server:
            self.sources.append(("reward_server", ServerRewards.from_options(options)))
        for spec in options.reward_fn:
            fn = load_reward_function(spec)
            name = f"reward_fn_{fn.__name__}"
            taken = {n for n, _ in self.sources}
            if name in taken:  # two functions of one name (in two files): number them
                name = next(f"{name}_{i}" for i in range(2, len(taken) + 3) if f"{name}_{i}" not in taken)
            self.sources.append((name, fn))
        self.weights = list(options.reward_weights) or [1.0] * len(self.sources)

    @staticmethod
    def _model_scorer(model, tokenizer, bias, device):
        from .sequences import score_pairs

        def score(prompts, completions, **columns):
            # a loaded model, or a function entering the scorer (PPO with LoRA: the value model's base)
            scope = contextlib.nullcontext(model) if isinstance(model, torch.nn.Module) else model()
            with scope as scorer:
                return (score_pairs(scorer, tokenizer, list(zip(prompts, completions)), 1 << 30, device) + bias).tolist()

        return score

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.sources]

    @torch.no_grad()
    def __call__(self, prompts: list, completions: list[str], columns: dict[str, list] | None = None,
                 device=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {}
        for name, source in self.sources:
            scores = [float(s) for s in source(prompts, completions, **(columns or {}))]
            if len(scores) != len(completions) or not all(math.isfinite(s) for s in scores):
                raise ValueError(f"{name} returned {len(scores)} scores for {len(completions)} completions"
                                 + ("" if len(scores) != len(completions) else ", not all finite"))
            parts[name] = torch.tensor(scores, dtype=torch.float32, device=device)
        total = sum(w * parts[name] for w, (name, _) in zip(self.weights, self.sources))
        return total, parts

    def close(self):
        for _, source in self.sources:
            if hasattr(source, "close"):
                source.close()


def column_names(records: list[dict]) -> list[str]:
    """Every column of a prompts file but the prompt."""
    return sorted({k for r in records for k in r if k != "prompt"})


def columns_of(records: list[dict], names: list[str] | None = None) -> dict[str, list]:
    """The columns `names` (default: every one these records have) of some records of a
    prompts file, one list per column, None where a record lacks it: pass the whole file's
    column_names so that every batch hands a reward function the same arguments."""
    names = column_names(records) if names is None else names
    return {k: [r.get(k) for r in records] for k in names}
