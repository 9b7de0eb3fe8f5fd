"""A real PostgreSQL for tests: the server on 127.0.0.1:5432 if one answers, else a private one; never mocks.

Usage from a conftest (tests/ is not a package, so load it by path)::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pgserver import pg_database_url, fresh_schema_url, PG_UNAVAILABLE

* `pg_database_url()` -> URL of a uniquely named throwaway database, created once per test process
  (``meterlink_test_<pid>_<random>``) and dropped at exit (``DROP DATABASE ... WITH (FORCE)``).
* `fresh_schema_url()` -> URL of that database with ``search_path`` set to a new empty schema, so
  each test gets an empty database in milliseconds.
* Server: 127.0.0.1:5432, user postgres, trust auth (the machine's server). If none answers, a
  private server is initialised with initdb and started with pg_ctl from /usr/lib/postgresql/*/bin
  in a temporary directory on a free port (as the ``postgres`` OS user when running as root, since
  PostgreSQL refuses to run as root) and stopped at exit. `PG_UNAVAILABLE` is the reason to skip
  when neither is possible (no PostgreSQL binaries), else None.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
from urllib.parse import quote

import psycopg

SYSTEM_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

_lock = threading.Lock()
_state: dict = {}
_schemas = itertools.count(1)


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def _binaries() -> str | None:
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0)
    for d in reversed(dirs):
        if os.path.exists(os.path.join(d, "initdb")) and os.path.exists(os.path.join(d, "pg_ctl")):
            return d
    for name in ("initdb", "pg_ctl"):
        if not shutil.which(name):
            return None
    return os.path.dirname(shutil.which("initdb"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_private(bindir: str) -> str:
    """initdb + pg_ctl start in a temp dir; returns the admin URL; registers the stop at exit."""
    tmp = tempfile.mkdtemp(prefix="meterlink-pg-")
    kwargs: dict = {}
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")          # PostgreSQL refuses to run as root
        os.chown(tmp, user.pw_uid, user.pw_gid)
        kwargs = {"user": user.pw_uid, "group": user.pw_gid}
    data, port = os.path.join(tmp, "data"), _free_port()
    run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True, timeout=120, cwd=tmp, **kwargs)  # noqa: E731
    run(os.path.join(bindir, "initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    run(os.path.join(bindir, "pg_ctl"), "-D", data, "-l", os.path.join(tmp, "log"), "-w", "-t", "60", "-o",
        f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop() -> None:
        subprocess.run([os.path.join(bindir, "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60, cwd=tmp, **kwargs)
        shutil.rmtree(tmp, ignore_errors=True)

    _state["stop_server"] = stop
    return f"postgresql://postgres@127.0.0.1:{port}/postgres"


def _server_url() -> str | None:
    """Admin URL of a running server (starting a private one if needed); None if impossible."""
    if "admin" not in _state:
        if _answers(SYSTEM_URL):
            _state["admin"] = SYSTEM_URL
        else:
            bindir = _binaries()
            _state["admin"] = _start_private(bindir) if bindir else None
    return _state["admin"]


def _unavailable() -> str | None:
    if _answers(SYSTEM_URL) or _binaries():
        return None
    return "no PostgreSQL server on 127.0.0.1:5432 and no initdb/pg_ctl in /usr/lib/postgresql/*/bin or PATH"


PG_UNAVAILABLE = _unavailable()


def pg_database_url() -> str:
    """URL of this test process's throwaway database (created on first use, dropped at exit)."""
    with _lock:
        if "db_url" not in _state:
            admin = _server_url()
            if admin is None:
                raise RuntimeError(PG_UNAVAILABLE or "PostgreSQL unavailable")
            name = f"meterlink_test_{os.getpid()}_{secrets.token_hex(4)}"
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            _state["db_url"] = admin.rsplit("/", 1)[0] + "/" + name
            _state["db_name"] = name
            atexit.register(_cleanup)
        return _state["db_url"]


def fresh_schema_url() -> str:
    """URL whose search_path is a new, empty schema in the throwaway database."""
    base = pg_database_url()
    schema = f"t{next(_schemas)}_{secrets.token_hex(3)}"
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return f"{base}?options={quote(f'-csearch_path={schema}')}"


def _cleanup() -> None:
    name, admin = _state.get("db_name"), _state.get("admin")
    if name and admin:
        try:
            with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.Error:
            pass
    if "stop_server" in _state:
        _state.pop("stop_server")()
