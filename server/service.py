"""gRPC servicers (grpc.aio): Generation, Reward, Models.

The servicers raise the request errors of server/errors.py; the one interceptor
(server/auth.py) turns them into statuses a person can act on. Limits on the work one
request may ask for are checked (server/limits.py) before any of it starts, and the work
that blocks (tokenizing, scoring) runs off the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import math
import re
import threading
import time
from typing import Awaitable, Callable

from rlhfkit.chat import as_messages, prompt_ids, require_chat_template, reply_ids
from rlhfkit.errors import InvalidArgumentError
from rlhfkit.kernels import SamplingParams
from rlhfkit.server import limits as lim
from rlhfkit.server.auth import caller, is_admin
from rlhfkit.server.engine import Engine, SequenceOutput, check_prompt_length
from rlhfkit.server.errors import EngineStoppedError, ModelNotFoundError, ServerLoadingError, StoreUnavailableError
from rlhfkit.server.registry import ModelRegistry
from rlhfkit.server.scoring import score_texts, token_scores
from rlhfkit.server.store import ModelStore
from rlhfkit.v1 import generation_pb2 as gen_pb
from rlhfkit.v1 import generation_pb2_grpc as gen_grpc
from rlhfkit.v1 import models_pb2 as models_pb
from rlhfkit.v1 import models_pb2_grpc as models_grpc
from rlhfkit.v1 import reward_pb2 as reward_pb
from rlhfkit.v1 import reward_pb2_grpc as reward_grpc


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
        raise InvalidArgumentError(field + given[-1], f"set exactly one of {', '.join(field + g for g in given)}")
    if not messages:
        return text
    require_chat_template(lm.tokenizer, lm.name)
    return as_messages(messages, field + "messages")


def request_prompt_ids(lm, text: str, ids, messages, field: str = "", limits: lim.RequestLimits | None = None):
    """(prompt, prompt token ids) from exactly one of text, token ids and messages (rendered
    with a generation prompt, rlhfkit.chat's rule everywhere); the prompt is "" for ids."""
    prompt = request_prompt(lm, text, messages, field, ids)
    tokens = prompt_ids(lm.tokenizer, prompt) if prompt else list(ids)
    if limits is not None:
        lim.check_prompt_tokens(field + ("prompt_token_ids" if ids else "messages" if messages else "prompt"),
                                len(tokens), limits)
    return prompt, tokens


class ServerState:
    """What the servicers share: the registry (models, roles, engines), the store if any,
    metrics, and whether the first load is done."""

    def __init__(self, registry: ModelRegistry, metrics, store: ModelStore | None = None,
                 on_store_change: Callable[[], Awaitable[None]] | None = None,
                 limits: lim.RequestLimits | None = None):
        self.registry = registry
        self.store = store
        self.on_store_change = on_store_change
        self.metrics = metrics
        self.limits = limits or lim.RequestLimits()
        self.loaded = False
        # Scoring forwards block; one worker keeps them off the event loop and in order.
        self.scoring_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rlhfkit-scoring")
        # Tokenizing a long prompt takes a while (a 1 MB prompt: about a second): never on the
        # event loop, and not behind the scoring queue.
        self.tokenize_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="rlhfkit-tokenize")

    def check_ready(self):
        if not self.loaded:
            raise ServerLoadingError("models are still loading; retry shortly (health: NOT_SERVING)")

    async def tokenize(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, fn, *args)

    async def run_blocking(self, fn, *args, context=None):
        """fn(*args, should_stop=...) on the scoring worker. should_stop() turns true once the
        call is cancelled or its deadline passes, and fn checks it between micro-batches, so an
        abandoned call frees the worker within one batch instead of finishing for nobody."""
        remaining = context.time_remaining() if context is not None else None
        deadline = time.monotonic() + remaining if remaining is not None else math.inf
        abandoned = threading.Event()

        def should_stop() -> bool:
            return abandoned.is_set() or time.monotonic() > deadline

        job = functools.partial(fn, *args, should_stop=should_stop)
        try:
            return await asyncio.get_running_loop().run_in_executor(self.scoring_pool, job)
        finally:
            abandoned.set()

    def shutdown(self):
        self.scoring_pool.shutdown(wait=False, cancel_futures=True)
        self.tokenize_pool.shutdown(wait=False, cancel_futures=True)


def _top_logprobs_pb(tokenizer, top):
    return [gen_pb.TopLogprobs(candidates=[gen_pb.TokenLogprob(token_id=t, logprob=v, token=tokenizer.decode([t]))
                                           for t, v in pos]) for pos in top]


class GenerationService(gen_grpc.GenerationServicer):
    def __init__(self, state: ServerState):
        self.state = state

    async def submit(self, request: gen_pb.GenerateRequest):
        """Validate and enqueue; returns (engine, engine request, asyncio queue of outputs).
        The prompt is checked against the limits first, then tokenized off the event loop."""
        self.state.check_ready()
        lim.check_generate(request, self.state.limits)
        params = sampling_from_proto(request.sampling)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[list[SequenceOutput]] = asyncio.Queue()
        for attempt in (1, 2):
            lm = self.state.registry.get(request.model, "policy")
            check_prompt_length(lm, len(request.prompt_token_ids))
            _, ids = await self.state.tokenize(request_prompt_ids, lm, request.prompt, request.prompt_token_ids,
                                               request.messages, "", self.state.limits)
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
        engine, req, queue = await self.submit(request)
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
        engine, req, queue = await self.submit(request)
        version = engine.lm.model_version
        async for outs in self.outputs(engine, req, queue):
            for o in outs:
                yield gen_pb.GenerateChunk(
                    index=o.index, text=o.text, token_ids=o.token_ids, logprobs=o.logprobs,
                    finish_reason=FINISH_REASONS[o.finish_reason] if o.finish_reason else 0,
                    stop_reason=o.stop_reason, model_version=version, request_id=req.request_id,
                    top_logprobs=_top_logprobs_pb(engine.tokenizer, o.top_logprobs), stop_token_id=o.stop_token_id)


def rendered_pairs(rm, items):
    """(prompt, response) pairs as score_texts takes them; items: (field prefix, text, messages,
    response). On the scoring worker, since rendering a conversation tokenizes."""
    return [(request_prompt(rm, text, messages, field), response) for field, text, messages, response in items]


class RewardService(reward_grpc.RewardServicer):
    def __init__(self, state: ServerState):
        self.state = state

    async def _score(self, model: str, items: list[tuple[str, object, str]], context=None):
        """items: (field prefix, prompt text, messages, response) per scored response."""
        self.state.check_ready()
        limits = self.state.limits
        lim.check_id("model", model, limits)
        for field, text, messages, response in items:
            lim.check_scored_item(field, text, messages, response, limits)
        rm = self.state.registry.get(model, "reward")
        start = time.monotonic()

        def score(should_stop):
            return score_texts(rm, rendered_pairs(rm, items), should_stop=should_stop)

        rewards = await self.state.run_blocking(score, context=context)
        self.state.metrics.score_latency.observe(time.monotonic() - start)
        self.state.metrics.scored_items.inc(len(rewards))
        return rm, rewards

    async def Score(self, request, context):
        if not request.items:
            raise InvalidArgumentError("items", "is empty: give at least one {prompt, response} item")
        lim.check_items(request.items, self.state.limits)
        rm, rewards = await self._score(request.model, [(f"items[{n}].", i.prompt, i.messages, i.response)
                                                        for n, i in enumerate(request.items)], context)
        return reward_pb.ScoreResponse(rewards=rewards, model_version=rm.model_version)

    async def Compare(self, request, context):
        rm, (ra, rb) = await self._score(request.model, [("", request.prompt, request.messages, r)
                                                         for r in (request.response_a, request.response_b)], context)
        return reward_pb.CompareResponse(reward_a=ra, reward_b=rb, model_version=rm.model_version,
                                         prob_a_preferred=0.5 * (1 + math.tanh((ra - rb) / 2)))  # sigmoid, no overflow

    def _log_probs_items(self, request, policy, reference):
        """(prompt ids, response ids) per item, checked; tokenizes, so it runs on the scoring worker."""
        vocab = policy.model.get_output_embeddings().weight.shape[0]
        if reference is not None and reference.model.get_output_embeddings().weight.shape[0] != vocab:
            raise InvalidArgumentError("reference_model", f"{reference.name} has a different vocabulary from "
                                       f"{policy.name}; KL needs the same tokenizer")
        items = []
        for i, it in enumerate(request.items):
            prompt, p = request_prompt_ids(policy, it.prompt, it.prompt_token_ids, it.messages, f"items[{i}].",
                                           self.state.limits)
            if it.response and it.response_token_ids:
                raise InvalidArgumentError(f"items[{i}].response", f"set items[{i}].response or "
                                           f"items[{i}].response_token_ids, not both")
            if not it.response:
                r = list(it.response_token_ids)
            elif isinstance(prompt, list):  # the assistant turn as the template renders it
                r = reply_ids(policy.tokenizer, prompt, it.response)
            else:
                r = policy.tokenizer(it.response, add_special_tokens=False).input_ids
            if not p or not r:
                raise InvalidArgumentError(f"items[{i}]", "needs a non-empty prompt and a non-empty response")
            if max(p + r) >= vocab:
                raise InvalidArgumentError(f"items[{i}]", f"token id {max(p + r)} is out of range [0, {vocab})")
            if len(p) + len(r) > policy.context_length:
                raise InvalidArgumentError(f"items[{i}]", f"prompt + response is {len(p) + len(r)} tokens, over "
                                           f"the context of {policy.context_length}")
            items.append((p, r))
        return items

    async def LogProbs(self, request, context):
        self.state.check_ready()
        limits = self.state.limits
        if not request.items:
            raise InvalidArgumentError("items", "is empty: give at least one {prompt, response} item")
        lim.check_items(request.items, limits)
        for field, value in (("model", request.model), ("reference_model", request.reference_model)):
            lim.check_id(field, value, limits)
        for i, it in enumerate(request.items):
            lim.check_scored_item(f"items[{i}].", it.prompt, it.messages, it.response, limits)
        temperature = request.temperature if request.HasField("temperature") else 1.0
        if not math.isfinite(temperature) or temperature <= 0:
            raise InvalidArgumentError("temperature", f"must be finite and > 0, got {temperature}")
        policy = self.state.registry.get(request.model, "policy")
        reference = self.state.registry.find(request.reference_model, "reference")
        for i, it in enumerate(request.items):  # before the ids are copied or scanned
            if len(it.prompt_token_ids) + len(it.response_token_ids) > policy.context_length:
                raise InvalidArgumentError(f"items[{i}]", f"prompt + response is over the context of "
                                           f"{policy.context_length} tokens")
        start = time.monotonic()

        def score(should_stop):
            items = self._log_probs_items(request, policy, reference)
            return items, token_scores(policy, reference, items, temperature, should_stop=should_stop)

        items, scores = await self.state.run_blocking(score, context=context)
        self.state.metrics.score_latency.observe(time.monotonic() - start)
        results = []
        for (_, r), sc in zip(items, scores):
            ts = reward_pb.TokenScores(token_ids=r, **sc)
            for key, values in sc.items():
                setattr(ts, SUM_FIELD.get(key, f"{key}_sum"), sum(values))
            results.append(ts)
        return reward_pb.LogProbsResponse(results=results, model_version=policy.model_version,
                                          reference_version=reference.model_version if reference else "")


# An absolute path inside an error message; non-admins see only its last part.
_PATH = re.compile(r"(?<![\w.])/(?:[^\s/'\"():,]+/)+([^\s/'\"():,]+)")


def without_paths(text: str) -> str:
    """`text` with each absolute path reduced to its last part (a checkpoint's name)."""
    return _PATH.sub(lambda m: m.group(1), text)


def model_info(m, roles: list[str], admin: bool = True) -> models_pb.ModelInfo:
    meta = m.meta
    return models_pb.ModelInfo(
        name=m.name, role=roles[0] if roles else "", roles=roles, version=m.version,
        stage=str(meta.get("stage", "")), path=str(m.path) if admin else "",
        parent=str(meta.get("parent") or "") if admin else without_paths(str(meta.get("parent") or "")),
        base_model=str(meta.get("base_model") or "") if admin else without_paths(str(meta.get("base_model") or "")),
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
        """What ListModels answers: paths (the store, each checkpoint's directory) only to admins."""
        admin = is_admin(caller.get())
        models, roles, failures = self.state.registry.snapshot()
        infos = [model_info(m, [r for r, n in roles.items() if n == name], admin) for name, m in models.items()]
        return models_pb.ListModelsResponse(
            models=infos, store=str(self.state.store.root) if self.state.store and admin else "",
            load_failures=[models_pb.LoadFailure(name=f.name, path=f.path if admin else "",
                                                 error=f.error if admin else without_paths(f.error),
                                                 failed_at=f.failed_at)
                           for f in failures])

    async def ListModels(self, request, context):
        return self._list()

    async def SetRole(self, request, context):
        if self.state.store is None:
            raise StoreUnavailableError("roles can only change on a server started with --store DIR")
        lim.check_id("name", request.name, self.state.limits)
        lim.check_id("role", request.role, self.state.limits)
        try:
            self.state.store.set_role(request.name, request.role)
        except KeyError as e:
            raise ModelNotFoundError(str(e.args[0])) from e
        await self.state.on_store_change()
        return models_pb.SetRoleResponse(models=self._list().models)
