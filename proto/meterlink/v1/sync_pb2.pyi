from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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

class Record(_message.Message):
    __slots__ = ("seq", "prev_hash", "reading")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    READING_FIELD_NUMBER: _ClassVar[int]
    seq: int
    prev_hash: bytes
    reading: Reading
    def __init__(self, seq: _Optional[int] = ..., prev_hash: _Optional[bytes] = ..., reading: _Optional[_Union[Reading, _Mapping]] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("gateway_id", "records", "head_signature")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    HEAD_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    records: _containers.RepeatedCompositeFieldContainer[Record]
    head_signature: bytes
    def __init__(self, gateway_id: _Optional[str] = ..., records: _Optional[_Iterable[_Union[Record, _Mapping]]] = ..., head_signature: _Optional[bytes] = ...) -> None: ...

class PushAck(_message.Message):
    __slots__ = ("acked_seq", "accepted", "duplicates")
    ACKED_SEQ_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_FIELD_NUMBER: _ClassVar[int]
    acked_seq: int
    accepted: int
    duplicates: int
    def __init__(self, acked_seq: _Optional[int] = ..., accepted: _Optional[int] = ..., duplicates: _Optional[int] = ...) -> None: ...
