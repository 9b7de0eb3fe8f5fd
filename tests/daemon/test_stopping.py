"""Stopping the long-running commands: the stop flag is safe to set from a signal handler, and a shutdown that
hangs is cut short with every thread's stack on stderr instead of hanging until SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from meterlink.stopping import StopFlag, stop_on_signals


def test_flag_set_by_sigterm_wakes_a_waiting_main_thread():
    old = signal.getsignal(signal.SIGTERM)
    try:
        flag = stop_on_signals(signal.SIGTERM)
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
        assert flag.wait(10) is True
        assert flag.is_set()
    finally:
        signal.signal(signal.SIGTERM, old)
        flag.close()


def test_wait_times_out_when_nobody_sets_the_flag_and_set_from_another_thread_wakes_it():
    flag = StopFlag()
    assert flag.wait(0.01) is False and not flag.is_set()
    threading.Timer(0.05, flag.set).start()
    assert flag.wait(10) is True
    flag.set()                                     # setting twice is harmless
    assert flag.wait(0) is True
    flag.close()


def test_a_signal_storm_never_deadlocks_the_waiter():
    """The handler runs between any two bytecodes of the main thread, including inside wait(); with
    threading.Event this deadlocks on the event's own lock (seen in 4 of 5 runs of this very script with an Event)."""
    code = """
import os, signal, threading, time
from meterlink.stopping import stop_on_signals
flag = stop_on_signals(signal.SIGUSR1)
pid = os.getpid()
def storm():
    for _ in range(5000):
        os.kill(pid, signal.SIGUSR1)
threading.Thread(target=storm).start()
for _ in range(200000):
    flag.wait(0)
print("ok", flag.is_set())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "True"]


def test_a_hung_shutdown_exits_1_with_every_threads_stack_on_stderr():
    code = """
import threading
from meterlink.stopping import bound_shutdown
stuck = threading.Lock(); stuck.acquire()
def db_call_that_never_returns():
    stuck.acquire()
threading.Thread(target=db_call_that_never_returns, name="rpc-worker").start()   # not a daemon: exit would wait
bound_shutdown(0.5)
"""
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Timeout (0:00:00.500000)!" in done.stderr
    assert "db_call_that_never_returns" in done.stderr       # the stuck thread's frame is named
    assert time.monotonic() - started < 30
