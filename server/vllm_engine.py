"""Generation through vLLM (`rlhfkit serve --engine vllm`), behind the native engine's interface.

vLLM's AsyncLLM runs on its own event loop in a background thread; each request is a task
there that maps our SamplingParams onto vLLM's (same semantics: temperature < 1e-5 is
greedy, top_k 0 is off, stop strings are cut, raw log-probs of every chosen token) and
turns vLLM's delta outputs into SequenceOutputs for the gRPC layer. Validation is the
native engine's (check_prompt, SamplingParams), so both engines answer bad input alike.
Reward and log-prob scoring stay on the native path (the HF copy of the weights).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid

from rlhfkit.chat import end_token_ids
from rlhfkit.kernels import SamplingParams
from rlhfkit.server.errors import EngineStoppedError, QueueFullError
from rlhfkit.server.engine import (FINISH_ABORT, FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Request, Sequence, SequenceOutput, check_prompt)
from rlhfkit.server.models import LoadedModel

log = logging.getLogger(__name__)


def to_vllm_params(params: SamplingParams, end_ids: set[int]):
    """`end_ids`: the model's end ids (rlhfkit.chat.end_token_ids); vLLM stops on its EOS by
    itself, and on the rest (the chat template's end of turn) as stop tokens."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    stop_ids = list(params.stop_token_ids) + ([] if params.ignore_eos else sorted(end_ids - set(params.stop_token_ids)))
    return VllmSamplingParams(
        n=params.n, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=params.seed,
        max_tokens=params.max_new_tokens, stop=list(params.stop), stop_token_ids=stop_ids, logprobs=params.logprobs,
        ignore_eos=params.ignore_eos, include_stop_str_in_output=params.include_stop_str_in_output,
        output_kind=RequestOutputKind.DELTA)


def finish_reason(vllm_reason: str | None, stop_reason, params: SamplingParams) -> str | None:
    """vLLM says "stop" for EOS (stop_reason None), a stop string (the string) and a stop
    token (its id): one of the request's stop_token_ids is a stop, a model end id is EOS."""
    if vllm_reason is None:
        return None
    if vllm_reason == "length":
        return FINISH_LENGTH
    if vllm_reason == "stop":
        if isinstance(stop_reason, str) or (isinstance(stop_reason, int) and stop_reason in params.stop_token_ids):
            return FINISH_STOP
        return FINISH_EOS
    return FINISH_ABORT


class VllmEngine:
    def __init__(self, lm: LoadedModel, max_num_seqs: int = 64, max_waiting: int = 1024, metrics=None,
                 seed: int | None = None, gpu_memory_utilization: float = 0.2):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.lm, self.tokenizer = lm, lm.tokenizer
        self.vocab_size = lm.model.get_output_embeddings().weight.shape[0]
        self.eos_ids = end_token_ids(lm.tokenizer, lm.model.generation_config)
        self.max_waiting = max_waiting
        self.metrics = metrics
        self._tasks: dict[Request, asyncio.Future] = {}
        self._draining = self._stopped = False
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]  # vLLM request ids must be unique within the engine
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="rlhfkit-vllm", daemon=True)
        self._thread.start()
        args = AsyncEngineArgs(
            model=str(lm.path), dtype=str(lm.dtype).removeprefix("torch."), max_model_len=lm.context_length,
            max_num_seqs=max_num_seqs, seed=seed or 0, gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=lm.device.type == "cpu", disable_log_stats=True)

        async def start():
            return AsyncLLM.from_engine_args(args)

        self.llm = asyncio.run_coroutine_threadsafe(start(), self.loop).result()

    # ---- the native engine's interface --------------------------------------------------

    def validate_prompt(self, prompt_ids: list[int], params: SamplingParams):
        check_prompt(self.lm, self.vocab_size, prompt_ids, params)

    def add_request(self, prompt_ids, params: SamplingParams, on_output, request_id: str = "") -> Request:
        self.validate_prompt(prompt_ids, params)
        req = Request(request_id or f"req-{next(self._ids)}", list(prompt_ids), params, on_output)
        req.sequences = [Sequence(req, i, None) for i in range(params.n)]
        with self._lock:
            if self._draining or self._stopped:
                raise EngineStoppedError(f"{self.lm.model_version} is no longer accepting requests")
            if len(self._tasks) >= self.max_waiting:
                raise QueueFullError(f"{len(self._tasks)} requests are in the engine "
                                     f"(--max-waiting {self.max_waiting}); retry later")
            self._tasks[req] = asyncio.run_coroutine_threadsafe(self._run(req), self.loop)
        return req

    def abort(self, req: Request):
        """Cancelling the task makes vLLM abort the request and free its KV blocks."""
        req.cancelled = True
        with self._lock:
            task = self._tasks.get(req)
        if task is not None:
            task.cancel()

    def drain(self):
        with self._lock:
            self._draining = True
            idle = not self._tasks
        if idle:
            self.shutdown()

    def shutdown(self):
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        self.llm.shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)

    @property
    def num_running(self) -> int:
        return len(self._tasks)

    @property
    def num_waiting(self) -> int:
        return 0  # vLLM's own scheduler queues; every accepted request counts as running here

    # ---- on the vLLM loop -----------------------------------------------------------------

    async def _run(self, req: Request):
        k = req.params.logprobs
        last_time: dict[int, float] = {}
        try:
            if self.metrics:
                self.metrics.prompt_tokens.inc(len(req.prompt_ids))
            async for out in self.llm.generate({"prompt_token_ids": req.prompt_ids},
                                               to_vllm_params(req.params, self.eos_ids),
                                               request_id=f"{self._prefix}-{req.request_id}-{next(self._ids)}"):
                now = time.monotonic()
                outs = []
                for o in out.outputs:
                    seq = req.sequences[o.index]
                    tokens = list(o.token_ids)
                    lps = o.logprobs or [{}] * len(tokens)
                    chosen = [d[t].logprob if t in d else float("nan") for t, d in zip(tokens, lps)]
                    top = [[(t, lp.logprob) for t, lp in sorted(d.items(), key=lambda kv: kv[1].rank or 0)
                            if lp.rank and lp.rank <= k][:k] for d in lps] if k else []
                    seq.token_ids += tokens
                    seq.finish_reason = finish_reason(o.finish_reason, o.stop_reason, req.params)
                    seq.stop_reason = o.stop_reason if isinstance(o.stop_reason, str) else ""
                    if seq.finish_reason == FINISH_STOP and isinstance(o.stop_reason, int):
                        seq.stop_token_id = o.stop_reason
                    outs.append(SequenceOutput(o.index, tokens, chosen, o.text, top, seq.finish_reason, seq.stop_reason,
                                               seq.stop_token_id))
                    self._observe(req, o.index, now, len(tokens), last_time)
                if outs:
                    req.on_output(outs)
            if self.metrics:
                self.metrics.e2e_request_latency.observe(time.monotonic() - req.arrival_time)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # an engine failure ends the request visibly, not silently
            log.exception("vLLM request %s failed", req.request_id)
            req.on_output([SequenceOutput(s.index, [], [], "", [], FINISH_ABORT, f"engine error: {e}")
                           for s in req.sequences if not s.finish_reason])
        finally:
            with self._lock:
                self._tasks.pop(req, None)
                finished_draining = self._draining and not self._tasks
            if finished_draining:
                threading.Thread(target=self.shutdown, daemon=True).start()

    def _observe(self, req: Request, index: int, now: float, n_tokens: int, last_time: dict[int, float]):
        if not self.metrics or not n_tokens:
            return
        if req.first_token_time is None:
            req.first_token_time = now
            self.metrics.time_to_first_token.observe(now - req.arrival_time)
        elif index in last_time:
            self.metrics.inter_token_latency.observe((now - last_time[index]) / n_tokens)
        last_time[index] = now
        self.metrics.generation_tokens.inc(n_tokens)
