"""The native generation engine: one thread runs a step loop over a batch of sequences.

Each step, cancelled and finished sequences leave the batch, waiting requests join it
(their prompts are prefilled together, then their K/V move into free rows of the slot
cache), and every running sequence decodes one token with its own sampling parameters
(rlhfkit.kernels.sample_tokens). Attention masks and per-row position ids keep each row's
numbers what they would be alone, so mixed prompt lengths do not change greedy results.
The KV cache (server/kv_cache.py) never copies the whole batch when membership changes.
With prefix caching (server/prefix_cache.py) a prompt that starts with cached blocks is
prefilled from the end of its cached prefix only.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from rlhfkit.chat import end_token_ids
from rlhfkit.hf import cache_kwargs, output_cache
from rlhfkit.errors import InvalidArgumentError
from rlhfkit.kernels import SamplingParams, logprobs_from_logits, sample_tokens, sampling_tensors
from rlhfkit.server import cpu_attention
from rlhfkit.server.detokenizer import IncrementalDetokenizer
from rlhfkit.server.errors import EngineStoppedError, QueueFullError
from rlhfkit.server.kv_cache import SlotKVCache, swap_remove
from rlhfkit.server.models import LoadedModel
from rlhfkit.server.prefix_cache import PrefixCache, Row

log = logging.getLogger(__name__)

FINISH_LENGTH, FINISH_STOP, FINISH_EOS, FINISH_ABORT = "length", "stop", "eos", "abort"


@dataclass
class SequenceOutput:
    """What one step added to one completion."""

    index: int
    token_ids: list[int]
    logprobs: list[float]
    text: str
    top_logprobs: list[list[tuple[int, float]]]
    finish_reason: str | None = None
    stop_reason: str = ""
    stop_token_id: int | None = None  # the SamplingParams.stop_token_ids entry that ended it


@dataclass(eq=False)
class Sequence:
    request: "Request"
    index: int
    generator: torch.Generator | None
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    detokenizer: IncrementalDetokenizer | None = None
    emitted_chars: int = 0
    finish_reason: str | None = None
    stop_reason: str = ""
    stop_token_id: int | None = None
    last_token_time: float = 0.0


@dataclass(eq=False)  # identity semantics: requests are dict keys
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    # Called from the engine thread with a list of SequenceOutput; must not block.
    on_output: Callable[[list[SequenceOutput]], None]
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    cancelled: bool = False
    sequences: list[Sequence] = field(default_factory=list)
    cached: list = field(default_factory=list)  # prefix-cache blocks its prompt starts with (set at admission)

    @property
    def finished(self) -> bool:
        return bool(self.sequences) and all(s.finish_reason for s in self.sequences)


@dataclass(eq=False)
class PartialPrefill:
    request: Request
    cache: DynamicCache
    done: int = 0  # prompt tokens prefilled so far
    decode_turn: bool = False  # the running batch decodes before the next chunk


def check_prompt_length(lm: LoadedModel, n_tokens: int):
    """A prompt must leave room for one new token. Checked on token ids as they arrive, before
    anything copies or scans them."""
    if n_tokens >= lm.context_length:
        raise InvalidArgumentError(
            "prompt", f"is {n_tokens} tokens, and the model's whole context is {lm.context_length} tokens "
            f"(at least one must be left to generate); shorten the prompt")


def check_prompt(lm: LoadedModel, vocab_size: int, prompt_ids: list[int], params: SamplingParams):
    """Request checks that need the model (every engine runs them); raise InvalidArgumentError
    naming the field."""
    if not prompt_ids:
        raise InvalidArgumentError("prompt", "is empty: give prompt text or prompt_token_ids")
    check_prompt_length(lm, len(prompt_ids))
    bad = [t for t in prompt_ids if t >= vocab_size]
    if bad:
        raise InvalidArgumentError("prompt_token_ids", f"token id {bad[0]} is out of range [0, {vocab_size})")
    bad = [t for t in params.stop_token_ids if t >= vocab_size]
    if bad:
        raise InvalidArgumentError("stop_token_ids", f"token id {bad[0]} is out of range [0, {vocab_size})")
    if len(prompt_ids) + params.max_new_tokens > lm.context_length:
        raise InvalidArgumentError(
            "max_new_tokens",
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds "
            f"the model's context of {lm.context_length} tokens; shorten the prompt or lower "
            f"max_new_tokens to at most {max(lm.context_length - len(prompt_ids), 0)}")


class Engine:
    """Continuous-batching generation over one causal LM.

    add_request() and abort() are thread-safe; everything else runs on the engine thread.
    """

    def __init__(self, lm: LoadedModel, max_num_seqs: int = 64, max_waiting: int = 1024,
                 metrics=None, seed: int | None = None, max_prefill_tokens: int = 512,
                 prefix_cache_tokens: int = 0, prefix_block_size: int = 16):
        self.lm = lm
        self.model = lm.model
        self.tokenizer = lm.tokenizer
        self.device = lm.device
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting
        self.max_prefill_tokens = max_prefill_tokens
        self.metrics = metrics
        # The model's end ids (EOS, generation_config's list, the chat template's end of turn):
        # the rule PPO rollouts and the vLLM engine stop on too.
        self.eos_ids = end_token_ids(lm.tokenizer, lm.model.generation_config)
        self.vocab_size = lm.model.get_output_embeddings().weight.shape[0]
        self.default_generator = torch.Generator(device=self.device)
        self.default_generator.manual_seed(seed if seed is not None else torch.seed())
        # Sliding-window layers keep only their window of K/V semantics per row; the prefix
        # cache is verified for full attention only, so such models run without it.
        self.prefix_cache = (PrefixCache(prefix_cache_tokens, prefix_block_size)
                             if prefix_cache_tokens >= prefix_block_size and not lm.attention.sliding else None)
        # Decode attention on the CPU: the C++ kernel (server/cpu_attention.py) for models on
        # sdpa with full attention; transformers' sdpa still runs every other forward.
        if (self.device.type == "cpu" and lm.attention.attn_implementation == "sdpa" and not lm.attention.sliding
                and cpu_attention.available()):
            self.model.set_attn_implementation(cpu_attention.register())
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Sequence] = []  # row b of the cache is self._running[b]
        self._cache: SlotKVCache | None = None
        self._sampling = None  # per-row (temperature, top_k, top_p), rebuilt when rows change
        self._partial: PartialPrefill | None = None  # a long prompt being prefilled chunk by chunk
        self._cv = threading.Condition()
        self._stopping = False
        self._draining = False
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="rlhfkit-engine", daemon=True)
        self._thread.start()

    # ---- API (any thread) -------------------------------------------------------------

    def validate_prompt(self, prompt_ids: list[int], params: SamplingParams):
        check_prompt(self.lm, self.vocab_size, prompt_ids, params)

    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    on_output: Callable[[list[SequenceOutput]], None], request_id: str = "") -> Request:
        self.validate_prompt(prompt_ids, params)
        req = Request(request_id or f"req-{next(self._ids)}", list(prompt_ids), params, on_output)
        req.sequences = [Sequence(req, i, params.generator(i, self.device), detokenizer=IncrementalDetokenizer(self.tokenizer))
                         for i in range(params.n)]
        with self._cv:
            if self._stopping or self._draining:
                raise EngineStoppedError(f"{self.lm.model_version} is no longer accepting requests")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(f"{len(self._waiting)} requests are already waiting "
                                     f"(--max-waiting {self.max_waiting}); retry later")
            self._waiting.append(req)
            self._cv.notify()
        return req

    def abort(self, req: Request):
        """Stop decoding this request; its slots are freed at the next step."""
        with self._cv:
            req.cancelled = True
            self._cv.notify()

    def drain(self):
        """Take no new requests; finish the ones admitted or waiting, then stop the thread
        (hot reload retires an old model this way)."""
        with self._cv:
            self._draining = True
            self._cv.notify()

    def shutdown(self):
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout=30)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        """Sequences decoding, or being prefilled in chunks."""
        return len(self._running) + len(self._partial_sequences())

    def _partial_sequences(self) -> list[Sequence]:
        partial = self._partial  # read once: other threads ask for num_running
        return partial.request.sequences if partial else []

    # ---- engine thread ----------------------------------------------------------------

    def _loop(self):
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not len(self._running) and not self._partial:
                    if self._draining:
                        return  # drained: nothing admitted, nothing waiting
                    self._cv.wait()
                if self._stopping:
                    break
                # Admit in arrival order while the batch has rows and the step's prefill
                # budget lasts. A smaller prefill reaches its first token sooner; the requests
                # behind it wait one step more. A prompt longer than the budget is admitted
                # alone and prefilled in chunks of the budget, alternating with decode steps;
                # it holds the head of the line until its last chunk.
                free = self.max_num_seqs - len(self._running)
                budget = self.max_prefill_tokens
                admitted = []
                while self._waiting and not self._partial:
                    req = self._waiting[0]
                    if req.cancelled:
                        self._waiting.popleft()
                        continue
                    if self.prefix_cache is not None:  # again each time: slots may have been reused since
                        req.cached = self.prefix_cache.lookup(req.prompt_ids)
                    cost = self._uncached(req)  # prefilled once for all its completions
                    if admitted and cost > budget or len(req.sequences) > free and (admitted or self._running):
                        break
                    admitted.append(self._waiting.popleft())
                    free -= len(req.sequences)
                    budget -= cost
            try:
                with torch.inference_mode():
                    self._step(admitted)
            except Exception:  # a bug must not kill the loop silently: fail the batch loudly
                log.exception("engine step failed; aborting the running requests")
                for seq in self._running + [s for r in admitted for s in r.sequences] + self._partial_sequences():
                    if not seq.finish_reason:
                        seq.finish_reason = FINISH_ABORT
                        seq.request.on_output([SequenceOutput(seq.index, [], [], "", [], FINISH_ABORT, "engine error")])
                self._running, self._cache, self._sampling, self._partial = [], None, None, None
            self._update_gauges()
        for seq in self._running + self._partial_sequences():
            seq.request.on_output([SequenceOutput(seq.index, [], [], "", [], FINISH_ABORT, "shutdown")])

    def _update_gauges(self):
        if self.metrics:
            self.metrics.num_requests_running.set(len({id(s.request) for s in self._running}) + bool(self._partial))
            self.metrics.num_requests_waiting.set(len(self._waiting))

    def _step(self, admitted: list[Request]):
        # Cancelled requests leave before any compute is spent on them.
        self._remove([i for i, s in enumerate(self._running) if s.request.cancelled])
        if admitted:
            if self.metrics:
                now = time.monotonic()
                for req in admitted:
                    self.metrics.request_queue_time.observe(now - req.arrival_time)
                    self.metrics.prompt_tokens.inc(len(req.prompt_ids))
                    if self.prefix_cache is not None:  # vLLM's meaning: prompt tokens looked up, and found
                        self.metrics.prefix_cache_queries.inc(len(req.prompt_ids))
                        self.metrics.prefix_cache_hits.inc(len(req.cached) * self.prefix_cache.block_size)
            if self._uncached(admitted[0]) > self.max_prefill_tokens:
                self._partial = PartialPrefill(admitted[0], *self._cached_prefix(admitted[0]))
                self._prefill_chunk()
            else:
                # Prompts with a cached prefix are prefilled one by one from its end; the
                # others together, as one left-padded batch. Every cached prefix is read
                # before the first prefill inserts blocks (which may reuse their slots).
                hits = [PartialPrefill(r, *self._cached_prefix(r)) for r in admitted if r.cached]
                for partial in hits:
                    self._partial = partial
                    self._prefill_chunk()
                misses = [r for r in admitted if not r.cached]
                if misses:
                    self._prefill(misses)
        elif self._partial and not (self._running and self._partial.decode_turn):
            self._prefill_chunk()
        elif self._running:
            self._decode()
            if self._partial:
                self._partial.decode_turn = False
        finished = [i for i, s in enumerate(self._running) if s.finish_reason]
        self._remember(finished)
        self._remove(finished)

    def _uncached(self, req: Request) -> int:
        return len(req.prompt_ids) - len(req.cached) * (self.prefix_cache.block_size if self.prefix_cache else 0)

    def _cached_prefix(self, req: Request) -> tuple[DynamicCache, int]:
        """A prefill cache holding the request's cached prefix, and its length."""
        cache = DynamicCache()
        for layer in range(self.num_layers if req.cached else 0):
            cache.update(*self.prefix_cache.stacked(req.cached, layer), layer)
        return cache, len(req.prompt_ids) - self._uncached(req)

    @property
    def num_layers(self) -> int:
        return self.model.config.get_text_config().num_hidden_layers

    def _remember(self, rows: list[int]):
        """Put the finished rows' prompts and replies in the prefix cache (K/V of positions
        0..lens[b]-1: the last sampled token has none yet)."""
        if self.prefix_cache is None:
            return
        c = self._cache
        done = [(b, self._running[b]) for b in rows if not self._running[b].request.cancelled]
        self.prefix_cache.insert([Row(s.request.prompt_ids + s.token_ids, c.lens[b], b) for b, s in done],
                                 self.num_layers, lambda layer: (c.k[layer], c.v[layer]))

    def _cache_prompts(self, rows: list[Row], prefill: DynamicCache):
        """Put just-prefilled prompts (rows of a prefill cache) in the prefix cache."""
        if self.prefix_cache is not None:
            self.prefix_cache.insert(rows, self.num_layers,
                                     lambda layer: (prefill.layers[layer].keys, prefill.layers[layer].values))

    def _remove(self, rows: list[int]):
        if rows:
            self._cache.remove_rows(rows)
            swap_remove(self._running, rows)
            self._sampling = None

    def _prefill(self, requests: list[Request]):
        """Run the new prompts (left-padded together, each once however many completions it
        asks for), sample every sequence's first token, and give each sequence a row of the
        cache holding a copy of its prompt's K/V."""
        lens = [len(r.prompt_ids) for r in requests]
        L = max(lens)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(requests), L), pad, dtype=torch.long)
        mask = torch.zeros((len(requests), L), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, L - lens[i]:] = torch.tensor(r.prompt_ids)
            mask[i, L - lens[i]:] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, **cache_kwargs(self.model, DynamicCache()),
                         use_cache=True, logits_to_keep=1)
        prefill = output_cache(out)
        self._cache_prompts([Row(r.prompt_ids, n, row, L - n) for row, (r, n) in enumerate(zip(requests, lens))], prefill)
        self._join(requests, out.logits[:, -1], prefill, lens)

    def _prefill_chunk(self):
        """The next max_prefill_tokens of the long prompt being prefilled; after the last
        chunk its sequences join the batch."""
        p = self._partial
        req = p.request
        if req.cancelled:
            self._partial = None
            return
        end = min(p.done + self.max_prefill_tokens, len(req.prompt_ids))
        ids = torch.tensor([req.prompt_ids[p.done:end]], device=self.device)
        positions = torch.arange(p.done, end, device=self.device)
        out = self.model(input_ids=ids, position_ids=positions.unsqueeze(0), cache_position=positions,
                         **cache_kwargs(self.model, p.cache), use_cache=True, logits_to_keep=1)
        p.done, p.decode_turn = end, True
        if end == len(req.prompt_ids):
            self._partial = None
            self._cache_prompts([Row(req.prompt_ids, end)], p.cache)
            self._join([req], out.logits[:, -1], p.cache, [end])

    def _join(self, requests: list[Request], last_logits: torch.Tensor, prefill: DynamicCache, lens: list[int]):
        """Sample the first token of every sequence of these prefilled requests (row i of
        last_logits and of the left-padded prefill cache is request i) and add them to the batch."""
        seqs = [s for r in requests for s in r.sequences]
        source = [i for i, r in enumerate(requests) for _ in r.sequences]  # prefill row of each sequence
        if len(seqs) > len(requests):
            last_logits = last_logits[torch.tensor(source, device=last_logits.device)]
        self._append_tokens(seqs, sampling_tensors([s.request.params for s in seqs], self.device), last_logits)
        if self._cache is None:
            self._cache = SlotKVCache(len(prefill.layers), self.lm.context_length, layout=self.lm.attention)
        self._cache.add_rows(prefill, [lens[i] for i in source], source)
        self._running += seqs
        self._sampling = None

    def _decode(self):
        last = torch.tensor([s.token_ids[-1] for s in self._running], device=self.device).unsqueeze(-1)
        mask, positions, cache_position = self._cache.begin_decode()
        out = self.model(input_ids=last, attention_mask=mask, position_ids=positions, cache_position=cache_position,
                         **cache_kwargs(self.model, self._cache), use_cache=True, logits_to_keep=1)
        self._cache.end_decode()
        if self._sampling is None:
            self._sampling = sampling_tensors([s.request.params for s in self._running], self.device)
        self._append_tokens(self._running, self._sampling, out.logits[:, -1])

    def _append_tokens(self, seqs: list[Sequence], sampling, logits: torch.Tensor):
        """Sample one token per row, record it, detokenize, check stop conditions, emit."""
        logits = logits.float()
        temperature, top_k, top_p = sampling
        tokens = sample_tokens(logits, temperature, top_k, top_p, [s.generator for s in seqs], self.default_generator)
        # The same kernel training and Reward.LogProbs use, so rollout numbers match theirs.
        chosen = logprobs_from_logits(logits, tokens).tolist()
        want_top = max(s.request.params.logprobs for s in seqs)
        if want_top:
            top_v, top_i = logits.topk(want_top, dim=-1)
            top_v = (top_v - logits.logsumexp(dim=-1, keepdim=True)).tolist()
            top_i = top_i.tolist()
        tokens = tokens.tolist()
        now = time.monotonic()
        outputs: dict[Request, list[SequenceOutput]] = {}
        for row, seq in enumerate(seqs):
            req, params = seq.request, seq.request.params
            tok = tokens[row]
            seq.token_ids.append(tok)
            seq.logprobs.append(chosen[row])
            top = [list(zip(top_i[row][:params.logprobs], top_v[row][:params.logprobs]))] if params.logprobs else []
            if self.metrics:
                if req.first_token_time is None:
                    self.metrics.time_to_first_token.observe(now - req.arrival_time)
                elif seq.last_token_time:
                    self.metrics.inter_token_latency.observe(now - seq.last_token_time)
                self.metrics.generation_tokens.inc()
            if req.first_token_time is None:
                req.first_token_time = now
            seq.last_token_time = now
            if tok in self.eos_ids and not params.ignore_eos:
                seq.finish_reason = FINISH_EOS
            elif tok in params.stop_token_ids:
                seq.finish_reason, seq.stop_token_id = FINISH_STOP, tok
            elif len(seq.token_ids) >= params.max_new_tokens:
                seq.finish_reason = FINISH_LENGTH
            new_text = self._new_text(seq)
            outputs.setdefault(req, []).append(SequenceOutput(seq.index, [tok], [chosen[row]], new_text, top,
                                                              seq.finish_reason, seq.stop_reason, seq.stop_token_id))
        # One delivery per request per step.
        for req, outs in outputs.items():
            req.on_output(outs)
            if req.finished and self.metrics:
                self.metrics.e2e_request_latency.observe(now - req.arrival_time)

    def _new_text(self, seq: Sequence) -> str:
        """Text to emit now: decoded so far (incrementally: constant work per token), minus a
        tail that could still become a stop string or is an incomplete character; everything
        left once the sequence ends."""
        params = seq.request.params
        stops = params.stop
        # The stop token's text is not part of the reply (vLLM's rule).
        excluded = seq.stop_token_id is not None and not params.include_stop_str_in_output
        seq.detokenizer.add(None if excluded else seq.token_ids[-1], final=seq.finish_reason is not None)
        text = seq.detokenizer.text
        if stops and seq.stop_token_id is None:
            # Search only where a stop string could newly appear.
            start = max(0, seq.emitted_chars - max(map(len, stops)))
            hits = [(text.find(s, start), s) for s in stops]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                i, s = min(hits)
                seq.finish_reason, seq.stop_reason = FINISH_STOP, s
                text = text[:i + len(s)] if params.include_stop_str_in_output else text[:i]
        if seq.finish_reason:
            end = len(text)
        else:
            end = len(text) - (max(map(len, stops)) - 1 if stops else 0)
        new = text[seq.emitted_chars:end] if end > seq.emitted_chars else ""
        seq.emitted_chars = max(seq.emitted_chars, end)
        return new
