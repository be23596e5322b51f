"""The daemon's work loop as data: coalescing queued work and the refresh retry policy."""

from __future__ import annotations

import queue

import pytest

from agent.service.work import RefreshOutcome, Work, coalesce, retry_after


def queued(*items: Work) -> queue.Queue[Work]:
    q: queue.Queue[Work] = queue.Queue()
    for item in items:
        q.put(item)
    return q


def test_a_burst_of_refreshes_is_one() -> None:
    q = queued(Work.REFRESH, Work.WAKE, Work.REFRESH)
    assert coalesce(Work.REFRESH, q) is Work.REFRESH and q.empty()
    assert coalesce(Work.REFRESH, queued(Work.REFRESH, Work.REFRESH_NOW, Work.REFRESH)) is Work.REFRESH_NOW
    assert coalesce(Work.REFRESH_NOW, queued(Work.REFRESH)) is Work.REFRESH_NOW


def test_stop_is_never_lost() -> None:
    assert coalesce(Work.REFRESH, queued(Work.REFRESH_NOW, Work.STOP, Work.REFRESH)) is Work.STOP


def test_other_work_leaves_the_queue_alone() -> None:
    q = queued(Work.REFRESH)
    assert coalesce(Work.WAKE, q) is Work.WAKE and q.qsize() == 1


@pytest.mark.parametrize("outcome", [RefreshOutcome.OK, RefreshOutcome.NO_REPOSITORY])
def test_nothing_wrong_waits_the_full_interval(outcome: RefreshOutcome) -> None:
    retry = retry_after(outcome, 4, 300.0)
    assert (retry.delay_s, retry.fails) == (300.0, 0)


def test_failures_back_off_to_the_interval() -> None:
    delays, fails = [], 0
    for _ in range(8):
        retry = retry_after(RefreshOutcome.TRANSPORT, fails, 300.0)
        delays.append(retry.delay_s)
        fails = retry.fails
    assert delays == [5, 10, 20, 40, 80, 160, 300, 300]
    assert retry_after(RefreshOutcome.FAILED, 0, 300.0).delay_s == 15
    assert retry_after(RefreshOutcome.FAILED, 1, 300.0).delay_s == 30
    assert retry_after(RefreshOutcome.FAILED, 60, 300.0).delay_s == 300


def test_only_a_transport_failure_leaves_the_device_unsettled() -> None:
    assert [o for o in RefreshOutcome if not o.settled] == [RefreshOutcome.TRANSPORT]
