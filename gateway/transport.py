"""Modbus masters over a serial line (RTU) and TCP; the thin I/O shell around meterlink.modbus.

Each call sends one request and waits at most `timeout` for its answer; errors name the port,
unit and timeout. Counters (requests, timeouts, CRC errors, exceptions, bytes) feed diagnostics.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field

import serial

from meterlink import modbus
from meterlink.errors import DeviceError, ProtocolError


@dataclass
class BusCounters:
    requests: int = 0
    timeouts: int = 0
    crc_errors: int = 0
    exceptions: int = 0
    bytes_out: int = 0
    bytes_in: int = 0


class RtuMaster:
    """Modbus RTU master on a serial port (RS-485 adapter or a pty in tests)."""

    def __init__(self, port: str, baud: int = 9600, parity: str = "N", stopbits: int = 1,
                 timeout: float = 1.0) -> None:
        self.port, self.baud, self.parity, self.stopbits, self.timeout = port, baud, parity, stopbits, timeout
        self.counters = BusCounters()
        self.gap_s = modbus.interframe_gap_s(baud, parity, stopbits)
        try:
            self._ser = serial.Serial(port, baudrate=baud, parity=parity.upper(), stopbits=stopbits,
                                      bytesize=8, timeout=timeout)
        except (serial.SerialException, OSError) as exc:
            raise DeviceError(f"cannot open serial port {port}: {exc}") from None

    def close(self) -> None:
        self._ser.close()

    def describe(self) -> str:
        return f"{self.port} ({self.baud} {8}{self.parity.upper()}{self.stopbits})"

    def _read_exact(self, n: int, deadline: float) -> bytes:
        buf = b""
        while len(buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._ser.timeout = remaining
            chunk = self._ser.read(n - len(buf))
            if not chunk:
                break
            buf += chunk
        return buf

    def execute(self, req: modbus.Request):
        """Send `req`, return registers/bits/echo; raises DeviceError or ProtocolError."""
        frame = modbus.rtu_frame(req.unit, req.pdu())
        self._ser.reset_input_buffer()  # drop line noise and late answers to earlier requests
        self._ser.write(frame)
        self._ser.flush()
        self.counters.requests += 1
        self.counters.bytes_out += len(frame)
        deadline = time.monotonic() + self.timeout
        head = self._read_exact(2, deadline)
        if len(head) == 2 and head[1] & 0x80:
            rest = self._read_exact(3, deadline)
        else:
            rest = self._read_exact(modbus.expected_response_length(req) - len(head), deadline) if head else b""
        answer = head + rest
        self.counters.bytes_in += len(answer)
        if not answer or len(answer) < (5 if len(head) == 2 and head[1] & 0x80 else modbus.expected_response_length(req)):
            self.counters.timeouts += 1
            time.sleep(self.gap_s)
            raise DeviceError(f"no complete answer from unit {req.unit} on {self.port} within "
                              f"{self.timeout:g} s (got {len(answer)} bytes)")
        try:
            return modbus.parse_rtu_response(req, answer)
        except modbus.ModbusException:
            self.counters.exceptions += 1
            raise
        except ProtocolError as exc:
            if "CRC" in str(exc):
                self.counters.crc_errors += 1
            raise ProtocolError(f"unit {req.unit} on {self.port}: {exc}") from None


class TcpMaster:
    """Modbus TCP master (MBAP framing); one connection, re-opened after an error."""

    def __init__(self, host: str, port: int, timeout: float = 1.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.counters = BusCounters()
        self._sock: socket.socket | None = None
        self._tid = 0

    def describe(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    def _connect(self) -> socket.socket:
        if self._sock is None:
            try:
                self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            except OSError as exc:
                raise DeviceError(f"cannot connect to {self.describe()} within {self.timeout:g} s: "
                                  f"{exc.strerror or exc}") from None
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _recv_exact(self, sock: socket.socket, n: int, unit: int) -> bytes:
        buf = b""
        while len(buf) < n:
            try:
                chunk = sock.recv(n - len(buf))
            except socket.timeout:
                self.counters.timeouts += 1
                self.close()
                raise DeviceError(f"no answer from unit {unit} at {self.describe()} within "
                                  f"{self.timeout:g} s") from None
            if not chunk:
                self.close()
                raise DeviceError(f"{self.describe()} closed the connection (unit {unit})")
            buf += chunk
        return buf

    def execute(self, req: modbus.Request):
        sock = self._connect()
        self._tid = (self._tid + 1) & 0xFFFF
        frame = modbus.mbap(self._tid, req.unit, req.pdu())
        try:
            sock.sendall(frame)
        except OSError as exc:
            self.close()
            raise DeviceError(f"send to {self.describe()} failed: {exc}") from None
        self.counters.requests += 1
        self.counters.bytes_out += len(frame)
        while True:
            header = self._recv_exact(sock, 7, req.unit)
            tid, length, unit = modbus.parse_mbap_header(header)
            pdu = self._recv_exact(sock, length - 1, req.unit)
            self.counters.bytes_in += 7 + len(pdu)
            if tid == self._tid:
                break  # answers to earlier, timed-out transactions are skipped
        if unit != req.unit:
            raise ProtocolError(f"answer from unit {unit}, expected {req.unit} at {self.describe()}")
        try:
            return modbus.parse_response_pdu(req, pdu)
        except modbus.ModbusException:
            self.counters.exceptions += 1
            raise


def open_master(port: str, *, baud: int = 9600, parity: str = "N", stopbits: int = 1,
                timeout: float = 1.0):
    """'tcp://HOST:PORT' -> TcpMaster, anything else is a serial device path -> RtuMaster."""
    if port.startswith("tcp://"):
        hostport = port[len("tcp://"):]
        host, sep, p = hostport.rpartition(":")
        if not sep or not p.isdigit():
            raise DeviceError(f"bad TCP address {port!r}: expected tcp://HOST:PORT")
        return TcpMaster(host.strip("[]"), int(p), timeout)
    return RtuMaster(port, baud, parity, stopbits, timeout)
