"""Why a site's bridge goes through litefleet's relay: a TLS failure towards central (here a
site bundle whose CA is not central's, so every handshake fails) must cost the site's own
devices nothing.

With Mosquitto 2.0.11 doing TLS in its bridge, the design experiments saw the whole site
broker stop answering after such failures (docs/sites.md); re-checked while building this,
with litefleet's bridge lines plus the TLS settings, it stopped answering after ~25 s in one
run and not within 45 s in another, so the trigger depends on timing and is not asserted
here. What is asserted is litefleet's side: behind the relay, the same fault leaves the
site broker answering every probe, and the failures are counted and named.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from converter.broker.certs import make_ca, new_key, pem_cert
from tests.support.sites import Central, SiteBroker, start_central

pytestmark = [
    pytest.mark.skipif(shutil.which("mosquitto_pub") is None, reason="mosquitto-clients are not installed"),
    pytest.mark.slow,
]
WATCH_S = 20.0


@pytest.fixture
def central(tmp_path: Path) -> Iterator[Central]:
    c = start_central(tmp_path, {"a": []})
    try:
        yield c
    finally:
        c.stop()


def test_tls_failures_towards_central_leave_the_site_broker_answering(
    tmp_path: Path, central: Central
) -> None:
    import datetime as dt

    site = SiteBroker(tmp_path, "a", central, [])
    (site.dir.root / "uplink" / "ca.pem").write_bytes(pem_cert(make_ca(new_key(), dt.datetime.now(dt.UTC))))
    site.start("--watchdog-s", "0")  # no restarts: this is about the broker staying responsive
    h = site.dir.host_client_settings()
    probe = [
        "timeout",
        "3",
        "mosquitto_pub",
        "-h",
        "localhost",
        "-p",
        str(h["port"]),
        "--cafile",
        h["ca_file"],
    ]
    probe += [
        "-u",
        h["username"],
        "-P",
        h["password"],
        "-t",
        "litefleet/v1/sites/a/ping",
        "-m",
        "x",
        "-q",
        "1",
    ]
    try:
        probes = missed = 0
        t0 = time.monotonic()
        while time.monotonic() - t0 < WATCH_S:
            probes += 1
            missed += subprocess.run(probe, capture_output=True).returncode != 0
            time.sleep(1)
        status = site.status()
    finally:
        site.kill()
    assert missed == 0, f"the site broker missed {missed} of {probes} probes"
    assert status["failures"] >= 3 and status["sessions"] == 0 and status["link"] == "down", status
    assert "certificate verify failed" in str(status["last_error"]), status
