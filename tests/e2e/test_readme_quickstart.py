"""README.md's "A fleet, step by step", run as written (issue 12).

The commands are parsed out of the README's code blocks and run in a fresh folder, each
as its own process; a command the README says runs "in a terminal of its own" runs in the
background, as a second terminal would. The only changes are the placeholders the README
names (``0.0.0.0`` and ``broker.lan`` -> loopback, ports 8883 and 8501 -> free ones) and
the device id for the second device; the "copy onto the device" step is a copy into a
folder per device. It must end with two devices serving over the secure broker, with no
file edited by hand.
"""

from __future__ import annotations

import re
import shlex
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tests.support.cli import REPO_ROOT, Background, run
from tests.support.harness import FleetWatcher, http_json

SECTION = "## A fleet, step by step"
OWN_TERMINAL = "in a terminal of its own"
DEVICES = ("pi-a", "pi-b")


@dataclass(frozen=True)
class Step:
    argv: list[str]
    background: bool  # the README says it runs in a terminal of its own


def readme_blocks() -> list[list[Step]]:
    """The quick start's ``sh`` code blocks, as commands."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = []
    for body in re.findall(r"```sh\n(.*?)```", section, re.DOTALL):
        steps, comment = [], ""
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("#"):
                comment += line
            elif line:
                steps.append(Step(shlex.split(line), OWN_TERMINAL in comment))
                comment = ""
        blocks.append(steps)
    return blocks


def consecutive_free_ports(count: int) -> int:
    """A base port with ``count`` free ports from it on loopback."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        socks = []
        try:
            for p in range(base, base + count):
                t = socket.socket()
                socks.append(t)
                t.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise AssertionError("no free port range")


def free_port() -> int:
    return consecutive_free_ports(1)


def substituted(step: Step, subs: dict[str, str]) -> list[str]:
    out = []
    for arg in step.argv:
        for old, new in subs.items():
            arg = arg.replace(old, new)
        out.append(arg)
    return out


def run_step(step: Step, args: list[str], cwd: Path, background: list[Background]) -> None:
    program, rest = args[0], args[1:]
    assert program in ("litefleet", "litefleet-agent"), args
    if step.background:
        proc = Background(program, rest, cwd=cwd)
        background.append(proc)
        if program == "litefleet":  # the broker: wait for its banner
            proc.wait_line(lambda ln: ln.startswith("Ctrl-C stops it."), 60)
        return
    done = run(program, *rest, cwd=cwd)
    assert done.returncode == 0, (args, done.stdout[-2000:], done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr


def test_the_readme_quick_start_as_written(tmp_path: Path, digits_files: dict[str, Path]) -> None:
    host_block, device_block, status_block = readme_blocks()
    assert [s.argv[:2] for s in host_block][:3] == [
        ["litefleet", "convert"],
        ["litefleet", "repo"],
        ["litefleet", "broker"],
    ]
    assert any(s.background for s in host_block), "the broker runs in a terminal of its own"
    assert all(s.background for s in device_block), "the agent runs in a terminal of its own"
    # the user's files, under the names the README gives them
    work = tmp_path / "fleet"
    work.mkdir()
    shutil.copy(digits_files["keras"], work / "model.keras")
    shutil.copy(digits_files["calibration"], work / "calib.npz")
    shutil.copy(digits_files["validation"], work / "val.npz")
    subs = {"0.0.0.0": "127.0.0.1", "broker.lan": "localhost", "8883": str(consecutive_free_ports(3))}
    background: list[Background] = []
    watch = None
    try:
        for step in host_block:
            run_step(step, substituted(step, subs), work, background)
        rest_ports = {}
        for device in DEVICES:
            # "copy the folder broker/devices/pi-a/ and repo/root.json onto it"
            there = tmp_path / f"device-{device}"
            shutil.copytree(work / "broker" / "devices" / device, there / device)
            shutil.copy(work / "repo" / "root.json", there / "root.json")
            rest_ports[device] = free_port()
            for step in device_block:
                args = substituted(step, {"pi-a": device, "8501": str(rest_ports[device])})
                run_step(step, args, there, background)
        watch = FleetWatcher(secure_dir=work / "broker")
        for device in DEVICES:
            watch.wait_active(device, "digits", 1, timeout_s=120)
        (status,) = status_block
        shown = run(*substituted(status, subs), cwd=work)
        assert shown.returncode == 0, shown.stderr
        rows = {ln.split()[0]: ln.split() for ln in shown.stdout.splitlines()[1:]}
        for device in DEVICES:
            assert rows[device][1] == "yes" and "digits" in rows[device] and "serving" in rows[device], (
                shown.stdout
            )
            # serving: a real answer over its REST API
            x = np.load(work / "val.npz")["x"][:2]
            code, doc = http_json(
                f"http://127.0.0.1:{rest_ports[device]}/v1/models/digits:predict", {"instances": x.tolist()}
            )
            assert code == 200 and len(doc["predictions"]) == 2, doc
        for proc in background:
            assert proc.proc.poll() is None, proc.output[-2000:]
            assert "Traceback" not in proc.output and "ERROR" not in proc.output, proc.output[-2000:]
    finally:
        if watch is not None:
            watch.close()
        for proc in reversed(background):
            proc.stop()
