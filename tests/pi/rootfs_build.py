"""Build steps of an emulated Raspberry Pi rootfs; see :mod:`.userland` for what they
guarantee together. Each step is a function over paths; the apt ones run ``apt-get`` under a
private configuration (``APT_CONFIG``) that neither reads nor writes the host's apt state.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from .specs import (
    DEBIAN_KEYRING,
    PYTHON,
    SITE_PACKAGES,
    SUITES,
    SYS_PATH_DIRS,
    TRAMPOLINE,
    ArchSpec,
    Board,
    UserlandBuildError,
    emulated_python_command,
    guest_environment,
)

logger = logging.getLogger(__name__)


def write_trampoline(cpu: str, qemu: str, root: Path) -> None:
    """(Re)write TRAMPOLINE for this qemu and this rootfs location; a no-op when current."""
    # "$0", not a fixed path: a venv's bin/python linked to the trampoline must see itself
    # as argv[0], or Python would not find the venv's pyvenv.cfg
    text = (
        "#!/bin/sh\n"
        "# written by tests/pi/userland.py: run the rootfs's python3.11 under qemu\n"
        f'exec {shlex.quote(qemu)} -0 "$0" -cpu {cpu} -L {shlex.quote(str(root))} '
        f'{shlex.quote(str(root / PYTHON))} "$@"\n'
    )
    path = root / TRAMPOLINE
    if not path.exists() or path.read_text() != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, path)


def run_build_tool(
    cmd: Sequence[str],
    *,
    what: str,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 600.0,
    ok_codes: tuple[int, ...] = (0,),
) -> subprocess.CompletedProcess[str]:
    logger.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(
            list(cmd),
            env=dict(env) if env is not None else None,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserlandBuildError(f"{what}: {exc}") from exc
    if proc.returncode not in ok_codes:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise UserlandBuildError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def optional_suites_failed(apt_stderr: str) -> list[str] | None:
    """The optional suites whose index ``apt-get update`` could not fetch, or None when a
    required suite failed or the failure is not a fetch failure. Pure."""
    failed = re.findall(r"^E: Failed to fetch (\S+)", apt_stderr, re.M)
    optional = [(m, s) for m, s, required in SUITES if not required]

    def suite_of(url: str) -> str | None:
        return next((s for m, s in optional if url.startswith(f"{m}/dists/{s}/")), None)

    suites = [suite_of(url) for url in failed]
    if not failed or None in suites:
        return None
    return sorted({s for s in suites if s is not None})


class PrivateApt:
    """apt-get under a private configuration: its own sources, state and cache."""

    def __init__(self, spec: ArchSpec, home: Path) -> None:
        self.spec = spec
        self.dir = home / "apt"
        self.conf = self.dir / "apt.conf"

    def _write_config(self) -> None:
        d = self.dir
        for sub in (
            "state/lists/partial",
            "cache/archives/partial",
            "etc/apt.conf.d",
            "etc/preferences.d",
            "etc/trusted.gpg.d",
        ):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "state/status").touch()  # nothing installed: resolve the whole closure
        if not Path(DEBIAN_KEYRING).exists():
            raise UserlandBuildError(f"{DEBIAN_KEYRING} is missing (apt-get install debian-archive-keyring)")
        sources = "".join(
            f"deb [arch={self.spec.arch} signed-by={DEBIAN_KEYRING}] {mirror} {suite} main\n"
            for mirror, suite, _ in SUITES
        )
        (d / "etc/sources.list").write_text(sources)
        settings = {
            "APT::Architecture": self.spec.arch,
            "APT::Architectures::": self.spec.arch,
            "APT::Install-Recommends": "false",
            "APT::Get::Assume-Yes": "true",
            "Dir::State": d / "state",
            "Dir::State::status": d / "state/status",
            "Dir::Cache": d / "cache",
            "Dir::Etc": d / "etc",
            "Dir::Etc::Main": d / "etc/apt.conf.main",
            "Dir::Etc::Parts": d / "etc/apt.conf.d",
            "Dir::Etc::SourceList": d / "etc/sources.list",
            "Dir::Etc::SourceParts": d / "etc/sources.list.d",
            "Dir::Etc::Preferences": d / "etc/preferences",
            "Dir::Etc::PreferencesParts": d / "etc/preferences.d",
            "Dir::Etc::Trusted": d / "etc/trusted.gpg",
            "Dir::Etc::TrustedParts": d / "etc/trusted.gpg.d",
            "Dir::Log": d / "log",
            "Debug::NoLocking": "true",
            "Acquire::Retries": "3",
        }
        if os.geteuid() == 0:
            # downloads go to a folder the _apt user cannot write
            settings["APT::Sandbox::User"] = "root"
        self.conf.write_text("".join(f'{k} "{v}";\n' for k, v in settings.items()))

    def _env(self) -> dict[str, str]:
        # APT_CONFIG is read before /etc/apt/apt.conf.d, and ours points Dir::Etc elsewhere:
        # the host's apt configuration is neither read nor written
        return {**os.environ, "APT_CONFIG": str(self.conf), "LC_ALL": "C"}

    def update(self) -> list[str]:
        """Fetch the package lists; return the optional suites that could not be fetched."""
        self._write_config()
        proc = run_build_tool(
            ["apt-get", "update"], what="apt-get update", env=self._env(), ok_codes=(0, 100)
        )
        if proc.returncode == 0:
            return []
        degraded = optional_suites_failed(proc.stderr)
        if degraded is None:
            tail = "\n".join(proc.stderr.strip().splitlines()[-10:])
            raise UserlandBuildError(f"apt-get update failed:\n{tail}")
        logger.warning(
            "%s: could not fetch the index of %s; building from the other suites",
            self.spec.arch,
            ", ".join(degraded),
        )
        return degraded

    def resolve(self, roots: Sequence[str]) -> dict[str, str]:
        """Package -> version of ``roots`` and their dependency closure, as apt would install."""
        proc = run_build_tool(
            ["apt-get", "-s", "install", *roots],
            what="resolving Debian packages",
            env=self._env(),
        )
        found = dict(re.findall(r"^Inst (\S+) \((\S+) ", proc.stdout, re.M))
        missing = [r for r in roots if r not in found]
        if missing:
            raise UserlandBuildError(f"apt did not resolve {missing}")
        return found

    def download(self, packages: Mapping[str, str], dest: Path) -> list[Path]:
        """The .deb of each package (name -> version) in ``dest``, downloading those missing."""
        dest.mkdir(parents=True, exist_ok=True)

        def deb_path(name: str, version: str) -> Path | None:
            escaped = version.replace(":", "%3a")
            hits = [
                p
                for p in dest.glob(f"{name}_{escaped}_*.deb")
                if p.name.rsplit("_", 1)[1] in (f"{self.spec.arch}.deb", "all.deb")
            ]
            return hits[0] if hits else None

        todo = [f"{n}={v}" for n, v in sorted(packages.items()) if deb_path(n, v) is None]
        if todo:
            logger.info("%s: downloading %d Debian packages", self.spec.arch, len(todo))
            run_build_tool(
                ["apt-get", "download", *todo],
                what="apt-get download",
                env=self._env(),
                cwd=dest,
            )
        paths = []
        for name, version in sorted(packages.items()):
            path = deb_path(name, version)
            if path is None:
                raise UserlandBuildError(f"apt-get download left no .deb for {name}={version}")
            paths.append(path)
        return paths


def download_wheels(spec: ArchSpec, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "--only-binary=:all:",
        "--no-deps",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
        "-d",
        str(dest),
    ]
    for platform in spec.pip_platforms:
        cmd += ["--platform", platform]
    run_build_tool([*cmd, *spec.wheels], what=f"pip download for {spec.arch}")
    wheels = []
    for pin in spec.wheels:
        name, version = pin.split("==")
        stem = re.sub(r"[-_.]+", "_", name).lower()
        hits = [p for p in dest.glob("*.whl") if p.name.lower().startswith(f"{stem}-{version}-")]
        if len(hits) != 1:
            raise UserlandBuildError(f"expected one wheel for {pin} in {dest}, found {hits}")
        wheels.append(hits[0])
    return wheels


def prune_downloads(keep: Sequence[Path], folders: Sequence[Path]) -> int:
    """Delete the .deb/.whl files in ``folders`` that are not in ``keep`` (superseded
    versions), so the download cache holds one build's worth. Returns how many went."""
    wanted = {path.resolve() for path in keep}
    stale = [
        path
        for folder in folders
        for path in folder.glob("*")
        if path.suffix in (".deb", ".whl") and path.resolve() not in wanted
    ]
    for path in stale:
        path.unlink()
    if stale:
        logger.info("removed %d superseded downloads", len(stale))
    return len(stale)


def install_wheel(wheel: Path, site: Path) -> None:
    """Unpack a wheel as pip would: ``*.data/{purelib,platlib}`` into site-packages."""
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts, headers, data: the agent needs none
                parts = parts[2:]
            target = site.joinpath(*parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                target.chmod(mode | stat.S_IRUSR | stat.S_IWUSR)


def relativise_symlinks(root: Path) -> int:
    """Rewrite absolute symlinks to relative ones: under ``qemu -L`` the kernel resolves an
    absolute target on the host (``sitecustomize.py -> /etc/python3.11/...``)."""
    count = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            link = Path(dirpath) / name
            if not link.is_symlink():
                continue
            target = os.readlink(link)
            if not target.startswith("/"):
                continue
            relative = os.path.relpath(root / target.lstrip("/"), link.parent)
            link.unlink()
            link.symlink_to(relative)
            count += 1
    return count


def build_ca_bundle(root: Path) -> int:
    """What ``update-ca-certificates`` makes from the default configuration: every
    certificate ``ca-certificates`` ships, concatenated."""
    certs = sorted((root / "usr/share/ca-certificates").rglob("*.crt"))
    if not certs:
        raise UserlandBuildError("ca-certificates shipped no certificates")
    bundle = root / "etc/ssl/certs/ca-certificates.crt"
    bundle.parent.mkdir(parents=True, exist_ok=True)
    with open(bundle, "w") as out:
        for cert in certs:
            text = cert.read_text()
            out.write(text if text.endswith("\n") else text + "\n")
    # openssl's OPENSSLDIR is /usr/lib/ssl: cert.pem and certs/ must point into the rootfs
    # (openssl ships them as links; make sure they exist even if it stops doing so)
    ssl_dir = root / "usr/lib/ssl"
    ssl_dir.mkdir(parents=True, exist_ok=True)
    for name, target in (
        ("cert.pem", "../../../etc/ssl/certs/ca-certificates.crt"),
        ("certs", "../../../etc/ssl/certs"),
    ):
        link = ssl_dir / name
        if not link.is_symlink() and not link.exists():
            link.symlink_to(target)
    return len(certs)


def build_rootfs(spec: ArchSpec, home: Path, qemu: str, debs: list[Path], wheels: list[Path]) -> Path:
    partial = home / "rootfs.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    for deb in debs:
        run_build_tool(["dpkg-deb", "-x", str(deb), str(partial)], what=f"dpkg -x {deb.name}")
    site = partial / SITE_PACKAGES
    for folder in SYS_PATH_DIRS:
        (partial / folder).mkdir(parents=True, exist_ok=True)
    for wheel in wheels:
        install_wheel(wheel, site)
    for link, target in spec.alternatives:
        path = partial / link
        if not (path.parent / target).exists():
            raise UserlandBuildError(f"alternative {link} -> {target}: target missing")
        path.unlink(missing_ok=True)
        path.symlink_to(target)
    relinked = relativise_symlinks(partial)
    certs = build_ca_bundle(partial)
    # ld.so reads /etc/ld.so.cache; absent from the rootfs, qemu would hand it the host's
    (partial / "etc/ld.so.cache").write_bytes(b"")
    (home / "home").mkdir(exist_ok=True)
    logger.info(
        "%s: unpacked %d packages and %d wheels (%d links made relative, %d CA certificates)",
        spec.arch,
        len(debs),
        len(wheels),
        relinked,
        certs,
    )
    # byte-compile as dpkg's py3compile and pip would, with the emulated interpreter itself
    # (an emulated import of numpy + LiteRT takes ~4.5 s from source, ~1 s from .pyc)
    cpu = spec.board().cpu
    write_trampoline(cpu, qemu, partial)
    folders = [str(partial / d) for d in ("usr/lib/python3.11", *SYS_PATH_DIRS)]
    run_build_tool(
        emulated_python_command(cpu, qemu, partial, ["-m", "compileall", "-q", "-j0", *folders]),
        what="byte-compiling the rootfs",
        env=guest_environment(home),
        timeout_s=900,
    )
    # each board writes its own (its CPU, its location)
    (partial / TRAMPOLINE).unlink()
    return partial


def clone_for_board(base: Path, board: Board, dest: Path) -> Path:
    """``dest/rootfs``: ``base`` hard-linked (``cp -al``: instant, no extra space) plus the
    board's ``/proc/cpuinfo``. Files are shared with ``base``: write only by replacing."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    partial = dest / "rootfs.partial"
    run_build_tool(["cp", "-al", str(base), str(partial)], what=f"cloning the rootfs for {board.name}")
    (partial / "proc").mkdir(exist_ok=True)
    (partial / "proc/cpuinfo").write_text(board.cpuinfo)
    partial.rename(dest / "rootfs")
    return dest / "rootfs"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
