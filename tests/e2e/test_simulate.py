"""``litefleet-agent simulate``: 1,000 devices in one process on the agent's real code.

One push of the digits model reaches every simulated device: each verifies the
metadata with its own TUF client, downloads into its own state folder, checks and
activates, and reports online with the new version; no will replaces a live state
and no event arrives twice; a SIGTERM says goodbye for every device. Slow (about a
minute of CPU on two cores; CI runs it).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from agent.service.simulate import device_ids
from tests.support.harness import REPO_ROOT, must, push, watching, write_agent_config

DEVICES = 1000


def _lines_naming(log: Path, device_id: str) -> list[str]:
    """The broker's log lines about one device (its connections, its will)."""
    return [line for line in log.read_text(errors="replace").splitlines() if device_id in line][-20:]


@pytest.mark.slow
def test_a_push_reaches_a_thousand_simulated_devices(broker, tmp_path: Path, digits_int8) -> None:
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    config = write_agent_config(
        tmp_path / "template.toml",
        device_id="sim",
        broker=broker.url,
        state_dir=str(tmp_path / "state"),
        trusted_root=str(repo / "root.json"),
        groups=["bench"],
        metrics_interval_s=3600.0,
        refresh_interval_s=3600.0,
        probation_s=3600.0,
        log_level="warning",
    )
    ids = device_ids("sim", DEVICES)
    with watching(broker.port) as watch:
        sim = subprocess.Popen(
            [sys.executable, "-m", "agent", "simulate", "--config", str(config), "--devices", str(DEVICES)],
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / "simulate.log", "wb"),  # noqa: SIM115
            text=True,
            cwd=REPO_ROOT,
        )
        try:
            assert sim.stdout is not None
            assert sim.stdout.readline().startswith(f"simulate: {DEVICES} devices started, 0 failed")

            def every(pred) -> bool:  # type: ignore[no-untyped-def]
                return all(pred(watch.states.get(i) or {}) for i in ids)

            watch.wait_for(lambda: every(lambda s: s.get("status") == "idle"), 300, "every device idle")
            push(digits_int8.tflite, repo, broker.url)
            watch.wait_for(
                lambda: every(lambda s: s.get("online") is True and s.get("version") == "1"),
                600,
                "every device serving v1",
            )
            # each device verified and stored its own copy
            for i in (ids[0], ids[-1]):
                state = json.loads((tmp_path / "state" / i / "state.json").read_text())
                assert state["models"]["digits"]["active"]["version"] == 1, state
                assert (tmp_path / "state" / i / "tuf" / "targets.json").exists()
            rows = json.loads(must("status", "--broker", broker.url, "--json"))
            assert sum(1 for r in rows if r["version"] == "1" and r["online"]) == DEVICES
            # no will replaced a live state, no event came twice (QoS 1 redelivery)
            raw = list(watch.raw)
            wills = [t for t, p in raw if t.endswith("/state") and p and "models" not in json.loads(p)]
            assert not wills, (
                f"{len(wills)} wills, first {wills[0]}",
                [(t, p[:200]) for t, p in raw if t == wills[0]],
                _lines_naming(broker.config.data_dir / "mosquitto.log", wills[0].split("/")[-2]),
                (tmp_path / "simulate.log").read_text()[-3000:],
            )
            seen = Counter((e["device_id"], e["boot"], e["seq"]) for e in watch.events)
            assert max(seen.values()) == 1
            assert sum(1 for e in watch.events if e["event"] == "activated") == DEVICES
        finally:
            sim.send_signal(signal.SIGTERM)
            try:
                code = sim.wait(120)
            except subprocess.TimeoutExpired:
                sim.kill()
                raise
        said = sim.stdout.read() if sim.stdout else ""
        print(said)  # the keep-alive lag: how overloaded the simulation was (-s shows it)
        assert code == 0, (tmp_path / "simulate.log").read_text()[-3000:]
        # every device said goodbye: its full state with online false, not a will
        watch.wait_for(lambda: every(lambda s: s.get("online") is False), 60, "every goodbye")
        bad = sorted(i for i in ids if "models" not in watch.states[i])
        history = [(t, p[:200]) for t, p in list(watch.raw) if bad and f"/{bad[0]}/" in t]
        assert not bad, (
            f"{len(bad)} wills, first {bad[0]}",
            said,
            history,
            (tmp_path / "simulate.log").read_text()[-3000:],
        )
