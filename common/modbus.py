"""Modbus RTU and TCP framing (application data units), pure bytes in / bytes out, no I/O.

Shared by the gateway's master and the simulator's slave. Independent peers (mbpoll, pymodbus)
check both sides in the tests, so the two cannot silently share a framing bug.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .errors import ProtocolError

READ_COILS = 1
READ_DISCRETE_INPUTS = 2
READ_HOLDING_REGISTERS = 3
READ_INPUT_REGISTERS = 4
WRITE_SINGLE_COIL = 5
WRITE_SINGLE_REGISTER = 6
WRITE_MULTIPLE_REGISTERS = 16

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    11: "gateway target device failed to respond",
}

MAX_READ_REGISTERS = 125  # protocol limit for FC 3/4 (253-byte PDU)


def _crc_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc_table()


def crc16(data: bytes, init: int = 0xFFFF) -> int:
    """CRC-16/MODBUS (poly 0xA001 reflected, init 0xFFFF); transmitted low byte first.

    `init=0` gives CRC-16/ARC (same polynomial and table), the checksum of DSMR P1 telegrams."""
    crc = init
    for b in data:
        crc = (crc >> 8) ^ _CRC_TABLE[(crc ^ b) & 0xFF]
    return crc


def rtu_frame(unit: int, pdu: bytes) -> bytes:
    body = bytes([unit]) + pdu
    return body + struct.pack("<H", crc16(body))


class ModbusException(ProtocolError):
    """The device answered with a Modbus exception response."""

    def __init__(self, function: int, code: int) -> None:
        self.function, self.code = function, code
        super().__init__(f"exception {code} ({EXCEPTION_NAMES.get(code, 'unknown')}) to function {function}")


@dataclass(frozen=True)
class Request:
    unit: int
    function: int
    address: int
    count: int = 0          # registers/coils to read
    value: int = 0          # for single writes

    def pdu(self) -> bytes:
        if self.function in (READ_COILS, READ_DISCRETE_INPUTS, READ_HOLDING_REGISTERS, READ_INPUT_REGISTERS):
            return struct.pack(">BHH", self.function, self.address, self.count)
        if self.function in (WRITE_SINGLE_COIL, WRITE_SINGLE_REGISTER):
            return struct.pack(">BHH", self.function, self.address, self.value)
        raise ValueError(f"unsupported function {self.function}")


def read_request(unit: int, function: int, address: int, count: int) -> Request:
    if not 1 <= unit <= 247:
        raise ValueError(f"unit {unit} outside 1..247")
    if function in (READ_HOLDING_REGISTERS, READ_INPUT_REGISTERS) and not 1 <= count <= MAX_READ_REGISTERS:
        raise ValueError(f"register count {count} outside 1..{MAX_READ_REGISTERS}")
    if not 0 <= address <= 0xFFFF or address + count > 0x10000:
        raise ValueError(f"address range {address:#06x}+{count} outside the 16-bit space")
    return Request(unit, function, address, count)


def expected_response_length(req: Request) -> int:
    """Length of a normal RTU response to `req` (unit..CRC)."""
    if req.function in (READ_HOLDING_REGISTERS, READ_INPUT_REGISTERS):
        return 5 + 2 * req.count
    if req.function in (READ_COILS, READ_DISCRETE_INPUTS):
        return 5 + (req.count + 7) // 8
    return 8  # echo of a single write


def parse_response_pdu(req: Request, pdu: bytes) -> list[int] | int:
    """Validate a response PDU against its request; return registers, coil bits or the echoed value."""
    if not pdu:
        raise ProtocolError("empty response PDU")
    fc = pdu[0]
    if fc == req.function | 0x80:
        if len(pdu) < 2:
            raise ProtocolError("truncated exception response")
        raise ModbusException(req.function, pdu[1])
    if fc != req.function:
        raise ProtocolError(f"response function {fc} does not match request function {req.function}")
    if req.function in (READ_HOLDING_REGISTERS, READ_INPUT_REGISTERS):
        if len(pdu) < 2 or pdu[1] != 2 * req.count or len(pdu) != 2 + 2 * req.count:
            raise ProtocolError(f"byte count {pdu[1] if len(pdu) > 1 else '?'} does not match "
                                f"{req.count} registers requested")
        return list(struct.unpack(f">{req.count}H", pdu[2:]))
    if req.function in (READ_COILS, READ_DISCRETE_INPUTS):
        n = (req.count + 7) // 8
        if len(pdu) != 2 + n or pdu[1] != n:
            raise ProtocolError("coil byte count does not match request")
        bits = []
        for i in range(req.count):
            bits.append((pdu[2 + i // 8] >> (i % 8)) & 1)
        return bits
    if req.function in (WRITE_SINGLE_COIL, WRITE_SINGLE_REGISTER):
        if pdu != req.pdu():
            raise ProtocolError("write response does not echo the request")
        return req.value
    raise ProtocolError(f"unsupported function {fc}")


def parse_rtu_response(req: Request, frame: bytes) -> list[int] | int:
    """Check unit, CRC and shape of an RTU response frame."""
    if len(frame) < 5:
        raise ProtocolError(f"truncated RTU frame ({len(frame)} bytes)")
    body, crc = frame[:-2], struct.unpack("<H", frame[-2:])[0]
    if crc16(body) != crc:
        raise ProtocolError(f"bad CRC: frame says {crc:#06x}, computed {crc16(body):#06x}")
    if body[0] != req.unit:
        raise ProtocolError(f"response from unit {body[0]}, expected unit {req.unit}")
    return parse_response_pdu(req, body[1:])


def rtu_request_length(head: bytes) -> int | None:
    """Given the first bytes of a request frame, its full length (None if not yet known)."""
    if len(head) < 2:
        return None
    fc = head[1]
    if fc in (1, 2, 3, 4, 5, 6):
        return 8
    if fc in (15, 16):
        return 9 + head[6] if len(head) >= 7 else None
    return 8  # unknown function: assume the common 8-byte shape; the slave answers exception 1


def mbap(transaction: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", transaction & 0xFFFF, 0, len(pdu) + 1, unit) + pdu


def parse_mbap_header(header: bytes) -> tuple[int, int, int]:
    """-> (transaction id, remaining length incl. unit, unit)."""
    if len(header) != 7:
        raise ProtocolError("truncated MBAP header")
    tid, proto, length, unit = struct.unpack(">HHHB", header)
    if proto != 0:
        raise ProtocolError(f"MBAP protocol id {proto} is not Modbus (0)")
    if not 2 <= length <= 254:
        raise ProtocolError(f"MBAP length {length} out of range")
    return tid, length, unit


def char_time_s(baud: int, parity: str = "N", stopbits: int = 1, bytesize: int = 8) -> float:
    """Seconds to transmit one character (start + data + parity + stop bits)."""
    bits = 1 + bytesize + (0 if parity.upper() == "N" else 1) + stopbits
    return bits / baud


def interframe_gap_s(baud: int, parity: str = "N", stopbits: int = 1) -> float:
    """t3.5: 3.5 character times, fixed at 1.75 ms above 19200 baud (Modbus over serial line §2.5.1.1)."""
    if baud > 19200:
        return 0.00175
    return 3.5 * char_time_s(baud, parity, stopbits)


@dataclass(frozen=True)
class SerialLine:
    """The character framing of one RS-485 line: what the wire-time model needs to know."""

    baud: int = 9600
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8

    def __post_init__(self) -> None:
        if self.baud <= 0:
            raise ValueError(f"baud rate {self.baud} must be positive")
        if self.parity.upper() not in ("N", "E", "O"):
            raise ValueError(f"parity {self.parity!r} must be N, E or O")
        if self.stopbits not in (1, 2):
            raise ValueError(f"stop bits {self.stopbits} must be 1 or 2")

    @property
    def char_time_s(self) -> float:
        return char_time_s(self.baud, self.parity, self.stopbits, self.bytesize)

    @property
    def gap_s(self) -> float:
        return interframe_gap_s(self.baud, self.parity, self.stopbits)

    def describe(self) -> str:
        return f"{self.baud} {self.bytesize}{self.parity.upper()}{self.stopbits}"
