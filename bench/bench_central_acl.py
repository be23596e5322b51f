"""Central's ACL when sites hold many devices: size, Mosquitto's start, reload and memory,
one ``device add --site``, and a site's publish rate against a small ACL's.

    .venv/bin/python bench/bench_central_acl.py [--layouts SITES:DEVICES,...] [--write-results]

Central's ACL names every device of every site (docs/sites.md: Mosquitto's patterns cannot
name a device's site). For each layout ``SITES:DEVICES``, a central secure folder with SITES
sites and DEVICES devices spread evenly over them is written (the registry, then ``SecureDir.ensure`` rewrites
every derived file, as each ``device add`` does), Mosquitto 2.0.11 is started on it, and:

* start: from starting Mosquitto until a new TLS connection with the host identity has its CONNACK;
* reload: from SIGHUP until such a connection has its CONNACK (Mosquitto rereads the files
  on its one thread and serves no client meanwhile);
* RSS of the Mosquitto process after the reload;
* one ``device add ID --site`` on a folder of that size;
* 2,000 QoS 1 state publishes by site ``s0``'s identity to its *last* device's topic, the
  time to the last PUBACK, against the same with a 10-device folder in the same run (the
  baseline: Mosquitto's ACL check walks the identity's list of topic lines).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.machine import describe  # noqa: E402
from converter.broker.mosquitto import BrokerProcess, free_port  # noqa: E402
from converter.broker.registry import AUTH_SITE, DeviceRecord, ListenerPorts, Registry  # noqa: E402
from converter.broker.sites import CentralDir  # noqa: E402
from converter.broker.uplink import load_uplink  # noqa: E402
from tests.support.secure import connect  # noqa: E402
from tests.support.sites import host_client  # noqa: E402

PUBLISHES = 2000


def build(root: Path, devices: int, sites: int) -> CentralDir:
    cd = CentralDir(root)
    cd.ensure(ports=ListenerPorts(free_port(), free_port(), free_port()))
    for s in range(sites):
        cd.add_site(f"s{s}")
    doc = cd.load().to_json()
    now = dt.datetime.now(dt.UTC).isoformat()
    records = [DeviceRecord(f"d{i:07d}", AUTH_SITE, now, site=f"s{i % sites}") for i in range(devices)]
    doc["devices"] = Registry(**{**_fields(cd.load()), "devices": tuple(records)}).to_json()["devices"]
    cd.paths.registry.write_text(json.dumps(doc))
    cd.ensure()  # rewrites the ACL and every other derived file from the registry
    return cd


def _fields(r: Registry) -> dict[str, Any]:
    return {k: getattr(r, k) for k in ("prefix", "sans", "ports", "host_password_hash", "revoked", "sites")}


def until_connack(cd: CentralDir, timeout_s: float = 300.0) -> float:
    t0 = time.perf_counter()
    deadline = t0 + timeout_s
    while time.perf_counter() < deadline:
        c = host_client_or_none(cd)
        if c is not None:
            c.close()
            return time.perf_counter() - t0
        time.sleep(0.01)
    raise RuntimeError("the broker never answered")


def host_client_or_none(cd: CentralDir) -> Any:
    try:
        return host_client(cd)
    except AssertionError:
        return None


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def publish_rate(cd: CentralDir, device_id: str) -> float:
    _, p = load_uplink(cd.site_dir("s0"))
    c = connect(cd.load().ports.cert, ca=p.ca_cert, cert=p.uplink_cert, key=p.uplink_key)
    assert c.connected.is_set(), c.connack
    try:
        topic = f"litefleet/v1/devices/{device_id}/state"
        assert c.publish(topic, b"{}").value in (0, 0x10), "the site may write its device's state"
        t0 = time.perf_counter()
        infos = [c.client.publish(topic, b'{"online": true}', qos=1) for _ in range(PUBLISHES)]
        for info in infos:
            info.wait_for_publish(120)
        return time.perf_counter() - t0
    finally:
        c.close()


def measure(work: Path, devices: int, sites: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    cd = build(work / f"s{sites}-n{devices}", devices, sites)
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cd.add_site_device("extra-1", "s0")
    add_s = time.perf_counter() - t0
    broker = BrokerProcess(cd.broker_config())
    t0 = time.perf_counter()
    broker.start(timeout_s=300)
    until_connack(cd)
    start_s = time.perf_counter() - t0
    try:
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGHUP)
        reload_s = until_connack(cd)
        mem = rss_mb(broker.proc.pid)
        # site s0's first and last device: Mosquitto's ACL check walks the identity's list
        first, last = "d0000000", f"d{(devices - 1) - ((devices - 1) % sites):07d}"
        pub_first_s = publish_rate(cd, first)
        pub_s = publish_rate(cd, last)
    finally:
        broker.stop()
    return {
        "sites": sites,
        "devices": devices,
        "acl_bytes": cd.paths.devices_acl.stat().st_size,
        "acl_lines": len(cd.paths.devices_acl.read_text().splitlines()),
        "save_s": save_s,
        "add_s": add_s,
        "start_s": start_s,
        "reload_s": reload_s,
        "rss_mb": mem,
        "publish_s": pub_s,
        "publish_first_s": pub_first_s,
    }


def section(rows: list[dict[str, Any]], base: dict[str, Any], layouts: str, machine: str, date: str) -> str:
    lines = [
        "## Sites: central's ACL with many site devices",
        "",
        f"`.venv/bin/python bench/bench_central_acl.py --layouts {layouts}` ({date}; {machine}).",
        "",
        "Central with SITES sites and DEVICES devices spread evenly over them; Mosquitto 2.0.11 on "
        "the generated files. Start and reload: until a new TLS connection gets its CONNACK. "
        f"Publishes: {PUBLISHES:,} QoS 1 state messages by site s0's identity to its last and to its "
        f"first device's topic, against the same on a folder of {base['devices']} devices in the same run.",
        "",
        "| sites | devices | ACL | lines | rewrite all files | one `device add --site` | Mosquitto start | "
        "reload (SIGHUP) | RSS | publishes: last device / first | vs 10 devices |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in [base, *rows]:
        lines.append(
            f"| {r['sites']} | {r['devices']:,} | {r['acl_bytes'] / 1e6:.1f} MB | {r['acl_lines']:,} "
            f"| {r['save_s']:.2f} s "
            f"| {r['add_s']:.2f} s | {r['start_s']:.2f} s | {r['reload_s']:.2f} s | {r['rss_mb']:.0f} MB "
            f"| {r['publish_s']:.2f} s / {r['publish_first_s']:.2f} s "
            f"| {r['publish_s'] / base['publish_s']:.1f}x "
            f"/ {r['publish_first_s'] / base['publish_first_s']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Sites: central's ACL.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(doc):
        doc = pattern.sub(lambda _m: text + "\n", doc, count=1)
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", default="10:1000,10:10000,10:100000,100:100000", help="SITES:DEVICES,...")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    machine = describe("paho-mqtt", "cryptography")
    print(f"# machine: {machine}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="lf-bench-acl-"))
    base = measure(work, 10, 10)
    print(base, flush=True)
    rows = []
    for layout in args.layouts.split(","):
        sites, devices = (int(x) for x in layout.split(":"))
        rows.append(measure(work, devices, sites))
        print(rows[-1], flush=True)
    text = section(rows, base, args.layouts, machine, time.strftime("%Y-%m-%d"))
    print("\n" + text)
    if args.write_results:
        write_section(REPO / "bench" / "RESULTS.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
