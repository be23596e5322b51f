"""Named points where a test can make this process die with SIGKILL (crash-safety tests only).

``LITEFLEET_CRASH_AT="NAME"`` kills the process the first time it reaches
:func:`crash_point("NAME")`; ``"NAME:N"`` the N-th time (1-based). Unset (always, outside
tests), :func:`crash_point` only compares a string: no file, no clock.

The points sit at the step boundaries of a rollout (``converter.rollout.signer``) and
inside a repository commit (``converter.repo.repository``: metadata written, ``repo.json``
not yet), so a test can check that a controller killed anywhere and resumed neither signs
twice nor leaves a half-signed change.

Guarantees:

* nothing happens unless the environment variable names this point;
* the kill is SIGKILL to this process: no ``finally``, no ``atexit``, no flush, the same as
  a power cut for everything not yet on disk.
"""

from __future__ import annotations

import os
import signal

ENV = "LITEFLEET_CRASH_AT"
_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Die here if ``$LITEFLEET_CRASH_AT`` names this point (and this occurrence)."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == (int(nth) if nth.isdigit() else 1):
        os.kill(os.getpid(), signal.SIGKILL)
