"""The termux-services service under a real runit supervisor (``runsv``), as on a phone.

docs/android.md says runit restarts the agent whenever it exits. With
``check_isolation = "restart"`` that restart is what rejects a model that ended the agent
during its check, so here it is shown, not assumed: the repository's ``run`` and
``log/run`` scripts (Termux's prefix replaced by a folder of the test's, as the
documented configuration is), the documented agent.toml pointed at the test's broker,
runit's ``runsv`` and ``svlogd``, and a model that never returns from its check."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.agent.service.test_android import SERVICE, TERMUX, documented_config
from tests.support.harness import REPO_ROOT, FleetWatcher, must, write_agent_config

pytestmark = pytest.mark.skipif(
    shutil.which("runsv") is None, reason="runit is not installed (scripts/setup.sh installs it)"
)


def termux_prefix(tmp_path: Path) -> Path:
    """A $PREFIX with the service installed as docs/android.md says (``cp -r``), its scripts'
    ``#!$PREFIX/bin/sh`` pointing into it, and termux-services' ``svlogger``."""
    prefix = tmp_path / "usr"
    for d in ("bin", "etc/litefleet", "var/lib/litefleet", "var/service", "share/termux-services"):
        (prefix / d).mkdir(parents=True)
    (prefix / "bin/sh").symlink_to("/bin/sh")
    agent = prefix / "bin/litefleet-agent"  # the console script pip would install
    agent.write_text(f'#!/bin/sh\nexec {sys.executable} -m agent "$@"\n')
    agent.chmod(0o755)
    # termux-services' svlogger: svlogd into $PREFIX/var/log/sv/<service>/
    svlogger = prefix / "share/termux-services/svlogger"
    svlogger.write_text(
        '#!/bin/sh\nsv=$(basename "$(dirname "$PWD")")\n'
        'mkdir -p "$PREFIX/var/log/sv/$sv"\nexec svlogd "$PREFIX/var/log/sv/$sv"\n'
    )
    svlogger.chmod(0o755)
    installed = prefix / "var/service" / SERVICE.name
    shutil.copytree(SERVICE, installed)
    for script in (installed / "run", installed / "log" / "run"):
        script.write_text(script.read_text().replace(TERMUX, str(prefix)))
    return prefix


def write_documented_config(prefix: Path, **overrides: object) -> Path:
    """docs/android.md's agent.toml under ``prefix``, with ``overrides``."""
    keys = {**tomllib.loads(documented_config(prefix)), **overrides}
    return write_agent_config(prefix / "etc/litefleet/agent.toml", **keys)


class RunSv:
    """``runsv`` supervising one service folder (termux-services' runsvdir starts one per service)."""

    def __init__(self, service: Path, env: dict[str, str]) -> None:
        self.service = service
        self.env = env
        self.proc = subprocess.Popen(["runsv", str(service)], env=env, start_new_session=True)

    def status(self) -> str:
        return self.sv("status").stdout.strip()

    def sv(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sv", *args, str(self.service)], capture_output=True, text=True, env=self.env)

    def agent_pid(self) -> int | None:
        m = re.match(r"run: [^:]+: \(pid (\d+)\) (\d+)s", self.status())
        return int(m.group(1)) if m else None

    def wait_pid(self, ok: Callable[[int], bool], timeout_s: float, what: str) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pid = self.agent_pid()
            if pid is not None and ok(pid):
                return pid
            time.sleep(0.2)
        raise AssertionError(f"{what}: runit says {self.status()!r}")

    def close(self) -> None:
        self.sv("-w", "30", "force-stop")
        self.sv("exit")
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def wait_text(path: Path, wanted: tuple[str, ...], timeout_s: float) -> str:
    """The file's text once it holds every one of ``wanted`` (svlogd writes a moment later)."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = path.read_text(errors="replace") if path.exists() else ""
        if all(w in text for w in wanted):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} lacks {[w for w in wanted if w not in text]}:\n{text[-3000:]}")
        time.sleep(0.2)


def test_runit_restarts_an_agent_a_model_hung_and_the_restart_rejects_the_model(
    broker, tmp_path: Path, digits_int8
) -> None:
    from tests.support.models import _never_returning_model

    hang = tmp_path / "hang" / "hang.tflite"
    hang.parent.mkdir()
    _never_returning_model(hang)
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    prefix = termux_prefix(tmp_path)
    shutil.copy(repo / "root.json", prefix / "etc/litefleet/root.json")
    write_documented_config(
        prefix,
        device_id="phone-rs",
        broker=broker.url,
        http="",
        check_isolation="restart",
        check_timeout_s=2.0,
        probation_s=1.0,
        probation_inferences=1,
    )
    env = {
        "PREFIX": str(prefix),
        "PATH": f"{prefix / 'bin'}:/usr/bin:/bin",
        "PYTHONPATH": str(REPO_ROOT),
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "HOME": str(tmp_path),
    }
    log = prefix / "var/log/sv/litefleet-agent/current"
    watch = FleetWatcher(broker.port)
    runsv = RunSv(prefix / "var/service/litefleet-agent", env)
    try:
        first = runsv.wait_pid(lambda _: True, 30, "the agent never started under runit")
        must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "m", "--broker", broker.url)
        watch.wait_active("phone-rs", "m", 1, timeout_s=90)
        must("push", str(hang), "--repo", str(repo), "--name", "m", "--broker", broker.url, "--no-check-data")
        ev = watch.wait_event("phone-rs", "rejected", timeout_s=180, version=2)
        assert ev["reason"] == "crashed", ev
        watch.wait_for(lambda: watch.active("phone-rs") == ("m", "1"), 60, "version 1 serving again")
        second = runsv.wait_pid(lambda pid: pid != first, 10, "runit did not start the agent again")
        assert os.path.exists(f"/proc/{second}"), runsv.status()
        said = (  # the agent's output, through log/run and svlogd, both runs
            "the candidate's check used more than 2 s of CPU time",
            "the agent stopped while checking this model",
        )
        text = wait_text(log, said, 30)
        assert "nothing seems to start it again" not in text  # it knows runsv restarts it
        state = json.loads((prefix / "var/lib/litefleet/state.json").read_text())["models"]["m"]
        assert state["checking"] is None and [r["version"] for r in state["rejected"]] == [2]
        assert state["active"]["version"] == 1
    finally:
        runsv.close()
        watch.close()
