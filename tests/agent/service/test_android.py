"""The no-systemd path: the termux-services scripts under a fake $PREFIX, the
documented Termux configuration, a notifier that does nothing, and the agent's
pieces working from a state folder under $PREFIX."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from agent.service.config import load_config
from agent.service.sdnotify import Notifier
from agent.serving.inference import ModelRunner
from agent.serving.registry import ActiveModel, ModelRegistry
from agent.serving.rest import RestServer
from agent.telemetry.metrics import DeviceProbe, MetricsRecorder, MetricsReporter
from agent.telemetry.metrics_queue import MetricsQueue
from tests.support.tiny_models import TinyModels, models_for

REPO = Path(__file__).resolve().parents[3]
SERVICE = REPO / "android" / "termux-services" / "litefleet-agent"
DOC = REPO / "docs" / "android.md"
TERMUX = "/data/data/com.termux/files/usr"


@pytest.fixture(scope="module")
def tiny_models(request: pytest.FixtureRequest) -> TinyModels:
    return models_for(request)


def fake_prefix(tmp_path: Path) -> Path:
    prefix = tmp_path / "usr"
    for d in ("bin", "etc/litefleet", "var/lib/litefleet", "share/termux-services"):
        (prefix / d).mkdir(parents=True)
    return prefix


def documented_config(prefix: Path) -> str:
    """The agent.toml of docs/android.md, with Termux's prefix replaced by ``prefix``."""
    block = re.search(r"```toml\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/android.md lost its agent.toml example"
    return block.group(1).replace(TERMUX, str(prefix))


def script_env(prefix: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    env.update({"PREFIX": str(prefix), "PATH": f"{prefix / 'bin'}:/usr/bin:/bin", **extra})
    return env


def test_scripts_are_termux_shell_scripts() -> None:
    for script in (SERVICE / "run", SERVICE / "log" / "run"):
        assert script.read_text().startswith(f"#!{TERMUX}/bin/sh\n")
        assert os.access(script, os.X_OK)
        assert subprocess.run(["sh", "-n", str(script)]).returncode == 0


def test_run_execs_the_agent_with_the_prefix_config_and_no_systemd(tmp_path: Path) -> None:
    prefix = fake_prefix(tmp_path)
    (prefix / "etc/litefleet/agent.toml").write_text(documented_config(prefix))
    record = tmp_path / "argv.json"
    agent = prefix / "bin/litefleet-agent"
    agent.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'notify': os.environ.get('NOTIFY_SOCKET'), "
        f"'prefix': os.environ.get('PREFIX')}}, open({str(record)!r}, 'w'))\n"
        "print('agent says hi', file=sys.stderr)\n"
    )
    agent.chmod(0o755)
    wake = prefix / "bin/termux-wake-lock"
    wake.write_text(f"#!/bin/sh\ntouch {tmp_path / 'woke'}\n")
    wake.chmod(0o755)
    out = subprocess.run(
        ["sh", str(SERVICE / "run")], env=script_env(prefix), capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "agent says hi" in out.stdout  # exec 2>&1: stderr goes to the log service
    seen = json.loads(record.read_text())
    assert seen == {
        "argv": ["run", "--config", f"{prefix}/etc/litefleet/agent.toml"],
        "notify": None,
        "prefix": str(prefix),
    }
    assert (tmp_path / "woke").exists()
    (tmp_path / "woke").unlink()
    subprocess.run(
        ["sh", str(SERVICE / "run")],
        env=script_env(prefix, LITEFLEET_WAKE_LOCK="0"),
        capture_output=True,
        timeout=30,
        check=True,
    )
    assert not (tmp_path / "woke").exists()


def test_run_without_a_config_waits_then_fails(tmp_path: Path) -> None:
    prefix = fake_prefix(tmp_path)
    # a sleep that does not sleep, so the test does not wait 30 s
    sleep = prefix / "bin/sleep"
    sleep.write_text("#!/bin/sh\nexit 0\n")
    sleep.chmod(0o755)
    out = subprocess.run(
        ["sh", str(SERVICE / "run")], env=script_env(prefix), capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 1 and "no configuration at" in out.stdout


def test_log_run_hands_over_to_svlogger(tmp_path: Path) -> None:
    prefix = fake_prefix(tmp_path)
    svlogger = prefix / "share/termux-services/svlogger"
    svlogger.write_text('#!/bin/sh\necho svlogger "$@"\n')
    svlogger.chmod(0o755)
    out = subprocess.run(
        ["sh", str(SERVICE / "log" / "run"), "x"],
        env=script_env(prefix),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.stdout.strip() == "svlogger x"


def test_documented_config_loads_and_check_config_passes(tmp_path: Path) -> None:
    prefix = fake_prefix(tmp_path)
    # the doc's step before: "cp root.json $PREFIX/etc/litefleet/root.json" (check-config reads it)
    from converter.repo.repository import Repository

    Repository.init(tmp_path / "repo")
    shutil.copy(tmp_path / "repo" / "root.json", prefix / "etc/litefleet/root.json")
    conf = prefix / "etc/litefleet/agent.toml"
    conf.write_text(documented_config(prefix))
    cfg = load_config(conf)
    assert str(cfg.state_dir).startswith(str(prefix)) and cfg.runtime == "auto"
    out = subprocess.run(
        [sys.executable, "-m", "agent", "check-config", "--config", str(conf)],
        env=script_env(prefix, PATH=os.environ["PATH"]),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


def test_without_notify_socket_the_agent_pieces_run_from_prefix(
    tmp_path: Path,
    tiny_models: TinyModels,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(key, raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert not (notifier.ready("serving") or notifier.watchdog() or notifier.stopping())
    prefix = fake_prefix(tmp_path)
    cfg_path = prefix / "etc/litefleet/agent.toml"
    cfg_path.write_text(documented_config(prefix).replace("127.0.0.1:8501", "127.0.0.1:0"))
    cfg = load_config(cfg_path)
    registry = ModelRegistry()
    runner = ModelRunner.from_file(tiny_models.int8, threads=cfg.threads, name="digits", version="1")
    registry.activate(ActiveModel("digits", "1", "aa", runner))
    server = RestServer.from_config(cfg, registry)
    assert server is not None
    server.start()
    queue = MetricsQueue.in_state_dir(cfg.state_dir, max_rows=cfg.metrics_queue_max_rows)
    try:
        body = json.dumps({"instances": np.zeros((1, 8, 8, 1)).tolist()}).encode()
        req = urllib.request.Request(
            f"{server.url}/v1/models/digits:predict", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as reply:
            assert len(json.loads(reply.read())["predictions"][0]) == 10
        reporter = MetricsReporter(
            device_id=cfg.device_id,
            topic="t",
            recorder=MetricsRecorder(registry),
            probe=DeviceProbe(cfg.state_dir),
            queue=queue,
        )
        assert reporter.report_once() == 1
    finally:
        server.stop()
        queue.close()
    assert (prefix / "var/lib/litefleet/metrics-queue.sqlite3").exists()
