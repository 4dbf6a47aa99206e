from kvrouter._proto.v1 import common_pb2 as _common_pb2
from kvrouter._proto.v1 import engine_pb2 as _engine_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GENERATE_MODE_UNSPECIFIED: _ClassVar[GenerateMode]
    GENERATE_MODE_AUTO: _ClassVar[GenerateMode]
    GENERATE_MODE_AGGREGATED: _ClassVar[GenerateMode]
    GENERATE_MODE_DISAGGREGATED: _ClassVar[GenerateMode]
GENERATE_MODE_UNSPECIFIED: GenerateMode
GENERATE_MODE_AUTO: GenerateMode
GENERATE_MODE_AGGREGATED: GenerateMode
GENERATE_MODE_DISAGGREGATED: GenerateMode

class RouteRequest(_message.Message):
    __slots__ = ("model", "token_ids", "token_ids_le", "extra_key", "request_id", "expected_output_tokens", "candidates", "role", "policy", "explain", "dry_run", "session_id", "priority", "tenant", "deadline_unix_ms")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_LE_FIELD_NUMBER: _ClassVar[int]
    EXTRA_KEY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    model: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    token_ids_le: bytes
    extra_key: bytes
    request_id: str
    expected_output_tokens: int
    candidates: _containers.RepeatedScalarFieldContainer[str]
    role: _common_pb2.WorkerRole
    policy: str
    explain: bool
    dry_run: bool
    session_id: str
    priority: str
    tenant: str
    deadline_unix_ms: int
    def __init__(self, model: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., token_ids_le: _Optional[bytes] = ..., extra_key: _Optional[bytes] = ..., request_id: _Optional[str] = ..., expected_output_tokens: _Optional[int] = ..., candidates: _Optional[_Iterable[str]] = ..., role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., policy: _Optional[str] = ..., explain: _Optional[bool] = ..., dry_run: _Optional[bool] = ..., session_id: _Optional[str] = ..., priority: _Optional[str] = ..., tenant: _Optional[str] = ..., deadline_unix_ms: _Optional[int] = ...) -> None: ...

class CandidateScore(_message.Message):
    __slots__ = ("worker", "gpu_blocks", "host_blocks", "disk_blocks", "new_prefill_tokens", "decode_blocks", "queue", "cost", "chosen", "evicted_blocks", "pressure_cost", "pending_blocks")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    GPU_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DISK_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NEW_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    CHOSEN_FIELD_NUMBER: _ClassVar[int]
    EVICTED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PRESSURE_COST_FIELD_NUMBER: _ClassVar[int]
    PENDING_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    worker: str
    gpu_blocks: int
    host_blocks: int
    disk_blocks: int
    new_prefill_tokens: int
    decode_blocks: int
    queue: int
    cost: float
    chosen: bool
    evicted_blocks: int
    pressure_cost: float
    pending_blocks: int
    def __init__(self, worker: _Optional[str] = ..., gpu_blocks: _Optional[int] = ..., host_blocks: _Optional[int] = ..., disk_blocks: _Optional[int] = ..., new_prefill_tokens: _Optional[int] = ..., decode_blocks: _Optional[int] = ..., queue: _Optional[int] = ..., cost: _Optional[float] = ..., chosen: _Optional[bool] = ..., evicted_blocks: _Optional[int] = ..., pressure_cost: _Optional[float] = ..., pending_blocks: _Optional[int] = ...) -> None: ...

class RouteResponse(_message.Message):
    __slots__ = ("worker", "address", "request_id", "overlap_blocks", "gpu_blocks", "prompt_blocks", "prompt_tokens", "block_size", "policy", "candidates", "model", "affinity")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OVERLAP_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    GPU_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    AFFINITY_FIELD_NUMBER: _ClassVar[int]
    worker: str
    address: str
    request_id: str
    overlap_blocks: int
    gpu_blocks: int
    prompt_blocks: int
    prompt_tokens: int
    block_size: int
    policy: str
    candidates: _containers.RepeatedCompositeFieldContainer[CandidateScore]
    model: str
    affinity: str
    def __init__(self, worker: _Optional[str] = ..., address: _Optional[str] = ..., request_id: _Optional[str] = ..., overlap_blocks: _Optional[int] = ..., gpu_blocks: _Optional[int] = ..., prompt_blocks: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., block_size: _Optional[int] = ..., policy: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[CandidateScore, _Mapping]]] = ..., model: _Optional[str] = ..., affinity: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("model", "request_id", "worker")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    model: str
    request_id: str
    worker: str
    def __init__(self, model: _Optional[str] = ..., request_id: _Optional[str] = ..., worker: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class MarkPrefillDoneRequest(_message.Message):
    __slots__ = ("model", "request_id", "worker")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    model: str
    request_id: str
    worker: str
    def __init__(self, model: _Optional[str] = ..., request_id: _Optional[str] = ..., worker: _Optional[str] = ...) -> None: ...

class MarkPrefillDoneResponse(_message.Message):
    __slots__ = ("found",)
    FOUND_FIELD_NUMBER: _ClassVar[int]
    found: bool
    def __init__(self, found: _Optional[bool] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class RouteStreamItem(_message.Message):
    __slots__ = ("route", "release", "prefill_done")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_DONE_FIELD_NUMBER: _ClassVar[int]
    route: RouteRequest
    release: ReleaseRequest
    prefill_done: MarkPrefillDoneRequest
    def __init__(self, route: _Optional[_Union[RouteRequest, _Mapping]] = ..., release: _Optional[_Union[ReleaseRequest, _Mapping]] = ..., prefill_done: _Optional[_Union[MarkPrefillDoneRequest, _Mapping]] = ...) -> None: ...

class RouteStreamRequest(_message.Message):
    __slots__ = ("seq", "items")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    items: _containers.RepeatedCompositeFieldContainer[RouteStreamItem]
    def __init__(self, seq: _Optional[int] = ..., items: _Optional[_Iterable[_Union[RouteStreamItem, _Mapping]]] = ...) -> None: ...

class RouteStreamResult(_message.Message):
    __slots__ = ("route", "release", "prefill_done", "error")
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    PREFILL_DONE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    route: RouteResponse
    release: ReleaseResponse
    prefill_done: MarkPrefillDoneResponse
    error: StreamError
    def __init__(self, route: _Optional[_Union[RouteResponse, _Mapping]] = ..., release: _Optional[_Union[ReleaseResponse, _Mapping]] = ..., prefill_done: _Optional[_Union[MarkPrefillDoneResponse, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ...) -> None: ...

class RouteStreamResponse(_message.Message):
    __slots__ = ("seq", "results")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    results: _containers.RepeatedCompositeFieldContainer[RouteStreamResult]
    def __init__(self, seq: _Optional[int] = ..., results: _Optional[_Iterable[_Union[RouteStreamResult, _Mapping]]] = ...) -> None: ...

class RouterGenerateRequest(_message.Message):
    __slots__ = ("model", "token_ids", "token_ids_le", "extra_key", "request_id", "sampling", "disaggregated", "session_id", "lora_name", "mode", "expected_output_tokens", "aggregator", "answer_regex", "scorer", "priority", "tenant", "deadline_unix_ms", "tool_pause_s", "tool_kv_action")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_LE_FIELD_NUMBER: _ClassVar[int]
    EXTRA_KEY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    DISAGGREGATED_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LORA_NAME_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_FIELD_NUMBER: _ClassVar[int]
    ANSWER_REGEX_FIELD_NUMBER: _ClassVar[int]
    SCORER_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    TOOL_PAUSE_S_FIELD_NUMBER: _ClassVar[int]
    TOOL_KV_ACTION_FIELD_NUMBER: _ClassVar[int]
    model: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    token_ids_le: bytes
    extra_key: bytes
    request_id: str
    sampling: _common_pb2.SamplingParams
    disaggregated: bool
    session_id: str
    lora_name: str
    mode: GenerateMode
    expected_output_tokens: int
    aggregator: str
    answer_regex: str
    scorer: str
    priority: str
    tenant: str
    deadline_unix_ms: int
    tool_pause_s: float
    tool_kv_action: str
    def __init__(self, model: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., token_ids_le: _Optional[bytes] = ..., extra_key: _Optional[bytes] = ..., request_id: _Optional[str] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., disaggregated: _Optional[bool] = ..., session_id: _Optional[str] = ..., lora_name: _Optional[str] = ..., mode: _Optional[_Union[GenerateMode, str]] = ..., expected_output_tokens: _Optional[int] = ..., aggregator: _Optional[str] = ..., answer_regex: _Optional[str] = ..., scorer: _Optional[str] = ..., priority: _Optional[str] = ..., tenant: _Optional[str] = ..., deadline_unix_ms: _Optional[int] = ..., tool_pause_s: _Optional[float] = ..., tool_kv_action: _Optional[str] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ("model", "page_size", "page_token")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model: str
    page_size: int
    page_token: str
    def __init__(self, model: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class WorkerLoad(_message.Message):
    __slots__ = ("reserved_prefill_tokens", "reserved_decode_blocks", "reserved_requests", "waiting_requests", "reported", "prefill_tokens", "decode_blocks", "queue")
    RESERVED_PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_DECODE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    WAITING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    PREFILL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DECODE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    reserved_prefill_tokens: int
    reserved_decode_blocks: int
    reserved_requests: int
    waiting_requests: int
    reported: _common_pb2.LoadReport
    prefill_tokens: int
    decode_blocks: int
    queue: int
    def __init__(self, reserved_prefill_tokens: _Optional[int] = ..., reserved_decode_blocks: _Optional[int] = ..., reserved_requests: _Optional[int] = ..., waiting_requests: _Optional[int] = ..., reported: _Optional[_Union[_common_pb2.LoadReport, _Mapping]] = ..., prefill_tokens: _Optional[int] = ..., decode_blocks: _Optional[int] = ..., queue: _Optional[int] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("name", "model", "role", "address", "status", "status_reason", "last_seen_age_s", "cached_blocks", "load", "metadata", "routable", "kv_mode")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_AGE_S_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ROUTABLE_FIELD_NUMBER: _ClassVar[int]
    KV_MODE_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    role: _common_pb2.WorkerRole
    address: str
    status: str
    status_reason: str
    last_seen_age_s: float
    cached_blocks: int
    load: WorkerLoad
    metadata: _containers.ScalarMap[str, str]
    routable: bool
    kv_mode: str
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., address: _Optional[str] = ..., status: _Optional[str] = ..., status_reason: _Optional[str] = ..., last_seen_age_s: _Optional[float] = ..., cached_blocks: _Optional[int] = ..., load: _Optional[_Union[WorkerLoad, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., routable: _Optional[bool] = ..., kv_mode: _Optional[str] = ...) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers", "admission", "next_page_token")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    admission: _containers.RepeatedCompositeFieldContainer[AdmissionState]
    next_page_token: str
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., admission: _Optional[_Iterable[_Union[AdmissionState, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class AdmissionClassState(_message.Message):
    __slots__ = ("name", "queued", "oldest_wait_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    OLDEST_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    queued: int
    oldest_wait_s: float
    def __init__(self, name: _Optional[str] = ..., queued: _Optional[int] = ..., oldest_wait_s: _Optional[float] = ...) -> None: ...

class AdmissionState(_message.Message):
    __slots__ = ("model", "enabled", "saturated", "queued", "max_queue", "classes", "admitted", "dispatched", "rejected", "expired", "retry_after_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    SATURATED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    ADMITTED_FIELD_NUMBER: _ClassVar[int]
    DISPATCHED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    enabled: bool
    saturated: bool
    queued: int
    max_queue: int
    classes: _containers.RepeatedCompositeFieldContainer[AdmissionClassState]
    admitted: int
    dispatched: int
    rejected: int
    expired: int
    retry_after_s: float
    def __init__(self, model: _Optional[str] = ..., enabled: _Optional[bool] = ..., saturated: _Optional[bool] = ..., queued: _Optional[int] = ..., max_queue: _Optional[int] = ..., classes: _Optional[_Iterable[_Union[AdmissionClassState, _Mapping]]] = ..., admitted: _Optional[int] = ..., dispatched: _Optional[int] = ..., rejected: _Optional[int] = ..., expired: _Optional[int] = ..., retry_after_s: _Optional[float] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "block_size", "vocab_size", "policy", "workers", "indexed_blocks", "admission")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    INDEXED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    block_size: int
    vocab_size: int
    policy: str
    workers: int
    indexed_blocks: int
    admission: AdmissionState
    def __init__(self, name: _Optional[str] = ..., block_size: _Optional[int] = ..., vocab_size: _Optional[int] = ..., policy: _Optional[str] = ..., workers: _Optional[int] = ..., indexed_blocks: _Optional[int] = ..., admission: _Optional[_Union[AdmissionState, _Mapping]] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("route",)
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    route: RouteRequest
    def __init__(self, route: _Optional[_Union[RouteRequest, _Mapping]] = ...) -> None: ...

class RegisterWorkerRequest(_message.Message):
    __slots__ = ("model", "worker", "role", "address", "block_size", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    model: str
    worker: str
    role: _common_pb2.WorkerRole
    address: str
    block_size: int
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, model: _Optional[str] = ..., worker: _Optional[str] = ..., role: _Optional[_Union[_common_pb2.WorkerRole, str]] = ..., address: _Optional[str] = ..., block_size: _Optional[int] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RegisterWorkerResponse(_message.Message):
    __slots__ = ("status", "status_reason", "block_size", "heartbeat_interval_s")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    STATUS_REASON_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    status: str
    status_reason: str
    block_size: int
    heartbeat_interval_s: float
    def __init__(self, status: _Optional[str] = ..., status_reason: _Optional[str] = ..., block_size: _Optional[int] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("model", "worker", "load", "epoch", "last_seq")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    model: str
    worker: str
    load: _common_pb2.LoadReport
    epoch: str
    last_seq: int
    def __init__(self, model: _Optional[str] = ..., worker: _Optional[str] = ..., load: _Optional[_Union[_common_pb2.LoadReport, _Mapping]] = ..., epoch: _Optional[str] = ..., last_seq: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("status",)
    STATUS_FIELD_NUMBER: _ClassVar[int]
    status: str
    def __init__(self, status: _Optional[str] = ...) -> None: ...

class DrainWorkerRequest(_message.Message):
    __slots__ = ("model", "worker")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    model: str
    worker: str
    def __init__(self, model: _Optional[str] = ..., worker: _Optional[str] = ...) -> None: ...

class DrainWorkerResponse(_message.Message):
    __slots__ = ("reserved_requests",)
    RESERVED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    reserved_requests: int
    def __init__(self, reserved_requests: _Optional[int] = ...) -> None: ...

class DeregisterWorkerRequest(_message.Message):
    __slots__ = ("model", "worker")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    model: str
    worker: str
    def __init__(self, model: _Optional[str] = ..., worker: _Optional[str] = ...) -> None: ...

class DeregisterWorkerResponse(_message.Message):
    __slots__ = ("dropped_reservations",)
    DROPPED_RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    dropped_reservations: int
    def __init__(self, dropped_reservations: _Optional[int] = ...) -> None: ...

class PublishEventsRequest(_message.Message):
    __slots__ = ("model", "worker", "epoch", "seq", "payload")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    model: str
    worker: str
    epoch: str
    seq: int
    payload: bytes
    def __init__(self, model: _Optional[str] = ..., worker: _Optional[str] = ..., epoch: _Optional[str] = ..., seq: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class PublishEventsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeSessionRequest(_message.Message):
    __slots__ = ("model", "session_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    session_id: str
    def __init__(self, model: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class ResumeSessionResponse(_message.Message):
    __slots__ = ("worker", "state", "action", "blocks", "detail")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    worker: str
    state: str
    action: str
    blocks: int
    detail: str
    def __init__(self, worker: _Optional[str] = ..., state: _Optional[str] = ..., action: _Optional[str] = ..., blocks: _Optional[int] = ..., detail: _Optional[str] = ...) -> None: ...
