"""The agent's state folder: activation state, installed models, downloads.

Layout (all under ``state_dir``)::

    state.json                      activation state, replaced atomically
    tuf/                            trusted TUF metadata (python-tuf's cache)
    downloads/<sha256>[.part]       targets being fetched, content-addressed
    models/<name>/<version>/        installed models: model.tflite, card.json, golden.npz
    models/<name>/.staging-<v>/     a model being installed (removed on start)

Guarantees: the state file is replaced with :func:`agent.files.atomic_write`
(old or new content after a crash or power cut). A model folder appears by one
``rename`` of a complete, fsynced staging folder, so ``models/<name>/<version>/`` is always whole.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from agent.activation.decisions import DeviceState
from agent.errors import StorageError
from agent.files import atomic_write, fsync_dir
from agent.protocol import CARD_FILE, GOLDEN_FILE, MODEL_FILE

logger = logging.getLogger(__name__)


class StateFile:
    """``state.json``: the one file that says which model versions are active."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> DeviceState:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return DeviceState.empty()
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc.strerror}") from exc
        try:
            return DeviceState.from_dict(json.loads(data))
        except (ValueError, KeyError, TypeError) as exc:
            # never written half (atomic_write), so this is outside damage: keep a copy
            broken = self.path.with_suffix(".broken")
            shutil.copyfile(self.path, broken)
            logger.error(
                "state file %s is unreadable (%s); kept as %s, starting empty", self.path, exc, broken
            )
            return DeviceState.empty()

    def save(self, state: DeviceState) -> None:
        atomic_write(self.path, (json.dumps(state.to_dict(), indent=1, sort_keys=True) + "\n").encode())


class ModelStore:
    """Installed models and downloads under the state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir
        self.models = state_dir / "models"
        self.downloads = state_dir / "downloads"
        self.tuf = state_dir / "tuf"
        for d in (self.models, self.downloads, self.tuf):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)

    def download_path(self, sha256: str) -> Path:
        return self.downloads / sha256

    def model_dir(self, name: str, version: int) -> Path:
        return self.models / name / str(version)

    def files(self, name: str, version: int) -> dict[str, Path]:
        d = self.model_dir(name, version)
        out = {"model": d / MODEL_FILE}
        for role, fname in (("card", CARD_FILE), ("golden", GOLDEN_FILE)):
            if (d / fname).exists():
                out[role] = d / fname
        return out

    def is_installed(self, name: str, version: int) -> bool:
        return (self.model_dir(name, version) / MODEL_FILE).is_file()

    def install(self, name: str, version: int, files: dict[str, Path]) -> Path:
        """Move downloaded files (role -> path; roles model, card, golden) into
        ``models/<name>/<version>/`` in one rename."""
        names = {"model": MODEL_FILE, "card": CARD_FILE, "golden": GOLDEN_FILE}
        final = self.model_dir(name, version)
        staging = final.parent / f".staging-{version}"
        try:
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(mode=0o700)
            for role, src in files.items():
                os.replace(src, staging / names[role])
            fsync_dir(staging)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
            fsync_dir(final.parent)
        except OSError as exc:
            raise StorageError(f"cannot install {name} v{version}: {exc.strerror or exc}") from exc
        return final

    def remove(self, name: str, version: int) -> None:
        shutil.rmtree(self.model_dir(name, version), ignore_errors=True)

    def discard_download(self, sha256: str) -> None:
        for p in (self.download_path(sha256), self.downloads / f"{sha256}.part"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def cleanup(self, keep: dict[str, set[int]]) -> list[str]:
        """Remove staging folders and model versions not in ``keep``; return what went."""
        removed: list[str] = []
        for name_dir in self.models.iterdir():
            if not name_dir.is_dir():
                continue
            for vdir in name_dir.iterdir():
                if not (vdir.name.isdigit() and int(vdir.name) in keep.get(name_dir.name, set())):
                    shutil.rmtree(vdir, ignore_errors=True)
                    removed.append(str(vdir.relative_to(self.root)))
        return removed

    def prune_downloads(self, wanted_sha256: set[str]) -> list[str]:
        """Remove downloads (partial or whole) of targets no longer wanted."""
        removed = []
        for f in self.downloads.iterdir():
            if f.name.split(".")[0] not in wanted_sha256:
                f.unlink(missing_ok=True)
                removed.append(str(f.relative_to(self.root)))
        return removed

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize
