from rlhfkit.v1 import chat_pb2 as _chat_pb2
from rlhfkit.v1 import generation_pb2 as _generation_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Choice(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHOICE_UNSPECIFIED: _ClassVar[Choice]
    CHOICE_LEFT: _ClassVar[Choice]
    CHOICE_RIGHT: _ClassVar[Choice]
    CHOICE_TIE: _ClassVar[Choice]
    CHOICE_BOTH_BAD: _ClassVar[Choice]
CHOICE_UNSPECIFIED: Choice
CHOICE_LEFT: Choice
CHOICE_RIGHT: Choice
CHOICE_TIE: Choice
CHOICE_BOTH_BAD: Choice

class ModelPair(_message.Message):
    __slots__ = ("model_a", "model_b")
    MODEL_A_FIELD_NUMBER: _ClassVar[int]
    MODEL_B_FIELD_NUMBER: _ClassVar[int]
    model_a: str
    model_b: str
    def __init__(self, model_a: _Optional[str] = ..., model_b: _Optional[str] = ...) -> None: ...

class CreateComparisonRequest(_message.Message):
    __slots__ = ("prompt", "models", "samples_of", "sampling", "messages")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_OF_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    models: ModelPair
    samples_of: str
    sampling: _generation_pb2.SamplingParams
    messages: _containers.RepeatedCompositeFieldContainer[_chat_pb2.ChatMessage]
    def __init__(self, prompt: _Optional[str] = ..., models: _Optional[_Union[ModelPair, _Mapping]] = ..., samples_of: _Optional[str] = ..., sampling: _Optional[_Union[_generation_pb2.SamplingParams, _Mapping]] = ..., messages: _Optional[_Iterable[_Union[_chat_pb2.ChatMessage, _Mapping]]] = ...) -> None: ...

class Comparison(_message.Message):
    __slots__ = ("comparison_id", "prompt", "left", "right", "messages")
    COMPARISON_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    LEFT_FIELD_NUMBER: _ClassVar[int]
    RIGHT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    comparison_id: str
    prompt: str
    left: str
    right: str
    messages: _containers.RepeatedCompositeFieldContainer[_chat_pb2.ChatMessage]
    def __init__(self, comparison_id: _Optional[str] = ..., prompt: _Optional[str] = ..., left: _Optional[str] = ..., right: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_chat_pb2.ChatMessage, _Mapping]]] = ...) -> None: ...

class SubmitVoteRequest(_message.Message):
    __slots__ = ("comparison_id", "choice", "annotator_id", "rationale")
    COMPARISON_ID_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_ID_FIELD_NUMBER: _ClassVar[int]
    RATIONALE_FIELD_NUMBER: _ClassVar[int]
    comparison_id: str
    choice: Choice
    annotator_id: str
    rationale: str
    def __init__(self, comparison_id: _Optional[str] = ..., choice: _Optional[_Union[Choice, str]] = ..., annotator_id: _Optional[str] = ..., rationale: _Optional[str] = ...) -> None: ...

class SubmitVoteResponse(_message.Message):
    __slots__ = ("vote_id", "comparison_id", "choice", "left_model", "right_model", "left_model_version", "right_model_version", "already_recorded")
    VOTE_ID_FIELD_NUMBER: _ClassVar[int]
    COMPARISON_ID_FIELD_NUMBER: _ClassVar[int]
    CHOICE_FIELD_NUMBER: _ClassVar[int]
    LEFT_MODEL_FIELD_NUMBER: _ClassVar[int]
    RIGHT_MODEL_FIELD_NUMBER: _ClassVar[int]
    LEFT_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    RIGHT_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALREADY_RECORDED_FIELD_NUMBER: _ClassVar[int]
    vote_id: str
    comparison_id: str
    choice: Choice
    left_model: str
    right_model: str
    left_model_version: str
    right_model_version: str
    already_recorded: bool
    def __init__(self, vote_id: _Optional[str] = ..., comparison_id: _Optional[str] = ..., choice: _Optional[_Union[Choice, str]] = ..., left_model: _Optional[str] = ..., right_model: _Optional[str] = ..., left_model_version: _Optional[str] = ..., right_model_version: _Optional[str] = ..., already_recorded: _Optional[bool] = ...) -> None: ...

class GetLeaderboardRequest(_message.Message):
    __slots__ = ("bootstrap_rounds", "seed", "prior_sd")
    BOOTSTRAP_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    PRIOR_SD_FIELD_NUMBER: _ClassVar[int]
    bootstrap_rounds: int
    seed: int
    prior_sd: float
    def __init__(self, bootstrap_rounds: _Optional[int] = ..., seed: _Optional[int] = ..., prior_sd: _Optional[float] = ...) -> None: ...

class ModelRating(_message.Message):
    __slots__ = ("model", "elo", "bradley_terry", "bradley_terry_lower", "bradley_terry_upper", "battles", "wins", "losses", "ties", "both_bad", "style_controlled", "style_controlled_lower", "style_controlled_upper")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ELO_FIELD_NUMBER: _ClassVar[int]
    BRADLEY_TERRY_FIELD_NUMBER: _ClassVar[int]
    BRADLEY_TERRY_LOWER_FIELD_NUMBER: _ClassVar[int]
    BRADLEY_TERRY_UPPER_FIELD_NUMBER: _ClassVar[int]
    BATTLES_FIELD_NUMBER: _ClassVar[int]
    WINS_FIELD_NUMBER: _ClassVar[int]
    LOSSES_FIELD_NUMBER: _ClassVar[int]
    TIES_FIELD_NUMBER: _ClassVar[int]
    BOTH_BAD_FIELD_NUMBER: _ClassVar[int]
    STYLE_CONTROLLED_FIELD_NUMBER: _ClassVar[int]
    STYLE_CONTROLLED_LOWER_FIELD_NUMBER: _ClassVar[int]
    STYLE_CONTROLLED_UPPER_FIELD_NUMBER: _ClassVar[int]
    model: str
    elo: float
    bradley_terry: float
    bradley_terry_lower: float
    bradley_terry_upper: float
    battles: int
    wins: int
    losses: int
    ties: int
    both_bad: int
    style_controlled: float
    style_controlled_lower: float
    style_controlled_upper: float
    def __init__(self, model: _Optional[str] = ..., elo: _Optional[float] = ..., bradley_terry: _Optional[float] = ..., bradley_terry_lower: _Optional[float] = ..., bradley_terry_upper: _Optional[float] = ..., battles: _Optional[int] = ..., wins: _Optional[int] = ..., losses: _Optional[int] = ..., ties: _Optional[int] = ..., both_bad: _Optional[int] = ..., style_controlled: _Optional[float] = ..., style_controlled_lower: _Optional[float] = ..., style_controlled_upper: _Optional[float] = ...) -> None: ...

class StyleCoefficient(_message.Message):
    __slots__ = ("feature", "elo_per_sd", "lower", "upper")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    ELO_PER_SD_FIELD_NUMBER: _ClassVar[int]
    LOWER_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    feature: str
    elo_per_sd: float
    lower: float
    upper: float
    def __init__(self, feature: _Optional[str] = ..., elo_per_sd: _Optional[float] = ..., lower: _Optional[float] = ..., upper: _Optional[float] = ...) -> None: ...

class WinRateRow(_message.Message):
    __slots__ = ("model", "win_rates", "battles")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WIN_RATES_FIELD_NUMBER: _ClassVar[int]
    BATTLES_FIELD_NUMBER: _ClassVar[int]
    model: str
    win_rates: _containers.RepeatedScalarFieldContainer[float]
    battles: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., win_rates: _Optional[_Iterable[float]] = ..., battles: _Optional[_Iterable[int]] = ...) -> None: ...

class Leaderboard(_message.Message):
    __slots__ = ("ratings", "models", "win_rates", "num_votes", "num_battles", "style", "prior_sd")
    RATINGS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    WIN_RATES_FIELD_NUMBER: _ClassVar[int]
    NUM_VOTES_FIELD_NUMBER: _ClassVar[int]
    NUM_BATTLES_FIELD_NUMBER: _ClassVar[int]
    STYLE_FIELD_NUMBER: _ClassVar[int]
    PRIOR_SD_FIELD_NUMBER: _ClassVar[int]
    ratings: _containers.RepeatedCompositeFieldContainer[ModelRating]
    models: _containers.RepeatedScalarFieldContainer[str]
    win_rates: _containers.RepeatedCompositeFieldContainer[WinRateRow]
    num_votes: int
    num_battles: int
    style: _containers.RepeatedCompositeFieldContainer[StyleCoefficient]
    prior_sd: float
    def __init__(self, ratings: _Optional[_Iterable[_Union[ModelRating, _Mapping]]] = ..., models: _Optional[_Iterable[str]] = ..., win_rates: _Optional[_Iterable[_Union[WinRateRow, _Mapping]]] = ..., num_votes: _Optional[int] = ..., num_battles: _Optional[int] = ..., style: _Optional[_Iterable[_Union[StyleCoefficient, _Mapping]]] = ..., prior_sd: _Optional[float] = ...) -> None: ...

class GetAnnotatorsRequest(_message.Message):
    __slots__ = ("days",)
    DAYS_FIELD_NUMBER: _ClassVar[int]
    days: int
    def __init__(self, days: _Optional[int] = ...) -> None: ...

class DailyVotes(_message.Message):
    __slots__ = ("day", "votes")
    DAY_FIELD_NUMBER: _ClassVar[int]
    VOTES_FIELD_NUMBER: _ClassVar[int]
    day: str
    votes: int
    def __init__(self, day: _Optional[str] = ..., votes: _Optional[int] = ...) -> None: ...

class AnnotatorStats(_message.Message):
    __slots__ = ("annotator", "votes", "votes_today", "agreement_with_majority", "majority_comparisons", "agreement_with_reward_model", "reward_comparisons", "daily")
    ANNOTATOR_FIELD_NUMBER: _ClassVar[int]
    VOTES_FIELD_NUMBER: _ClassVar[int]
    VOTES_TODAY_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_WITH_MAJORITY_FIELD_NUMBER: _ClassVar[int]
    MAJORITY_COMPARISONS_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_WITH_REWARD_MODEL_FIELD_NUMBER: _ClassVar[int]
    REWARD_COMPARISONS_FIELD_NUMBER: _ClassVar[int]
    DAILY_FIELD_NUMBER: _ClassVar[int]
    annotator: str
    votes: int
    votes_today: int
    agreement_with_majority: float
    majority_comparisons: int
    agreement_with_reward_model: float
    reward_comparisons: int
    daily: _containers.RepeatedCompositeFieldContainer[DailyVotes]
    def __init__(self, annotator: _Optional[str] = ..., votes: _Optional[int] = ..., votes_today: _Optional[int] = ..., agreement_with_majority: _Optional[float] = ..., majority_comparisons: _Optional[int] = ..., agreement_with_reward_model: _Optional[float] = ..., reward_comparisons: _Optional[int] = ..., daily: _Optional[_Iterable[_Union[DailyVotes, _Mapping]]] = ...) -> None: ...

class AnnotatorPair(_message.Message):
    __slots__ = ("annotator_a", "annotator_b", "shared_comparisons", "cohen_kappa")
    ANNOTATOR_A_FIELD_NUMBER: _ClassVar[int]
    ANNOTATOR_B_FIELD_NUMBER: _ClassVar[int]
    SHARED_COMPARISONS_FIELD_NUMBER: _ClassVar[int]
    COHEN_KAPPA_FIELD_NUMBER: _ClassVar[int]
    annotator_a: str
    annotator_b: str
    shared_comparisons: int
    cohen_kappa: float
    def __init__(self, annotator_a: _Optional[str] = ..., annotator_b: _Optional[str] = ..., shared_comparisons: _Optional[int] = ..., cohen_kappa: _Optional[float] = ...) -> None: ...

class AnnotatorReport(_message.Message):
    __slots__ = ("annotators", "pairs", "fleiss_kappa", "fleiss_comparisons", "fleiss_raters", "max_votes_per_annotator_per_day", "num_votes")
    ANNOTATORS_FIELD_NUMBER: _ClassVar[int]
    PAIRS_FIELD_NUMBER: _ClassVar[int]
    FLEISS_KAPPA_FIELD_NUMBER: _ClassVar[int]
    FLEISS_COMPARISONS_FIELD_NUMBER: _ClassVar[int]
    FLEISS_RATERS_FIELD_NUMBER: _ClassVar[int]
    MAX_VOTES_PER_ANNOTATOR_PER_DAY_FIELD_NUMBER: _ClassVar[int]
    NUM_VOTES_FIELD_NUMBER: _ClassVar[int]
    annotators: _containers.RepeatedCompositeFieldContainer[AnnotatorStats]
    pairs: _containers.RepeatedCompositeFieldContainer[AnnotatorPair]
    fleiss_kappa: float
    fleiss_comparisons: int
    fleiss_raters: int
    max_votes_per_annotator_per_day: int
    num_votes: int
    def __init__(self, annotators: _Optional[_Iterable[_Union[AnnotatorStats, _Mapping]]] = ..., pairs: _Optional[_Iterable[_Union[AnnotatorPair, _Mapping]]] = ..., fleiss_kappa: _Optional[float] = ..., fleiss_comparisons: _Optional[int] = ..., fleiss_raters: _Optional[int] = ..., max_votes_per_annotator_per_day: _Optional[int] = ..., num_votes: _Optional[int] = ...) -> None: ...
