"""The command lines as a user runs them: each command its own process.

:func:`run` runs ``litefleet``/``litefleet-agent`` (through ``python -m``, the same entry
points as the console scripts) to completion; :class:`Background` starts a long-running
one (a broker, an agent) and collects its output lines, so a test can wait for a line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# what `litefleet` and `litefleet-agent` are, for a process started here
PROGRAMS = {
    "litefleet": [sys.executable, "-m", "converter"],
    "litefleet-agent": [sys.executable, "-m", "agent"],
}


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("LITEFLEET_SECURE_DIR", None)
    env.update(extra or {})
    return env


def argv(program: str, args: Sequence[str]) -> list[str]:
    return [*PROGRAMS[program], *args]


def run(
    program: str,
    *args: str,
    cwd: Path | None = None,
    timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv(program, args),
        cwd=cwd or REPO_ROOT,
        env=environment(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def litefleet(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run("litefleet", *args, cwd=cwd)


class Background:
    """A long-running command; stdout and stderr lines are collected as they come."""

    def __init__(
        self, program: str, args: Sequence[str], *, cwd: Path, env: dict[str, str] | None = None
    ) -> None:
        self.args = list(args)
        self.proc = subprocess.Popen(
            argv(program, args),
            cwd=cwd,
            env=environment(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_line(self, predicate: Callable[[str], bool], timeout_s: float = 60.0) -> str:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                found = next((ln for ln in self.lines if predicate(ln)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(f"no such line from {self.args}: {self.lines[-20:]}")
                self._cond.wait(min(left, 0.5))

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode
