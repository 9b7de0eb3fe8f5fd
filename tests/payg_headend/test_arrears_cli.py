"""`meterlink-headend arrears register|show` and `balances verify|rebuild`: the operator's commands over the
PAYG store (SQLite file)."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone

from meterlink.headend import payg_store as S
from meterlink.headend.cli import main as headend_main


def run(argv, capsys) -> tuple[int, str, str]:
    rc = headend_main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_arrears_register_once_per_reference_and_show(tmp_path, capsys):
    db = f"sqlite:///{tmp_path}/headend.db"
    store = S.PaygStore(db)
    store.put_account("ACC1", "GBP", max_balance_minor=100_000)
    store.close()
    base = ["--database", db, "--config", str(tmp_path / "none.toml"), "--at", "2026-03-09T12:00:00Z"]
    reg = ["arrears", "register", "--account", "ACC1", "--reference", "OLD-1", "--amount-minor", "1000",
           "--reason", "previous supply", *base]
    rc, out, _ = run(reg, capsys)
    assert rc == 0 and "arrears outstanding 1000 GBP" in out
    rc, out, _ = run(reg, capsys)                                   # the same reference books once
    assert rc == 0 and "arrears outstanding 1000 GBP" in out
    rc, _, err = run([*reg[:7], "999", *reg[8:]], capsys)           # same reference, other amount
    assert rc == 2 and "arrears:ACC1:OLD-1" in err
    rc, out, _ = run(["arrears", "show", "--account", "ACC1", *base], capsys)
    assert rc == 0 and "arrears outstanding 1000 GBP" in out
    rc, _, err = run(["arrears", "show", "--account", "NOPE", *base], capsys)
    assert rc == 2 and "account NOPE is not a PAYG account" in err
    rc, _, err = run([*reg[:7], "0", *reg[8:]], capsys)
    assert rc == 2 and "must be > 0" in err


def test_balances_verify_finds_a_tampered_running_balance_and_rebuild_repairs_it(tmp_path, capsys):
    db = f"sqlite:///{tmp_path}/headend.db"
    store = S.PaygStore(db)
    store.put_account("ACC1", "GBP", max_balance_minor=100_000)
    store.register_arrears("ACC1", "R1", 500, datetime(2026, 3, 9, tzinfo=timezone.utc), "previous supply")
    store.close()
    base = ["--database", db, "--config", str(tmp_path / "none.toml")]
    rc, out, _ = run(["balances", "verify", *base], capsys)
    assert rc == 0 and "all equal to the sum of their postings" in out
    with sqlite3.connect(tmp_path / "headend.db") as raw:
        assert raw.execute("UPDATE payg_balance SET balance_minor = balance_minor + 1").rowcount >= 1
    rc, out, _ = run(["balances", "verify", *base], capsys)
    assert rc == 1 and "MISMATCH customer:" in out
    assert run(["balances", "rebuild", *base], capsys)[0] == 0
    assert run(["balances", "verify", *base], capsys)[0] == 0
