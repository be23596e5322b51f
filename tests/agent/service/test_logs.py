"""Structured logs: key=value lines, JSON lines, journald entries (issue 12, item 6 and item 8's
agent log items).

Pure tests of the formatting, the journal protocol against a datagram socket the test
binds (journald's stand-in), and a real agent process that logs through each of the
three outputs while it activates and refuses models: no Python dict repr, no LiteRT
``INFO: Created TensorFlow Lite XNNPACK delegate`` line at ``info``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.logs import (
    JournalHandler,
    JsonFormatter,
    TextFormatter,
    fields,
    format_kv,
    make_handler,
    native_stderr_logged,
    stderr_is_journal,
)
from agent.reasons import Reason
from tests.support.harness import AgentProcess, FleetWatcher, must
from tests.support.journal import FakeJournal


# -- pure -----------------------------------------------------------------------------------
def record(msg: str, level: int = logging.INFO, **values: object) -> logging.LogRecord:
    rec = logging.LogRecord("agent.x", level, __file__, 1, msg, (), None)
    for k, v in fields(**values).items():
        setattr(rec, k, v)
    return rec


def test_key_value_quotes_what_would_not_split() -> None:
    line = format_kv(
        {"model": "digits", "version": 3, "reason": Reason.GOLDEN, "message": 'a "b" c=d', "ok": True}
    )
    assert line == 'model=digits version=3 reason=golden message="a \\"b\\" c=d" ok=true'
    assert format_kv({"groups": ("a", "b"), "empty": "", "p": 0.5}) == 'groups=["a","b"] empty="" p=0.5'
    assert format_kv({"m": "two\nlines"}) == 'm="two\\nlines"'  # one record, one line


def test_text_and_json_formatters() -> None:
    rec = record("activated", event="activated", model="digits", version=3, previous=None)
    text = TextFormatter("%(levelname)s %(name)s: %(message)s").format(rec)
    assert text == "INFO agent.x: activated model=digits version=3"
    doc = json.loads(JsonFormatter().format(rec))
    assert (doc["level"], doc["logger"], doc["message"]) == ("info", "agent.x", "activated")
    assert (doc["event"], doc["model"], doc["version"]) == (
        "activated",
        "digits",
        3,
    ) and "previous" not in doc
    assert "{" not in text


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[FakeJournal]:
    j = FakeJournal(tmp_path / "journal.sock")
    try:
        yield j
    finally:
        j.close()


def test_journal_entries_are_well_formed(journal: FakeJournal) -> None:
    handler = JournalHandler("litefleet-agent", static={"device_id": "pi-1"}, address=str(journal.path))
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    handler.handle(
        record("rolled_back", logging.WARNING, event="rolled_back", model="m", reason=Reason.CRASH_LOOP)
    )
    handler.handle(record("two\nlines", logging.DEBUG, note="x\ny"))
    e = journal.wait_for(LITEFLEET_EVENT="rolled_back")
    assert (e["PRIORITY"], e["SYSLOG_IDENTIFIER"], e["LITEFLEET_DEVICE_ID"]) == (
        "4",
        "litefleet-agent",
        "pi-1",
    )
    assert (e["LITEFLEET_MODEL"], e["LITEFLEET_REASON"]) == ("m", "crash_loop")
    assert e["MESSAGE"].startswith("agent.x: rolled_back")
    e = journal.wait_for(PRIORITY="7")
    assert e["MESSAGE"] == "agent.x: two\nlines" and e["LITEFLEET_NOTE"] == "x\ny"  # the binary form
    handler.close()


def test_under_systemd_the_message_carries_the_fields_as_a_line_does(journal: FakeJournal) -> None:
    # stderr is the journal when $JOURNAL_STREAM names fd 2's device and inode (systemd's rule)
    st = os.fstat(2)
    env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "LITEFLEET_JOURNAL_SOCKET": str(journal.path)}
    handler = make_handler("litefleet-agent", env=env)
    assert isinstance(handler, JournalHandler)
    handler.handle(record("activated", event="activated", model="digits", version=1))
    e = journal.wait_for(LITEFLEET_EVENT="activated")
    # what `journalctl -u litefleet-agent` prints: the fields too, not only "activated"
    assert e["MESSAGE"] == "agent.x: activated model=digits version=1"
    assert (e["LITEFLEET_MODEL"], e["LITEFLEET_VERSION"]) == ("digits", "1")
    handler.close()


def test_journal_gone_falls_back_to_stderr(tmp_path: Path) -> None:
    handler = JournalHandler("litefleet-agent", address=str(tmp_path / "nobody-listens"))
    handler.fallback.setStream(io.StringIO())
    handler.handle(record("activated", event="activated", model="m"))
    assert "INFO agent.x: activated model=m" in handler.fallback.stream.getvalue()


def test_journal_only_when_stderr_is_the_journal(tmp_path: Path) -> None:
    f = tmp_path / "err"
    f.write_text("")
    with open(f, "rb") as fh:
        st = os.fstat(fh.fileno())
        assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, fh.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, fh.fileno())
        assert not stderr_is_journal({}, fh.fileno())
    assert isinstance(make_handler("x", stream=io.StringIO()).formatter, TextFormatter)
    assert isinstance(make_handler("x", fmt="json", stream=io.StringIO()).formatter, JsonFormatter)


def test_native_stderr_goes_to_the_debug_log(tmp_model_path: Path) -> None:
    """LiteRT's C++ "INFO: Created ... XNNPACK delegate" never reaches fd 2."""
    script = f"""
import logging, sys
from agent.logs import configure
configure("t", logging.INFO)
from agent.serving.runtime import load_interpreter
for _ in range(2):
    load_interpreter({str(tmp_model_path)!r})
logging.getLogger("agent.t").info("done", extra={{"litefleet_fields": {{"n": 2}}}})
"""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert "XNNPACK" not in out.stderr and "agent.t: done n=2" in out.stderr, out.stderr
    debug = subprocess.run(
        [sys.executable, "-c", script.replace("logging.INFO", "logging.DEBUG")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = [ln for ln in debug.stderr.splitlines() if "XNNPACK" in ln]
    assert lines and all(" DEBUG agent.serving.runtime: INFO: Created" in ln for ln in lines), debug.stderr


def test_capture_keeps_other_native_output_at_warning(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("agent.test.native")
    with caplog.at_level(logging.DEBUG, logger="agent.test.native"), native_stderr_logged(log):
        os.write(2, b"INFO: chatter\nERROR: something real\n")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("DEBUG", "INFO: chatter"),
        ("WARNING", "ERROR: something real"),
    ]


@pytest.fixture
def tmp_model_path(tmp_path: Path, digits_int8) -> Path:
    out = tmp_path / "m.tflite"
    shutil.copy(digits_int8.tflite, out)
    return out


# -- a real agent -------------------------------------------------------------------------------
def run_agent_through_a_push(
    broker, tmp_path: Path, digits_int8, **keys: object
) -> tuple[AgentProcess, FleetWatcher, Path]:
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    agent = AgentProcess(tmp_path, "pi-l", broker.url, repo / "root.json", log_level="info", **keys)
    watch = FleetWatcher(broker.port)
    return agent, watch, repo


def push_good_then_broken(broker, repo: Path, tmp_path: Path, watch: FleetWatcher, digits_int8) -> None:
    must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "digits", "--broker", broker.url)
    watch.wait_active("pi-l", "digits", 1, timeout_s=60)
    bad = tmp_path / "bad.tflite"
    data = bytearray(Path(digits_int8.tflite).read_bytes())
    data[8:] = bytes(len(data) - 8)  # signed and intact, but the runtime cannot load it
    bad.write_bytes(bytes(data))
    must("push", str(bad), "--repo", str(repo), "--name", "digits", "--broker", broker.url, "--no-check-data")
    watch.wait_event("pi-l", "rejected", timeout_s=60, reason="load")


def test_agent_text_log_is_key_value_without_reprs_or_runtime_chatter(
    broker, tmp_path: Path, digits_int8
) -> None:
    agent, watch, repo = run_agent_through_a_push(broker, tmp_path, digits_int8)
    try:
        agent.start()
        push_good_then_broken(broker, repo, tmp_path, watch, digits_int8)
    finally:
        agent.stop()
        watch.close()
    log = agent.log()
    assert "XNNPACK" not in log and "{'" not in log and "Traceback" not in log, log
    # at info, nothing below info: not even a record a filter relabelled to DEBUG late (paho's)
    assert " DEBUG " not in log, log
    activated = [ln for ln in log.splitlines() if " INFO agent.service.daemon: activated " in ln]
    assert activated and " model=digits version=1 " in activated[0], log
    rejected = [ln for ln in log.splitlines() if " WARNING agent.service.daemon: rejected " in ln]
    assert rejected and " reason=load " in rejected[0] and ' message="' in rejected[0], log


def test_agent_json_log(broker, tmp_path: Path, digits_int8) -> None:
    agent, watch, repo = run_agent_through_a_push(broker, tmp_path, digits_int8, log_format="json")
    try:
        agent.start()
        push_good_then_broken(broker, repo, tmp_path, watch, digits_int8)
    finally:
        agent.stop()
        watch.close()
    docs = [json.loads(line) for line in agent.log().splitlines() if line.strip()]  # every line JSON
    rejected = [d for d in docs if d.get("event") == "rejected"]
    assert rejected and rejected[0]["level"] == "warning" and rejected[0]["reason"] == "load", docs
    assert any(d.get("event") == "activated" and d["version"] == 1 for d in docs), docs


def test_agent_under_journald_sends_native_entries(
    broker, tmp_path: Path, digits_int8, journal: FakeJournal
) -> None:
    agent, watch, repo = run_agent_through_a_push(broker, tmp_path, digits_int8)
    agent.log_path.write_bytes(b"")  # the stderr the agent gets: $JOURNAL_STREAM names it
    st = agent.log_path.stat()
    env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "LITEFLEET_JOURNAL_SOCKET": str(journal.path)}
    try:
        agent.start(env=env)
        push_good_then_broken(broker, repo, tmp_path, watch, digits_int8)
        act = journal.wait_for(LITEFLEET_EVENT="activated")
        assert (act["PRIORITY"], act["LITEFLEET_MODEL"], act["LITEFLEET_VERSION"]) == ("6", "digits", "1")
        assert act["SYSLOG_IDENTIFIER"] == "litefleet-agent" and act["LITEFLEET_DEVICE_ID"] == "pi-l"
        rej = journal.wait_for(LITEFLEET_EVENT="rejected")
        assert (rej["PRIORITY"], rej["LITEFLEET_REASON"], rej["LITEFLEET_VERSION"]) == ("4", "load", "2")
    finally:
        agent.stop()
        watch.close()
    assert not any("XNNPACK" in e["MESSAGE"] for e in journal.entries)
    assert agent.log() == "", agent.log()  # everything went to the journal
