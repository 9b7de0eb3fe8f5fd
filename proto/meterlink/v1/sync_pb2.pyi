from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Refusal(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFUSAL_NONE: _ClassVar[Refusal]
    REFUSAL_ALTERED: _ClassVar[Refusal]
    REFUSAL_REORDERED: _ClassVar[Refusal]
    REFUSAL_GAP: _ClassVar[Refusal]
    REFUSAL_REPLAY: _ClassVar[Refusal]
    REFUSAL_BAD_SIGNATURE: _ClassVar[Refusal]
    REFUSAL_UNKNOWN_GATEWAY: _ClassVar[Refusal]
    REFUSAL_MALFORMED: _ClassVar[Refusal]
REFUSAL_NONE: Refusal
REFUSAL_ALTERED: Refusal
REFUSAL_REORDERED: Refusal
REFUSAL_GAP: Refusal
REFUSAL_REPLAY: Refusal
REFUSAL_BAD_SIGNATURE: Refusal
REFUSAL_UNKNOWN_GATEWAY: Refusal
REFUSAL_MALFORMED: Refusal

class Reading(_message.Message):
    __slots__ = ("meter_id", "obis", "taken_at_ms", "value", "unit", "quality")
    METER_ID_FIELD_NUMBER: _ClassVar[int]
    OBIS_FIELD_NUMBER: _ClassVar[int]
    TAKEN_AT_MS_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    meter_id: str
    obis: str
    taken_at_ms: int
    value: int
    unit: str
    quality: int
    def __init__(self, meter_id: _Optional[str] = ..., obis: _Optional[str] = ..., taken_at_ms: _Optional[int] = ..., value: _Optional[int] = ..., unit: _Optional[str] = ..., quality: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("kind", "meter_id", "at_ms", "payload")
    KIND_FIELD_NUMBER: _ClassVar[int]
    METER_ID_FIELD_NUMBER: _ClassVar[int]
    AT_MS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    kind: str
    meter_id: str
    at_ms: int
    payload: bytes
    def __init__(self, kind: _Optional[str] = ..., meter_id: _Optional[str] = ..., at_ms: _Optional[int] = ..., payload: _Optional[bytes] = ...) -> None: ...

class Tombstone(_message.Message):
    __slots__ = ("first_seq", "record_hash")
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    RECORD_HASH_FIELD_NUMBER: _ClassVar[int]
    first_seq: int
    record_hash: bytes
    def __init__(self, first_seq: _Optional[int] = ..., record_hash: _Optional[bytes] = ...) -> None: ...

class Record(_message.Message):
    __slots__ = ("seq", "prev_hash", "reading", "event", "tombstone")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    READING_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    TOMBSTONE_FIELD_NUMBER: _ClassVar[int]
    seq: int
    prev_hash: bytes
    reading: Reading
    event: Event
    tombstone: Tombstone
    def __init__(self, seq: _Optional[int] = ..., prev_hash: _Optional[bytes] = ..., reading: _Optional[_Union[Reading, _Mapping]] = ..., event: _Optional[_Union[Event, _Mapping]] = ..., tombstone: _Optional[_Union[Tombstone, _Mapping]] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("gateway_id", "records", "chain_records", "head_signature", "head_hash")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    CHAIN_RECORDS_FIELD_NUMBER: _ClassVar[int]
    HEAD_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    records: _containers.RepeatedCompositeFieldContainer[Record]
    chain_records: _containers.RepeatedScalarFieldContainer[bytes]
    head_signature: bytes
    head_hash: bytes
    def __init__(self, gateway_id: _Optional[str] = ..., records: _Optional[_Iterable[_Union[Record, _Mapping]]] = ..., chain_records: _Optional[_Iterable[bytes]] = ..., head_signature: _Optional[bytes] = ..., head_hash: _Optional[bytes] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("acked_seq", "accepted", "duplicates", "refused", "detail")
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    REFUSED_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    acked_seq: int
    accepted: int
    duplicates: int
    refused: Refusal
    detail: str
    def __init__(self, acked_seq: _Optional[int] = ..., accepted: _Optional[int] = ..., duplicates: _Optional[int] = ..., refused: _Optional[_Union[Refusal, str]] = ..., detail: _Optional[str] = ...) -> None: ...
