"""The real agent with per-phase CPU timers, for bench/bench_activation.py.

    python -m bench.agent_probe run --config agent.toml     (same flags as ``python -m agent``)

It wraps the agent's own functions (nothing else changes) and keeps, for each
phase, how often it ran and its inclusive CPU time on the calling thread
(``time.thread_time``), keyed by the path of enclosing phases
(``refresh > consider > check_isolated``). Phases that run on paho's thread
(a chunk arriving, the metadata cache) are counted the same way.

``SIGUSR1`` writes a snapshot to ``$LF_PROBE_OUT/<pid>.json``: the cumulative phase
table, the CPU of every live thread (``pthread_getcpuclockid``), the process's
own and its waited children's CPU (``os.times``). The bench takes one snapshot
before a push and one after the fleet has settled, and subtracts.

The forked golden-check child inherits the wrappers: when its check returns, it
writes its own phase table to ``$LF_PROBE_OUT/child-<pid>.json`` (it leaves by
``os._exit``, so nothing else would). ``LF_PROBE_CPROFILE=1`` also runs cProfile on
the main thread between the first and second snapshot and writes
``$LF_PROBE_OUT/<pid>.prof``.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

OUT = Path(os.environ.get("LF_PROBE_OUT", "/tmp/lf-probe"))

_local = threading.local()
_lock = threading.Lock()
# phase path -> [calls, thread CPU s, wall s]
_table: dict[str, list[float]] = {}


def _stack() -> list[str]:
    st = getattr(_local, "stack", None)
    if st is None:
        st = _local.stack = []
    return st


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        st = _stack()
        st.append(name)
        path = " > ".join(st)
        c0, w0 = time.thread_time(), time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            dc, dw = time.thread_time() - c0, time.perf_counter() - w0
            st.pop()
            with _lock:
                row = _table.setdefault(path, [0, 0.0, 0.0])
                row[0] += 1
                row[1] += dc
                row[2] += dw

    return wrapper


def _patch(owner: Any, attr: str, name: str | None = None) -> None:
    if hasattr(owner, attr):  # a prototype may have removed it
        setattr(owner, attr, timed(name or attr, getattr(owner, attr)))


def _threads() -> dict[str, float]:
    out = {}
    for t in threading.enumerate():
        if t.ident is None:
            continue
        try:
            out[f"{t.name}"] = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
        except (OSError, ProcessLookupError):
            continue
    return out


_profile: Any = None
_child_cpu = 0.0  # process_time at the end of the last check in a check process
_child_checks = 0
_snapshots = 0


def snapshot(*_: Any) -> None:
    global _profile, _snapshots
    t = os.times()
    with _lock:
        table = {k: list(v) for k, v in _table.items()}
    doc = {
        "pid": os.getpid(),
        "time": time.time(),
        "process_cpu": time.process_time(),
        "self_user": t.user,
        "self_system": t.system,
        "children_user": t.children_user,
        "children_system": t.children_system,
        "threads": _threads(),
        "phases": table,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{os.getpid()}.json.{_snapshots}").write_text(json.dumps(doc))
    _snapshots += 1
    if os.environ.get("LF_PROBE_CPROFILE"):
        import cProfile

        if _profile is None:
            _profile = cProfile.Profile(time.thread_time)
            _profile.enable()
        else:
            _profile.disable()
            _profile.dump_stats(str(OUT / f"{os.getpid()}.prof"))
            _profile = None


def install() -> None:
    from agent.activation import check, manager, store
    from agent.delivery import chunks, metadata, updater
    from agent.mqtt import client
    from agent.service import daemon
    from agent.serving import inference, registry, runtime

    # phases of the main thread
    _patch(daemon.Agent, "refresh_once", "refresh")
    _patch(daemon.Agent, "publish_state")
    _patch(daemon.Agent, "_state_payload", "state_payload_json")
    _patch(daemon.Agent, "event")
    _patch(daemon.Agent, "_after_changes", "after_changes")
    _patch(daemon.Agent, "_maybe_ready", "maybe_ready")
    daemon.release_free_memory = timed("malloc_trim", daemon.release_free_memory)
    _patch(updater.ModelUpdater, "verified_targets", "tuf_refresh")
    _patch(updater.Updater, "__init__", "tuf_updater_init")
    _patch(updater.Updater, "refresh", "tuf_updater_refresh")
    _patch(updater.ModelUpdater, "choose")
    _patch(updater.ModelUpdater, "_fetch_release", "fetch_release")
    _patch(updater.TargetFile, "verify_length_and_hashes", "target_hash_verify")
    _patch(chunks.ChunkDownloader, "download", "chunk_download")
    _patch(chunks.ChunkDownloader, "_scan_part", "scan_part")
    _patch(store.ModelStore, "install", "store_install")
    _patch(store.ModelStore, "prune_downloads")
    _patch(store.StateFile, "save", "state_file_save")
    _patch(manager.ModelManager, "consider")
    _patch(manager.ModelManager, "cleanup")
    _patch(manager.ModelManager, "poll_trials")
    _patch(manager.ModelManager, "_load_runner", "parent_load_and_check")
    _patch(registry.ModelRegistry, "activate", "registry_swap")
    manager.check_isolated = timed("check_isolated", check.check_isolated)
    # the checks (parent and forked child alike)
    check.load_checked = timed("load_checked", check.load_checked)
    manager.load_checked = check.load_checked
    if hasattr(check, "load_unchecked"):  # the "check once" prototype
        check.load_unchecked = timed("load_unchecked", check.load_unchecked)
        manager.load_unchecked = check.load_unchecked
    check.check_golden = timed("check_golden", check.check_golden)
    check.file_sha256 = timed("card_sha256", check.file_sha256)
    check.check_signature = timed("card_signature", check.check_signature)
    check.load_interpreter = timed("load_interpreter", check.load_interpreter)
    _patch(inference.ModelRunner, "__init__", "runner_init")
    _patch(inference.ModelRunner, "run_raw", "invoke")
    rt_cls = runtime.resolve_runtime("auto").interpreter_class
    _patch(rt_cls, "__init__", "interpreter_create")
    _patch(rt_cls, "allocate_tensors", "allocate_tensors")
    # the child reports its own table before it leaves
    inner = check._child_check

    def child_check(*args: Any, **kwargs: Any) -> Any:
        global _child_cpu, _child_checks
        with _lock:
            _table.clear()  # inherited from the parent, or the previous check's
        result = inner(*args, **kwargs)
        now = time.process_time()
        OUT.mkdir(parents=True, exist_ok=True)
        # the CPU of this process since the fork (a child per check) or since the end of
        # its previous check (a long-lived check process): what this check cost it
        doc = {"phases": _table, "process_cpu": now - _child_cpu, "check_number": _child_checks}
        _child_cpu = now
        _child_checks += 1
        name = f"child-{os.getppid()}-{os.getpid()}-{_child_checks}.json"
        (OUT / name).write_text(json.dumps(doc))
        return result

    check._child_check = timed("child_check", child_check)
    # the download's system calls and hashing (module attributes the downloader looks up)
    import hashlib as _hashlib
    import types

    os.pwrite = timed("os.pwrite", os.pwrite)
    os.fsync = timed("os.fsync", os.fsync)
    os.posix_fallocate = timed("os.posix_fallocate", os.posix_fallocate)
    chunks.hashlib = types.SimpleNamespace(sha256=timed("chunk_sha256", _hashlib.sha256))  # type: ignore[assignment]
    _patch(chunks.ChunkDownloader, "_fetch_missing", "fetch_missing")
    _patch(client.MqttClient, "subscribe_many")
    _patch(client.MqttClient, "unsubscribe")
    # paho's thread, and paho's own work on it
    import paho.mqtt.client as paho_client

    for attr in (
        "_packet_read",
        "_packet_write",
        "loop_misc",
        "_handle_publish",
        "_handle_pubackcomp",
        "_handle_suback",
        "_handle_unsuback",
        "_handle_connack",
        "_send_puback",
    ):
        _patch(paho_client.Client, attr, f"paho.{attr}")
    _patch(client.MqttClient, "_on_message", "paho_on_message")
    _patch(client.MqttClient, "_on_connect", "paho_on_connect")
    _patch(client.MqttClient, "replace_will", "will_renewal")
    _patch(metadata.RetainedMetadata, "handle", "metadata_cache_handle")
    _patch(chunks.ChunkDownloader, "_handle", "chunk_enqueue")
    signal.signal(signal.SIGUSR1, snapshot)


def main() -> int:
    install()
    from agent.service.cli import main as agent_main

    return int(agent_main(sys.argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
