"""One writer at a time for a repository folder: ``DIR/.lock``.

``repo.json`` and the metadata versions are read, changed and written by whole commands
(``push``, a rollout step): two of them at once would both sign targets version N+1.
:func:`signing_lock` makes them take turns.

Guarantees:

* the lock is an exclusive ``flock`` on ``DIR/.lock``: the kernel lets it go when its
  holder dies, SIGKILL included, so a crashed command never leaves the repository locked;
* taking it blocks (changes are short); it is not re-entrant.
"""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".lock"


@contextlib.contextmanager
def signing_lock(repo_dir: Path) -> Iterator[None]:
    """Hold the repository's writer lock for the ``with`` block."""
    with open(repo_dir / LOCK_FILE, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
