"""Rollout records on disk, beside the repository: ``DIR/rollouts/``.

Layout::

    DIR/rollouts/<name>.json          the record of the current (or last) rollout of <name>
    DIR/rollouts/<name>.lock          held (flock) by the one process driving it
    DIR/rollouts/<name>.request       an operator's pause/resume/abort, until applied
    DIR/rollouts/<name>.files/        the new version's model, card and golden vectors,
                                      staged at start (a resumed rollout signs from here)
    DIR/rollouts/history/<name>.v<N>.json   records of finished rollouts

Guarantees:

* every write is atomic and durable (:func:`agent.files.atomic_write`: temp file, fsync,
  rename, fsync of the folder): after a crash a record is the old or the new one;
* one writer per record: only the holder of ``<name>.lock`` (an exclusive ``flock``, let go
  by the kernel when its process dies, SIGKILL included) writes ``<name>.json``; others
  leave a request file, which the holder applies and then deletes;
* a damaged record is a :class:`~converter.errors.RepositoryError` naming the file, never
  a silently new rollout.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from agent.files import atomic_write, fsync_dir
from converter.errors import RepositoryError
from converter.repo.targets import ReleaseFiles
from converter.rollout.decide import Request
from converter.rollout.record import RolloutRecord, parse_record

FOLDER = "rollouts"
_STAGED = {"model": "model.tflite", "card": "card.json", "golden": "golden.npz"}


class DriverLock:
    """The exclusive right to drive one rollout, held until :meth:`release` or process death."""

    def __init__(self, handle: IO[bytes], name: str) -> None:
        self._handle = handle
        self.name = name

    def release(self) -> None:
        """Let go (closing the file lets go too); a second call does nothing."""
        if self._handle.closed:
            return
        with contextlib.suppress(OSError):
            fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()


class RolloutStore:
    def __init__(self, repo_dir: Path) -> None:
        self.dir = repo_dir / FOLDER

    def _ensure(self) -> None:
        if not self.dir.is_dir():
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            fsync_dir(self.dir.parent)

    def record_path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    # -- records ---------------------------------------------------------------------------
    def load(self, name: str) -> RolloutRecord | None:
        path = self.record_path(name)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return parse_record(json.loads(data))
        except ValueError as exc:
            raise RepositoryError(f"{path}: {exc}") from exc

    def save(self, record: RolloutRecord) -> None:
        self._ensure()
        data = json.dumps(record.to_json(), indent=1, sort_keys=True).encode()
        atomic_write(self.record_path(record.name), data)

    def names(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.stem for p in self.dir.glob("*.json"))

    def history(self, name: str | None = None) -> list[RolloutRecord]:
        folder = self.dir / "history"
        out = []
        for path in sorted(folder.glob(f"{name or '*'}.v*.json")) if folder.is_dir() else []:
            with contextlib.suppress(ValueError, OSError):
                out.append(parse_record(json.loads(path.read_bytes())))
        return out

    def archive(self, record: RolloutRecord) -> None:
        """Copy a finished record to ``history/`` (the current one stays until the next start)."""
        folder = self.dir / "history"
        folder.mkdir(mode=0o700, exist_ok=True)
        data = json.dumps(record.to_json(), indent=1, sort_keys=True).encode()
        atomic_write(folder / f"{record.name}.v{record.version}.json", data)

    # -- the new version's files -------------------------------------------------------------
    def stage_files(self, name: str, files: ReleaseFiles) -> None:
        """Keep the files a resumed rollout signs wave 0 from (before the record names them)."""
        self._ensure()
        folder = self.dir / f"{name}.files"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(mode=0o700)
        for role, data in (("model", files.model), ("card", files.card), ("golden", files.golden)):
            if data is not None:
                atomic_write(folder / _STAGED[role], data)

    def staged_files(self, name: str) -> ReleaseFiles:
        folder = self.dir / f"{name}.files"
        try:
            model = (folder / _STAGED["model"]).read_bytes()
        except FileNotFoundError as exc:
            raise RepositoryError(f"the staged model of rollout {name} is gone ({folder})") from exc

        def optional(role: str) -> bytes | None:
            path = folder / _STAGED[role]
            return path.read_bytes() if path.exists() else None

        return ReleaseFiles(model, optional("card"), optional("golden"))

    def drop_files(self, name: str) -> None:
        shutil.rmtree(self.dir / f"{name}.files", ignore_errors=True)

    # -- operator requests ----------------------------------------------------------------------
    def put_request(self, name: str, request: Request) -> None:
        self._ensure()
        atomic_write(self.dir / f"{name}.request", request.value.encode())

    def request(self, name: str) -> Request | None:
        try:
            word = (self.dir / f"{name}.request").read_text().strip()
        except (FileNotFoundError, UnicodeDecodeError):
            return None
        try:
            return Request(word)
        except ValueError:
            return None

    def clear_request(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dir / f"{name}.request")

    # -- who drives ---------------------------------------------------------------------------
    def try_lock(self, name: str) -> DriverLock | None:
        """The driver lock of ``name``, or None when another process holds it."""
        self._ensure()
        handle = open(self.dir / f"{name}.lock", "a+b")  # noqa: SIM115 (held for the driver's life)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n".encode())
        handle.flush()
        return DriverLock(handle, name)

    def driver_pid(self, name: str) -> int | None:
        """The pid of the process driving ``name``, None when nobody does."""
        lock = self.try_lock(name)
        if lock is not None:
            lock.release()
            return None
        try:
            return int((self.dir / f"{name}.lock").read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    @contextlib.contextmanager
    def locked(self, name: str) -> Iterator[DriverLock | None]:
        lock = self.try_lock(name)
        try:
            yield lock
        finally:
            if lock is not None:
                lock.release()
