"""Coverage-guided fuzzing with atheris (libFuzzer for Python), in the soak only.

Where it fits: the pure parsers a device runs on bytes from the network or from
signed files, each fast enough for hundreds of thousands of runs --
``.npy`` (:func:`agent.serving.npy.parse_npy`), JSON predict bodies
(``load_json`` + ``parse_predict``), model cards (``parse_card``), the signed
litefleet fields (``parse_release`` / ``parse_chunk_info``), TUF metadata
(``Metadata.from_bytes``, what the agent's refresh deserializes first) and
``agent.toml`` (``tomllib`` + the strict config reader). The property is the
hypothesis fuzzers': only the declared errors. atheris runs in a child process
(``-runs=N``, ``LITEFLEET_ATHERIS_RUNS``); an unexpected exception ends it with
the input that caused it.

atheris is not a dependency of the default suite: scripts/soak.sh installs it
(``pip install atheris``); without it these tests are skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.support.harness import soak_report

pytestmark = [
    pytest.mark.soak,
    pytest.mark.skipif(
        importlib.util.find_spec("atheris") is None,
        reason="atheris is not installed (scripts/soak.sh installs it)",
    ),
]

REPO = Path(__file__).resolve().parents[2]

HARNESS = r"""
import sys, tomllib
import atheris

with atheris.instrument_imports():
    from agent.serving import npy
    from agent.service.config import ConfigError, config_from_mapping
    from agent.errors import BadRequestError, ModelRejectedError
    from agent.model_card import parse_card
    from agent.protocol import ProtocolError, parse_chunk_info, parse_release
    from agent.serving.formats import load_json, parse_predict
    from tuf.api.metadata import Metadata
    from tuf.api.exceptions import RepositoryError

TARGET = sys.argv.pop(1)


def one(data: bytes) -> None:
    if TARGET == "npy":
        try:
            npy.parse_npy(data)
        except BadRequestError:
            pass
    elif TARGET == "predict":
        try:
            parse_predict(load_json(data), with_model=len(data) % 2 == 0)
        except BadRequestError:
            pass
    elif TARGET == "card":
        try:
            parse_card(data)
        except ModelRejectedError:
            pass
    elif TARGET == "release":
        try:
            custom = load_json(data)
        except BadRequestError:
            return
        try:
            parse_release("models/m/1/model.tflite", custom if isinstance(custom, dict) else {})
        except ProtocolError:
            pass
        try:
            parse_chunk_info(custom if isinstance(custom, dict) else {}, len(data))
        except ProtocolError:
            pass
    elif TARGET == "metadata":
        try:
            Metadata.from_bytes(data)
        except RepositoryError:  # DeserializationError: what the refresh reports as invalid_metadata
            pass
    elif TARGET == "config":
        try:
            doc = tomllib.loads(data.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError):
            return
        try:
            config_from_mapping(doc)
        except ConfigError:
            pass


atheris.Setup(sys.argv, one)
atheris.Fuzz()
"""


def seeds(target: str) -> list[bytes]:
    from agent.serving import npy

    if target == "npy":
        return [npy.to_npy(np.zeros((1, 8, 8, 1), np.int8)), npy.to_npy(np.arange(6, dtype=">f4"))]
    if target == "predict":
        return [b'{"instances": [[1, 2], [3, 4]]}', b'{"model": "m", "version": 3, "inputs": {"a": [1]}}']
    if target == "card":
        from tests.fuzz.test_config import REAL_CARD

        return [REAL_CARD.encode()]
    if target == "release":
        lf = {
            "kind": "model",
            "name": "m",
            "version": 1,
            "rollout": {"target": "all", "canary_pct": 100},
            "chunk_size": 4,
            "chunks": ["ab" * 32],
        }
        return [json.dumps({"litefleet": lf}).encode()]
    if target == "metadata":
        from converter.repo.repository import Repository

        root = Path(os.environ["LITEFLEET_ATHERIS_TMP"]) / "repo"
        if not root.exists():
            Repository.init(root)
        return [(root / "metadata" / n).read_bytes() for n in sorted(os.listdir(root / "metadata"))]
    return [
        b'device_id = "pi-1"\nbroker = "mqtt://h:1883"\nstate_dir = "/s"\ntrusted_root = "/r"\n'
        b'groups = ["a"]\nhttp = "127.0.0.1:8501"\ndownload_window = 8\n'
    ]


@pytest.mark.parametrize("target", ["npy", "predict", "card", "release", "metadata", "config"])
def test_atheris(tmp_path: Path, target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = int(os.environ.get("LITEFLEET_ATHERIS_RUNS", "200000"))
    monkeypatch.setenv("LITEFLEET_ATHERIS_TMP", str(tmp_path))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seed in enumerate(seeds(target)):
        (corpus / f"seed{i}").write_bytes(seed)
    harness = tmp_path / "harness.py"
    harness.write_text(HARNESS)
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            str(harness),
            target,
            f"-runs={runs}",
            "-max_len=4096",
            "-timeout=20",
            "-rss_limit_mb=2048",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, tail
    done = [ln for ln in proc.stderr.splitlines() if ln.startswith("Done ")]
    soak_report(
        f"atheris_{target}",
        runs=runs,
        result=done[-1] if done else "",
        minutes=round((time.monotonic() - started) / 60, 1),
    )
