"""gRPC servicers (grpc.aio): Generation, Reward, Models.

Every bad input becomes a status a person can act on; the mapping from exception to
status code lives in STATUS_FOR, one place.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
from typing import Awaitable, Callable

import grpc

from rlhfkit.chat import ChatFormatError, NoChatTemplateError, as_messages, prompt_ids, require_chat_template, reply_ids
from rlhfkit.kernels import SamplingParams, SamplingParamsError
from rlhfkit.server.engine import Engine, EngineStoppedError, QueueFullError, SequenceOutput
from rlhfkit.server.feedback import ComparisonNotFoundError, FeedbackInputError, VoteConflictError
from rlhfkit.server.registry import ModelNotFoundError, ModelRegistry
from rlhfkit.server.scoring import score_texts, token_scores
from rlhfkit.server.store import ModelStore, StoreError
from rlhfkit.v1 import generation_pb2 as gen_pb
from rlhfkit.v1 import generation_pb2_grpc as gen_grpc
from rlhfkit.v1 import models_pb2 as models_pb
from rlhfkit.v1 import models_pb2_grpc as models_grpc
from rlhfkit.v1 import reward_pb2 as reward_pb
from rlhfkit.v1 import reward_pb2_grpc as reward_grpc


class ServerLoadingError(RuntimeError):
    """Models are still loading."""


class StoreUnavailableError(RuntimeError):
    """An operation that needs a model store on a server started without one."""


STATUS_FOR = {
    SamplingParamsError: grpc.StatusCode.INVALID_ARGUMENT,
    ChatFormatError: grpc.StatusCode.INVALID_ARGUMENT,
    NoChatTemplateError: grpc.StatusCode.FAILED_PRECONDITION,
    StoreError: grpc.StatusCode.INVALID_ARGUMENT,
    StoreUnavailableError: grpc.StatusCode.FAILED_PRECONDITION,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EngineStoppedError: grpc.StatusCode.UNAVAILABLE,
    ServerLoadingError: grpc.StatusCode.UNAVAILABLE,
    FeedbackInputError: grpc.StatusCode.INVALID_ARGUMENT,
    ComparisonNotFoundError: grpc.StatusCode.NOT_FOUND,
    VoteConflictError: grpc.StatusCode.ALREADY_EXISTS,
}
REQUEST_ERRORS = tuple(STATUS_FOR)

# TokenScores names the sums of its plural per-token fields in the singular.
SUM_FIELD = {"logprobs": "logprob_sum", "ref_logprobs": "ref_logprob_sum"}

FINISH_REASONS = {
    "length": gen_pb.FINISH_REASON_LENGTH,
    "stop": gen_pb.FINISH_REASON_STOP,
    "eos": gen_pb.FINISH_REASON_EOS,
    "abort": gen_pb.FINISH_REASON_ABORT,
}


def sampling_from_proto(sp: gen_pb.SamplingParams) -> SamplingParams:
    """Proto defaults (0 / unset) mean: greedy, no top-k, top_p 1, 16 new tokens, n 1."""
    return SamplingParams(
        temperature=sp.temperature,
        top_k=sp.top_k,
        top_p=sp.top_p if sp.HasField("top_p") else 1.0,
        seed=sp.seed if sp.HasField("seed") else None,
        max_new_tokens=sp.max_new_tokens or 16,
        n=sp.n or 1,
        stop=list(sp.stop),
        logprobs=sp.logprobs,
        ignore_eos=sp.ignore_eos,
        stop_token_ids=list(sp.stop_token_ids),
        include_stop_str_in_output=sp.include_stop_str_in_output,
    )


def request_prompt(lm, text: str, messages, field: str = "", ids=()):
    """The prompt of a request as rlhfkit.chat takes it: text, or a checked conversation
    (which needs the model's chat template); at most one of text, ids and messages."""
    given = [name for name, v in (("prompt", text), ("prompt_token_ids", ids), ("messages", messages)) if v]
    if len(given) > 1:
        raise SamplingParamsError(field + given[-1], f"set exactly one of {', '.join(field + g for g in given)}")
    if not messages:
        return text
    require_chat_template(lm.tokenizer, lm.name)
    return as_messages(messages, field + "messages")


def request_prompt_ids(lm, text: str, ids, messages, field: str = ""):
    """(prompt, prompt token ids) from exactly one of text, token ids and messages (rendered
    with a generation prompt, rlhfkit.chat's rule everywhere); the prompt is "" for ids."""
    prompt = request_prompt(lm, text, messages, field, ids)
    return prompt, prompt_ids(lm.tokenizer, prompt) if prompt else list(ids)


class ServerState:
    """What the servicers share: the registry (models, roles, engines), the store if any,
    metrics, and whether the first load is done."""

    def __init__(self, registry: ModelRegistry, metrics, store: ModelStore | None = None,
                 on_store_change: Callable[[], Awaitable[None]] | None = None):
        self.registry = registry
        self.store = store
        self.on_store_change = on_store_change
        self.metrics = metrics
        self.loaded = False
        # Scoring forwards block; one worker keeps them off the event loop and in order.
        self.scoring_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rlhfkit-scoring")

    def check_ready(self):
        if not self.loaded:
            raise ServerLoadingError("models are still loading; retry shortly (health: NOT_SERVING)")

    async def run_blocking(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.scoring_pool, fn, *args)


async def fail(state: ServerState, context, method: str, exc: Exception):
    code = STATUS_FOR[type(exc)]
    state.metrics.rpc_errors.labels(method, code.name).inc()
    await context.abort(code, str(exc))


def _top_logprobs_pb(tokenizer, top):
    return [gen_pb.TopLogprobs(candidates=[gen_pb.TokenLogprob(token_id=t, logprob=v, token=tokenizer.decode([t]))
                                           for t, v in pos]) for pos in top]


class GenerationService(gen_grpc.GenerationServicer):
    def __init__(self, state: ServerState):
        self.state = state

    def submit(self, request: gen_pb.GenerateRequest):
        """Validate and enqueue; returns (engine, engine request, asyncio queue of outputs)."""
        self.state.check_ready()
        params = sampling_from_proto(request.sampling)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[SequenceOutput]] = asyncio.Queue()
        for attempt in (1, 2):
            lm = self.state.registry.get(request.model, "policy")
            _, ids = request_prompt_ids(lm, request.prompt, request.prompt_token_ids, request.messages)
            try:
                req = lm.engine.add_request(ids, params,
                                            lambda outs: loop.call_soon_threadsafe(queue.put_nowait, outs),
                                            request.request_id)
                return lm.engine, req, queue
            except EngineStoppedError:
                if attempt == 2:
                    raise  # a hot reload retired the model between lookup and enqueue: look again once

    async def outputs(self, engine: Engine, req, queue):
        """Yield each step's outputs until every completion has finished; abort the request
        in the engine if the call ends first (client cancel, deadline, server stop)."""
        remaining = len(req.sequences)
        try:
            while remaining:
                outs = await queue.get()
                remaining -= sum(1 for o in outs if o.finish_reason)
                yield outs
        finally:
            if remaining:
                engine.abort(req)
            else:
                for seq in req.sequences:
                    self.state.metrics.request_success.labels(seq.finish_reason).inc()

    async def Generate(self, request, context):
        try:
            engine, req, queue = self.submit(request)
        except REQUEST_ERRORS as e:
            return await fail(self.state, context, "Generate", e)
        completions = [gen_pb.Completion(index=i) for i in range(req.params.n)]
        async for outs in self.outputs(engine, req, queue):
            for o in outs:
                c = completions[o.index]
                c.text += o.text
                c.token_ids.extend(o.token_ids)
                c.logprobs.extend(o.logprobs)
                c.top_logprobs.extend(_top_logprobs_pb(engine.tokenizer, o.top_logprobs))
                if o.finish_reason:
                    c.finish_reason = FINISH_REASONS[o.finish_reason]
                    c.stop_reason = o.stop_reason
                    if o.stop_token_id is not None:
                        c.stop_token_id = o.stop_token_id
        return gen_pb.GenerateResponse(
            completions=completions, model_version=engine.lm.model_version, request_id=req.request_id,
            prompt_token_ids=req.prompt_ids,
            usage=gen_pb.Usage(prompt_tokens=len(req.prompt_ids),
                               completion_tokens=sum(len(c.token_ids) for c in completions)))

    async def GenerateStream(self, request, context):
        try:
            engine, req, queue = self.submit(request)
        except REQUEST_ERRORS as e:
            await fail(self.state, context, "GenerateStream", e)
            return
        version = engine.lm.model_version
        async for outs in self.outputs(engine, req, queue):
            for o in outs:
                yield gen_pb.GenerateChunk(
                    index=o.index, text=o.text, token_ids=o.token_ids, logprobs=o.logprobs,
                    finish_reason=FINISH_REASONS[o.finish_reason] if o.finish_reason else 0,
                    stop_reason=o.stop_reason, model_version=version, request_id=req.request_id,
                    top_logprobs=_top_logprobs_pb(engine.tokenizer, o.top_logprobs), stop_token_id=o.stop_token_id)


class RewardService(reward_grpc.RewardServicer):
    def __init__(self, state: ServerState):
        self.state = state

    async def _score(self, model: str, items: list[tuple[str, object, str]]):
        """items: (field prefix, prompt text, messages, response) per scored response."""
        self.state.check_ready()
        rm = self.state.registry.get(model, "reward")
        pairs = [(request_prompt(rm, text, messages, field), response) for field, text, messages, response in items]
        start = time.monotonic()
        rewards = await self.state.run_blocking(score_texts, rm, pairs)
        self.state.metrics.score_latency.observe(time.monotonic() - start)
        self.state.metrics.scored_items.inc(len(rewards))
        return rm, rewards

    async def Score(self, request, context):
        try:
            if not request.items:
                raise SamplingParamsError("items", "is empty: give at least one {prompt, response} item")
            rm, rewards = await self._score(request.model, [(f"items[{n}].", i.prompt, i.messages, i.response)
                                                            for n, i in enumerate(request.items)])
        except REQUEST_ERRORS as e:
            return await fail(self.state, context, "Score", e)
        return reward_pb.ScoreResponse(rewards=rewards, model_version=rm.model_version)

    async def Compare(self, request, context):
        try:
            rm, (ra, rb) = await self._score(request.model, [("", request.prompt, request.messages, r)
                                                             for r in (request.response_a, request.response_b)])
        except REQUEST_ERRORS as e:
            return await fail(self.state, context, "Compare", e)
        return reward_pb.CompareResponse(reward_a=ra, reward_b=rb, model_version=rm.model_version,
                                         prob_a_preferred=0.5 * (1 + math.tanh((ra - rb) / 2)))  # sigmoid, no overflow

    def _log_probs_items(self, request, policy, reference):
        if not request.items:
            raise SamplingParamsError("items", "is empty: give at least one {prompt, response} item")
        temperature = request.temperature if request.HasField("temperature") else 1.0
        if not math.isfinite(temperature) or temperature <= 0:
            raise SamplingParamsError("temperature", f"must be finite and > 0, got {temperature}")
        vocab = policy.model.get_output_embeddings().weight.shape[0]
        if reference is not None and reference.model.get_output_embeddings().weight.shape[0] != vocab:
            raise SamplingParamsError("reference_model", f"{reference.name} has a different vocabulary from "
                                      f"{policy.name}; KL needs the same tokenizer")
        items = []
        for i, it in enumerate(request.items):
            prompt, p = request_prompt_ids(policy, it.prompt, it.prompt_token_ids, it.messages, f"items[{i}].")
            if it.response and it.response_token_ids:
                raise SamplingParamsError(f"items[{i}].response", f"set items[{i}].response or "
                                          f"items[{i}].response_token_ids, not both")
            if not it.response:
                r = list(it.response_token_ids)
            elif isinstance(prompt, list):  # the assistant turn as the template renders it
                r = reply_ids(policy.tokenizer, prompt, it.response)
            else:
                r = policy.tokenizer(it.response, add_special_tokens=False).input_ids
            if not p or not r:
                raise SamplingParamsError(f"items[{i}]", "needs a non-empty prompt and a non-empty response")
            if max(p + r) >= vocab:
                raise SamplingParamsError(f"items[{i}]", f"token id {max(p + r)} is out of range [0, {vocab})")
            if len(p) + len(r) > policy.context_length:
                raise SamplingParamsError(f"items[{i}]", f"prompt + response is {len(p) + len(r)} tokens, over "
                                          f"the context of {policy.context_length}")
            items.append((p, r))
        return items, temperature

    async def LogProbs(self, request, context):
        try:
            self.state.check_ready()
            policy = self.state.registry.get(request.model, "policy")
            reference = self.state.registry.find(request.reference_model, "reference")
            items, temperature = self._log_probs_items(request, policy, reference)
            start = time.monotonic()
            scores = await self.state.run_blocking(token_scores, policy, reference, items, temperature)
            self.state.metrics.score_latency.observe(time.monotonic() - start)
        except REQUEST_ERRORS as e:
            return await fail(self.state, context, "LogProbs", e)
        results = []
        for (_, r), sc in zip(items, scores):
            ts = reward_pb.TokenScores(token_ids=r, **sc)
            for key, values in sc.items():
                setattr(ts, SUM_FIELD.get(key, f"{key}_sum"), sum(values))
            results.append(ts)
        return reward_pb.LogProbsResponse(results=results, model_version=policy.model_version,
                                          reference_version=reference.model_version if reference else "")


def model_info(m, roles: list[str]) -> models_pb.ModelInfo:
    meta = m.meta
    return models_pb.ModelInfo(
        name=m.name, role=roles[0] if roles else "", roles=roles, version=m.version,
        stage=str(meta.get("stage", "")), path=str(m.path), parent=str(meta.get("parent") or ""),
        base_model=str(meta.get("base_model") or ""),
        architecture=",".join(m.model.config.architectures or [type(m.model).__name__]),
        dtype=str(m.dtype).removeprefix("torch."), device=str(m.device), context_length=m.context_length,
        num_parameters=sum(p.numel() for p in m.model.parameters()),
        data_fingerprint=str(meta.get("data_fingerprint") or ""),
        metrics={k: float(v) for k, v in (meta.get("metrics") or {}).items() if isinstance(v, (int, float))},
        created_at=str(meta.get("created_at") or ""))


class ModelsService(models_grpc.ModelsServicer):
    def __init__(self, state: ServerState):
        self.state = state

    def _list(self) -> models_pb.ListModelsResponse:
        models, roles, failures = self.state.registry.snapshot()
        infos = [model_info(m, [r for r, n in roles.items() if n == name]) for name, m in models.items()]
        return models_pb.ListModelsResponse(
            models=infos, store=str(self.state.store.root) if self.state.store else "",
            load_failures=[models_pb.LoadFailure(name=f.name, path=f.path, error=f.error, failed_at=f.failed_at)
                           for f in failures])

    async def ListModels(self, request, context):
        return self._list()

    async def SetRole(self, request, context):
        try:
            if self.state.store is None:
                raise StoreUnavailableError("roles can only change on a server started with --store DIR")
            try:
                self.state.store.set_role(request.name, request.role)
            except KeyError as e:
                raise ModelNotFoundError(str(e.args[0])) from e
            await self.state.on_store_change()
        except REQUEST_ERRORS as e:
            return await fail(self.state, context, "SetRole", e)
        return models_pb.SetRoleResponse(models=self._list().models)
