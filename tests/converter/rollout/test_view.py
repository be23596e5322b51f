"""What the console shows of a rollout: the live view, plain lines, the final line, the status table."""

from __future__ import annotations

import io

from converter.cli.rollout_view import LiveView, final_line, status_table
from converter.rollout.decide import Action, ActionKind, after_step, new_record, with_action, with_observation
from converter.rollout.gates import GateName, GateResult, Op, Verdict
from converter.rollout.spec import RolloutSpec

SPEC = RolloutSpec("digits", waves=(10, 100), bake_s=60.0, max_wait_s=180.0, min_samples=10)


def baking(now: float = 1000.0):  # type: ignore[no-untyped-def]
    r = after_step(new_record(SPEC, version=4, previous=3, model_sha256="0" * 64, now=now), 7, now)
    results = (
        GateResult(GateName.HEALTH, Verdict.PASS, 0.0, 0.0, Op.LE, 2),
        GateResult(GateName.AGREEMENT, Verdict.WAIT, 0.5, 0.9, Op.GE, 3),
    )
    return with_observation(r, results, {"canary": 2, "control": 18, "selected": ["a", "b"]}, now + 5)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_plain_lines_on_change_and_at_most_every_interval() -> None:
    out, clock = io.StringIO(), Clock(1005.0)
    view = LiveView(out, tty=False, clock=clock, plain_every_s=10.0)
    record = baking()
    view.update(record)
    view.update(record)  # nothing changed: nothing printed
    assert out.getvalue().count("\n") == 1
    line = out.getvalue()
    assert "digits v4 (from v3) wave 1/2: 10 % of all, baking 5s of 1m00s; canary 2, control 18" in line
    assert "agreement 0.5 wait (3)" in line and "\x1b" not in line
    moved = with_observation(
        record,
        (
            GateResult(GateName.HEALTH, Verdict.PASS, 0.0, 0.0, Op.LE, 2),
            GateResult(GateName.AGREEMENT, Verdict.WAIT, 0.6, 0.9, Op.GE, 8),
        ),
        {"canary": 2, "control": 18},
        1006.0,
    )
    clock.t = 1008.0
    view.update(moved)  # values moved, same verdicts, too soon
    assert out.getvalue().count("\n") == 1
    clock.t = 1016.0
    view.update(moved)
    assert out.getvalue().count("\n") == 2
    aborted = with_action(
        moved, Action(ActionKind.ABORT, "agreement 0.1 (>= 0.9 fails, 300 samples)"), 1017.0
    )
    view.update(aborted)  # a change of state prints at once
    assert out.getvalue().count("\n") == 3 and "aborting" in out.getvalue().splitlines()[-1]


def test_tty_redraws_one_block_in_place() -> None:
    out, clock = io.StringIO(), Clock(1005.0)
    view = LiveView(out, tty=True, clock=clock)
    view.update(baking())
    first = out.getvalue()
    assert "GATE" in first and "agreement" in first and "\x1b" not in first
    clock.t = 1006.0
    view.update(baking())
    redraw = out.getvalue()[len(first) :]
    assert redraw.startswith(f"\x1b[{first.count(chr(10))}F\x1b[J")


def test_final_lines_and_status_table() -> None:
    r = baking()
    aborted = after_step(
        with_action(r, Action(ActionKind.ABORT, "latency_p99_ratio 9.1 (<= 1.5 fails)"), 1010.0), 8, 1011.0
    )
    assert final_line(aborted) == (
        "rollout digits v4 aborted: latency_p99_ratio 9.1 (<= 1.5 fails); devices that took v4 go back to v3"
    )
    promoted = after_step(with_action(r, Action(ActionKind.PROMOTE), 1070.0), 8, 1071.0)
    assert final_line(promoted) == "rollout digits v4 promoted through 10 %, 100 % of all"
    table = status_table([(r, 4242), (aborted, None)], 1020.0)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["MODEL", "VERSION", "FROM", "STATE"]
    assert "pid 4242" in lines[1] and "waiting on agreement" in lines[1] and "1/2 (10 %)" in lines[1]
    assert "aborted" in lines[2] and "latency_p99_ratio" in lines[2]
