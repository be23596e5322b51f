"""The real agent on a Raspberry Pi's userland: ``litefleet-agent`` under qemu, end to end.

A Mosquitto and the host CLI run on x86-64; the agent process itself runs emulated
(arm64: a Pi 4 with ai-edge-litert; armhf: a Pi 2 with tflite-runtime and Debian's numpy
1.24), exactly as ``python -m agent run --config agent.toml``. Per architecture it must:
pull the signed int8 digits model over MQTT, verify it (TUF), pass its golden vectors in a
forked check process, activate it, tell systemd's notify socket ``READY=1``, answer REST
``:predict`` with the host runtime's outputs (arm64: bit for bit; armhf: bit for bit with
the host's tflite-runtime of the same version and within the golden tolerance of the host's
LiteRT), report metrics; then take a v2 (the float32 model) the same way without a restart.

No timing is asserted: waits have generous limits only so that a hung agent fails the test.
Figures go to ``bench/RESULTS.md`` (``python -m tests.pi.measure_agent``).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.files import file_sha256
from converter.broker.mosquitto import free_port
from tests.support.harness import FleetWatcher, must

from .emulated_agent import EmulatedAgent, MetricsListener, NotifySocket, Rest, model_metrics
from .userland import Userland

pytestmark = pytest.mark.pi

HERE = Path(__file__).resolve().parent
DEVICE = "pi-emu"
# an emulated agent takes seconds where the host takes milliseconds, on a shared 2-core VM:
# these only bound a hang
WAIT_S = 300.0


def quantize_like_the_model(model: Path, x: np.ndarray) -> np.ndarray:
    """Float samples -> the int8 codes the model takes (round half away, as the agent does)."""
    from agent.serving.runtime import load_interpreter

    detail = load_interpreter(model).get_input_details()[0]
    scale, zero_point = detail["quantization"]
    info = np.iinfo(detail["dtype"])
    q = np.trunc(x / scale + np.copysign(0.5, x)) + zero_point
    return np.clip(q, info.min, info.max).astype(detail["dtype"])


def host_raw_outputs(
    python: Path | str, runtime_module: str, model: Path, codes: np.ndarray, folder: Path
) -> np.ndarray:
    """The bare runtime's raw outputs on the host (``guest_infer.py``, one sample at a time)."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "in.npz", input_0=codes)
    proc = subprocess.run(
        [
            str(python),
            str(HERE / "guest_infer.py"),
            runtime_module,
            str(model),
            str(folder / "in.npz"),
            str(folder / "out.npz"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(folder / "out.npz") as out:
        return np.array(out["output_0"])


def host_api_outputs(model: Path, x: np.ndarray) -> np.ndarray:
    """What the agent's own code gives on x86-64: ``agent.load_model(model).predict(x)``."""
    import agent

    return np.asarray(agent.load_model(model).predict(x), dtype=np.float32)


def golden_atol(model: Any) -> float:
    with np.load(model.golden) as golden:
        return float(golden["atol_0"])


def output_scale(model: Path) -> float:
    from agent.serving.runtime import load_interpreter

    return float(load_interpreter(model).get_output_details()[0]["quantization"][0])


def wait_active(watch: FleetWatcher, version: int) -> None:
    """Until the device serves digits ``version``; a refusal fails at once, not after WAIT_S."""

    def settled() -> bool:
        refused = [e for e in watch.events_of(DEVICE) if e["event"] in ("rejected", "rolled_back")]
        online = (watch.states.get(DEVICE) or {}).get("online") is True
        return bool(refused) or (online and watch.active(DEVICE) == ("digits", str(version)))

    watch.wait_for(settled, WAIT_S, f"{DEVICE} to serve digits v{version}")
    refused = [e for e in watch.events_of(DEVICE) if e["event"] in ("rejected", "rolled_back")]
    assert refused == [], refused


def test_the_real_agent_pulls_checks_activates_serves_and_reports_under_emulation(
    userland: Userland,
    broker: Any,
    tmp_path: Path,
    digits_int8: Any,
    digits_float32: Any,
    digits_data: Any,
    request: pytest.FixtureRequest,
) -> None:
    arch = userland.spec.arch
    repo = tmp_path / "repo"
    must("repo", "init", str(repo))
    must("push", str(digits_int8.tflite), "--repo", str(repo), "--name", "digits", "--broker", broker.url)

    port = free_port()
    agent = EmulatedAgent(
        userland,
        tmp_path,
        DEVICE,
        broker.url,
        repo / "root.json",
        http=f"127.0.0.1:{port}",
        metrics_interval_s=1.0,
        log_level="info",
    )
    notify = NotifySocket(tmp_path / "notify.sock")
    watch = FleetWatcher(broker.port)
    metrics = MetricsListener(broker.port, DEVICE)
    rest: Rest | None = None
    try:
        agent.start(env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"})
        wait_active(watch, 1)
        # downloaded, verified (TUF) and checked (golden vectors, in a forked child), then active
        kinds = [e["event"] for e in watch.events_of(DEVICE)]
        assert "rejected" not in kinds and "rolled_back" not in kinds, watch.events_of(DEVICE)
        assert kinds.index("verified") < kinds.index("activated")
        activated = watch.wait_event(DEVICE, "activated", version=1)
        assert activated["sha256"] == file_sha256(digits_int8.tflite)
        boot = watch.states[DEVICE]["boot"]
        # systemd's protocol works from the emulated process: READY=1 as soon as it serves what
        # is installed (nothing yet on this fresh device), then STATUS= names the model, pings
        _, ready = notify.wait_for("READY", WAIT_S)
        assert ready["STATUS"].startswith("idle (no model yet); "), ready
        deadline = time.monotonic() + WAIT_S
        serving = "serving digits v1; connected to mqtt://"
        while not any(f.get("STATUS", "").startswith(serving) for _, f in notify.messages):
            assert time.monotonic() < deadline, notify.messages[-5:]
            time.sleep(0.1)
        notify.wait_for("WATCHDOG", WAIT_S)
        assert agent.ready_after_s(timeout_s=60) is not None, agent.log()[-3000:]

        rest = Rest(port)
        status, doc = rest.get_json("/v1/models/digits")
        assert status == 200
        assert (doc["model_version_status"][0]["version"], doc["model_version_status"][0]["state"]) == (
            "1",
            "AVAILABLE",
        )

        # raw int8 codes in, raw codes out: the golden inputs and the first validation samples
        _, _, x_test, _ = digits_data
        x = np.asarray(x_test[:24], dtype=np.float32)
        with np.load(digits_int8.golden) as golden:
            codes = np.concatenate([golden["input_0"], quantize_like_the_model(digits_int8.tflite, x)])
        raw = rest.predict_npy("digits", codes)
        assert raw.dtype == np.int8 and raw.shape == (len(codes), 10)
        litert = host_raw_outputs(
            sys.executable, "ai_edge_litert.interpreter", digits_int8.tflite, codes, tmp_path / "host-litert"
        )
        if arch == "arm64":
            np.testing.assert_array_equal(raw, litert)  # the same LiteRT: bit for bit
        else:
            # tflite-runtime 2.14 is not LiteRT 2.3: bit for bit with the same version on the
            # host, and within the golden vectors' tolerance of the LiteRT that made them
            same = host_raw_outputs(
                request.getfixturevalue("host_tflite_runtime"),
                "tflite_runtime.interpreter",
                digits_int8.tflite,
                codes,
                tmp_path / "host-tflite-runtime",
            )
            np.testing.assert_array_equal(raw, same)
            diff = np.abs(raw.astype(np.int32) - litert.astype(np.int32))
            assert diff.max() <= golden_atol(digits_int8)

        # JSON floats in (quantized by the agent), dequantized floats out
        status, doc = rest.predict_json("digits", x[:8])
        assert status == 200, doc
        got = np.asarray(doc["predictions"], dtype=np.float32)
        want = host_api_outputs(digits_int8.tflite, x[:8])
        assert got.shape == want.shape == (8, 10)
        if arch == "arm64":
            np.testing.assert_array_equal(got, want)
        else:
            tol = golden_atol(digits_int8) * output_scale(digits_int8.tflite)
            np.testing.assert_allclose(got, want, rtol=0, atol=tol * (1 + 1e-6))
        status, doc = rest.predict_json("nope", x[:1])
        assert status == 404 and "error" in doc

        # metrics: the requests above are counted, with the process's memory and latency
        served = 2  # the .npy request and the JSON one (the 404 is not the model's)
        doc = metrics.wait_for(
            lambda d: (model_metrics(d, "digits") or {}).get("ok", 0) >= served,
            WAIT_S,
            f"digits ok >= {served}",
        )
        m = model_metrics(doc, "digits")
        assert m is not None and m["version"] == "1" and m["errors"] == 0
        assert m["latency_ms"]["p50"] > 0
        assert doc["device_id"] == DEVICE and doc["device"]["rss_bytes"] > 0
        seqs = [d["seq"] for d in metrics.docs]
        assert seqs == sorted(seqs)

        # v2: the float32 model, downloaded, checked in a forked child, swapped in while serving
        must(
            "push",
            str(digits_float32.tflite),
            "--repo",
            str(repo),
            "--name",
            "digits",
            "--broker",
            broker.url,
        )
        wait_active(watch, 2)
        activated = watch.wait_event(DEVICE, "activated", version=2)
        assert activated["sha256"] == file_sha256(digits_float32.tflite) and activated["previous"] == 1
        assert agent.alive() and watch.states[DEVICE]["boot"] == boot  # no restart
        status, doc = rest.get_json("/v1/models/digits")
        assert status == 200 and doc["model_version_status"][0]["version"] == "2"
        status, doc = rest.predict_json("digits", x[:8])
        assert status == 200, doc
        np.testing.assert_allclose(
            np.asarray(doc["predictions"], dtype=np.float32),
            host_api_outputs(digits_float32.tflite, x[:8]),
            rtol=0,
            atol=golden_atol(digits_float32),
        )
        assert "rejected" not in [e["event"] for e in watch.events_of(DEVICE)]
    finally:
        if rest is not None:
            rest.close()
        code = agent.stop(timeout_s=60)
        metrics.close()
        notify.close()
        watch.close()
    assert code == 0, agent.log()[-3000:]
    assert watch.states[DEVICE]["online"] is False
    assert notify.first("STOPPING") is not None


_FORK_PROBE = r"""
import json, os, platform, signal, subprocess
from pathlib import Path
import agent.activation.check as cc
from agent.errors import ModelRejectedError

def report_pid(*_):  # a verdict only the child can give: its own pid
    return {"ok": False, "reason": "golden", "message": str(os.getpid())}

def crash(*_):
    os.kill(os.getpid(), signal.SIGSEGV)

def spin(*_):
    while True:
        pass

out = {"pid": os.getpid(), "machine": platform.machine(),
       "exec_uname": subprocess.run(["uname", "-m"], capture_output=True, text=True).stdout.strip()}
for name, child, cpu_s in (("report_pid", report_pid, 60), ("crash", crash, 60), ("spin", spin, 1)):
    cc._child_check = child
    try:
        cc.check_isolated(Path("unused.tflite"), None, None, threads=1, runtime="auto", timeout_s=cpu_s)
        out[name] = ["passed"]
    except ModelRejectedError as exc:
        out[name] = [exc.reason, str(exc)]
print(json.dumps(out))
"""


def test_candidate_checks_fork_and_isolate_under_emulation(userland: Userland, tmp_path: Path) -> None:
    """The agent's check process is a fork (no exec): under qemu it is emulated too, a crash or
    a runaway model kills only the child (SIGSEGV, SIGXCPU from the CPU limit), and the
    parent reads the verdict from the pipe."""
    proc = userland.run(["-c", _FORK_PROBE], cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["machine"] == userland.spec.machine
    reason, child_pid = out["report_pid"]
    assert reason == "golden" and int(child_pid) != out["pid"]
    assert out["crash"][0] == "crashed" and "SIGSEGV" in out["crash"][1]
    assert out["spin"][0] == "crashed" and "SIGXCPU" in out["spin"][1]
    # why install.sh is given LITEFLEET_UNAME_M here: qemu runs an exec'd program natively,
    # so `uname -m` from inside the emulated process is the host's
    assert out["exec_uname"] == platform.machine() != userland.spec.machine
