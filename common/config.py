"""TOML configuration loading with errors that name the file, the line and the key; no defaults here."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from .errors import ConfigError


def load_toml(path: str | Path) -> tuple[dict, str]:
    """Read and parse a TOML file -> (data, text); syntax errors name file and line."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", path=str(path)) from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise toml_error(exc, str(path)) from None


def toml_error(exc: tomllib.TOMLDecodeError, path: str) -> ConfigError:
    """A TOML syntax error -> ConfigError naming file and line (Python 3.11 keeps the line only in the text)."""
    text = str(exc)
    m = re.search(r"\(at line (\d+), column (\d+)\)", text)
    msg = text.split(" (at line")[0]
    return ConfigError(f"TOML syntax error: {msg}" + (f" at column {m.group(2)}" if m else ""),
                       path=path, line=int(m.group(1)) if m else getattr(exc, "lineno", None))


def key_line(text: str, dotted_key: str) -> int | None:
    """Best-effort line number of the last component of `dotted_key` in TOML `text`."""
    last = re.sub(r"\[\d+\]", "", dotted_key).rsplit(".", 1)[-1]
    pattern = re.compile(rf"^\s*{re.escape(last)}\s*=", re.M)
    m = pattern.search(text)
    if m is None:  # inside an inline table: `rule = [{ feature = "x" }]`
        m = re.compile(rf"[{{,]\s*{re.escape(last)}\s*=").search(text)
    if m is None:
        header = re.compile(rf"^\s*\[+\s*[\w.]*{re.escape(last)}\s*\]+", re.M).search(text)
        m = header
    return text.count("\n", 0, m.start()) + 1 if m else None


class Section:
    """Typed access to one table of a config file; every error names file, line and dotted key."""

    def __init__(self, data: dict, path: str, text: str, prefix: str = "") -> None:
        self.data, self.path, self.text, self.prefix = data, path, text, prefix

    def _err(self, key: str, message: str) -> ConfigError:
        dotted = f"{self.prefix}{key}"
        return ConfigError(message, path=self.path, line=key_line(self.text, dotted), key=dotted)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                raise self._err(key, "required key is missing")
            return default
        value = self.data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self._err(key, f"must be {names}, got {value!r}")
        return value

    def section(self, key: str, required: bool = True) -> "Section":
        value = self.get(key, dict, ... if required else {})
        return Section(value, self.path, self.text, f"{self.prefix}{key}.")

    def sections(self, key: str) -> list["Section"]:
        value = self.get(key, list, [])
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise self._err(f"{key}[{i}]", "must be a table")
            out.append(Section(item, self.path, self.text, f"{self.prefix}{key}[{i}]."))
        return out

    def check_known(self, known: set[str]) -> None:
        for key in self.data:
            if key not in known:
                raise self._err(key, f"unknown key (known: {', '.join(sorted(known))})")

    def error(self, key: str, message: str) -> ConfigError:
        return self._err(key, message)


def load_section(path: str | Path) -> Section:
    data, text = load_toml(path)
    return Section(data, str(path), text)
