"""The agent's signal handlers take no lock and write nothing: a SIGTERM that lands while the main
thread is inside a logging call on stderr used to raise "reentrant call inside
<_io.BufferedWriter name='<stderr>'>" (seen in the emulated install test)."""

from __future__ import annotations

import logging
import signal
from typing import Any
from unittest import mock

from agent.service.daemon import install_signal_handlers


class _Recorder:
    def __init__(self) -> None:
        self.signals: list[int] = []

    def stop_from_signal(self, signum: int) -> None:
        self.signals.append(signum)

    def stop(self) -> None:  # the old handler's way: takes the work queue's lock
        raise AssertionError("a signal handler must not take the work queue's lock")


def test_the_handler_only_records_the_signal() -> None:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    agent: Any = _Recorder()
    try:
        install_signal_handlers(agent)
        with mock.patch.object(logging.Logger, "_log", side_effect=AssertionError("logged")):
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGINT)
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert agent.signals == [signal.SIGTERM, signal.SIGINT]
