"""Synthetic devices that speak the metrics schema of the rollout design, for controller tests.

A :class:`FakeDevice` keeps cumulative counters per model version exactly as
``docs/agent-api.md`` and the rollout design (section 4) describe them: ``ok``,
``errors``, ``histogram_ms``, ``outputs`` (top-1 classes and confidence) and ``shadow``
(sampled/compared/agreed), plus ``boot``; :func:`metrics_payload` and
:func:`state_payload` give the bytes an agent would publish.

:class:`FakeFleet` runs such devices over a real broker: each tick every device serves
some requests on the version the repository's *signed* targets assign it (the same rule
as an agent: :func:`agent.protocol.choose_releases` over the signed releases), with the
behaviour a test gives per version (latency, error rate, agreement with the previous
version, class distribution), and publishes its state and metrics. It is for testing the
host-side controller without 20 agent processes; the end-to-end test uses real agents.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.protocol import ModelRelease, choose_releases
from agent.serving.stats import N_BUCKETS, bucket_index
from agent.telemetry.metrics import histogram_ms


@dataclass(frozen=True)
class Behaviour:
    """How a version answers on a fake device."""

    latency_ms: float = 1.0
    error_rate: float = 0.0
    agreement: float = 1.0  # with the previous version, on shadowed requests
    classes: Sequence[float] = (0.1,) * 10  # top-1 class probabilities


@dataclass
class VersionCounters:
    version: str
    ok: int = 0
    errors: int = 0
    latency: list[int] = field(default_factory=lambda: [0] * N_BUCKETS)
    classes: Counter[int] = field(default_factory=Counter)
    confidence: Counter[float] = field(default_factory=Counter)
    shadow: dict[str, Any] | None = None

    def serve(self, n: int, b: Behaviour, rng: random.Random, shadow_k: int, against: str | None) -> None:
        for _ in range(n):
            if rng.random() < b.error_rate:
                self.errors += 1
                continue
            self.ok += 1
            ms = b.latency_ms * rng.uniform(0.8, 1.2)
            self.latency[bucket_index(int(ms * 1e6))] += 1
            cls = rng.choices(range(len(b.classes)), weights=b.classes)[0]
            self.classes[cls] += 1
            self.confidence[round(min(20, max(1, int(rng.uniform(0.6, 1.0) * 20) + 1)) * 0.05, 2)] += 1
            if shadow_k and against is not None:
                if self.shadow is None or self.shadow.get("against") != against:
                    self.shadow = {
                        "against": against,
                        "k": shadow_k,
                        "sampled": 0,
                        "compared": 0,
                        "agreed": 0,
                        "dropped": 0,
                        "errors": 0,
                    }
                if rng.random() < 1 / shadow_k:
                    self.shadow["sampled"] += 1
                    self.shadow["compared"] += 1
                    self.shadow["agreed"] += rng.random() < b.agreement

    def entry(self, name: str, active: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": name,
            "version": self.version,
            "active": active,
            "requests": self.ok + self.errors,
            "ok": self.ok,
            "errors": self.errors,
            "bad_requests": 0,
            "histogram_ms": histogram_ms(tuple(self.latency)),
            "outputs": {
                "kind": "classes",
                "n": self.ok,
                "classes": [[c, n] for c, n in sorted(self.classes.items())],
                "confidence": [[b, n] for b, n in sorted(self.confidence.items())],
            },
        }
        if self.shadow is not None:
            out["shadow"] = dict(self.shadow)
        return out


@dataclass
class FakeDevice:
    device_id: str
    model: str
    active: str
    groups: tuple[str, ...] = ()
    boot: str = "b0"
    seq: int = 0
    versions: dict[str, VersionCounters] = field(default_factory=dict)
    previous: str | None = None
    shadow_k: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)

    def counters(self, version: str) -> VersionCounters:
        return self.versions.setdefault(version, VersionCounters(version))

    def switch(self, version: str, shadow_k: int) -> None:
        if version != self.active:
            self.previous, self.active = self.active, version
        self.shadow_k = shadow_k

    def state_payload(self) -> bytes:
        return json.dumps(
            {
                "device_id": self.device_id,
                "online": True,
                "status": "serving",
                "model": self.model,
                "version": self.active,
                "models": {self.model: {"version": int(self.active), "sha256": "0" * 64, "trial": False}},
                "groups": list(self.groups),
                "boot": self.boot,
                "ts": time.time(),
            }
        ).encode()

    def metrics_payload(self, ts: float | None = None) -> bytes:
        self.seq += 1
        models = [self.counters(self.active).entry(self.model, True)]
        return json.dumps(
            {
                "v": 1,
                "device_id": self.device_id,
                "seq": self.seq,
                "ts": ts or time.time(),
                "boot": self.boot,
                "interval_s": 1.0,
                "models": models,
            }
        ).encode()


def assigned(releases: Sequence[ModelRelease], device: FakeDevice) -> ModelRelease | None:
    return choose_releases(releases, device.device_id, device.groups).get(device.model)


class FakeFleet:
    """Fake devices on a real broker, following the repository's signed targets."""

    def __init__(
        self,
        port: int,
        repo_dir: Path,
        model: str,
        device_ids: Sequence[str],
        behaviour: Callable[[str], Behaviour],
        *,
        start_version: str,
        requests_per_tick: int = 20,
        tick_s: float = 0.2,
        seed: int = 0,
    ) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.repo_dir = repo_dir
        self.model = model
        self.behaviour = behaviour
        self.devices = [FakeDevice(d, model, start_version) for d in device_ids]
        self.requests_per_tick = requests_per_tick
        self.tick_s = tick_s
        self.rng = random.Random(seed)
        self.downloads: Counter[tuple[str, str]] = Counter()  # (device, version) switches
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"fake-fleet-{seed}", protocol=paho.MQTTv5
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        for dev in self.devices:
            self.publish_state(dev)

    def publish_state(self, dev: FakeDevice) -> None:
        self.client.publish(
            f"litefleet/v1/devices/{dev.device_id}/state", dev.state_payload(), qos=1, retain=True
        )

    def start(self) -> FakeFleet:
        self._thread.start()
        return self

    def releases(self) -> list[ModelRelease]:
        from converter.repo.repository import Repository

        repo = Repository.open(self.repo_dir)
        return [t.release for t in repo.catalog.values() if t.release is not None]

    def tick(self) -> None:
        releases = self.releases()
        for dev in self.devices:
            rel = assigned(releases, dev)
            if rel is not None and str(rel.version) != dev.active:
                self.downloads[(dev.device_id, str(rel.version))] += 1
                dev.switch(str(rel.version), rel.rollout.shadow_k)
                self.publish_state(dev)
            elif rel is not None:
                dev.shadow_k = rel.rollout.shadow_k
            b = self.behaviour(dev.active)
            dev.counters(dev.active).serve(self.requests_per_tick, b, self.rng, dev.shadow_k, dev.previous)
            self.client.publish(f"litefleet/v1/devices/{dev.device_id}/metrics", dev.metrics_payload(), qos=0)

    def _run(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self.tick()
            except (OSError, ValueError):  # a repository mid-write: the next tick reads it
                continue

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.client.loop_stop()
        self.client.disconnect()
