"""gRPC servicers (grpc.aio): Generation, Reward, Models.

Every bad input becomes a status a person can act on; the mapping from exception to
status code lives in STATUS_FOR, one place.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time

import grpc

from rlhfkit.kernels import SamplingParams, SamplingParamsError
from rlhfkit.server.engine import Engine, EngineStoppedError, QueueFullError, SequenceOutput
from rlhfkit.server.models import ModelNotFoundError, ModelRegistry
from rlhfkit.server.reward import score_texts
from rlhfkit.v1 import generation_pb2 as gen_pb
from rlhfkit.v1 import generation_pb2_grpc as gen_grpc
from rlhfkit.v1 import models_pb2 as models_pb
from rlhfkit.v1 import models_pb2_grpc as models_grpc
from rlhfkit.v1 import reward_pb2 as reward_pb
from rlhfkit.v1 import reward_pb2_grpc as reward_grpc


class ServerLoadingError(RuntimeError):
    """Models are still loading."""


STATUS_FOR = {
    SamplingParamsError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    EngineStoppedError: grpc.StatusCode.UNAVAILABLE,
    ServerLoadingError: grpc.StatusCode.UNAVAILABLE,
}
REQUEST_ERRORS = tuple(STATUS_FOR)

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
    )


class ServerState:
    """What the servicers share: the models, their engines, metrics, and whether loading is done."""

    def __init__(self, metrics):
        self.registry = ModelRegistry()
        self.engines: dict[str, Engine] = {}
        self.metrics = metrics
        self.loaded = False
        # Reward forwards block; one worker keeps them off the event loop and in order.
        self.reward_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rlhfkit-reward")

    def check_ready(self):
        if not self.loaded:
            raise ServerLoadingError("models are still loading; retry shortly (health: NOT_SERVING)")


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

    def _submit(self, request: gen_pb.GenerateRequest):
        """Validate and enqueue; returns (engine, engine request, asyncio queue of outputs)."""
        self.state.check_ready()
        engine = self.state.engines.get(self.state.registry.get(request.model, "policy").name)
        if engine is None:
            raise ModelNotFoundError(f"model {request.model!r} is not served for generation")
        params = sampling_from_proto(request.sampling)
        if request.prompt and request.prompt_token_ids:
            raise SamplingParamsError("prompt", "set prompt or prompt_token_ids, not both")
        if request.prompt:
            prompt_ids = engine.tokenizer(request.prompt).input_ids
        else:
            prompt_ids = list(request.prompt_token_ids)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[SequenceOutput]] = asyncio.Queue()
        req = engine.add_request(prompt_ids, params, lambda outs: loop.call_soon_threadsafe(queue.put_nowait, outs),
                                 request.request_id)
        return engine, req, queue

    async def _outputs(self, engine: Engine, req, queue):
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
            engine, req, queue = self._submit(request)
        except REQUEST_ERRORS as e:
            return await fail(self.state, context, "Generate", e)
        completions = [gen_pb.Completion(index=i) for i in range(req.params.n)]
        async for outs in self._outputs(engine, req, queue):
            for o in outs:
                c = completions[o.index]
                c.text += o.text
                c.token_ids.extend(o.token_ids)
                c.logprobs.extend(o.logprobs)
                c.top_logprobs.extend(_top_logprobs_pb(engine.tokenizer, o.top_logprobs))
                if o.finish_reason:
                    c.finish_reason = FINISH_REASONS[o.finish_reason]
                    c.stop_reason = o.stop_reason
        return gen_pb.GenerateResponse(
            completions=completions, model_version=engine.lm.model_version, request_id=req.request_id,
            prompt_token_ids=req.prompt_ids,
            usage=gen_pb.Usage(prompt_tokens=len(req.prompt_ids),
                               completion_tokens=sum(len(c.token_ids) for c in completions)))

    async def GenerateStream(self, request, context):
        try:
            engine, req, queue = self._submit(request)
        except REQUEST_ERRORS as e:
            await fail(self.state, context, "GenerateStream", e)
            return
        version = engine.lm.model_version
        async for outs in self._outputs(engine, req, queue):
            for o in outs:
                yield gen_pb.GenerateChunk(
                    index=o.index, text=o.text, token_ids=o.token_ids, logprobs=o.logprobs,
                    finish_reason=FINISH_REASONS[o.finish_reason] if o.finish_reason else 0,
                    stop_reason=o.stop_reason, model_version=version, request_id=req.request_id,
                    top_logprobs=_top_logprobs_pb(engine.tokenizer, o.top_logprobs))


class RewardService(reward_grpc.RewardServicer):
    def __init__(self, state: ServerState):
        self.state = state

    async def _score(self, model: str, prompts: list[str], responses: list[str]):
        self.state.check_ready()
        rm = self.state.registry.get(model, "reward")
        start = time.monotonic()
        loop = asyncio.get_running_loop()
        rewards = await loop.run_in_executor(self.state.reward_pool, score_texts, rm, prompts, responses)
        self.state.metrics.score_latency.observe(time.monotonic() - start)
        self.state.metrics.scored_items.inc(len(rewards))
        return rm, rewards

    async def Score(self, request, context):
        try:
            if not request.items:
                raise SamplingParamsError("items", "is empty: give at least one {prompt, response} item")
            rm, rewards = await self._score(request.model, [i.prompt for i in request.items],
                                            [i.response for i in request.items])
        except REQUEST_ERRORS as e:
            return await fail(self.state, context, "Score", e)
        return reward_pb.ScoreResponse(rewards=rewards, model_version=rm.model_version)

    async def Compare(self, request, context):
        try:
            rm, (ra, rb) = await self._score(request.model, [request.prompt] * 2,
                                             [request.response_a, request.response_b])
        except REQUEST_ERRORS as e:
            return await fail(self.state, context, "Compare", e)
        return reward_pb.CompareResponse(reward_a=ra, reward_b=rb, prob_a_preferred=0.5 * (1 + math.tanh((ra - rb) / 2)),  # sigmoid, overflow-free
                                         model_version=rm.model_version)


class ModelsService(models_grpc.ModelsServicer):
    def __init__(self, state: ServerState):
        self.state = state

    async def ListModels(self, request, context):
        infos = []
        for m in self.state.registry.models.values():
            meta = m.meta
            infos.append(models_pb.ModelInfo(
                name=m.name, role=m.role, version=m.version, stage=str(meta.get("stage", "")), path=str(m.path),
                parent=str(meta.get("parent") or ""), base_model=str(meta.get("base_model") or ""),
                architecture=",".join(m.model.config.architectures or [type(m.model).__name__]),
                dtype=str(m.dtype).removeprefix("torch."), device=str(m.device),
                context_length=m.context_length, num_parameters=sum(p.numel() for p in m.model.parameters()),
                data_fingerprint=str(meta.get("data_fingerprint") or ""),
                metrics={k: float(v) for k, v in (meta.get("metrics") or {}).items()
                         if isinstance(v, (int, float))},
                created_at=str(meta.get("created_at") or "")))
        return models_pb.ListModelsResponse(models=infos)
