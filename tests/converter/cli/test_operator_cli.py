"""The small things an operator hit on day one (issue 12, item 8), each run as a user runs it.

``litefleet --version``; no Sphinx markup in any ``--help``; one spelling for the secure
broker's folder (``--secure DIR``, with ``--secure-dir`` kept as a hidden alias);
``status --metrics`` says what it waits for and shows the groups; a removed device
leaves ``status``; ``status --json`` gives every version as a string.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from converter.cli.main import build_parser
from tests.support.cli import Background, argv, environment, litefleet
from tests.support.harness import FleetWatcher
from tests.support.journal import FakeJournal
from tests.support.monitor import publish_many, publish_one
from tests.support.payloads import agent_payload, state_payload

SPHINX = re.compile(r"``|:(mod|func|class|meth|attr|data|exc):`")


def command_paths() -> Iterator[list[str]]:
    def walk(p: argparse.ArgumentParser, path: list[str]) -> Iterator[list[str]]:
        yield path
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    yield from walk(child, [*path, name])

    yield from walk(build_parser(), [])


def test_version() -> None:
    out = litefleet("--version")
    assert out.returncode == 0 and re.fullmatch(r"litefleet \d+\.\d+\.\d+\n", out.stdout), out


def test_help_texts_are_plain_and_say_secure_one_way() -> None:
    paths = list(command_paths())
    assert ["broker"] in paths and ["device", "remove"] in paths and ["push"] in paths
    for path in paths:
        shown = litefleet(*path, "--help")
        assert shown.returncode == 0, (path, shown.stderr)
        assert not SPHINX.search(shown.stdout), (path, SPHINX.search(shown.stdout), shown.stdout)
        assert "--secure-dir" not in shown.stdout, (path, shown.stdout)
    for path in (
        ["push"],
        ["status"],
        ["monitor"],
        ["repo", "publish"],
        ["repo", "resign"],
        ["device", "add"],
    ):
        assert "--secure DIR" in litefleet(*path, "--help").stdout, path


def test_status_metrics_says_what_it_waits_for_and_shows_groups(broker) -> None:
    publish_many(
        broker.port,
        [
            ("litefleet/v1/devices/pi-on/state", state_payload(device_id="pi-on", groups=["kitchen", "lab"])),
            ("litefleet/v1/devices/pi-off/state", state_payload(device_id="pi-off", online=False)),
        ],
        retain=True,
    )
    stop = threading.Event()

    def device() -> None:  # pi-on reports every 0.2 s
        seq = 0
        while not stop.is_set():
            seq += 1
            publish_one(
                broker.port,
                "litefleet/v1/devices/pi-on/metrics",
                agent_payload("pi-on", seq=seq, ts=time.time()),
            )
            stop.wait(0.2)

    t = threading.Thread(target=device, daemon=True)
    t.start()
    try:
        out = litefleet("status", "--broker", broker.url, "--metrics", "20")
    finally:
        stop.set()
        t.join()
    assert out.returncode == 0, out.stderr
    assert "waiting up to 20 s for the next metrics message of 1 online device(s) (pi-on)" in out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split()[:3] == ["DEVICE_ID", "ONLINE", "GROUPS"], header
    assert rows[1].split()[:3] == ["pi-on", "yes", "kitchen,lab"], rows
    plain = litefleet("status", "--broker", broker.url)
    assert "GROUPS" in plain.stdout.splitlines()[0] and "waiting" not in plain.stderr


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "broker"
    proc = Background("litefleet", ["broker", "--secure", str(folder), "--port", "0"], cwd=tmp_path)
    proc.wait_line(lambda ln: ln.startswith("Ctrl-C stops it."), 60)
    try:
        yield folder
    finally:
        proc.stop()


def start_agent(tmp_path: Path, folder: Path, device: str, root: Path) -> Background:
    """The agent as `device add` left it: its folder's agent.toml, as it is."""
    return Background(
        "litefleet-agent",
        [
            "run",
            "--config",
            str(folder / "devices" / device / "agent.toml"),
            "--trusted-root",
            str(root),
            "--state-dir",
            str(tmp_path / f"state-{device}"),
            "--http",
            "",
        ],
        cwd=tmp_path,
    )


def status_rows(*args: str) -> list[dict[str, object]]:
    out = litefleet("status", *args, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_status_versions_and_a_removed_device(tmp_path: Path, secure_broker: Path, digits_int8) -> None:
    folder = secure_broker
    for device in ("pi-x", "pi-y"):
        assert litefleet("device", "add", device, "--secure", str(folder)).returncode == 0
    repo = tmp_path / "repo"
    assert litefleet("repo", "init", str(repo)).returncode == 0
    pushed = litefleet(
        "push", str(digits_int8.tflite), "--repo", str(repo), "--name", "digits", "--secure", str(folder)
    )
    assert pushed.returncode == 0, pushed.stderr
    watch = FleetWatcher(secure_dir=folder)
    agents = [start_agent(tmp_path, folder, d, repo / "root.json") for d in ("pi-x", "pi-y")]
    try:
        for d in ("pi-x", "pi-y"):
            watch.wait_active(d, "digits", 1, timeout_s=90)
        rows = status_rows("--secure", str(folder))
        # one type for every version: a string, at row level and under models
        for r in rows:
            versions = [r["version"], *(m["version"] for m in r["models"].values())]  # type: ignore[attr-defined]
            assert versions == ["1", "1"], r
        # the old spelling still works and means the same folder
        assert [r["device_id"] for r in status_rows("--secure-dir", str(folder))] == ["pi-x", "pi-y"]
    finally:
        for a in agents:
            a.stop()
        watch.close()
    assert {r["device_id"]: r["online"] for r in status_rows("--secure", str(folder))} == {
        "pi-x": False,
        "pi-y": False,
    }

    removed = litefleet("device", "remove", "pi-x", "--secure", str(folder))
    assert removed.returncode == 0 and "retained state is cleared" in removed.stdout, removed
    assert [r["device_id"] for r in status_rows("--secure", str(folder))] == ["pi-y"]


def test_removed_without_a_broker_is_cleared_by_a_second_remove(tmp_path: Path) -> None:
    folder = tmp_path / "broker"
    assert litefleet("device", "add", "pi-z", "--secure", str(folder)).returncode == 0
    broker = Background("litefleet", ["broker", "--secure", str(folder), "--port", "0"], cwd=tmp_path)
    try:
        broker.wait_line(lambda ln: ln.startswith("Ctrl-C stops it."), 60)
        # pi-z's state as its agent would leave it (the host may write state topics: to clear them)
        _publish_state_as_host(folder, "pi-z")
        assert [r["device_id"] for r in status_rows("--secure", str(folder))] == ["pi-z"]
    finally:
        broker.stop()
    removed = litefleet("device", "remove", "pi-z", "--secure", str(folder))
    assert removed.returncode == 0 and "No broker is running" in removed.stdout and "again" in removed.stdout
    broker = Background("litefleet", ["broker", "--secure", str(folder)], cwd=tmp_path)  # its ports again
    try:
        broker.wait_line(lambda ln: ln.startswith("Ctrl-C stops it."), 60)
        assert [r["device_id"] for r in status_rows("--secure", str(folder))] == ["pi-z"]  # persisted
        again = litefleet("device", "remove", "pi-z", "--secure", str(folder))
        assert again.returncode == 0 and "retained state is cleared" in again.stdout, again
        assert status_rows("--secure", str(folder)) == []
        typo = litefleet("device", "remove", "pi-nobody", "--secure", str(folder))
        assert typo.returncode == 2 and "no device 'pi-nobody'" in typo.stderr, typo
    finally:
        broker.stop()


def _publish_state_as_host(folder: Path, device: str) -> None:
    from converter.broker.secure import host_client_settings
    from tests.support.secure import connect

    s = host_client_settings(folder)
    client = connect(
        s["port"],
        ca=Path(s["ca_file"]),
        username=s["username"],
        password=s["password"],
        client_id="_lf-host-t",
    )
    try:
        assert client.connected.wait(10)
        payload = state_payload(device_id=device, online=False)
        assert not client.publish(f"litefleet/v1/devices/{device}/state", payload, retain=True).is_failure
    finally:
        client.close()


def test_host_logs_are_json_lines_or_journal_entries(broker, tmp_path: Path) -> None:
    """Item 6 for the host commands: ``--log-format json`` makes every log line a JSON
    object; under systemd (stderr is the journal) each record is a journal entry."""
    out = litefleet("--debug", "--log-format", "json", "status", "--broker", broker.url)
    assert out.returncode == 0, out.stderr
    docs = [json.loads(line) for line in out.stderr.splitlines()]  # every line: JSON
    assert any(d["logger"] == "agent.mqtt.client" and d["message"].startswith("connected to") for d in docs)
    assert all({"ts", "level", "logger", "message"} <= set(d) for d in docs)

    journal = FakeJournal(tmp_path / "journal.sock")
    err = tmp_path / "stderr"
    try:
        with open(err, "wb") as f:
            st = os.fstat(f.fileno())
            env = environment(
                {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "LITEFLEET_JOURNAL_SOCKET": str(journal.path)}
            )
            done = subprocess.run(
                argv("litefleet", ["--debug", "status", "--broker", broker.url]),
                stdout=subprocess.PIPE,
                stderr=f,
                env=env,
                timeout=120,
                check=False,
            )
        assert done.returncode == 0
        entry = journal.wait_for(SYSLOG_IDENTIFIER="litefleet", LITEFLEET_LOGGER="agent.mqtt.client")
        assert entry["PRIORITY"] == "6" and "connected to" in entry["MESSAGE"]
    finally:
        journal.close()
    assert err.read_text() == ""  # every record went to the journal
