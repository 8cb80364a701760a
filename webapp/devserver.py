"""Runs several processes as one: prefixed logs, and a clean stop of all on Ctrl-C or a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


def _pump(name: str, width: int, stream, lock: threading.Lock) -> None:
    for line in iter(stream.readline, b""):
        with lock:
            sys.stdout.write(f"{name:<{width}} | {line.decode(errors='replace')}")
            sys.stdout.flush()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def run_together(commands: dict[str, list[str]], cwd: Path, grace: float = 10.0) -> int:
    """Start every command in its own process group; when one ends or we are told to stop,
    ask all to stop (SIGINT: consumers finish or checkpoint), then force what is left."""
    stopping: list[int] = []  # a plain list: an Event's lock is not safe in a signal handler
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: stopping.append(signum))
    lock = threading.Lock()
    width = max(map(len, commands))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs: dict[str, subprocess.Popen] = {}
    for name, argv in commands.items():
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs[name] = proc
        threading.Thread(target=_pump, args=(name, width, proc.stdout, lock), daemon=True).start()
    code = 0
    while not stopping:
        ended = [n for n, p in procs.items() if p.poll() is not None]
        if ended:
            code = procs[ended[0]].returncode or 1
            print(f"{ended[0]} exited with {procs[ended[0]].returncode}; stopping all", flush=True)
            break
        time.sleep(0.2)
    for proc in procs.values():
        _signal_group(proc, signal.SIGINT)
    deadline = time.monotonic() + grace
    for proc in procs.values():
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs.values():
        _signal_group(proc, signal.SIGKILL)  # the whole group: no orphaned worker processes
        proc.wait()
    return code
