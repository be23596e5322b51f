"""Sites: bytes per bridge per model, and push-to-all-active at two sites vs one central broker.

    .venv/bin/python bench/bench_sites.py [--devices 10] [--runs 3] [--skip-mobilenet] [--write-results]

Two fleets of the same size run side by side, each with real agent processes:

* **sites**: a central secure broker and two site brokers (``litefleet broker --secure SITE
  --upstream``, each bridged through its relay), ``--devices`` agents at each site;
* **central**: one central secure broker with ``2 x --devices`` agents connected to it.

For each model (the digits CNN and MobileNetV2 224, both int8 with card and golden vectors,
converted once and cached in ``bench/out/sites/``) and each run, a new version is pushed to each
fleet in turn (the order alternates between runs; two different files alternate between versions)
and timed from the start of ``litefleet push`` until central's host sees every device's retained
state on the new version (for the sites that state comes up through the bridges). The figures
are medians and the ratio sites/central, from the same run. The bytes are the relays' counters
(plain MQTT bytes, each direction) against what central published for the push (a subscriber to
``repo/#`` at central) and what the site's devices received (their ``verified`` events).
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.protocol import Topics  # noqa: E402
from bench.machine import describe  # noqa: E402
from tests.support.harness import AgentProcess, FleetWatcher, must  # noqa: E402
from tests.support.secure import Client  # noqa: E402
from tests.support.sites import Central, SiteBroker, start_central, wait_until  # noqa: E402

TOPICS = Topics()
OUT = REPO / "bench" / "out" / "sites"


# -- models -------------------------------------------------------------------------------


def digits_pair(out: Path) -> list[Path]:
    """Two digits CNNs (two training seeds), int8 with card and golden vectors."""
    from converter.convert.pipeline import ConvertConfig, convert_model
    from tests.support.models import digits_data, save_digits_npz, train_digits_cnn

    paths = [out / f"digits{i}" / "digits.tflite" for i in range(2)]
    if all(p.exists() for p in paths):
        return paths
    data = digits_data()
    x_train, _, x_test, y_test = data
    cal, val = (
        save_digits_npz(out / "digits-cal.npz", x_train),
        save_digits_npz(out / "digits-val.npz", x_test, y_test),
    )
    for seed, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        model = train_digits_cnn(data, seed=seed)
        src = path.with_suffix(".keras")
        model.save(src)
        convert_model(
            src, path, ConvertConfig(quantize="int8", latency_runs=5), calibration=cal, validate=val
        )
    return paths


def mobilenet_pair(out: Path) -> list[Path]:
    """Two MobileNetV2 224 (random weights, the second's classifier nudged), int8."""
    import numpy as np

    from converter.convert.pipeline import ConvertConfig, convert_model
    from tests.support.models import mobilenet_v2, synthetic_images

    paths = [out / f"mnv2-{i}" / "mnv2.tflite" for i in range(2)]
    if all(p.exists() for p in paths):
        return paths
    np.savez(out / "mnv2-cal.npz", x=synthetic_images(32, seed=3))
    np.savez(out / "mnv2-val.npz", x=synthetic_images(16, seed=4))
    model = mobilenet_v2(224, bn_data=synthetic_images(16, seed=1), classifier_activation=None)
    for i, path in enumerate(paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        if i:
            kernel, bias = model.layers[-1].get_weights()
            model.layers[-1].set_weights([kernel * 1.01, bias])
        src = path.with_suffix(".keras")
        model.save(src)
        convert_model(
            src,
            path,
            ConvertConfig(quantize="int8", latency_runs=5, max_accuracy_drop=100.0, force=True),
            calibration=out / "mnv2-cal.npz",
            validate=out / "mnv2-val.npz",
        )
    return paths


def push_bytes(path: Path) -> int:
    return sum(
        p.stat().st_size for p in (path, path.with_suffix(".card.json"), path.with_suffix(".golden.npz"))
    )


# -- fleets -------------------------------------------------------------------------------


@dataclass
class Fleet:
    name: str
    central: Central
    repo: Path
    watch: FleetWatcher
    tap: Client
    devices: list[str]
    sites: dict[str, SiteBroker] = field(default_factory=dict)
    site_devices: dict[str, list[str]] = field(default_factory=dict)
    agents: list[AgentProcess] = field(default_factory=list)

    def close(self) -> None:
        for a in self.agents:
            a.kill()
        for s in self.sites.values():
            s.kill()
        self.tap.close()
        self.watch.close()
        self.central.stop()


def start_fleet(work: Path, name: str, per_site: int, with_sites: bool) -> Fleet:
    root = work / name
    root.mkdir()
    if with_sites:
        layout = {s: [f"{s}-{i:03d}" for i in range(per_site)] for s in ("a", "b")}
        central = start_central(root, layout)
    else:
        layout = {}
        central = start_central(root, {})
        for i in range(2 * per_site):
            central.dir.add_device(f"c-{i:03d}")
        central.dir.reload_broker()
    repo = root / "repo"
    must("repo", "init", str(repo))
    watch = FleetWatcher(secure_dir=central.dir.root)
    tap = central.host()
    tap.subscribe(TOPICS.repo_filter)
    fleet = Fleet(name, central, repo, watch, tap, [], site_devices=layout)
    try:
        for site, ids in layout.items():
            s = SiteBroker(root, site, central, ids)
            s.start()
            fleet.sites[site] = s
            for d in ids:
                fleet.agents.append(
                    AgentProcess(
                        root, d, s.device_url, repo / "root.json", log_level="warning", **s.device_keys(d)
                    )
                )
        if not with_sites:
            url = f"mqtts://localhost:{central.cert_port}"
            for d in (r.device_id for r in central.dir.devices()):
                folder = central.dir.paths.device_dir(d)
                keys = {
                    "ca_file": str(folder / "ca.pem"),
                    "cert_file": str(folder / f"{d}.pem"),
                    "key_file": str(folder / f"{d}.key"),
                }
                fleet.agents.append(
                    AgentProcess(root, d, url, repo / "root.json", log_level="warning", **keys)
                )
        for s in fleet.sites.values():
            s.wait_status(lambda st: st.get("link") == "up", 60, "link up")
        for a in fleet.agents:
            a.start()
            fleet.devices.append(a.device_id)
        watch.wait_for(
            lambda: all((watch.states.get(d) or {}).get("online") for d in fleet.devices),
            300,
            f"{name} online",
        )
    except BaseException:
        fleet.close()
        raise
    return fleet


def push_once(fleet: Fleet, model: Path, name: str, version: int) -> dict[str, Any]:
    before = {s: site.status()["bytes_down"] for s, site in fleet.sites.items()}
    mark = len(fleet.tap.messages)
    t0_wall = time.time()
    t0 = time.perf_counter()
    must(
        "push",
        str(model),
        "--repo",
        str(fleet.repo),
        "--name",
        name,
        "--secure-dir",
        str(fleet.central.dir.root),
    )
    w = fleet.watch
    w.wait_for(
        lambda: all(serves(w, d, name, version) for d in fleet.devices), 600, f"{fleet.name} v{version}"
    )
    seen_s = time.perf_counter() - t0
    activated = [
        e["ts"] for d in fleet.devices for e in w.events_of(d, "activated") if e.get("version") == version
    ]
    size = push_bytes(model)
    wait_until(lambda: live_bytes(fleet.tap, mark) >= size, 30, "the tap")
    pushed = live_bytes(fleet.tap, mark)
    row: dict[str, Any] = {"seen_s": seen_s, "last_activated_s": max(activated) - t0_wall, "pushed": pushed}
    for s, site in fleet.sites.items():

        def counted(x: dict[str, Any], s: str = s) -> bool:
            return bool(x["bytes_down"] - before[s] >= pushed)

        st = site.wait_status(counted, 30, "bytes counted")
        ids = fleet.site_devices[s]
        row[f"bridge_{s}"] = st["bytes_down"] - before[s]
        row[f"devices_{s}"] = sum(
            e["bytes_received"]
            for d in ids
            for e in w.events_of(d, "verified")
            if e.get("version") == version
        )
    return row


def serves(w: FleetWatcher, device_id: str, name: str, version: int) -> bool:
    """The device's retained state has model ``name`` active at ``version`` (a device runs
    both models, and the state's top-level ``model`` names only the first)."""
    state = w.states.get(device_id) or {}
    return bool(state.get("online")) and (state.get("models") or {}).get(name, {}).get("version") == version


def live_bytes(tap: Client, start: int) -> int:
    with tap.new_message:
        return sum(len(m.payload) for m in tap.messages[start:] if not m.retain)


# -- report -------------------------------------------------------------------------------


def section(results: dict[str, Any]) -> str:
    n = results["devices"]
    lines = [
        "## Sites: bytes per bridge, push to all active",
        "",
        f"`.venv/bin/python bench/bench_sites.py --devices {n} --runs {results['runs']}` ({results['date']}; "
        f"{results['machine']}).",
        "",
        f"Two fleets side by side, real agent processes: **sites** = central + 2 site brokers with {n} "
        f"agents each (`litefleet broker --secure SITE --upstream`, bridged through the relay); "
        f"**central** = one central secure broker with {2 * n} agents. One push per fleet per run, "
        "alternating which fleet goes first; time from the start of `litefleet push` until central's "
        "host sees every device's retained state on the new version (at the sites that state comes "
        "up through the bridges). Bytes: the relay's counter (plain MQTT bytes, central to site) "
        "against what central published for the push and what the site's devices received.",
        "",
        "| model (int8) | pushed per version | bytes down each bridge | per pushed byte | "
        f"the site's {n} devices received | bridge / devices |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in results["models"]:
        for s in ("a", "b"):
            bridge = statistics.median(r[f"bridge_{s}"] for r in m["sites"])
            dev = statistics.median(r[f"devices_{s}"] for r in m["sites"])
            pushed = statistics.median(r["pushed"] for r in m["sites"])
            lines.append(
                f"| {m['name']} (site {s}) | {pushed:,.0f} B | {bridge:,.0f} B | "
                f"**{bridge / pushed:.3f}x** | {dev:,.0f} B | {bridge / dev:.3f} (1/{dev / bridge:.1f}) |"
            )
    lines += [
        "",
        f"| model (int8) | central, {2 * n} agents: push -> all active | two sites, {n} + {n} agents | "
        "sites / central, per run | median ratio | same, by the last `activated` event |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in results["models"]:
        pairs = list(zip(m["central"], m["sites"], strict=True))
        seen = [s["seen_s"] / c["seen_s"] for c, s in pairs]
        act = [s["last_activated_s"] / c["last_activated_s"] for c, s in pairs]
        lines.append(
            f"| {m['name']} | {statistics.median(c['seen_s'] for c, _ in pairs):.2f} s "
            f"| {statistics.median(s['seen_s'] for _, s in pairs):.2f} s "
            f"| {', '.join(f'{r:.2f}' for r in seen)} | **{statistics.median(seen):.2f}x** "
            f"| {statistics.median(act):.2f}x |"
        )
    lines += [
        "",
        f"Times are medians of {results['runs']} runs; each run pushes to both fleets back to back, so "
        "the ratio is taken per run and its median reported. Every run's figures are in "
        "`bench/out/sites/results.txt`.",
        "",
    ]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace this bench's section of ``path`` (or append it), nothing else."""
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(r"^## Sites: bytes per bridge.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(doc):
        doc = pattern.sub(lambda _m: text + "\n", doc, count=1)
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--devices", type=int, default=10, help="agents per site (the central fleet gets twice as many)"
    )
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-mobilenet", action="store_true")
    ap.add_argument(
        "--write-results", action="store_true", help="replace this bench's section of bench/RESULTS.md"
    )
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    machine = describe("paho-mqtt", "tuf", "ai-edge-litert")
    print(f"# machine: {machine}", flush=True)
    kinds = [("digits", digits_pair(OUT))]
    if not args.skip_mobilenet:
        kinds.append(("mobilenet_v2", mobilenet_pair(OUT)))
    # after the conversions: TensorFlow's import replaces SIGINT's handler, and either
    # signal must reach the cleanup below (agents and brokers are child processes)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    logging.getLogger().setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="lf-bench-sites-"))
    log = open(OUT / "results.txt", "w")  # noqa: SIM115
    fleets: list[Fleet] = []
    results: dict[str, Any] = {
        "devices": args.devices,
        "runs": args.runs,
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "models": [],
    }
    try:
        for name, with_sites in (("sites", True), ("central", False)):
            fleets.append(start_fleet(work, name, args.devices, with_sites))
        for kind, files in kinds:
            rows: dict[str, list[dict[str, Any]]] = {"sites": [], "central": []}
            for run in range(args.runs):
                order = fleets if run % 2 == 0 else fleets[::-1]
                for fleet in order:
                    row = push_once(fleet, files[run % 2], kind, run + 1)
                    rows[fleet.name].append(row)
                    line = f"{kind} run {run + 1} {fleet.name}: {row}"
                    print(line, flush=True)
                    log.write(line + "\n")
            results["models"].append({"name": kind, **rows})
    finally:
        for f in fleets:
            f.close()
        log.close()
    text = section(results)
    print("\n" + text)
    if args.write_results:
        write_section(REPO / "bench" / "RESULTS.md", text)
        print("updated the '## Sites' section of bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
