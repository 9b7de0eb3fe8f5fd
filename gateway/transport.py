"""Modbus masters over a serial line (RTU) and TCP; the thin I/O shell around meterlink.modbus.

Each call sends one request and waits at most `timeout` for its answer; errors name the port,
unit and timeout. Counters (requests, timeouts, CRC errors, exceptions, bytes) feed diagnostics.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

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
    garbage_bytes: int = 0   # bytes skipped while resynchronising on a valid frame


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

    def _find_frame(self, buf: bytes, req: modbus.Request) -> tuple[int, int, bool]:
        """Scan `buf` for the answer to `req` -> (start, length, saw_bad_crc); start -1 if none yet.

        A candidate starts with our unit and our function (or its exception form) and, for register
        reads, the right byte count; it is accepted only with a good CRC. Everything before it is
        line noise, garbage or a late answer to an earlier request.
        """
        normal = modbus.expected_response_length(req)
        reads = req.function in (modbus.READ_HOLDING_REGISTERS, modbus.READ_INPUT_REGISTERS)
        bad_crc = False
        unit = req.unit
        i = buf.find(bytes([unit]))
        while 0 <= i < len(buf) - 1:
            fc = buf[i + 1]
            length = 5 if fc == req.function | 0x80 else normal if fc == req.function else 0
            if length and not (reads and fc == req.function and len(buf) > i + 2 and buf[i + 2] != 2 * req.count):
                if len(buf) >= i + length:
                    body = buf[i:i + length - 2]
                    if modbus.crc16(body) == buf[i + length - 2] | (buf[i + length - 1] << 8):
                        return i, length, bad_crc
                    bad_crc = True
            i = buf.find(bytes([unit]), i + 1)
        return -1, 0, bad_crc

    def execute(self, req: modbus.Request):
        """Send `req`, return registers/bits/echo; raises DeviceError or ProtocolError.

        Resynchronises on the answer: garbage before it, a late answer to an earlier request or a
        frame with a bad CRC followed by the real one are skipped; a bad CRC with nothing valid
        after it (the line stays quiet) counts as a CRC error.
        """
        frame = modbus.rtu_frame(req.unit, req.pdu())
        self._ser.reset_input_buffer()  # drop line noise and late answers to earlier requests
        self._ser.write(frame)
        self._ser.flush()
        self.counters.requests += 1
        self.counters.bytes_out += len(frame)
        deadline = time.monotonic() + self.timeout
        quiet = max(4 * self.gap_s, 0.05)   # silence after a corrupt frame that ends the wait
        buf = b""
        bad_crc = False
        while True:
            start, length, bad_crc = self._find_frame(buf, req)
            if start >= 0:
                self.counters.bytes_in += len(buf)
                self.counters.garbage_bytes += start
                try:
                    return modbus.parse_rtu_response(req, buf[start:start + length])
                except modbus.ModbusException:
                    self.counters.exceptions += 1
                    raise
                except ProtocolError as exc:
                    raise ProtocolError(f"unit {req.unit} on {self.port}: {exc}") from None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._ser.timeout = min(remaining, quiet) if bad_crc else remaining
            chunk = self._ser.read(max(1, self._ser.in_waiting))
            if not chunk:
                if bad_crc:
                    break  # the line went quiet after a corrupt frame: nothing better is coming
                continue
            buf += chunk
        self.counters.bytes_in += len(buf)
        self.counters.garbage_bytes += len(buf)
        if bad_crc:
            self.counters.crc_errors += 1
            raise ProtocolError(f"unit {req.unit} on {self.port}: bad CRC in the answer "
                                f"({len(buf)} bytes, no valid frame)")
        self.counters.timeouts += 1
        raise DeviceError(f"no complete answer from unit {req.unit} on {self.port} within "
                          f"{self.timeout:g} s (got {len(buf)} bytes)")


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
