"""File and boot-directory operations: what `copy` and `tvmm_deploy` need on a node.

Content moves by digest: the engine asks what is there, uploads only what differs to a
temporary name next to the target, and the node checks the digest before the atomic rename, so
a cut upload never leaves a half-written file in place.

The boot directory holds one folder per TVMM build (`<boot_dir>/<build>/<artifact>`) and a
`next` file naming the build to boot; the running build is read from the kernel command line
(`tccdeploy.build=<name>`), which the boot measured.
"""

from __future__ import annotations

import os
import re
import stat
from typing import Any

from ..crypto.files import atomic_write, durable_replace, sha256_file
from .ops import OpError, op

BUILD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
ARTIFACT_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


def _state(path: str) -> dict[str, Any]:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return {"exists": False}
    if not stat.S_ISREG(info.st_mode):
        return {"exists": True, "regular": False}
    return {"exists": True, "regular": True, "size": info.st_size, "mode": f"{stat.S_IMODE(info.st_mode):04o}",
            "sha256": sha256_file(path)}


@op("file_state")
def file_state(path: str, text_limit: int = 0) -> dict[str, Any]:
    """What is at path; with text_limit, its content too when it is small text (for --diff)."""
    out = _state(path)
    if text_limit and out.get("regular") and out["size"] <= text_limit:
        with open(path, "rb") as fh:
            raw = fh.read()
        try:
            out["text"] = raw.decode()
        except UnicodeDecodeError:
            pass
    return out


@op("file_install")
def file_install(staged: str, dest: str, sha256: str, mode: str | None = None) -> dict[str, Any]:
    """Move a staged upload into place once its digest is right; the staged file always goes."""
    try:
        actual = sha256_file(staged)
        if actual != sha256:
            raise OpError(f"upload of {dest} is corrupt: sha256 {actual}, expected {sha256}")
        if mode is not None:
            os.chmod(staged, int(mode, 8))
        # Durable before it is reported in place: a power cycle right after (a `tvmm_deploy`
        # reboot) must boot the whole file, not what the page cache had written of it.
        fd = os.open(staged, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        durable_replace(staged, dest)
    finally:
        if os.path.exists(staged):
            os.unlink(staged)
    return {"path": dest, "sha256": sha256}


@op("file_mode")
def file_mode(path: str, mode: str) -> dict[str, Any]:
    os.chmod(path, int(mode, 8))
    return {"path": path, "mode": mode}


def _running_build(cmdline_path: str) -> str | None:
    try:
        with open(cmdline_path) as fh:
            words = fh.read().split()
    except OSError:
        return None
    for word in words:
        if word.startswith("tccdeploy.build="):
            return word.split("=", 1)[1]
    return None


@op("boot_state")
def boot_state(boot_dir: str, cmdline: str, build: str, artifacts: dict[str, str]) -> dict[str, Any]:
    """The running build, the next boot, and which of build's artifacts are in place with the
    expected digest."""
    if not BUILD_NAME.match(build):
        raise OpError(f"invalid build name {build!r}")
    nxt = None
    try:
        with open(os.path.join(boot_dir, "next")) as fh:
            nxt = fh.read().strip() or None
    except OSError:
        pass
    present, elsewhere = {}, {}
    for name, digest in artifacts.items():
        if not ARTIFACT_NAME.match(name):
            raise OpError(f"invalid artifact name {name!r}")
        state = _state(os.path.join(boot_dir, build, name))
        present[name] = state.get("sha256") == digest
        if not present[name] and (other := _installed_elsewhere(boot_dir, build, name, digest)):
            elsewhere[name] = other
    return {"running": _running_build(cmdline), "next": nxt, "present": present, "elsewhere": elsewhere,
            "boot_dir_exists": os.path.isdir(boot_dir)}


def _installed_elsewhere(boot_dir: str, build: str, name: str, digest: str) -> str | None:
    """Another installed build whose artifact of this name has this digest (a new kernel's build
    shares the initramfs with the running one): it is copied on the node, not uploaded again."""
    try:
        others = sorted(os.listdir(boot_dir))
    except OSError:
        return None
    for other in others:
        folder = os.path.join(boot_dir, other)
        if other == build or not BUILD_NAME.match(other) or os.path.islink(folder) or not os.path.isdir(folder):
            continue  # `next` and whatever else is not an installed build
        if _state(os.path.join(folder, name)).get("sha256") == digest:
            return other
    return None


@op("boot_reuse")
def boot_reuse(boot_dir: str, build: str, name: str, source: str, sha256: str) -> dict[str, Any]:
    """Install build's artifact name from another installed build's identical file: a hard link
    (the files are only ever replaced whole, never written in place) or a copy, checked against
    sha256 before the atomic rename, as an upload is."""
    for value in (build, source):
        if not BUILD_NAME.match(value):
            raise OpError(f"invalid build name {value!r}")
    if not ARTIFACT_NAME.match(name):
        raise OpError(f"invalid artifact name {name!r}")
    origin, dest = os.path.join(boot_dir, source, name), os.path.join(boot_dir, build, name)
    staged = os.path.join(boot_dir, build, f".{name}.reuse")
    if os.path.lexists(staged):
        os.unlink(staged)
    try:
        os.link(origin, staged, follow_symlinks=False)
    except OSError:
        with open(origin, "rb") as src, open(staged, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    return file_install(staged, dest, sha256, "0644")


@op("boot_prepare")
def boot_prepare(boot_dir: str, build: str) -> dict[str, Any]:
    """Create the build's folder; returns where uploads are staged."""
    if not BUILD_NAME.match(build):
        raise OpError(f"invalid build name {build!r}")
    folder = os.path.join(boot_dir, build)
    os.makedirs(folder, mode=0o755, exist_ok=True)
    return {"folder": folder}


@op("boot_set_next")
def boot_set_next(boot_dir: str, build: str) -> dict[str, Any]:
    """Make build the next boot (atomically); refuse a build whose folder is missing."""
    if not BUILD_NAME.match(build) or not os.path.isdir(os.path.join(boot_dir, build)):
        raise OpError(f"build {build!r} is not installed in {boot_dir}")
    atomic_write(os.path.join(boot_dir, "next"), (build + "\n").encode(), 0o644)
    return {"next": build}
