"""Modbus RTU (pseudo-terminal) and Modbus TCP servers for simulated meters; wire I/O only.

One server is one bus: several simulated meters (units) may share it, as on a real RS-485 line.
"""

from __future__ import annotations

import os
import select
import socket
import socketserver
import struct
import threading
import time
import tty

from meterlink import modbus
from meterlink.errors import ProtocolError

from .meter import MeterModel


def handle_pdu(meters: dict[int, MeterModel], unit: int, pdu: bytes) -> bytes | None:
    """Answer one request PDU for `unit`; None means the unit stays silent."""
    meter = meters.get(unit)
    if meter is None or not meter.present():
        return None
    fc = pdu[0]
    if meter.faults.exception_code is not None:
        return bytes([fc | 0x80, meter.faults.exception_code])
    if fc in (modbus.READ_HOLDING_REGISTERS, modbus.READ_INPUT_REGISTERS):
        if len(pdu) != 5:
            return bytes([fc | 0x80, 3])
        address, count = struct.unpack(">HH", pdu[1:5])
        if not 1 <= count <= modbus.MAX_READ_REGISTERS or count > meter.profile.max_block:
            return bytes([fc | 0x80, 3])
        wanted = range(address, address + count)
        if meter.refuses(address, count):
            return bytes([fc | 0x80, 2])
        regs = meter.registers(fc)
        # Real meters answer zeros for reserved gaps inside their map, exception 2 outside it.
        lo, hi = (min(regs), max(regs)) if regs else (0, -1)
        if address < lo or address + count - 1 > hi:
            return bytes([fc | 0x80, 2])
        words = [regs.get(a, 0) for a in wanted]
        return bytes([fc, 2 * count]) + struct.pack(f">{count}H", *words)
    relay = meter.profile.relay_coil
    if fc == modbus.READ_COILS and relay is not None:
        address, count = struct.unpack(">HH", pdu[1:5])
        if address != relay or count != 1:
            return bytes([fc | 0x80, 2])
        return bytes([fc, 1, 1 if meter.relay_closed else 0])
    if fc == modbus.WRITE_SINGLE_COIL and relay is not None:
        address, value = struct.unpack(">HH", pdu[1:5])
        if address != relay or value not in (0x0000, 0xFF00):
            return bytes([fc | 0x80, 3 if address == relay else 2])
        meter.set_relay(value == 0xFF00)
        return pdu
    return bytes([fc | 0x80, 1])


class RtuPtyServer:
    """Serves Modbus RTU on the master side of a pty; clients open `client_path`."""

    def __init__(self, meters: dict[int, MeterModel], pace: modbus.SerialLine | None = None) -> None:
        """`pace`: emulate that line's wire time (request + response characters, t3.5 gaps and the
        profile's response delay) before answering, so real timings match a real RS-485 bus."""
        self.meters = meters
        self.pace = pace
        self._master, slave = os.openpty()
        tty.setraw(slave)
        self.client_path = os.ttyname(slave)
        self._slave = slave  # kept open so the pty survives clients closing it
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sim-rtu", daemon=True)
        self.frames_in = 0
        self.bad_frames = 0

    def start(self) -> "RtuPtyServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._thread.is_alive():
            # still sleeping on a slow reply: the thread closes the descriptors itself when it ends,
            # so it can never write to a descriptor number the process has reused meanwhile
            self._closing_left_to_thread = True
            return
        self._close()

    def _close(self) -> None:
        for fd in (self._master, self._slave):
            try:
                os.close(fd)
            except OSError:
                pass

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            if self._stop.is_set() and threading.current_thread() is self._thread and self._stop_waited():
                self._close()

    def _stop_waited(self) -> bool:
        """True when stop() has returned without closing (it gave up waiting for this thread)."""
        return self._stop.is_set() and getattr(self, "_closing_left_to_thread", False)

    def _serve(self) -> None:
        buf = b""
        while not self._stop.is_set():
            ready, _, _ = select.select([self._master], [], [], 0.05)
            if not ready:
                if buf:  # a silent line ends a frame (t3.5): drop an incomplete fragment
                    self.bad_frames += 1
                    buf = b""
                continue
            try:
                buf += os.read(self._master, 512)
            except OSError:
                return
            buf = self._consume(buf)

    def _consume(self, buf: bytes) -> bytes:
        while True:
            need = modbus.rtu_request_length(buf)
            if need is None or len(buf) < need:
                return buf
            frame, rest = buf[:need], buf[need:]
            if modbus.crc16(frame[:-2]) != struct.unpack("<H", frame[-2:])[0]:
                self.bad_frames += 1
                buf = buf[1:]  # resynchronise byte by byte
                continue
            self.frames_in += 1
            buf = rest
            self._answer(frame[0], frame[1:-2])

    def _answer(self, unit: int, pdu: bytes) -> None:
        meter = self.meters.get(unit)
        reply = handle_pdu(self.meters, unit, pdu)
        if reply is None or meter is None:
            return
        out = modbus.rtu_frame(unit, reply)
        f = meter.faults
        meter.answers += 1
        if f.corrupt_crc or (f.corrupt_crc_every and meter.answers % f.corrupt_crc_every == 0):
            out = out[:-1] + bytes([out[-1] ^ 0xFF])
        wait = f.delay_s
        if self.pace is not None:
            wait += (self.pace.char_time_s * (len(pdu) + 3 + len(out)) + 2 * self.pace.gap_s
                     + meter.profile.response_delay_ms / 1000)
        if wait:
            time.sleep(wait)
        if self._stop.is_set():
            return                     # stopping: the client is gone, answer nothing
        os.write(self._master, f.garbage_before + out + f.garbage_after)


class _TcpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        meters = self.server.meters  # type: ignore[attr-defined]
        while True:
            header = _recv(sock, 7)
            if header is None:
                return
            try:
                tid, length, unit = modbus.parse_mbap_header(header)
            except ProtocolError:
                return  # not Modbus: drop the connection
            pdu = _recv(sock, length - 1)
            if pdu is None:
                return
            reply = handle_pdu(meters, unit, pdu)
            if reply is None:
                continue
            meter = meters[unit]
            if meter.faults.delay_s:
                time.sleep(meter.faults.delay_s)
            sock.sendall(modbus.mbap(tid, unit, reply))


def _recv(sock: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    return buf


class TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, meters: dict[int, MeterModel], host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__((host, port), _TcpHandler)
        self.meters = meters
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="sim-tcp", daemon=True)

    @property
    def address(self) -> str:
        host, port = self.server_address[:2]
        return f"{host}:{port}"

    def start(self) -> "TcpServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
