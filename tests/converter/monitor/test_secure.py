"""``litefleet monitor --secure-dir`` against the secure broker (TLS, per-identity ACLs).

The host identity's ACL (``read <prefix>/v1/devices/#``) must also let it take
a *shared* subscription on device topics; Mosquitto checks ``$share/<g>/F``
against the ACL as ``F``. A device publishes with its own password identity.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from agent.mqtt.client import wait_until
from tests.support.harness import REPO_ROOT
from tests.support.monitor import scraped_value
from tests.support.payloads import agent_payload, state_payload
from tests.support.secure import start_secure


def test_monitor_with_the_host_identity_of_a_secure_broker(tmp_path: Path) -> None:
    secure = start_secure(tmp_path, {"dev-p": "password"})
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "converter",
            "monitor",
            "--secure-dir",
            str(secure.dir.root),
            "--db",
            str(tmp_path / "m.db"),
            "--prometheus",
            "127.0.0.1:0",
            "--share",
            "g",
            "--quiet",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
        cwd=REPO_ROOT,
    )
    device = None
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        found = re.search(r"serving Prometheus on (http://\S+)/metrics", line)
        assert found, line
        url = found.group(1)
        device = secure.device("dev-p")
        assert device.connected.is_set()
        device.client.publish(
            "litefleet/v1/devices/dev-p/state", state_payload(device_id="dev-p"), qos=1, retain=True
        ).wait_for_publish(5)
        for seq in (1, 2):
            device.client.publish(
                "litefleet/v1/devices/dev-p/metrics", agent_payload("dev-p", seq=seq), qos=1
            ).wait_for_publish(5)

        def scrape() -> str:
            with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
                return resp.read().decode()

        assert wait_until(
            lambda: scraped_value(scrape(), "litefleet_monitor_samples_stored_total") == 2, 10
        ), scrape()
        body = scrape()
        assert scraped_value(body, 'litefleet_device_online{device="dev-p"}') == 1
        # the host identity may write rollout records, a device may not (it could fake a verdict):
        # the device's record is acknowledged (and dropped) before the host's is sent
        record = {"name": "digits", "version": 4, "state": "baking", "wave": 0, "waves": [5, 100]}
        forged = json.dumps({**record, "name": "faces"})
        device.client.publish("litefleet/v1/rollouts/faces", forged, qos=1, retain=True).wait_for_publish(5)
        host = secure.host()
        try:
            host.client.publish(
                "litefleet/v1/rollouts/digits", json.dumps(record), qos=1, retain=True
            ).wait_for_publish(5)
        finally:
            host.close()
        info = 'litefleet_rollout_info{model="digits",previous="",target="",version="4"}'
        assert wait_until(lambda: scraped_value(scrape(), info) == 1, 10), scrape()
        assert 'model="faces"' not in scrape()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
    finally:
        if device is not None:
            device.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        secure.broker.kill()
