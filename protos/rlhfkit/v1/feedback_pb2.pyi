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
    __slots__ = ("bootstrap_rounds", "seed")
    BOOTSTRAP_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    bootstrap_rounds: int
    seed: int
    def __init__(self, bootstrap_rounds: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class ModelRating(_message.Message):
    __slots__ = ("model", "elo", "bradley_terry", "bradley_terry_lower", "bradley_terry_upper", "battles", "wins", "losses", "ties", "both_bad")
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
    def __init__(self, model: _Optional[str] = ..., elo: _Optional[float] = ..., bradley_terry: _Optional[float] = ..., bradley_terry_lower: _Optional[float] = ..., bradley_terry_upper: _Optional[float] = ..., battles: _Optional[int] = ..., wins: _Optional[int] = ..., losses: _Optional[int] = ..., ties: _Optional[int] = ..., both_bad: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("ratings", "models", "win_rates", "num_votes", "num_battles")
    RATINGS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    WIN_RATES_FIELD_NUMBER: _ClassVar[int]
    NUM_VOTES_FIELD_NUMBER: _ClassVar[int]
    NUM_BATTLES_FIELD_NUMBER: _ClassVar[int]
    ratings: _containers.RepeatedCompositeFieldContainer[ModelRating]
    models: _containers.RepeatedScalarFieldContainer[str]
    win_rates: _containers.RepeatedCompositeFieldContainer[WinRateRow]
    num_votes: int
    num_battles: int
    def __init__(self, ratings: _Optional[_Iterable[_Union[ModelRating, _Mapping]]] = ..., models: _Optional[_Iterable[str]] = ..., win_rates: _Optional[_Iterable[_Union[WinRateRow, _Mapping]]] = ..., num_votes: _Optional[int] = ..., num_battles: _Optional[int] = ...) -> None: ...
