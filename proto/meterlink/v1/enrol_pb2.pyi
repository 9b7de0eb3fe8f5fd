from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class AccessRefusal(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCESS_REFUSAL_UNSPECIFIED: _ClassVar[AccessRefusal]
    ACCESS_REFUSAL_NO_CLIENT_CERTIFICATE: _ClassVar[AccessRefusal]
    ACCESS_REFUSAL_UNKNOWN_GATEWAY: _ClassVar[AccessRefusal]
    ACCESS_REFUSAL_GATEWAY_REVOKED: _ClassVar[AccessRefusal]
    ACCESS_REFUSAL_CERTIFICATE_SUPERSEDED: _ClassVar[AccessRefusal]
    ACCESS_REFUSAL_IDENTITY_MISMATCH: _ClassVar[AccessRefusal]
    ACCESS_REFUSAL_METER_NOT_PROVISIONED: _ClassVar[AccessRefusal]
ACCESS_REFUSAL_UNSPECIFIED: AccessRefusal
ACCESS_REFUSAL_NO_CLIENT_CERTIFICATE: AccessRefusal
ACCESS_REFUSAL_UNKNOWN_GATEWAY: AccessRefusal
ACCESS_REFUSAL_GATEWAY_REVOKED: AccessRefusal
ACCESS_REFUSAL_CERTIFICATE_SUPERSEDED: AccessRefusal
ACCESS_REFUSAL_IDENTITY_MISMATCH: AccessRefusal
ACCESS_REFUSAL_METER_NOT_PROVISIONED: AccessRefusal

class EnrollRequest(_message.Message):
    __slots__ = ("code", "csr_der", "signing_public_key", "signing_proof")
    CODE_FIELD_NUMBER: _ClassVar[int]
    CSR_DER_FIELD_NUMBER: _ClassVar[int]
    SIGNING_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNING_PROOF_FIELD_NUMBER: _ClassVar[int]
    code: str
    csr_der: bytes
    signing_public_key: bytes
    signing_proof: bytes
    def __init__(self, code: _Optional[str] = ..., csr_der: _Optional[bytes] = ..., signing_public_key: _Optional[bytes] = ..., signing_proof: _Optional[bytes] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("gateway_id", "certificate_pem", "ca_certificate_pem", "headend_signing_key")
    GATEWAY_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CA_CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    HEADEND_SIGNING_KEY_FIELD_NUMBER: _ClassVar[int]
    gateway_id: str
    certificate_pem: bytes
    ca_certificate_pem: bytes
    headend_signing_key: bytes
    def __init__(self, gateway_id: _Optional[str] = ..., certificate_pem: _Optional[bytes] = ..., ca_certificate_pem: _Optional[bytes] = ..., headend_signing_key: _Optional[bytes] = ...) -> None: ...
