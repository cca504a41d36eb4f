from rlhfkit.v1 import chat_pb2 as _chat_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreItem(_message.Message):
    __slots__ = ("prompt", "response", "messages")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    response: str
    messages: _containers.RepeatedCompositeFieldContainer[_chat_pb2.ChatMessage]
    def __init__(self, prompt: _Optional[str] = ..., response: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_chat_pb2.ChatMessage, _Mapping]]] = ...) -> None: ...

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
    __slots__ = ("model", "prompt", "response_a", "response_b", "messages")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_A_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_B_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    response_a: str
    response_b: str
    messages: _containers.RepeatedCompositeFieldContainer[_chat_pb2.ChatMessage]
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., response_a: _Optional[str] = ..., response_b: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_chat_pb2.ChatMessage, _Mapping]]] = ...) -> None: ...

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

class LogProbsItem(_message.Message):
    __slots__ = ("prompt", "response", "prompt_token_ids", "response_token_ids", "messages")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    response: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    response_token_ids: _containers.RepeatedScalarFieldContainer[int]
    messages: _containers.RepeatedCompositeFieldContainer[_chat_pb2.ChatMessage]
    def __init__(self, prompt: _Optional[str] = ..., response: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., response_token_ids: _Optional[_Iterable[int]] = ..., messages: _Optional[_Iterable[_Union[_chat_pb2.ChatMessage, _Mapping]]] = ...) -> None: ...

class LogProbsRequest(_message.Message):
    __slots__ = ("model", "reference_model", "items", "temperature")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_MODEL_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    model: str
    reference_model: str
    items: _containers.RepeatedCompositeFieldContainer[LogProbsItem]
    temperature: float
    def __init__(self, model: _Optional[str] = ..., reference_model: _Optional[str] = ..., items: _Optional[_Iterable[_Union[LogProbsItem, _Mapping]]] = ..., temperature: _Optional[float] = ...) -> None: ...

class TokenScores(_message.Message):
    __slots__ = ("token_ids", "logprobs", "ref_logprobs", "kl_k1", "kl_k2", "kl_k3", "kl_full", "entropy", "logprob_sum", "ref_logprob_sum", "kl_k1_sum", "kl_k2_sum", "kl_k3_sum", "kl_full_sum", "entropy_sum")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    REF_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    KL_K1_FIELD_NUMBER: _ClassVar[int]
    KL_K2_FIELD_NUMBER: _ClassVar[int]
    KL_K3_FIELD_NUMBER: _ClassVar[int]
    KL_FULL_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_SUM_FIELD_NUMBER: _ClassVar[int]
    REF_LOGPROB_SUM_FIELD_NUMBER: _ClassVar[int]
    KL_K1_SUM_FIELD_NUMBER: _ClassVar[int]
    KL_K2_SUM_FIELD_NUMBER: _ClassVar[int]
    KL_K3_SUM_FIELD_NUMBER: _ClassVar[int]
    KL_FULL_SUM_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_SUM_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    ref_logprobs: _containers.RepeatedScalarFieldContainer[float]
    kl_k1: _containers.RepeatedScalarFieldContainer[float]
    kl_k2: _containers.RepeatedScalarFieldContainer[float]
    kl_k3: _containers.RepeatedScalarFieldContainer[float]
    kl_full: _containers.RepeatedScalarFieldContainer[float]
    entropy: _containers.RepeatedScalarFieldContainer[float]
    logprob_sum: float
    ref_logprob_sum: float
    kl_k1_sum: float
    kl_k2_sum: float
    kl_k3_sum: float
    kl_full_sum: float
    entropy_sum: float
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., ref_logprobs: _Optional[_Iterable[float]] = ..., kl_k1: _Optional[_Iterable[float]] = ..., kl_k2: _Optional[_Iterable[float]] = ..., kl_k3: _Optional[_Iterable[float]] = ..., kl_full: _Optional[_Iterable[float]] = ..., entropy: _Optional[_Iterable[float]] = ..., logprob_sum: _Optional[float] = ..., ref_logprob_sum: _Optional[float] = ..., kl_k1_sum: _Optional[float] = ..., kl_k2_sum: _Optional[float] = ..., kl_k3_sum: _Optional[float] = ..., kl_full_sum: _Optional[float] = ..., entropy_sum: _Optional[float] = ...) -> None: ...

class LogProbsResponse(_message.Message):
    __slots__ = ("results", "model_version", "reference_version")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_VERSION_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[TokenScores]
    model_version: str
    reference_version: str
    def __init__(self, results: _Optional[_Iterable[_Union[TokenScores, _Mapping]]] = ..., model_version: _Optional[str] = ..., reference_version: _Optional[str] = ...) -> None: ...
