from kvrouter._proto.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TransferKvRequest(_message.Message):
    __slots__ = ("ctx_request_id", "opaque_state", "requester")
    CTX_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OPAQUE_STATE_FIELD_NUMBER: _ClassVar[int]
    REQUESTER_FIELD_NUMBER: _ClassVar[int]
    ctx_request_id: int
    opaque_state: bytes
    requester: str
    def __init__(self, ctx_request_id: _Optional[int] = ..., opaque_state: _Optional[bytes] = ..., requester: _Optional[str] = ...) -> None: ...

class TransferKvResponse(_message.Message):
    __slots__ = ("tokens", "bytes")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    bytes: int
    def __init__(self, tokens: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "token_ids", "token_ids_le", "sampling", "disaggregated", "extra_key", "lora_name", "session_id", "tool_pause_s", "tool_kv_action")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_LE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    DISAGGREGATED_FIELD_NUMBER: _ClassVar[int]
    EXTRA_KEY_FIELD_NUMBER: _ClassVar[int]
    LORA_NAME_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_PAUSE_S_FIELD_NUMBER: _ClassVar[int]
    TOOL_KV_ACTION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    token_ids_le: bytes
    sampling: _common_pb2.SamplingParams
    disaggregated: _common_pb2.DisaggregatedParams
    extra_key: bytes
    lora_name: str
    session_id: str
    tool_pause_s: float
    tool_kv_action: str
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., token_ids_le: _Optional[bytes] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., disaggregated: _Optional[_Union[_common_pb2.DisaggregatedParams, _Mapping]] = ..., extra_key: _Optional[bytes] = ..., lora_name: _Optional[str] = ..., session_id: _Optional[str] = ..., tool_pause_s: _Optional[float] = ..., tool_kv_action: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "finished", "finish_reason", "disaggregated", "usage", "sample_index", "worker", "logprobs")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    DISAGGREGATED_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish_reason: str
    disaggregated: _common_pb2.DisaggregatedParams
    usage: _common_pb2.Usage
    sample_index: int
    worker: str
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., disaggregated: _Optional[_Union[_common_pb2.DisaggregatedParams, _Mapping]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., sample_index: _Optional[int] = ..., worker: _Optional[str] = ..., logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class OffloadRequest(_message.Message):
    __slots__ = ("session_id", "target")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    target: _common_pb2.Tier
    def __init__(self, session_id: _Optional[str] = ..., target: _Optional[_Union[_common_pb2.Tier, str]] = ...) -> None: ...

class OffloadResponse(_message.Message):
    __slots__ = ("blocks", "tier")
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    blocks: int
    tier: _common_pb2.Tier
    def __init__(self, blocks: _Optional[int] = ..., tier: _Optional[_Union[_common_pb2.Tier, str]] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("blocks",)
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    blocks: int
    def __init__(self, blocks: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("worker", "model", "block_size", "load", "kv_total_blocks", "kv_host_blocks", "kv_disk_blocks", "events_published", "extra")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    WORKER_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    KV_TOTAL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_HOST_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    KV_DISK_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_PUBLISHED_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    worker: str
    model: str
    block_size: int
    load: _common_pb2.LoadReport
    kv_total_blocks: int
    kv_host_blocks: int
    kv_disk_blocks: int
    events_published: int
    extra: _containers.ScalarMap[str, float]
    def __init__(self, worker: _Optional[str] = ..., model: _Optional[str] = ..., block_size: _Optional[int] = ..., load: _Optional[_Union[_common_pb2.LoadReport, _Mapping]] = ..., kv_total_blocks: _Optional[int] = ..., kv_host_blocks: _Optional[int] = ..., kv_disk_blocks: _Optional[int] = ..., events_published: _Optional[int] = ..., extra: _Optional[_Mapping[str, float]] = ...) -> None: ...
