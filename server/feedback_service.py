"""The Feedback servicer: A/B comparisons, votes, leaderboard, annotators.

A comparison's two responses come from two models the caller names (admins), two samples
of one model, or (no source given: the labeling page's default) a pair the server draws
from its arena models with ratings.matchup_weights, decoded with the operator's
--arena-sampling, so the annotator learns nothing about who answered until the vote.
When a reward model is served, both responses are scored as the comparison is made, so
annotators can be compared with it later (GetAnnotators).

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
import logging
import secrets

import numpy as np

from google.protobuf.json_format import MessageToJson

from rlhfkit.chat import as_messages, has_chat_template
from rlhfkit.errors import InvalidArgumentError
from rlhfkit.server import limits as lim
from rlhfkit.server.agreement import MAX_DAYS, annotator_report
from rlhfkit.server.auth import NO_CALLER, caller, is_admin
from rlhfkit.server.errors import (REQUEST_ERRORS, EngineStoppedError, LimitExceededError, ModelNotFoundError,
                                   NotEnoughModelsError, PermissionDeniedError)
from rlhfkit.server.feedback import FeedbackStore
from rlhfkit.server.ratings import PRIOR_SD, PRIOR_SD_RANGE, draw_matchup, matchup_weights, rate
from rlhfkit.server.service import GenerationService, RewardService, ServerState
from rlhfkit.v1 import feedback_pb2 as fb_pb
from rlhfkit.v1 import feedback_pb2_grpc as fb_grpc
from rlhfkit.v1 import generation_pb2 as gen_pb

CHOICE_NAMES = {fb_pb.CHOICE_LEFT: "left", fb_pb.CHOICE_RIGHT: "right", fb_pb.CHOICE_TIE: "tie",
                fb_pb.CHOICE_BOTH_BAD: "both_bad"}
CHOICE_OF = {v: k for k, v in CHOICE_NAMES.items()}
DEFAULT_ARENA_SAMPLING = gen_pb.SamplingParams(temperature=0.7, max_new_tokens=256)
log = logging.getLogger(__name__)


class FeedbackService(fb_grpc.FeedbackServicer):
    def __init__(self, state: ServerState, store: FeedbackStore, max_votes_per_day: int = 0,
                 arena_models: list[str] = (), arena_sampling: gen_pb.SamplingParams = DEFAULT_ARENA_SAMPLING):
        self.state = state
        self.store = store
        self.max_votes_per_day = max_votes_per_day  # per annotator per UTC day; 0: no cap
        self.arena_models = list(arena_models)  # names or roles; empty: every served policy
        self.arena_sampling = arena_sampling
        self.rng = np.random.default_rng(secrets.randbits(64))  # matchups: nobody can predict the next pair
        self.generation = GenerationService(state)
        self.reward = RewardService(state)
        # Bootstrapped ratings take seconds of CPU: one at a time, and never in the pool the
        # store's writes (votes) go through.
        self.ratings_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rlhfkit-ratings")
        # A matchup's small fit (25 ms at 10,000 votes) must not wait behind a leaderboard.
        self.matchup_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rlhfkit-matchups")

    async def _db(self, fn, *args):
        """Store calls block (disk, network): off the event loop, in the default pool."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def _submit(self, model: str, request: fb_pb.CreateComparisonRequest, n: int,
                      sampling: gen_pb.SamplingParams):
        """Validate and enqueue n completions of one model for the comparison's prompt (text or
        messages, rendered with that model's chat template exactly as Generate renders them)."""
        s = gen_pb.SamplingParams()
        s.CopyFrom(sampling)
        s.n = n
        try:
            return await self.generation.submit(gen_pb.GenerateRequest(model=model, prompt=request.prompt,
                                                                       messages=request.messages, sampling=s))
        except InvalidArgumentError as e:
            if sampling is not self.arena_sampling or e.field == "prompt" or e.field.startswith("messages"):
                raise
            # The annotator did not send these parameters: the prompt is what does not fit them.
            raise InvalidArgumentError("prompt", f"does not fit this server's --arena-sampling: {e}") from None

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
        if source is not None and not is_admin(caller.get()):
            raise PermissionDeniedError(f"{source}: choosing what answers needs the admin role; leave models and "
                                        "samples_of unset for a server-chosen (blind) matchup")
        sampling = request.sampling
        if source is None and request.HasField("sampling"):
            raise InvalidArgumentError("sampling", "a server-chosen matchup decodes with the server's "
                                       "--arena-sampling: leave sampling unset (or choose the models, as an admin)")
        self.state.check_ready()
        if source == "models":
            responses = await self._two_models((request.models.model_a, request.models.model_b), request, sampling)
        elif source == "samples_of":
            if request.sampling.temperature <= 0:
                raise InvalidArgumentError("sampling.temperature", "two samples of one model need temperature > 0 "
                                           "(greedy decoding gives the same text twice)")
            responses = await self._collect(await self._submit(request.samples_of, request, 2, sampling), 2)
        else:
            pair, sampling = await self._draw_pair(bool(messages)), self.arena_sampling
            try:
                responses = await self._two_models(pair, request, sampling)
            except (ModelNotFoundError, EngineStoppedError):  # reloaded since the draw: these would name it
                raise EngineStoppedError("a model of this matchup was replaced while it was drawn; retry") from None
        if secrets.randbelow(2):  # sides at random: position must not tell the annotator who answered
            responses.reverse()
        left, right = responses
        rewards, reward_model = await self._rewards(request, left[2], right[2])
        source = source or "arena"  # stored and counted as models, samples_of or arena
        comparison_id = await self._db(self.store.add_comparison, request.prompt, source, left, right,
                                       MessageToJson(sampling, indent=None), messages, rewards, reward_model)
        self.state.metrics.feedback_comparisons.labels(source).inc()
        return fb_pb.Comparison(comparison_id=comparison_id, prompt=request.prompt, left=left[2], right=right[2],
                                messages=request.messages)

    async def _two_models(self, pair: tuple[str, str], request, sampling) -> list[tuple[str, str, str]]:
        """One response from each model of the pair."""
        for model in pair:  # both known before decoding either
            self.state.registry.get(model, "policy")
        # Both validated and queued before either is awaited: a prompt one model refuses (no
        # chat template, too long for its context) must not leave the other decoding for nothing.
        first = await self._submit(pair[0], request, 1, sampling)
        try:
            second = await self._submit(pair[1], request, 1, sampling)
        except BaseException:  # a refusal, or the call cancelled while the second was tokenized
            first[0].abort(first[1])
            raise
        texts = await asyncio.gather(self._collect(first, 1), self._collect(second, 1))
        return [texts[0][0], texts[1][0]]

    def _arena_candidates(self, chat: bool) -> list[str]:
        """Names of the policies server-chosen matchups draw from (--arena-models resolved,
        roles to the names they point at; else every served policy); for a conversation only
        those with a chat template (a refusal would name the drawn model)."""
        if self.arena_models:
            models = {}
            for name in self.arena_models:
                try:
                    m = self.state.registry.get(name, "policy")
                    models[m.name] = m
                except REQUEST_ERRORS as e:  # one arena model not (yet) served: the others still play
                    log.warning("--arena-models %s: %s", name, e)
        else:
            models = {m.name: m for m in self.state.registry.snapshot()[0].values() if m.kind == "policy"}
        return sorted(name for name, m in models.items() if not chat or has_chat_template(m.tokenizer))

    async def _draw_pair(self, chat: bool) -> tuple[str, str]:
        """Two arena models, drawn with probability proportional to the posterior variance of
        their rating difference (ratings.matchup_weights)."""
        candidates = self._arena_candidates(chat)
        if len(candidates) < 2:
            which = "policies with a chat template (for messages)" if chat else "policies"
            raise NotEnoughModelsError(f"a server-chosen matchup needs two served {which}, and this server has "
                                       f"{', '.join(candidates) or 'none'}: serve another (--store with two policy "
                                       "checkpoints, or --arena-models) or choose the models (admin)")
        votes = await self._db(self.store.battles)
        weights = await asyncio.get_running_loop().run_in_executor(self.matchup_pool, matchup_weights, votes, candidates)
        return draw_matchup(weights, self.rng)

    async def _rewards(self, request, left: str, right: str) -> tuple[tuple[float, float] | None, str | None]:
        """Both responses scored by the served reward model, if there is one (for annotator
        quality); a response it cannot score (too long for it) leaves them unscored."""
        if self.state.registry.find("", "reward") is None:
            return None, None
        try:
            rm, rewards = await self.reward._score("", [(f"{side}.", request.prompt, request.messages, text)
                                                        for side, text in (("left", left), ("right", right))])
        except REQUEST_ERRORS as e:
            log.info("comparison left unscored by the reward model: %s", e)
            return None, None
        return (rewards[0], rewards[1]), rm.model_version

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
        prior_sd = request.prior_sd if request.HasField("prior_sd") else PRIOR_SD
        low, high = PRIOR_SD_RANGE
        if not low <= prior_sd <= high:  # NaN fails too
            raise InvalidArgumentError("prior_sd", f"must be in [{low:g}, {high:g}] Elo points, got {prior_sd}")
        rows = await self._db(self.store.battles, True)  # not voted_comparisons: prompts are not needed
        votes = [r[:3] for r in rows]
        responses = [r[3:] for r in rows]
        r = await asyncio.get_running_loop().run_in_executor(
            self.ratings_pool, rate, votes, rounds, request.seed if request.HasField("seed") else 0, prior_sd, responses)
        return fb_pb.Leaderboard(
            ratings=[fb_pb.ModelRating(model=x.model, elo=x.elo, bradley_terry=x.bradley_terry,
                                       bradley_terry_lower=x.lower, bradley_terry_upper=x.upper, battles=x.battles,
                                       wins=x.wins, losses=x.losses, ties=x.ties, both_bad=x.both_bad,
                                       style_controlled=x.style_controlled, style_controlled_lower=x.style_lower,
                                       style_controlled_upper=x.style_upper)
                     for x in r.ratings],
            models=r.models, num_votes=len(votes), num_battles=r.num_battles, prior_sd=r.prior_sd,
            style=[fb_pb.StyleCoefficient(feature=e.feature, elo_per_sd=e.elo_per_sd, lower=e.lower, upper=e.upper)
                   for e in r.style],
            win_rates=[fb_pb.WinRateRow(model=m, win_rates=r.win_rates[i].tolist(), battles=r.battles[i].tolist())
                       for i, m in enumerate(r.models)])

    async def GetAnnotators(self, request: fb_pb.GetAnnotatorsRequest, context=None) -> fb_pb.AnnotatorReport:
        days = request.days or 14
        if days > MAX_DAYS:
            raise InvalidArgumentError("days", f"must be at most {MAX_DAYS}, got {days}")
        rows = await self._db(self.store.voted_comparisons)
        return await asyncio.get_running_loop().run_in_executor(
            self.ratings_pool, annotator_report, rows, self.max_votes_per_day, days)
