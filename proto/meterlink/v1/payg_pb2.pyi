from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RequestType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REQUEST_TYPE_UNSPECIFIED: _ClassVar[RequestType]
    REQUEST_TYPE_INITIAL: _ClassVar[RequestType]
    REQUEST_TYPE_UPDATE: _ClassVar[RequestType]
    REQUEST_TYPE_TERMINATION: _ClassVar[RequestType]

class FinalUnitAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINAL_UNIT_ACTION_NONE: _ClassVar[FinalUnitAction]
    FINAL_UNIT_ACTION_TERMINATE: _ClassVar[FinalUnitAction]
    FINAL_UNIT_ACTION_REDIRECT: _ClassVar[FinalUnitAction]
    FINAL_UNIT_ACTION_RESTRICT_ACCESS: _ClassVar[FinalUnitAction]
REQUEST_TYPE_UNSPECIFIED: RequestType
REQUEST_TYPE_INITIAL: RequestType
REQUEST_TYPE_UPDATE: RequestType
REQUEST_TYPE_TERMINATION: RequestType
FINAL_UNIT_ACTION_NONE: FinalUnitAction
FINAL_UNIT_ACTION_TERMINATE: FinalUnitAction
FINAL_UNIT_ACTION_REDIRECT: FinalUnitAction
FINAL_UNIT_ACTION_RESTRICT_ACCESS: FinalUnitAction

class AppliedTopUp(_message.Message):
    __slots__ = ("reference", "amount_minor")
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    reference: str
    amount_minor: int
    def __init__(self, reference: _Optional[str] = ..., amount_minor: _Optional[int] = ...) -> None: ...

class UsedUnits(_message.Message):
    __slots__ = ("used_minor", "used_wh", "from_emergency_minor", "to_debt_minor", "repaid_debt_minor", "repaid_emergency_minor", "recovered_arrears_minor", "top_ups", "standing_minor", "standing_days", "standing_from_emergency_minor", "standing_to_debt_minor", "standing_first_day", "standing_last_day", "import_wh_from", "import_wh_to")
    USED_MINOR_FIELD_NUMBER: _ClassVar[int]
    USED_WH_FIELD_NUMBER: _ClassVar[int]
    FROM_EMERGENCY_MINOR_FIELD_NUMBER: _ClassVar[int]
    TO_DEBT_MINOR_FIELD_NUMBER: _ClassVar[int]
    REPAID_DEBT_MINOR_FIELD_NUMBER: _ClassVar[int]
    REPAID_EMERGENCY_MINOR_FIELD_NUMBER: _ClassVar[int]
    RECOVERED_ARREARS_MINOR_FIELD_NUMBER: _ClassVar[int]
    TOP_UPS_FIELD_NUMBER: _ClassVar[int]
    STANDING_MINOR_FIELD_NUMBER: _ClassVar[int]
    STANDING_DAYS_FIELD_NUMBER: _ClassVar[int]
    STANDING_FROM_EMERGENCY_MINOR_FIELD_NUMBER: _ClassVar[int]
    STANDING_TO_DEBT_MINOR_FIELD_NUMBER: _ClassVar[int]
    STANDING_FIRST_DAY_FIELD_NUMBER: _ClassVar[int]
    STANDING_LAST_DAY_FIELD_NUMBER: _ClassVar[int]
    IMPORT_WH_FROM_FIELD_NUMBER: _ClassVar[int]
    IMPORT_WH_TO_FIELD_NUMBER: _ClassVar[int]
    used_minor: int
    used_wh: int
    from_emergency_minor: int
    to_debt_minor: int
    repaid_debt_minor: int
    repaid_emergency_minor: int
    recovered_arrears_minor: int
    top_ups: _containers.RepeatedCompositeFieldContainer[AppliedTopUp]
    standing_minor: int
    standing_days: int
    standing_from_emergency_minor: int
    standing_to_debt_minor: int
    standing_first_day: str
    standing_last_day: str
    import_wh_from: int
    import_wh_to: int
    def __init__(self, used_minor: _Optional[int] = ..., used_wh: _Optional[int] = ..., from_emergency_minor: _Optional[int] = ..., to_debt_minor: _Optional[int] = ..., repaid_debt_minor: _Optional[int] = ..., repaid_emergency_minor: _Optional[int] = ..., recovered_arrears_minor: _Optional[int] = ..., top_ups: _Optional[_Iterable[_Union[AppliedTopUp, _Mapping]]] = ..., standing_minor: _Optional[int] = ..., standing_days: _Optional[int] = ..., standing_from_emergency_minor: _Optional[int] = ..., standing_to_debt_minor: _Optional[int] = ..., standing_first_day: _Optional[str] = ..., standing_last_day: _Optional[str] = ..., import_wh_from: _Optional[int] = ..., import_wh_to: _Optional[int] = ...) -> None: ...

class CreditControlRequest(_message.Message):
    __slots__ = ("gateway_id", "session_id", "request_number", "account_id", "meter_id", "currency", "used", "gateway_at_ms", "card_lists_digest", "request_type")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_NUMBER_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    METER_ID_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_AT_MS_FIELD_NUMBER: _ClassVar[int]
    CARD_LISTS_DIGEST_FIELD_NUMBER: _ClassVar[int]
    REQUEST_TYPE_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    session_id: str
    request_number: int
    account_id: str
    meter_id: str
    currency: str
    used: UsedUnits
    gateway_at_ms: int
    card_lists_digest: bytes
    request_type: RequestType
    def __init__(self, gateway_id: _Optional[str] = ..., session_id: _Optional[str] = ..., request_number: _Optional[int] = ..., account_id: _Optional[str] = ..., meter_id: _Optional[str] = ..., currency: _Optional[str] = ..., used: _Optional[_Union[UsedUnits, _Mapping]] = ..., gateway_at_ms: _Optional[int] = ..., card_lists_digest: _Optional[bytes] = ..., request_type: _Optional[_Union[RequestType, str]] = ...) -> None: ...

class GrantedUnits(_message.Message):
    __slots__ = ("amount_minor", "wh", "has_wh", "validity_time_s", "issued_at_ms", "expires_at_ms")
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    WH_FIELD_NUMBER: _ClassVar[int]
    HAS_WH_FIELD_NUMBER: _ClassVar[int]
    VALIDITY_TIME_S_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    amount_minor: int
    wh: int
    has_wh: bool
    validity_time_s: int
    issued_at_ms: int
    expires_at_ms: int
    def __init__(self, amount_minor: _Optional[int] = ..., wh: _Optional[int] = ..., has_wh: _Optional[bool] = ..., validity_time_s: _Optional[int] = ..., issued_at_ms: _Optional[int] = ..., expires_at_ms: _Optional[int] = ...) -> None: ...

class CreditControlAnswer(_message.Message):
    __slots__ = ("session_id", "request_number", "result_code", "granted", "final_unit_action", "detail", "tokens", "balance_minor", "card_list", "blacklist", "arrears_minor", "books_standing_charges", "refusal")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_NUMBER_FIELD_NUMBER: _ClassVar[int]
    RESULT_CODE_FIELD_NUMBER: _ClassVar[int]
    GRANTED_FIELD_NUMBER: _ClassVar[int]
    FINAL_UNIT_ACTION_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BALANCE_MINOR_FIELD_NUMBER: _ClassVar[int]
    CARD_LIST_FIELD_NUMBER: _ClassVar[int]
    BLACKLIST_FIELD_NUMBER: _ClassVar[int]
    ARREARS_MINOR_FIELD_NUMBER: _ClassVar[int]
    BOOKS_STANDING_CHARGES_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    request_number: int
    result_code: int
    granted: GrantedUnits
    final_unit_action: FinalUnitAction
    detail: str
    tokens: _containers.RepeatedScalarFieldContainer[str]
    balance_minor: int
    card_list: str
    blacklist: str
    arrears_minor: int
    books_standing_charges: bool
    refusal: str
    def __init__(self, session_id: _Optional[str] = ..., request_number: _Optional[int] = ..., result_code: _Optional[int] = ..., granted: _Optional[_Union[GrantedUnits, _Mapping]] = ..., final_unit_action: _Optional[_Union[FinalUnitAction, str]] = ..., detail: _Optional[str] = ..., tokens: _Optional[_Iterable[str]] = ..., balance_minor: _Optional[int] = ..., card_list: _Optional[str] = ..., blacklist: _Optional[str] = ..., arrears_minor: _Optional[int] = ..., books_standing_charges: _Optional[bool] = ..., refusal: _Optional[str] = ...) -> None: ...

class ChallengeRequest(_message.Message):
    __slots__ = ("vendor_id",)
    VENDOR_ID_FIELD_NUMBER: _ClassVar[int]
    vendor_id: str
    def __init__(self, vendor_id: _Optional[str] = ...) -> None: ...

class ChallengeReply(_message.Message):
    __slots__ = ("challenge",)
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    challenge: bytes
    def __init__(self, challenge: _Optional[bytes] = ...) -> None: ...

class AuthoriseRequest(_message.Message):
    __slots__ = ("vendor_id", "sale_id", "card_id", "account_id", "amount_minor", "currency", "challenge", "card_signature", "meter_id")
    VENDOR_ID_FIELD_NUMBER: _ClassVar[int]
    SALE_ID_FIELD_NUMBER: _ClassVar[int]
    CARD_ID_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_MINOR_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    CARD_SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    METER_ID_FIELD_NUMBER: _ClassVar[int]
    vendor_id: str
    sale_id: str
    card_id: str
    account_id: str
    amount_minor: int
    currency: str
    challenge: bytes
    card_signature: bytes
    meter_id: str
    def __init__(self, vendor_id: _Optional[str] = ..., sale_id: _Optional[str] = ..., card_id: _Optional[str] = ..., account_id: _Optional[str] = ..., amount_minor: _Optional[int] = ..., currency: _Optional[str] = ..., challenge: _Optional[bytes] = ..., card_signature: _Optional[bytes] = ..., meter_id: _Optional[str] = ...) -> None: ...

class AuthoriseReply(_message.Message):
    __slots__ = ("authorised", "reason", "detail", "commission_minor", "vat_on_commission_minor", "token")
    AUTHORISED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    COMMISSION_MINOR_FIELD_NUMBER: _ClassVar[int]
    VAT_ON_COMMISSION_MINOR_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    authorised: bool
    reason: str
    detail: str
    commission_minor: int
    vat_on_commission_minor: int
    token: str
    def __init__(self, authorised: _Optional[bool] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., commission_minor: _Optional[int] = ..., vat_on_commission_minor: _Optional[int] = ..., token: _Optional[str] = ...) -> None: ...

class ReverseRequest(_message.Message):
    __slots__ = ("vendor_id", "sale_id", "reversal_id", "reason")
    VENDOR_ID_FIELD_NUMBER: _ClassVar[int]
    SALE_ID_FIELD_NUMBER: _ClassVar[int]
    REVERSAL_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    vendor_id: str
    sale_id: str
    reversal_id: str
    reason: str
    def __init__(self, vendor_id: _Optional[str] = ..., sale_id: _Optional[str] = ..., reversal_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReverseReply(_message.Message):
    __slots__ = ("reversed", "reason", "detail")
    REVERSED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    reversed: bool
    reason: str
    detail: str
    def __init__(self, reversed: _Optional[bool] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...
