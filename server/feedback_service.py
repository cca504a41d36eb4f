"""The Feedback servicer: A/B comparisons, votes, leaderboard.

Responses come from the served engines through GenerationService's own submit/collect
path, so a comparison is decoded (and validated, queued, cancelled) exactly like a
Generate call. The methods raise the request errors of server/errors.py: the interceptor
(server/auth.py) turns them into gRPC statuses; the HTTP side (server/http.py) calls the same
methods (context None) and turns them into HTTP errors. Both set auth.caller first: votes are
recorded under the caller's token name when the server has tokens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets

from google.protobuf.json_format import MessageToJson

from rlhfkit.chat import as_messages
from rlhfkit.errors import InvalidArgumentError
from rlhfkit.server import limits as lim
from rlhfkit.server.agreement import annotator_report
from rlhfkit.server.auth import NO_CALLER, caller
from rlhfkit.server.errors import LimitExceededError, PermissionDeniedError
from rlhfkit.server.feedback import FeedbackStore
from rlhfkit.server.ratings import rate
from rlhfkit.server.service import GenerationService, ServerState
from rlhfkit.v1 import feedback_pb2 as fb_pb
from rlhfkit.v1 import feedback_pb2_grpc as fb_grpc
from rlhfkit.v1 import generation_pb2 as gen_pb

CHOICE_NAMES = {fb_pb.CHOICE_LEFT: "left", fb_pb.CHOICE_RIGHT: "right", fb_pb.CHOICE_TIE: "tie",
                fb_pb.CHOICE_BOTH_BAD: "both_bad"}
CHOICE_OF = {v: k for k, v in CHOICE_NAMES.items()}


class FeedbackService(fb_grpc.FeedbackServicer):
    def __init__(self, state: ServerState, store: FeedbackStore, max_votes_per_day: int = 0):
        self.state = state
        self.store = store
        self.max_votes_per_day = max_votes_per_day  # per annotator per UTC day; 0: no cap
        self.generation = GenerationService(state)
        # Bootstrapped ratings take seconds of CPU: one at a time, and never in the pool the
        # store's writes (votes) go through.
        self.ratings_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rlhfkit-ratings")

    async def _db(self, fn, *args):
        """Store calls block (disk, network): off the event loop, in the default pool."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _submit(self, model: str, request: fb_pb.CreateComparisonRequest, n: int):
        """Validate and enqueue n completions of one model for the comparison's prompt (text or
        messages, rendered with that model's chat template exactly as Generate renders them)."""
        s = gen_pb.SamplingParams()
        s.CopyFrom(request.sampling)
        s.n = n
        return await self.generation.submit(gen_pb.GenerateRequest(model=model, prompt=request.prompt,
                                                                   messages=request.messages, sampling=s))

    async def _collect(self, submitted, n: int):
        """The n completions of a submitted request: [(name, name@version, text)]."""
        engine, req, queue = submitted
        texts = [""] * n
        async for outs in self.generation.outputs(engine, req, queue):
            for o in outs:
                texts[o.index] += o.text
        return [(engine.lm.name, engine.lm.model_version, t) for t in texts]

    async def CreateComparison(self, request: fb_pb.CreateComparisonRequest, context=None) -> fb_pb.Comparison:
        if request.prompt and request.messages:
            raise InvalidArgumentError("messages", "set exactly one of prompt (text) and messages (a conversation)")
        if not request.prompt and not request.messages:
            raise InvalidArgumentError("prompt", "is empty: set prompt (text) or messages (a conversation)")
        lim.check_prompt("", request.prompt, request.messages, self.state.limits)
        for field, name in (("models.model_a", request.models.model_a), ("models.model_b", request.models.model_b),
                            ("samples_of", request.samples_of)):
            lim.check_id(field, name, self.state.limits)
        messages = as_messages(request.messages) if request.messages else None  # INVALID_ARGUMENT naming the turn
        if request.sampling.n > 1:
            raise InvalidArgumentError("sampling.n", f"a comparison has one response per side: leave n unset or 1, "
                                       f"got {request.sampling.n}")
        source = request.WhichOneof("source")
        if source is None:
            raise InvalidArgumentError("source", "set models {model_a, model_b} (two models) or samples_of "
                                       "(two samples of one model)")
        self.state.check_ready()
        if source == "models":
            for model in (request.models.model_a, request.models.model_b):  # both known before decoding either
                self.state.registry.get(model, "policy")
            # Both validated and queued before either is awaited: a prompt one model refuses (no
            # chat template, too long for its context) must not leave the other decoding for nothing.
            first = await self._submit(request.models.model_a, request, 1)
            try:
                second = await self._submit(request.models.model_b, request, 1)
            except BaseException:  # a refusal, or the call cancelled while the second was tokenized
                first[0].abort(first[1])
                raise
            pair = await asyncio.gather(self._collect(first, 1), self._collect(second, 1))
            responses = [pair[0][0], pair[1][0]]
        else:
            if request.sampling.temperature <= 0:
                raise InvalidArgumentError("sampling.temperature", "two samples of one model need temperature > 0 "
                                           "(greedy decoding gives the same text twice)")
            responses = await self._collect(await self._submit(request.samples_of, request, 2), 2)
        if secrets.randbelow(2):  # sides at random: position must not tell the annotator who answered
            responses.reverse()
        left, right = responses
        comparison_id = await self._db(self.store.add_comparison, request.prompt, source, left, right,
                                       MessageToJson(request.sampling, indent=None), messages)
        self.state.metrics.feedback_comparisons.labels(source).inc()
        return fb_pb.Comparison(comparison_id=comparison_id, prompt=request.prompt, left=left[2], right=right[2],
                                messages=request.messages)

    async def SubmitVote(self, request: fb_pb.SubmitVoteRequest, context=None) -> fb_pb.SubmitVoteResponse:
        """The vote is recorded under the caller's token name (auth.caller; any annotator_id on
        a server without tokens); naming anyone else in annotator_id is refused."""
        identity = caller.get()
        if identity is NO_CALLER:
            raise PermissionDeniedError("votes need an identified caller")
        limits = self.state.limits
        lim.check_id("comparison_id", request.comparison_id, limits)
        lim.check_id("annotator_id", request.annotator_id, limits)
        annotator = request.annotator_id
        if identity is not None:
            if annotator and annotator != identity.name:
                raise PermissionDeniedError(f"annotator_id: this token votes as {identity.name!r} only; "
                                            "leave annotator_id empty or set it to that name")
            annotator = identity.name
        if request.HasField("rationale"):
            lim.check_chars("rationale", request.rationale, limits.max_prompt_chars, "max_prompt_chars")
        if request.choice not in CHOICE_NAMES:
            raise InvalidArgumentError("choice", "must be CHOICE_LEFT, CHOICE_RIGHT, CHOICE_TIE or CHOICE_BOTH_BAD, "
                                       f"got {fb_pb.Choice.Name(request.choice) if request.choice in fb_pb.Choice.values() else request.choice}")
        vote = await self._db(self.store.add_vote, request.comparison_id, CHOICE_NAMES[request.choice],
                              annotator, request.rationale if request.HasField("rationale") else None,
                              self.max_votes_per_day)
        if not vote.already_recorded:
            self.state.metrics.feedback_votes.labels(vote.choice).inc()
        c = vote.comparison
        return fb_pb.SubmitVoteResponse(
            vote_id=vote.vote_id, comparison_id=vote.comparison_id, choice=request.choice,
            left_model=c["left_model"], right_model=c["right_model"], left_model_version=c["left_model_version"],
            right_model_version=c["right_model_version"], already_recorded=vote.already_recorded)

    async def GetLeaderboard(self, request: fb_pb.GetLeaderboardRequest, context=None) -> fb_pb.Leaderboard:
        rounds = request.bootstrap_rounds or 100
        limit = self.state.limits.max_bootstrap_rounds
        if rounds > limit:
            raise LimitExceededError("bootstrap_rounds", f"is {rounds}, over --max-bootstrap-rounds {limit}")
        battles = await self._db(self.store.battles)
        r = await asyncio.get_running_loop().run_in_executor(
            self.ratings_pool, rate, battles, rounds, request.seed if request.HasField("seed") else 0)
        return fb_pb.Leaderboard(
            ratings=[fb_pb.ModelRating(model=x.model, elo=x.elo, bradley_terry=x.bradley_terry,
                                       bradley_terry_lower=x.lower, bradley_terry_upper=x.upper, battles=x.battles,
                                       wins=x.wins, losses=x.losses, ties=x.ties, both_bad=x.both_bad)
                     for x in r.ratings],
            models=r.models, num_votes=len(battles), num_battles=r.num_battles,
            win_rates=[fb_pb.WinRateRow(model=m, win_rates=r.win_rates[i].tolist(), battles=r.battles[i].tolist())
                       for i, m in enumerate(r.models)])

    async def GetAnnotators(self, request: fb_pb.GetAnnotatorsRequest, context=None) -> fb_pb.AnnotatorReport:
        days = request.days or 14
        if days > 366:
            raise InvalidArgumentError("days", f"must be at most 366, got {days}")
        rows = await self._db(self.store.voted_comparisons)
        return await asyncio.get_running_loop().run_in_executor(
            self.ratings_pool, annotator_report, rows, self.max_votes_per_day, days)
