from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreItem(_message.Message):
    __slots__ = ("prompt", "response")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    response: str
    def __init__(self, prompt: _Optional[str] = ..., response: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("model", "items")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    model: str
    items: _containers.RepeatedCompositeFieldContainer[ScoreItem]
    def __init__(self, model: _Optional[str] = ..., items: _Optional[_Iterable[_Union[ScoreItem, _Mapping]]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("rewards", "model_version")
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    rewards: _containers.RepeatedScalarFieldContainer[float]
    model_version: str
    def __init__(self, rewards: _Optional[_Iterable[float]] = ..., model_version: _Optional[str] = ...) -> None: ...

class CompareRequest(_message.Message):
    __slots__ = ("model", "prompt", "response_a", "response_b")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_A_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_B_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    response_a: str
    response_b: str
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., response_a: _Optional[str] = ..., response_b: _Optional[str] = ...) -> None: ...

class CompareResponse(_message.Message):
    __slots__ = ("reward_a", "reward_b", "prob_a_preferred", "model_version")
    REWARD_A_FIELD_NUMBER: _ClassVar[int]
    REWARD_B_FIELD_NUMBER: _ClassVar[int]
    PROB_A_PREFERRED_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    reward_a: float
    reward_b: float
    prob_a_preferred: float
    model_version: str
    def __init__(self, reward_a: _Optional[float] = ..., reward_b: _Optional[float] = ..., prob_a_preferred: _Optional[float] = ..., model_version: _Optional[str] = ...) -> None: ...
