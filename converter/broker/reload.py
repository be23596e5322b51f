"""The running secure broker: find its process and make it reread its files.

Guarantees:

* :func:`running_pid` names a process only when the pid file points at a live
  ``mosquitto`` (a stale pid file, or a pid since reused by another program,
  counts as none), so :func:`reload` never signals a stranger;
* :func:`reload` returns once Mosquitto has logged the reload (or after
  ``timeout_s`` with a warning): from then on new connections see the new ACL,
  password and CRL files.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def running_pid(pid_file: Path) -> int | None:
    """The pid of the Mosquitto that wrote ``pid_file``, or None."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _proc_is_mosquitto(pid) else None


def reload(pid_file: Path, *, timeout_s: float = 5.0) -> int | None:
    """SIGHUP the running broker so it rereads ACL, password and CRL files, and wait
    (up to ``timeout_s``) until its log says it did; returns its pid, or None when
    no broker runs."""
    pid = running_pid(pid_file)
    if pid is None:
        return None
    log = _broker_log_file(pid)
    offset = log.stat().st_size if log is not None and log.exists() else 0
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return None
    if log is not None and not _wait_for_log_line(log, offset, RELOADED_LOG_LINE, timeout_s):
        logger.warning("mosquitto pid %s did not log a reload within %.0f s", pid, timeout_s)
    logger.info("reloaded mosquitto pid %s", pid)
    return pid


def _proc_is_mosquitto(pid: int) -> bool:
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0]
    except OSError:
        return False
    return argv0.endswith(b"mosquitto")


RELOADED_LOG_LINE = b"Reloading config."


def _broker_log_file(pid: int) -> Path | None:
    """Mosquitto's log file, from the ``-c CONFIG`` it was started with (``log_dest file``)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        conf = Path(os.fsdecode(argv[argv.index(b"-c") + 1]))
        for line in conf.read_text().splitlines():
            if line.startswith("log_dest file "):
                return Path(line[len("log_dest file ") :].strip())
    except (OSError, ValueError, IndexError):
        return None
    return None


def _wait_for_log_line(log: Path, offset: int, needle: bytes, timeout_s: float) -> bool:
    """Mosquitto logs the reload before it rereads the files and serves no client in
    between (one thread), so once the line is there new connections see the new files."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with open(log, "rb") as f:
                f.seek(offset)
                if needle in f.read():
                    return True
        except OSError:
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
