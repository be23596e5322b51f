"""Checks a candidate model must pass before it may serve.

1. the runtime loads it;
2. its inputs and outputs are the ones its card promises (when it has a card),
   and the card describes this very file (its SHA-256);
3. it reproduces its golden vectors within their tolerances (when it has
   them); without golden vectors it must at least run once on zeros.

:func:`check_isolated` runs these checks in a forked child process, so a
model that crashes the runtime kills the child, not the agent. Where a child
process cannot be forked (an embedded interpreter) it returns None and the
caller checks in-process, guarded by the ``checking`` mark in the state file.
``python -m agent.activation.check --model M [--card C] [--golden G]`` runs the
same checks from a shell.

Where the device's configuration asks for it (``check_isolation = "restart"``,
:class:`Isolation`), the agent checks in its own process instead, on a thread that
:func:`check_bounded` watches: no fork, so about half the CPU of a small model's
activation, but a model that crashes the runtime takes the agent with it, and the
agent's restart (systemd's ``Restart=``) rejects it by the ``checking`` mark.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import numpy as np

from agent.errors import InferenceError, ModelLoadError, ModelRejectedError
from agent.files import file_sha256
from agent.model_card import check_signature, parse_card
from agent.reasons import Reason, parse_reason
from agent.serving.inference import ModelRunner
from agent.serving.runtime import load_interpreter

logger = logging.getLogger(__name__)

MAX_GOLDEN_SAMPLES = 64
CHECK_TIMEOUT_S = 300.0
STALL_S = 15.0  # a check child with no CPU time for this long is stuck (check_isolated)

T = TypeVar("T")


class Isolation(StrEnum):
    """Where a candidate's checks run (``check_isolation`` in agent.toml: docs/agent-api.md)."""

    # a forked child: a crash or a hang in the runtime kills the child, never the agent
    FORK = "fork"
    # the agent itself, on a thread bounded by check_bounded(): a crash kills the agent and its
    # restart rejects the model (the ``checking`` mark); a check past its bound ends the agent
    RESTART = "restart"
    # the caller's thread, unbounded: the fleet simulator (agent.service.simulate)
    NONE = "none"


class RunnerSource(Protocol):
    """Where runners come from instead of a new interpreter each (:func:`share_interpreters`)."""

    def runner(self, model: Path, *, threads: int, runtime: str, name: str, version: str) -> ModelRunner:
        """A runner for the bytes of ``model``; :class:`ModelLoadError` if they do not load."""
        ...


_shared: RunnerSource | None = None


def share_interpreters(source: RunnerSource | None) -> None:
    """Process-wide: runners for checks and serving come from ``source`` (the fleet
    simulator's one interpreter per model file, :mod:`agent.service.simulate`); None: a new
    interpreter per load, as a device does."""
    global _shared
    _shared = source


def _new_runner(model: Path, threads: int, runtime: str, name: str, version: str) -> ModelRunner:
    try:
        if _shared is not None:
            return _shared.runner(model, threads=threads, runtime=runtime, name=name, version=version)
        interpreter = load_interpreter(model, threads=threads, runtime=runtime)
    except ModelLoadError as exc:
        raise ModelRejectedError(Reason.LOAD, str(exc)) from exc
    return ModelRunner(interpreter, name=name, version=version)


def load_checked(
    model: Path,
    card: Path | None,
    golden: Path | None,
    *,
    threads: int = 1,
    runtime: str = "auto",
    name: str = "model",
    version: str = "0",
    model_sha256: str | None = None,
) -> ModelRunner:
    """Load ``model`` and run every check; return the ready runner or raise
    :class:`ModelRejectedError` saying which check failed.

    ``model_sha256``: the model's SHA-256 when the caller has just verified the file
    against it (a download checks the signed hash): the card is compared with it
    instead of hashing the file again (4.4 ms of a MobileNetV2 int8 check with 100
    agents, bench/activation_phases.py)."""
    runner = _new_runner(model, threads, runtime, name, version)
    if card is not None:
        parsed = parse_card(card.read_bytes())
        if parsed.tflite_sha256 and parsed.tflite_sha256 != (model_sha256 or file_sha256(model)):
            raise ModelRejectedError(
                Reason.CARD, "the card describes a different model file (sha256 differs)"
            )
        check_signature(parsed, runner.inputs, runner.outputs)
    if golden is not None:
        check_golden(runner, golden)
    else:
        zeros = [np.zeros(s.shape, dtype=s.dtype) for s in runner.inputs]
        try:
            runner.run_raw(zeros)
        except InferenceError as exc:
            raise ModelRejectedError(Reason.INFERENCE, str(exc)) from exc
    return runner


def load_unchecked(
    model: Path, *, threads: int = 1, runtime: str = "auto", name: str = "model", version: str = "0"
) -> ModelRunner:
    """Load ``model`` for serving without checking it again: only for bytes that
    :func:`check_isolated` has just passed (see :func:`file_identity`)."""
    return _new_runner(model, threads, runtime, name, version)


def file_identity(path: Path) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime in ns): equal before a check and before the
    parent's load means the parent loads the very bytes the child checked (the
    store is the agent's own 0700 folder, written only by its main thread, and
    a file there is replaced by rename, never rewritten in place)."""
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def check_golden(runner: ModelRunner, golden: Path) -> None:
    """Run every golden input; each output must be within its ``atol``."""
    try:
        with np.load(golden, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ModelRejectedError(Reason.GOLDEN, f"golden vectors unreadable: {exc}") from exc
    n_in, n_out = len(runner.inputs), len(runner.outputs)
    try:
        xs = [arrays[f"input_{k}"] for k in range(n_in)]
        ys = [arrays[f"output_{k}"] for k in range(n_out)]
        atols = [float(arrays[f"atol_{k}"]) for k in range(n_out)]
    except KeyError as exc:
        raise ModelRejectedError(Reason.GOLDEN, f"golden vectors lack {exc}") from exc
    count = xs[0].shape[0] if xs[0].ndim else 0
    if not 0 < count <= MAX_GOLDEN_SAMPLES:
        raise ModelRejectedError(Reason.GOLDEN, f"golden vectors hold {count} samples")
    for spec, x in zip(runner.inputs, xs, strict=True):
        if x.dtype != np.dtype(spec.dtype) or tuple(x.shape[1:]) != spec.shape[1:] or x.shape[0] != count:
            raise ModelRejectedError(
                Reason.GOLDEN,
                f"golden input for {spec.name} is {x.dtype}{list(x.shape)}, "
                f"the model takes {spec.dtype}{list(spec.shape)}",
            )
    for j in range(count):
        try:
            outs = runner.run_raw([x[j : j + 1] for x in xs])
        except (InferenceError, ValueError) as exc:
            raise ModelRejectedError(Reason.INFERENCE, f"golden sample {j}: {exc}") from exc
        for k, (out, want, atol) in enumerate(zip(outs, ys, atols, strict=True)):
            diff = np.abs(out.astype(np.float64) - want[j : j + 1].astype(np.float64))
            worst = float(diff.max()) if diff.size else 0.0
            if not np.isfinite(worst) or worst > atol:
                raise ModelRejectedError(
                    Reason.GOLDEN,
                    f"golden sample {j}, output {k}: differs by {worst:g}, more than the {atol:g} allowed",
                )


def _limit_cpu(cpu_s: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))


def _child_check(
    model: Path,
    card: Path | None,
    golden: Path | None,
    threads: int,
    runtime: str,
    model_sha256: str | None = None,
) -> dict[str, object]:
    try:
        load_checked(model, card, golden, threads=threads, runtime=runtime, model_sha256=model_sha256)
        return {"ok": True}
    except ModelRejectedError as exc:
        return {"ok": False, "reason": exc.reason, "message": str(exc)}
    except Exception as exc:  # anything else the model does to the runtime
        return {"ok": False, "reason": Reason.CRASHED, "message": f"{type(exc).__name__}: {exc}"}


def check_isolated(
    model: Path,
    card: Path | None,
    golden: Path | None,
    *,
    threads: int,
    runtime: str,
    timeout_s: float = CHECK_TIMEOUT_S,
    tick: Callable[[], None] | None = None,
    model_sha256: str | None = None,
) -> bool | None:
    """Run :func:`load_checked` in a forked child process.

    True when it passed; raises :class:`ModelRejectedError` when it failed or the
    child died (a crash in the runtime kills the child, not the agent); None
    where this platform cannot fork (the caller then checks in-process).

    The child has already imported the runtime (it is a fork of the agent), so
    a check costs milliseconds, not an interpreter start. It may use
    ``timeout_s`` of CPU time (the kernel ends it with SIGXCPU after that: a
    model that never returns from ``invoke``) and twice that of wall-clock time.
    ``tick()`` is called at least once a second while the child runs: the caller is
    healthy while it waits for a bounded check (the agent feeds systemd's watchdog).
    ``model_sha256``: as for :func:`load_checked`.

    A child that gets no CPU time at all for ``STALL_S`` before it answers is stuck, not
    checking: the fork copied a lock that another thread of the agent held at that
    instant, and no thread of the child will ever release it (seen with a preloaded
    library, in ``pthread_cond_init`` as the child recreated Python's GIL). That is no
    verdict on the model, so it is killed and the check runs once more in a new child,
    which has the bounds above (a model that hangs without using CPU is still ended by
    the wall-clock bound, and rejected).
    """
    if not hasattr(os, "fork"):
        return None
    _libc()  # in the agent, once: the children inherit it
    args = (model, card, golden, threads, runtime, model_sha256)
    try:
        outcome = _fork_check(args, timeout_s, tick, stall_s=STALL_S)
    except _Stalled:
        logger.warning(
            "the check process used no CPU for %g s (stuck on a lock the fork copied); "
            "checking once more in a new one",
            STALL_S,
        )
        outcome = _fork_check(args, timeout_s, tick, stall_s=None)
    if outcome is None:
        return None
    data, status = outcome
    if data is None:
        raise ModelRejectedError(
            Reason.TIMEOUT, f"checking the model took more than {2 * timeout_s + 10:g} s"
        )
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        why = (
            f"used more than {int(timeout_s)} s of CPU time (it never returned)"
            if sig == "SIGXCPU"
            else "crashed"
        )
        raise ModelRejectedError(Reason.CRASHED, f"the runtime was killed by {sig} running this model: {why}")
    try:
        result = json.loads(data)
    except ValueError as exc:
        raise ModelRejectedError(Reason.CRASHED, f"the check process failed (exit status {status})") from exc
    if result.get("ok"):
        return True
    reason = parse_reason(result.get("reason"))
    if reason is None:  # the child said something no check says: it did not finish its work
        raise ModelRejectedError(Reason.CRASHED, f"the check process answered {data[:200]!r}")
    raise ModelRejectedError(reason, str(result.get("message", "")))


class _Stalled(Exception):
    """The check child got no CPU time for ``STALL_S`` (it was killed and reaped)."""


def _fork_check(
    args: tuple[Path, Path | None, Path | None, int, str, str | None],
    timeout_s: float,
    tick: Callable[[], None] | None,
    *,
    stall_s: float | None,
) -> tuple[bytes | None, int] | None:
    """Fork a child that checks ``args`` (:func:`_child_check`'s) and wait for it: (its
    answer, or None when the wall-clock bound passed and it was killed; its wait status),
    or None when no child can be forked. Raises :class:`_Stalled` (``stall_s`` given)."""
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(read_fd)
        os.close(write_fd)
        logger.info("cannot fork a check process here (%s); checking in-process", exc)
        return None
    if pid == 0:  # the child: check, report on the pipe, leave without cleanup
        code = 0
        try:
            os.close(read_fd)
            _die_with_parent(parent, 2 * timeout_s + 10)
            _limit_cpu(max(1, int(timeout_s)))
            result = _child_check(*args)
            os.write(write_fd, json.dumps(result).encode()[:65536])
        except BaseException:
            code = 70
        finally:
            os._exit(code)
    os.close(write_fd)
    stuck = _CpuWatch(pid, stall_s).stuck if stall_s is not None else None
    try:
        data = _read_all(read_fd, 2 * timeout_s + 10, tick, stuck)
    except _Stalled:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(read_fd)
    if data is None:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return data, status


class _CpuWatch:
    """A process's CPU time as the kernel counts it (/proc); :meth:`stuck` once it has not
    moved for ``stall_s``. Where /proc cannot tell, never stuck."""

    def __init__(self, pid: int, stall_s: float) -> None:
        self.pid = pid
        self.stall_s = stall_s
        self.used: int | None = None
        self.since = time.monotonic()

    def cpu(self) -> int | None:
        try:  # nanoseconds on the CPU; else utime + stime in clock ticks
            return int(Path(f"/proc/{self.pid}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            return None

    def stuck(self) -> bool:
        used, now = self.cpu(), time.monotonic()
        if used is None:
            return False
        if used != self.used:
            self.used, self.since = used, now
            return False
        return now - self.since >= self.stall_s


def check_bounded(
    check: Callable[[], T],
    *,
    cpu_s: float,
    on_stuck: Callable[[str], NoReturn],
    tick: Callable[[], None] | None = None,
) -> T:
    """Run ``check()`` on a thread of this process and return what it returns (or raise
    what it raises), calling ``tick()`` at least once a second meanwhile.

    Bounds as :func:`check_isolated`'s child has them: ``cpu_s`` of the thread's CPU time
    (a model that never returns from ``invoke``), twice that plus 10 s of wall-clock time
    (a deadlock). A thread stuck in native code cannot be stopped, so past either bound
    ``on_stuck(why)`` is called, and it must not return: the agent ends itself, and its
    supervisor's restart rejects the model (the ``checking`` mark, saved before this)."""
    done: dict[str, Any] = {}
    clock: list[int] = []

    def run() -> None:
        with contextlib.suppress(OSError, AttributeError):
            clock.append(time.pthread_getcpuclockid(threading.get_ident()))
        try:
            done["value"] = check()
        except BaseException as exc:  # handed to the caller as it is
            done["error"] = exc

    worker = threading.Thread(target=run, name="model-check", daemon=True)
    worker.start()
    deadline = time.monotonic() + 2 * cpu_s + 10
    while True:
        worker.join(1.0)
        if not worker.is_alive():
            break
        if tick is not None:
            tick()
        used = _thread_cpu_s(clock)
        if used > cpu_s:
            on_stuck(f"used more than {cpu_s:g} s of CPU time (it never returned)")
        if time.monotonic() > deadline:
            on_stuck(f"took more than {2 * cpu_s + 10:g} s")
    if "error" in done:
        raise done["error"]
    value: T = done["value"]
    return value


def _thread_cpu_s(clock: list[int]) -> float:
    """CPU seconds of the check thread so far (0 where the platform cannot tell)."""
    if not clock:
        return 0.0
    try:
        return time.clock_gettime(clock[0])
    except OSError:  # the thread has just ended
        return 0.0


@functools.cache
def _libc() -> Any:
    """The C library's handle, or None; loaded in the agent before its first fork, so that
    each check child does not load it again (0.3-0.5 ms of a child's CPU)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except (OSError, AttributeError):
        return None


def _die_with_parent(parent: int, wall_s: float) -> None:
    """In the child: end with the agent, and after ``wall_s`` in any case. A child that
    hangs without using CPU (a deadlock) is never ended by RLIMIT_CPU; if the agent is
    killed meanwhile (SIGKILL, OOM, the watchdog), nothing else would end it."""
    signal.alarm(int(wall_s) + 1)  # SIGALRM's default action ends the process
    libc = _libc()
    if libc is not None:
        with contextlib.suppress(OSError, AttributeError):
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    if os.getppid() != parent:  # the agent died before prctl took effect
        os._exit(71)


def _read_all(
    fd: int,
    timeout_s: float,
    tick: Callable[[], None] | None = None,
    stuck: Callable[[], bool] | None = None,
) -> bytes | None:
    """Everything until EOF, or None when ``timeout_s`` passes first; ``tick()`` each
    second, and :class:`_Stalled` raised when ``stuck()`` says so before EOF."""
    import select

    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        if tick is not None:
            tick()
        if stuck is not None and stuck():
            raise _Stalled
        ready, _, _ = select.select([fd], [], [], min(left, 1.0))
        if not ready:
            continue
        block = os.read(fd, 65536)
        if not block:
            return b"".join(chunks)
        chunks.append(block)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.activation.check")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--card", type=Path)
    parser.add_argument("--golden", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runtime", default="auto")
    args = parser.parse_args(argv)
    try:
        load_checked(args.model, args.card, args.golden, threads=args.threads, runtime=args.runtime)
        result: dict[str, object] = {"ok": True}
    except ModelRejectedError as exc:
        result = {"ok": False, "reason": exc.reason, "message": str(exc)}
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
