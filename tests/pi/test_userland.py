"""The device stack inside an emulated Raspberry Pi userland (arm64 and armhf under qemu).

What these prove, per architecture: the very wheels (and, on armhf, Debian's numpy) a Pi
installs import in the Pi's own Python; nothing is loaded from the host; the agent's
runtime loader picks the architecture's LiteRT; the converter's int8 digits model gives
bit-exact outputs (arm64 as a Pi 4, Pi 5 and Pi 3: vs the host's LiteRT; armhf: vs the
host's tflite-runtime of the same version, and within the golden vectors' tolerance of the
host's LiteRT); MQTT 5
request/response reaches a Mosquitto on the host, in plain TCP and in TLS.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import os
import queue
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .userland import Userland

pytestmark = pytest.mark.pi

HERE = Path(__file__).resolve().parent

_PROBE = r"""
import importlib, importlib.metadata as md, importlib.util, json, platform, ssl, sys, time
started = time.perf_counter()
for name in ("numpy", "paho.mqtt.client", "tuf.ngclient", "securesystemslib", sys.argv[1]):
    importlib.import_module(name)
import_s = time.perf_counter() - started
dists = {}
for dist in ("numpy", "paho-mqtt", "tuf", "securesystemslib", "ai-edge-litert", "tflite-runtime"):
    try:
        dists[dist] = md.version(dist)
    except md.PackageNotFoundError:
        pass
maps = sorted({line.split()[-1] for line in open("/proc/self/maps") if "/" in line})
model = [l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("Model")]
print(json.dumps({
    "machine": platform.machine(),
    "python": platform.python_version(),
    "dists": dists,
    "numpy": sys.modules["numpy"].__version__,
    "import_s": import_s,
    "absent": [m for m in ("tensorflow", "keras") if importlib.util.find_spec(m)],
    "mapped_files": maps,
    "cpuinfo_model": model,
    "ca_certs": ssl.create_default_context().cert_store_stats()["x509_ca"],
}))
"""


def _probe(userland: Userland, code: str, *args: str, timeout: float = 300) -> Any:
    proc = userland.run(["-c", code, *args], timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _pins(userland: Userland) -> dict[str, str]:
    return dict(pin.split("==") for pin in userland.spec.wheels)


def test_device_stack_imports_inside_the_userland(userland: Userland) -> None:
    info = _probe(userland, _PROBE, userland.spec.runtime_module)
    pins = _pins(userland)

    assert info["machine"] == userland.spec.machine
    assert info["python"].startswith("3.11.")
    for dist in ("paho-mqtt", "tuf", "securesystemslib"):
        assert info["dists"][dist] == pins[dist]
    runtime = "ai-edge-litert" if userland.spec.arch == "arm64" else "tflite-runtime"
    assert info["dists"][runtime] == pins[runtime]
    if userland.spec.arch == "arm64":
        assert info["numpy"] == pins["numpy"]
    else:  # Debian's python3-numpy: "1:1.24.2-1+deb12u1" -> "1.24.2"
        debian = userland.manifest["debian_packages"]["python3-numpy"]
        assert info["numpy"] == debian.split(":")[-1].split("-")[0]
    # the device needs neither, and the userland has neither
    assert info["absent"] == []
    # every ELF object the process mapped (python, libc, numpy, LiteRT) is the rootfs's own:
    # qemu -L falls back to host paths, so a missing library would be the host's x86-64 one
    mapped = [p for p in info["mapped_files"] if p.startswith("/")]
    assert mapped, "no mapped files reported"
    outside = [p for p in mapped if not p.startswith(str(userland.root) + "/")]
    assert outside == []
    assert info["cpuinfo_model"] == [userland.board.cpuinfo.split("Model\t\t: ")[1].strip()]
    assert info["ca_certs"] > 100


def test_ca_bundle_is_the_rootfs_own(userland: Userland) -> None:
    # openssl looks in /usr/lib/ssl; each link must end inside the rootfs, or qemu would
    # hand the guest the host's file of that name
    for name in ("usr/lib/ssl/cert.pem", "usr/lib/ssl/certs"):
        resolved = (userland.root / name).resolve()
        assert resolved.is_relative_to(userland.root.resolve()), resolved
        assert resolved.exists()
    bundle = (userland.root / "etc/ssl/certs/ca-certificates.crt").read_text()
    count = bundle.count("-----BEGIN CERTIFICATE-----")
    info = _probe(
        userland,
        "import json, ssl; print(json.dumps(ssl.create_default_context().cert_store_stats()))",
    )
    assert info["x509_ca"] == count


_AGENT_IMPORTS = r"""
import importlib, json, pkgutil, sys
import agent
names = sorted(m.name for m in pkgutil.walk_packages(agent.__path__, "agent.")
               if not m.name.endswith("__main__"))
failed = {}
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = repr(exc)
from agent.serving.runtime import resolve_runtime
runtime = resolve_runtime()
print(json.dumps({
    "modules": names,
    "failed": failed,
    "runtime": runtime.name,
    "host_side": [m for m in ("tensorflow", "keras", "converter") if m in sys.modules],
}))
"""


def test_every_agent_module_imports_and_picks_the_architectures_litert(userland: Userland) -> None:
    info = _probe(userland, _AGENT_IMPORTS)
    assert "agent.serving.runtime" in info["modules"] and len(info["modules"]) > 20
    assert info["failed"] == {}
    assert info["runtime"] == {"arm64": "litert", "armhf": "tflite_runtime"}[userland.spec.arch]
    # the device side never pulls in the host's packages
    assert info["host_side"] == []


# -- int8 inference: bit-exact under emulation ---------------------------------------------


def _digits_inputs(model: Any, path: Path) -> Path:
    """The golden inputs plus the whole validation set, quantized like the converter does."""
    from ai_edge_litert.interpreter import Interpreter

    detail = Interpreter(model_path=str(model.tflite)).get_input_details()[0]
    scale, zero_point = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    with np.load(model.validation) as data:
        x = data["x"]
    q = np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(detail["dtype"])
    with np.load(model.golden) as golden:
        golden_x = golden["input_0"]
    np.savez(path, input_0=np.concatenate([golden_x, q.reshape(-1, *golden_x.shape[1:])]))
    return path


def _infer(cmd: list[Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    proc = subprocess.run(
        [str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _outputs(path: Path) -> np.ndarray:
    with np.load(path) as data:
        return np.array(data["output_0"])


def _emulated(userland: Userland, model: Any, inputs: Path, out: Path) -> dict[str, Any]:
    args = [HERE / "guest_infer.py", userland.spec.runtime_module, model.tflite, inputs, out]
    return _infer(userland.command(args), env=userland.environment())


def test_int8_digits_is_bit_exact_on_arm64(
    arm64_board_userland: Userland, digits_int8: Any, tmp_path: Path
) -> None:
    inputs = _digits_inputs(digits_int8, tmp_path / "inputs.npz")
    host = _infer(
        [
            sys.executable,
            HERE / "guest_infer.py",
            "ai_edge_litert.interpreter",
            digits_int8.tflite,
            inputs,
            tmp_path / "host.npz",
        ]
    )
    guest = _emulated(arm64_board_userland, digits_int8, inputs, tmp_path / "guest.npz")

    assert guest["version"] == host["version"]
    expected, got = _outputs(tmp_path / "host.npz"), _outputs(tmp_path / "guest.npz")
    assert got.dtype == expected.dtype == np.int8
    assert got.shape == expected.shape and got.shape[0] == guest["samples"] > 400
    np.testing.assert_array_equal(got, expected)


def test_int8_digits_on_armhf_matches_the_same_tflite_runtime(
    armhf_userland: Userland, digits_int8: Any, host_tflite_runtime: Path, tmp_path: Path
) -> None:
    inputs = _digits_inputs(digits_int8, tmp_path / "inputs.npz")
    reference = _infer(
        [
            host_tflite_runtime,
            HERE / "guest_infer.py",
            "tflite_runtime.interpreter",
            digits_int8.tflite,
            inputs,
            tmp_path / "host.npz",
        ]
    )
    guest = _emulated(armhf_userland, digits_int8, inputs, tmp_path / "guest.npz")

    assert guest["version"] == reference["version"]
    expected, got = _outputs(tmp_path / "host.npz"), _outputs(tmp_path / "guest.npz")
    assert got.shape == expected.shape and got.shape[0] > 400
    np.testing.assert_array_equal(got, expected)
    # against the golden vectors (made by the host's LiteRT): within their tolerance
    with np.load(digits_int8.golden) as golden:
        want, atol = golden["output_0"], float(golden["atol_0"])
    diff = np.abs(got[: len(want)].astype(np.int32) - want.astype(np.int32))
    assert diff.max() <= atol


# -- MQTT from the emulated Python to the host's Mosquitto ---------------------------------


def _round_trip(userland: Userland, port: int, prefix: str, cafile: Path | None) -> dict:
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    events: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if cafile is not None:
        client.tls_set_context(ssl.create_default_context(cafile=str(cafile)))
    client.on_message = lambda _c, _u, msg: events.put(msg)
    client.connect("127.0.0.1", port)
    client.subscribe([(f"{prefix}/ready", 1), (f"{prefix}/reply", 1)])
    client.loop_start()
    args: list[Any] = [HERE / "guest_mqtt.py", "127.0.0.1", str(port), prefix]
    if cafile is not None:
        args += ["--cafile", cafile]
    guest = userland.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = events.get(timeout=120)
        assert ready.topic == f"{prefix}/ready"
        payload = os.urandom(64 * 1024)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = f"{prefix}/reply"
        props.CorrelationData = b"req-1"
        client.publish(f"{prefix}/request", payload, qos=1, properties=props)
        reply = events.get(timeout=120)
        _, err = guest.communicate(timeout=120)
        assert guest.returncode == 0, err[-3000:]
    finally:
        if guest.poll() is None:
            guest.kill()
            guest.wait()
        client.loop_stop()
        client.disconnect()
    assert reply.topic == f"{prefix}/reply"
    reply_props: Any = reply.properties
    assert reply_props.CorrelationData == b"req-1"
    body = dict(json.loads(reply.payload))
    assert body["length"] == len(payload)
    assert body["sha256"] == hashlib.sha256(payload).hexdigest()
    return body


def test_mqtt5_round_trip_with_the_host_broker(
    userland: Userland, broker: Any, request: pytest.FixtureRequest
) -> None:
    body = _round_trip(userland, broker.port, f"pi-test/{request.node.name}", None)
    assert body["machine"] == userland.spec.machine
    assert body["tls"] is False


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1: (ca.pem, server.pem, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pi-test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = (folder / "ca.pem", folder / "server.pem", folder / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_mqtt5_round_trip_over_tls(
    userland: Userland, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from converter.broker.mosquitto import BrokerConfig, BrokerProcess, free_port

    ca, cert, key = _tls_files(tmp_path / "tls")
    port = free_port()
    config = BrokerConfig(
        data_dir=tmp_path / "broker",
        port=port,
        plain_listener=False,
        persistence=False,
        extra_lines=[
            f"listener {port} 127.0.0.1",
            f"cafile {ca}",
            f"certfile {cert}",
            f"keyfile {key}",
        ],
    )
    with BrokerProcess(config) as tls_broker:
        body = _round_trip(userland, tls_broker.port, f"pi-test/{request.node.name}", ca)
    assert body["machine"] == userland.spec.machine
    assert body["tls"] is True


def test_a_python_child_of_the_emulated_python_is_emulated_too(userland: Userland) -> None:
    # the agent starts candidate checks as [sys.executable, "-m", ...]; without the
    # trampoline that exec fails with ENOEXEC (the host cannot run an ARM ELF)
    code = (
        "import json, platform, subprocess, sys;"
        "child = subprocess.run([sys.executable, '-c', 'import platform; print(platform.machine())'],"
        " capture_output=True, text=True, check=True);"
        "print(json.dumps({'parent': platform.machine(), 'child': child.stdout.strip()}))"
    )
    info = _probe(userland, code)
    assert info == {"parent": userland.spec.machine, "child": userland.spec.machine}
