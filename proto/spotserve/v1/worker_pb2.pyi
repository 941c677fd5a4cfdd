from spotserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATE_UNSPECIFIED: _ClassVar[WorkerState]
    WORKER_STATE_STANDBY: _ClassVar[WorkerState]
    WORKER_STATE_LOADING: _ClassVar[WorkerState]
    WORKER_STATE_READY: _ClassVar[WorkerState]
    WORKER_STATE_DRAINING: _ClassVar[WorkerState]
    WORKER_STATE_DRAINED: _ClassVar[WorkerState]
    WORKER_STATE_STOPPING: _ClassVar[WorkerState]

class SourceKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SOURCE_KIND_UNSPECIFIED: _ClassVar[SourceKind]
    SOURCE_KIND_KEPT: _ClassVar[SourceKind]
    SOURCE_KIND_PEER: _ClassVar[SourceKind]
    SOURCE_KIND_CHECKPOINT: _ClassVar[SourceKind]
WORKER_STATE_UNSPECIFIED: WorkerState
WORKER_STATE_STANDBY: WorkerState
WORKER_STATE_LOADING: WorkerState
WORKER_STATE_READY: WorkerState
WORKER_STATE_DRAINING: WorkerState
WORKER_STATE_DRAINED: WorkerState
WORKER_STATE_STOPPING: WorkerState
SOURCE_KIND_UNSPECIFIED: SourceKind
SOURCE_KIND_KEPT: SourceKind
SOURCE_KIND_PEER: SourceKind
SOURCE_KIND_CHECKPOINT: SourceKind

class Role(_message.Message):
    __slots__ = ("pipeline", "stage", "tp_rank", "tp_size", "layer_start", "layer_end", "num_stages", "tp_peers", "prev_stage", "next_stage", "max_batch", "pipeline_id", "stages", "driver")
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    TP_RANK_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    NUM_STAGES_FIELD_NUMBER: _ClassVar[int]
    TP_PEERS_FIELD_NUMBER: _ClassVar[int]
    PREV_STAGE_FIELD_NUMBER: _ClassVar[int]
    NEXT_STAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_ID_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    DRIVER_FIELD_NUMBER: _ClassVar[int]
    pipeline: int
    stage: int
    tp_rank: int
    tp_size: int
    layer_start: int
    layer_end: int
    num_stages: int
    tp_peers: _containers.RepeatedScalarFieldContainer[str]
    prev_stage: str
    next_stage: str
    max_batch: int
    pipeline_id: str
    stages: _containers.RepeatedCompositeFieldContainer[StageShape]
    driver: str
    def __init__(self, pipeline: _Optional[int] = ..., stage: _Optional[int] = ..., tp_rank: _Optional[int] = ..., tp_size: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., num_stages: _Optional[int] = ..., tp_peers: _Optional[_Iterable[str]] = ..., prev_stage: _Optional[str] = ..., next_stage: _Optional[str] = ..., max_batch: _Optional[int] = ..., pipeline_id: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[StageShape, _Mapping]]] = ..., driver: _Optional[str] = ...) -> None: ...

class StageShape(_message.Message):
    __slots__ = ("layer_start", "layer_end", "tp_size")
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    layer_start: int
    layer_end: int
    tp_size: int
    def __init__(self, layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., tp_size: _Optional[int] = ...) -> None: ...

class Rendezvous(_message.Message):
    __slots__ = ("master_address", "world_size", "rank", "group_id")
    MASTER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    master_address: str
    world_size: int
    rank: int
    group_id: str
    def __init__(self, master_address: _Optional[str] = ..., world_size: _Optional[int] = ..., rank: _Optional[int] = ..., group_id: _Optional[str] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "checkpoint_path", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    checkpoint_path: str
    dtype: str
    def __init__(self, name: _Optional[str] = ..., checkpoint_path: _Optional[str] = ..., dtype: _Optional[str] = ...) -> None: ...

class WeightSource(_message.Message):
    __slots__ = ("slice", "kind", "peers")
    SLICE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    slice: _common_pb2.TensorSlice
    kind: SourceKind
    peers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, slice: _Optional[_Union[_common_pb2.TensorSlice, _Mapping]] = ..., kind: _Optional[_Union[SourceKind, str]] = ..., peers: _Optional[_Iterable[str]] = ...) -> None: ...

class KVImport(_message.Message):
    __slots__ = ("slice", "peers")
    SLICE_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    slice: _common_pb2.KVSlice
    peers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, slice: _Optional[_Union[_common_pb2.KVSlice, _Mapping]] = ..., peers: _Optional[_Iterable[str]] = ...) -> None: ...

class ConfigureRequest(_message.Message):
    __slots__ = ("epoch", "role", "model", "weights", "kv_imports", "rendezvous", "preload_only")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    KV_IMPORTS_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    PRELOAD_ONLY_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    role: Role
    model: ModelRef
    weights: _containers.RepeatedCompositeFieldContainer[WeightSource]
    kv_imports: _containers.RepeatedCompositeFieldContainer[KVImport]
    rendezvous: Rendezvous
    preload_only: bool
    def __init__(self, epoch: _Optional[int] = ..., role: _Optional[_Union[Role, _Mapping]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., weights: _Optional[_Iterable[_Union[WeightSource, _Mapping]]] = ..., kv_imports: _Optional[_Iterable[_Union[KVImport, _Mapping]]] = ..., rendezvous: _Optional[_Union[Rendezvous, _Mapping]] = ..., preload_only: _Optional[bool] = ...) -> None: ...

class ConfigureResponse(_message.Message):
    __slots__ = ("epoch", "state", "bytes_kept", "bytes_pulled", "bytes_from_checkpoint", "seconds")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    BYTES_KEPT_FIELD_NUMBER: _ClassVar[int]
    BYTES_PULLED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FROM_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    state: WorkerState
    bytes_kept: int
    bytes_pulled: int
    bytes_from_checkpoint: int
    seconds: float
    def __init__(self, epoch: _Optional[int] = ..., state: _Optional[_Union[WorkerState, str]] = ..., bytes_kept: _Optional[int] = ..., bytes_pulled: _Optional[int] = ..., bytes_from_checkpoint: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...

class ResumeState(_message.Message):
    __slots__ = ("generated_token_ids", "mode")
    GENERATED_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    generated_token_ids: _containers.RepeatedScalarFieldContainer[int]
    mode: _common_pb2.ResumeMode
    def __init__(self, generated_token_ids: _Optional[_Iterable[int]] = ..., mode: _Optional[_Union[_common_pb2.ResumeMode, str]] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "sampling", "resume", "detachable")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    DETACHABLE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    resume: ResumeState
    detachable: bool
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., resume: _Optional[_Union[ResumeState, _Mapping]] = ..., detachable: _Optional[bool] = ...) -> None: ...

class TokenDelta(_message.Message):
    __slots__ = ("request_id", "token_ids", "position", "finish_reason", "usage", "request")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    position: int
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    request: SubmitRequest
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., position: _Optional[int] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., request: _Optional[_Union[SubmitRequest, _Mapping]] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("found", "generated_tokens", "finish_reason", "attached")
    FOUND_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    found: bool
    generated_tokens: int
    finish_reason: _common_pb2.FinishReason
    attached: bool
    def __init__(self, found: _Optional[bool] = ..., generated_tokens: _Optional[int] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., attached: _Optional[bool] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("epoch", "steps", "deadline_unix", "gather")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_FIELD_NUMBER: _ClassVar[int]
    GATHER_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    steps: int
    deadline_unix: float
    gather: bool
    def __init__(self, epoch: _Optional[int] = ..., steps: _Optional[int] = ..., deadline_unix: _Optional[float] = ..., gather: _Optional[bool] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("requests", "steps_run")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_RUN_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[_common_pb2.RequestProgress]
    steps_run: int
    def __init__(self, requests: _Optional[_Iterable[_Union[_common_pb2.RequestProgress, _Mapping]]] = ..., steps_run: _Optional[int] = ...) -> None: ...

class PullTensorsRequest(_message.Message):
    __slots__ = ("epoch", "weights", "kv", "chunk_bytes")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    KV_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    weights: _containers.RepeatedCompositeFieldContainer[_common_pb2.TensorSlice]
    kv: _containers.RepeatedCompositeFieldContainer[_common_pb2.KVSlice]
    chunk_bytes: int
    def __init__(self, epoch: _Optional[int] = ..., weights: _Optional[_Iterable[_Union[_common_pb2.TensorSlice, _Mapping]]] = ..., kv: _Optional[_Iterable[_Union[_common_pb2.KVSlice, _Mapping]]] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("index", "dtype", "shape", "total_bytes", "offset", "data", "last", "crc32")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    index: int
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    total_bytes: int
    offset: int
    data: bytes
    last: bool
    crc32: int
    def __init__(self, index: _Optional[int] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., total_bytes: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ..., crc32: _Optional[int] = ...) -> None: ...

class BulkTicket(_message.Message):
    __slots__ = ("ticket", "port", "total_bytes", "ttl_ms")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    ticket: bytes
    port: int
    total_bytes: _containers.RepeatedScalarFieldContainer[int]
    ttl_ms: int
    def __init__(self, ticket: _Optional[bytes] = ..., port: _Optional[int] = ..., total_bytes: _Optional[_Iterable[int]] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("epoch", "state", "role", "running", "waiting", "kv_blocks_used", "kv_blocks_total", "decode_step_seconds", "requests", "device", "weight_bytes", "pipeline_error")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DECODE_STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PIPELINE_ERROR_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    state: WorkerState
    role: Role
    running: int
    waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    decode_step_seconds: float
    requests: _containers.RepeatedCompositeFieldContainer[_common_pb2.RequestProgress]
    device: str
    weight_bytes: int
    pipeline_error: str
    def __init__(self, epoch: _Optional[int] = ..., state: _Optional[_Union[WorkerState, str]] = ..., role: _Optional[_Union[Role, _Mapping]] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., kv_blocks_total: _Optional[int] = ..., decode_step_seconds: _Optional[float] = ..., requests: _Optional[_Iterable[_Union[_common_pb2.RequestProgress, _Mapping]]] = ..., device: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., pipeline_error: _Optional[str] = ...) -> None: ...
