from spotserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PipelineState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PIPELINE_STATE_UNSPECIFIED: _ClassVar[PipelineState]
    PIPELINE_STATE_SERVING: _ClassVar[PipelineState]
    PIPELINE_STATE_DRAINING: _ClassVar[PipelineState]
    PIPELINE_STATE_GONE: _ClassVar[PipelineState]
PIPELINE_STATE_UNSPECIFIED: PipelineState
PIPELINE_STATE_SERVING: PipelineState
PIPELINE_STATE_DRAINING: PipelineState
PIPELINE_STATE_GONE: PipelineState

class PipelineInfo(_message.Message):
    __slots__ = ("id", "driver_address", "capacity", "state", "max_concurrency")
    ID_FIELD_NUMBER: _ClassVar[int]
    DRIVER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    id: str
    driver_address: str
    capacity: float
    state: PipelineState
    max_concurrency: int
    def __init__(self, id: _Optional[str] = ..., driver_address: _Optional[str] = ..., capacity: _Optional[float] = ..., state: _Optional[_Union[PipelineState, str]] = ..., max_concurrency: _Optional[int] = ...) -> None: ...

class ResumeHint(_message.Message):
    __slots__ = ("request_id", "pipeline_id", "mode", "kv_tokens")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    KV_TOKENS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    pipeline_id: str
    mode: _common_pb2.ResumeMode
    kv_tokens: int
    def __init__(self, request_id: _Optional[str] = ..., pipeline_id: _Optional[str] = ..., mode: _Optional[_Union[_common_pb2.ResumeMode, str]] = ..., kv_tokens: _Optional[int] = ...) -> None: ...

class Topology(_message.Message):
    __slots__ = ("epoch", "pipelines", "resume_hints")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PIPELINES_FIELD_NUMBER: _ClassVar[int]
    RESUME_HINTS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    pipelines: _containers.RepeatedCompositeFieldContainer[PipelineInfo]
    resume_hints: _containers.RepeatedCompositeFieldContainer[ResumeHint]
    def __init__(self, epoch: _Optional[int] = ..., pipelines: _Optional[_Iterable[_Union[PipelineInfo, _Mapping]]] = ..., resume_hints: _Optional[_Iterable[_Union[ResumeHint, _Mapping]]] = ...) -> None: ...

class TopologyAck(_message.Message):
    __slots__ = ("epoch",)
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    def __init__(self, epoch: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RouterStats(_message.Message):
    __slots__ = ("arrival_rate_ewma", "arrival_rate_window", "queued", "running", "completed", "failed", "ttft_p50_seconds", "e2e_p50_seconds", "e2e_p99_seconds", "requests", "epoch")
    ARRIVAL_RATE_EWMA_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_RATE_WINDOW_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    TTFT_P50_SECONDS_FIELD_NUMBER: _ClassVar[int]
    E2E_P50_SECONDS_FIELD_NUMBER: _ClassVar[int]
    E2E_P99_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    arrival_rate_ewma: float
    arrival_rate_window: float
    queued: int
    running: int
    completed: int
    failed: int
    ttft_p50_seconds: float
    e2e_p50_seconds: float
    e2e_p99_seconds: float
    requests: _containers.RepeatedCompositeFieldContainer[_common_pb2.RequestProgress]
    epoch: int
    def __init__(self, arrival_rate_ewma: _Optional[float] = ..., arrival_rate_window: _Optional[float] = ..., queued: _Optional[int] = ..., running: _Optional[int] = ..., completed: _Optional[int] = ..., failed: _Optional[int] = ..., ttft_p50_seconds: _Optional[float] = ..., e2e_p50_seconds: _Optional[float] = ..., e2e_p99_seconds: _Optional[float] = ..., requests: _Optional[_Iterable[_Union[_common_pb2.RequestProgress, _Mapping]]] = ..., epoch: _Optional[int] = ...) -> None: ...
