"""Python clients for a running rlhfkit server: `Client` (blocking) and `AsyncClient`
(asyncio). Both return the protobuf messages of rlhfkit.v1; errors are grpc.RpcError
(grpc.aio.AioRpcError) carrying the server's status code and message.

Access (ARCHITECTURE.md, Access and transport): `token=` (default: the RLHFKIT_TOKEN
environment variable) is sent as `authorization: Bearer TOKEN` metadata on every call;
`tls_ca=` (the CA that signed the server's certificate) makes the channel TLS, and
`tls_cert=` / `tls_key=` add a client certificate for a server with --tls-client-ca (mutual
TLS). A token on a plaintext channel travels in the clear: use TLS beyond loopback.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
from typing import AsyncIterator, Iterable, Iterator, Mapping, Sequence, Union

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rlhfkit.v1 import chat_pb2, feedback_pb2, feedback_pb2_grpc
from rlhfkit.v1 import generation_pb2, generation_pb2_grpc, models_pb2, models_pb2_grpc, reward_pb2, reward_pb2_grpc

# A conversation: [{"role": "system" | "user" | "assistant", "content": str}, ...] (or ChatMessage
# protos). The server renders it with the model's chat template (ARCHITECTURE.md, Chat models).
Messages = Sequence[Union[Mapping[str, str], chat_pb2.ChatMessage]]


def is_messages(prompt) -> bool:
    """A prompt given as a conversation: a non-empty list of dicts / ChatMessages (not text,
    not token ids)."""
    return (not isinstance(prompt, (str, bytes)) and isinstance(prompt, Sequence) and len(prompt) > 0
            and all(isinstance(m, (Mapping, chat_pb2.ChatMessage)) for m in prompt))


def chat_messages(messages: Messages | None) -> list[chat_pb2.ChatMessage]:
    """ChatMessage protos from {"role", "content"} dicts (or ChatMessages). Roles and contents
    are checked by the server, which names the offending message in its INVALID_ARGUMENT."""
    out = []
    for i, m in enumerate(messages or ()):
        if isinstance(m, chat_pb2.ChatMessage):
            out.append(m)
        elif isinstance(m, Mapping):
            extra = set(m) - {"role", "content"}
            if extra or "role" not in m or "content" not in m:
                raise ValueError(f"messages[{i}]: a message is {{'role': ..., 'content': ...}}, got keys {sorted(m)}")
            out.append(chat_pb2.ChatMessage(role=m["role"], content=m["content"]))
        else:
            raise TypeError(f"messages[{i}]: a message is a dict {{'role', 'content'}} or a ChatMessage, "
                            f"got {type(m).__name__}")
    return out


def _prompt_and_messages(prompt, messages) -> tuple[str, list[chat_pb2.ChatMessage]]:
    """(text, messages) from a prompt that may itself be a conversation, and messages=."""
    if is_messages(prompt):
        if messages:
            raise ValueError("give the conversation as the prompt or as messages=, not both")
        return "", chat_messages(prompt)
    return prompt or "", chat_messages(messages)


def generate_request(prompt: str | Messages | None = None, *, prompt_token_ids: Iterable[int] = (),
                     messages: Messages | None = None, model: str = "",
                     temperature: float = 0.0, top_k: int = 0, top_p: float | None = None,
                     seed: int | None = None, max_new_tokens: int = 16, n: int = 1, stop: Iterable[str] = (),
                     logprobs: int = 0, ignore_eos: bool = False, stop_token_ids: Iterable[int] = (),
                     include_stop_str_in_output: bool = False,
                     request_id: str = "") -> generation_pb2.GenerateRequest:
    """A GenerateRequest from text, token ids or a conversation (`messages=[{"role": "user",
    "content": ...}]`, or the list as `prompt`); temperature 0 (the default) is greedy."""
    text, msgs = _prompt_and_messages(prompt, messages)
    sampling = generation_pb2.SamplingParams(temperature=temperature, top_k=top_k, max_new_tokens=max_new_tokens,
                                             n=n, stop=list(stop), logprobs=logprobs, ignore_eos=ignore_eos,
                                             stop_token_ids=list(stop_token_ids),
                                             include_stop_str_in_output=include_stop_str_in_output)
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    return generation_pb2.GenerateRequest(model=model, prompt=text, prompt_token_ids=list(prompt_token_ids),
                                          messages=msgs, sampling=sampling, request_id=request_id)


def score_request(items: Iterable[tuple], model: str = "") -> reward_pb2.ScoreRequest:
    """items: (prompt, response), the prompt text or a conversation (a list of messages)."""
    pb_items = []
    for prompt, response in items:
        text, msgs = _prompt_and_messages(prompt, None)
        pb_items.append(reward_pb2.ScoreItem(prompt=text, messages=msgs, response=response))
    return reward_pb2.ScoreRequest(model=model, items=pb_items)


def compare_request(prompt: str | Messages | None, response_a: str, response_b: str, model: str = "", *,
                    messages: Messages | None = None) -> reward_pb2.CompareRequest:
    text, msgs = _prompt_and_messages(prompt, messages)
    return reward_pb2.CompareRequest(model=model, prompt=text, messages=msgs, response_a=response_a,
                                     response_b=response_b)


def log_probs_request(items: Iterable[tuple], model: str = "", reference_model: str = "",
                      temperature: float | None = None) -> reward_pb2.LogProbsRequest:
    """items: (prompt, response) strings, (messages, response) with the conversation as a list
    of messages (the response is its assistant turn), or (prompt_token_ids, response_token_ids)."""
    pb_items = []
    for prompt, response in items:
        if isinstance(prompt, str):
            pb_items.append(reward_pb2.LogProbsItem(prompt=prompt, response=response))
        elif is_messages(prompt):
            pb_items.append(reward_pb2.LogProbsItem(messages=chat_messages(prompt), response=response))
        else:
            pb_items.append(reward_pb2.LogProbsItem(prompt_token_ids=prompt, response_token_ids=response))
    req = reward_pb2.LogProbsRequest(model=model, reference_model=reference_model, items=pb_items)
    if temperature is not None:
        req.temperature = temperature
    return req


def comparison_request(prompt: str | Messages | None = None, *, messages: Messages | None = None,
                       models: tuple[str, str] | None = None, samples_of: str | None = None,
                       **sampling) -> feedback_pb2.CreateComparisonRequest:
    """A comparison of two responses to a prompt: text, or a conversation (a list of messages
    as the prompt or as messages=). The responses come from two models (`models=("ppo-1",
    "sft-1")`), two samples of one (`samples_of="policy"`, with temperature > 0), or, with
    neither, a matchup the server chooses (blind: two of its arena models, decoded with its
    --arena-sampling, so no sampling keywords then). `sampling` takes generate_request's
    decoding keywords. On a server with tokens, choosing the models needs the admin role."""
    if models is not None and samples_of is not None:
        raise ValueError("give models=(model_a, model_b) or samples_of=MODEL (or neither: the server picks "
                         "the matchup), not both")
    text, msgs = _prompt_and_messages(prompt, messages)
    req = feedback_pb2.CreateComparisonRequest(prompt=text, messages=msgs)
    if models is None and samples_of is None:
        if sampling:
            raise ValueError(f"a server-chosen matchup is decoded with the server's --arena-sampling: drop "
                             f"{', '.join(sorted(sampling))}, or choose models= / samples_of=")
        return req
    req.sampling.CopyFrom(generate_request("", **sampling).sampling)
    if models is not None:
        req.models.model_a, req.models.model_b = models
    else:
        req.samples_of = samples_of
    return req


def vote_request(comparison_id: str, choice: str | int, annotator_id: str,
                 rationale: str | None = None) -> feedback_pb2.SubmitVoteRequest:
    """choice: "left", "right", "tie", "both_bad" or a feedback_pb2.Choice value."""
    if isinstance(choice, str):
        choice = feedback_pb2.Choice.Value("CHOICE_" + choice.upper())
    req = feedback_pb2.SubmitVoteRequest(comparison_id=comparison_id, choice=choice, annotator_id=annotator_id)
    if rationale is not None:
        req.rationale = rationale
    return req


def leaderboard_request(bootstrap_rounds: int = 0, seed: int | None = None,
                        prior_sd: float | None = None) -> feedback_pb2.GetLeaderboardRequest:
    """bootstrap_rounds 0: the server's default (100); prior_sd: the Gaussian prior's standard
    deviation in Elo points (None: the server's default, 200)."""
    req = feedback_pb2.GetLeaderboardRequest(bootstrap_rounds=bootstrap_rounds)
    if seed is not None:
        req.seed = seed
    if prior_sd is not None:
        req.prior_sd = prior_sd
    return req


TOKEN_ENV = "RLHFKIT_TOKEN"
PemSource = Union[str, os.PathLike, bytes, None]


def read_pem(source: PemSource, option: str) -> bytes | None:
    """The PEM bytes of a file path (or the bytes themselves, or None); ValueError naming
    `option` when the file cannot be read or holds no PEM block."""
    if source is None or isinstance(source, bytes):
        data, where = source, "the bytes given"
    else:
        where = str(source)
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise ValueError(f"{option} {where}: cannot read it: {e.strerror or e}") from None
    if data is not None and b"-----BEGIN" not in data:
        raise ValueError(f"{option} {where}: not a PEM file (no -----BEGIN line)")
    return data


def resolve_token(token: str | None) -> str | None:
    """token, or RLHFKIT_TOKEN when it is None; "" means none. Surrounding whitespace (a
    newline from a file) is dropped; a token with whitespace inside is a ValueError."""
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    token = (token or "").strip()
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError("the token has whitespace or control characters in it (is it the whole token file?)")
    return token or None


def channel_credentials(tls_ca: PemSource = None, tls_cert: PemSource = None, tls_key: PemSource = None,
                        tls: bool = False) -> grpc.ChannelCredentials | None:
    """TLS channel credentials (None: plaintext). TLS when any of them is given or tls=True;
    without tls_ca the server's certificate is checked against gRPC's default roots."""
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("give tls_cert and tls_key together (the client certificate and its key)")
    if not (tls or tls_ca or tls_cert):
        return None
    return grpc.ssl_channel_credentials(root_certificates=read_pem(tls_ca, "tls_ca"),
                                        private_key=read_pem(tls_key, "tls_key"),
                                        certificate_chain=read_pem(tls_cert, "tls_cert"))


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                           "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


def _with_token(metadata, token: str) -> list:
    return [*(metadata or ()), ("authorization", f"Bearer {token}")]


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """`authorization: Bearer TOKEN` on every call of a plaintext channel (gRPC sends call
    credentials only over TLS or local connections)."""

    def __init__(self, token: str):
        self.token = token

    def _details(self, d):
        return _CallDetails(d.method, d.timeout, _with_token(d.metadata, self.token), d.credentials,
                            d.wait_for_ready, getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)


class _AsyncTokenInterceptor:
    def __init__(self, token: str):
        self.token = token

    def _details(self, d):
        return grpc.aio.ClientCallDetails(d.method, d.timeout, grpc.aio.Metadata(*_with_token(d.metadata, self.token)),
                                          d.credentials, d.wait_for_ready)


# Two classes: grpc.aio files an interceptor under the first kind it is an instance of only.
class _AsyncUnaryTokenInterceptor(_AsyncTokenInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _AsyncStreamTokenInterceptor(_AsyncTokenInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


def _channel(address: str, token, tls_ca, tls_cert, tls_key, tls: bool, aio: bool):
    """A channel to address: TLS with the token as call credentials, or plaintext with the
    token added by an interceptor."""
    token = resolve_token(token)
    credentials = channel_credentials(tls_ca, tls_cert, tls_key, tls)
    if credentials is not None:
        if token:
            credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
        return grpc.aio.secure_channel(address, credentials) if aio else grpc.secure_channel(address, credentials)
    if aio:
        interceptors = [_AsyncUnaryTokenInterceptor(token), _AsyncStreamTokenInterceptor(token)] if token else None
        return grpc.aio.insecure_channel(address, interceptors=interceptors)
    channel = grpc.insecure_channel(address)
    return grpc.intercept_channel(channel, _TokenInterceptor(token)) if token else channel


class _Stubs:
    def __init__(self, channel):
        self.channel = channel
        self.generation = generation_pb2_grpc.GenerationStub(channel)
        self.reward = reward_pb2_grpc.RewardStub(channel)
        self.models = models_pb2_grpc.ModelsStub(channel)
        self.feedback = feedback_pb2_grpc.FeedbackStub(channel)
        self.health_stub = health_pb2_grpc.HealthStub(channel)


class Client(_Stubs):
    """Blocking client. `timeout` (seconds) is the default deadline of every call.

    `token`: sent as `authorization: Bearer TOKEN` on every call (default: the
    RLHFKIT_TOKEN environment variable; "" sends none). `tls_ca`: PEM file (or bytes) of the CA
    that signed the server's certificate, making the channel TLS; `tls_cert` / `tls_key`: a
    client certificate and its key for mutual TLS; `tls=True`: TLS checked against gRPC's
    default root certificates (implied by the others). ValueError names an unreadable file."""

    def __init__(self, address: str = "127.0.0.1:50051", timeout: float | None = None, token: str | None = None,
                 tls_ca: PemSource = None, tls_cert: PemSource = None, tls_key: PemSource = None, *,
                 tls: bool = False):
        super().__init__(_channel(address, token, tls_ca, tls_cert, tls_key, tls, aio=False))
        self.address = address
        self.timeout = timeout

    def generate(self, prompt: str | Messages | None = None, *, timeout: float | None = None,
                 **kwargs) -> generation_pb2.GenerateResponse:
        """kwargs: generate_request's (messages=, prompt_token_ids=, sampling keywords, model=)."""
        return self.generation.Generate(generate_request(prompt, **kwargs), timeout=timeout or self.timeout)

    def generate_stream(self, prompt: str | Messages | None = None, *, timeout: float | None = None,
                        **kwargs) -> Iterator[generation_pb2.GenerateChunk]:
        return self.generation.GenerateStream(generate_request(prompt, **kwargs), timeout=timeout or self.timeout)

    def score(self, items: Iterable[tuple], model: str = "", timeout: float | None = None) -> list[float]:
        """items: (prompt, response), the prompt text or a list of messages."""
        return list(self.reward.Score(score_request(items, model), timeout=timeout or self.timeout).rewards)

    def compare(self, prompt: str | Messages | None, response_a: str, response_b: str, model: str = "",
                timeout: float | None = None, *, messages: Messages | None = None) -> reward_pb2.CompareResponse:
        """P(response_a preferred); the prompt is text or a conversation (a list of messages)."""
        return self.reward.Compare(compare_request(prompt, response_a, response_b, model, messages=messages),
                                   timeout=timeout or self.timeout)

    def log_probs(self, items: Iterable[tuple], model: str = "", reference_model: str = "",
                  temperature: float | None = None, timeout: float | None = None) -> reward_pb2.LogProbsResponse:
        """items: (prompt, response), (messages, response) or (prompt_token_ids, response_token_ids)."""
        return self.reward.LogProbs(log_probs_request(items, model, reference_model, temperature),
                                    timeout=timeout or self.timeout)

    def list_models(self, timeout: float | None = None) -> list[models_pb2.ModelInfo]:
        return list(self.models.ListModels(models_pb2.ListModelsRequest(), timeout=timeout or self.timeout).models)

    def set_role(self, name: str, role: str, timeout: float | None = None) -> list[models_pb2.ModelInfo]:
        """Point `role` at checkpoint `name` of the server's model store."""
        resp = self.models.SetRole(models_pb2.SetRoleRequest(name=name, role=role), timeout=timeout or self.timeout)
        return list(resp.models)

    def create_comparison(self, prompt: str | Messages | None = None, *, timeout: float | None = None,
                          **kwargs) -> feedback_pb2.Comparison:
        """kwargs: comparison_request's (messages=, models= or samples_of= and sampling keywords;
        neither: the server chooses the matchup)."""
        return self.feedback.CreateComparison(comparison_request(prompt, **kwargs), timeout=timeout or self.timeout)

    def submit_vote(self, comparison_id: str, choice: str | int, annotator_id: str, rationale: str | None = None,
                    timeout: float | None = None) -> feedback_pb2.SubmitVoteResponse:
        return self.feedback.SubmitVote(vote_request(comparison_id, choice, annotator_id, rationale),
                                        timeout=timeout or self.timeout)

    def leaderboard(self, bootstrap_rounds: int = 0, seed: int | None = None, timeout: float | None = None, *,
                    prior_sd: float | None = None) -> feedback_pb2.Leaderboard:
        return self.feedback.GetLeaderboard(leaderboard_request(bootstrap_rounds, seed, prior_sd),
                                            timeout=timeout or self.timeout)

    def annotators(self, days: int = 0, timeout: float | None = None) -> feedback_pb2.AnnotatorReport:
        """Votes per annotator (in all, today, per day over the last `days` UTC days; 0: 14) and
        their agreement (admin role)."""
        return self.feedback.GetAnnotators(feedback_pb2.GetAnnotatorsRequest(days=days),
                                           timeout=timeout or self.timeout)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """SERVING, NOT_SERVING, ... for the server (or one service)."""
        resp = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout or self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    def wait_ready(self, timeout: float = 120.0):
        """Block until the server reports SERVING (models loaded)."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=5) == "SERVING":
                    return self
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not SERVING after {timeout:.0f}s")
            time.sleep(0.1)

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncClient(_Stubs):
    """asyncio client; use inside a running event loop. Options as Client's."""

    def __init__(self, address: str = "127.0.0.1:50051", timeout: float | None = None, token: str | None = None,
                 tls_ca: PemSource = None, tls_cert: PemSource = None, tls_key: PemSource = None, *,
                 tls: bool = False):
        super().__init__(_channel(address, token, tls_ca, tls_cert, tls_key, tls, aio=True))
        self.address = address
        self.timeout = timeout

    async def generate(self, prompt: str | Messages | None = None, *, timeout: float | None = None,
                       **kwargs) -> generation_pb2.GenerateResponse:
        return await self.generation.Generate(generate_request(prompt, **kwargs), timeout=timeout or self.timeout)

    async def generate_stream(self, prompt: str | Messages | None = None, *, timeout: float | None = None,
                              **kwargs) -> AsyncIterator[generation_pb2.GenerateChunk]:
        call = self.generation.GenerateStream(generate_request(prompt, **kwargs), timeout=timeout or self.timeout)
        async for chunk in call:
            yield chunk

    async def score(self, items: Iterable[tuple], model: str = "", timeout: float | None = None) -> list[float]:
        resp = await self.reward.Score(score_request(items, model), timeout=timeout or self.timeout)
        return list(resp.rewards)

    async def compare(self, prompt: str | Messages | None, response_a: str, response_b: str, model: str = "",
                      timeout: float | None = None, *, messages: Messages | None = None) -> reward_pb2.CompareResponse:
        return await self.reward.Compare(compare_request(prompt, response_a, response_b, model, messages=messages),
                                         timeout=timeout or self.timeout)

    async def log_probs(self, items: Iterable[tuple], model: str = "", reference_model: str = "",
                        temperature: float | None = None, timeout: float | None = None) -> reward_pb2.LogProbsResponse:
        return await self.reward.LogProbs(log_probs_request(items, model, reference_model, temperature),
                                          timeout=timeout or self.timeout)

    async def list_models(self, timeout: float | None = None) -> list[models_pb2.ModelInfo]:
        resp = await self.models.ListModels(models_pb2.ListModelsRequest(), timeout=timeout or self.timeout)
        return list(resp.models)

    async def set_role(self, name: str, role: str, timeout: float | None = None) -> list[models_pb2.ModelInfo]:
        resp = await self.models.SetRole(models_pb2.SetRoleRequest(name=name, role=role), timeout=timeout or self.timeout)
        return list(resp.models)

    async def create_comparison(self, prompt: str | Messages | None = None, *, timeout: float | None = None,
                                **kwargs) -> feedback_pb2.Comparison:
        return await self.feedback.CreateComparison(comparison_request(prompt, **kwargs), timeout=timeout or self.timeout)

    async def submit_vote(self, comparison_id: str, choice: str | int, annotator_id: str,
                          rationale: str | None = None, timeout: float | None = None) -> feedback_pb2.SubmitVoteResponse:
        return await self.feedback.SubmitVote(vote_request(comparison_id, choice, annotator_id, rationale),
                                              timeout=timeout or self.timeout)

    async def leaderboard(self, bootstrap_rounds: int = 0, seed: int | None = None, timeout: float | None = None,
                          *, prior_sd: float | None = None) -> feedback_pb2.Leaderboard:
        return await self.feedback.GetLeaderboard(leaderboard_request(bootstrap_rounds, seed, prior_sd),
                                                  timeout=timeout or self.timeout)

    async def annotators(self, days: int = 0, timeout: float | None = None) -> feedback_pb2.AnnotatorReport:
        return await self.feedback.GetAnnotators(feedback_pb2.GetAnnotatorsRequest(days=days),
                                                 timeout=timeout or self.timeout)

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        resp = await self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout or self.timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    async def close(self):
        await self.channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
