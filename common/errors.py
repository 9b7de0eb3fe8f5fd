"""The error hierarchy shared by both sides; every message names the offending thing."""

from __future__ import annotations


class MeterlinkError(Exception):
    """Base of every error meterlink raises on purpose (CLIs turn these into exit status 2)."""


class ConfigError(MeterlinkError):
    """A configuration or data file is unusable; the message names file, line and key."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 key: str | None = None) -> None:
        where = []
        if path:
            where.append(str(path) + (f":{line}" if line else ""))
        if key:
            where.append(f"key '{key}'")
        super().__init__(f"{' '.join(where)}: {message}" if where else message)
        self.path, self.line, self.key = path, line, key


class ProtocolError(MeterlinkError):
    """Bytes on a wire that do not form a valid frame/telegram (bad CRC, truncated, garbage)."""


class DeviceError(MeterlinkError):
    """A device did not answer, or answered with an exception."""


class ValidationError(MeterlinkError):
    """Input data that is well formed but not acceptable (unknown meter, bad value, ...)."""
