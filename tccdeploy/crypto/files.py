"""File digests, streamed (bounded memory), shared by the engine, the TC and the node helper."""

from __future__ import annotations

import hashlib


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """Write path as a whole or not at all: a fresh temporary file beside it (O_EXCL: never an
    existing file, O_NOFOLLOW: never through a symlink someone planted), mode set at creation
    (a secret is never readable by others, not even for a moment), then renamed over path.

    Durable when it returns: the file and then its directory are fsynced, so a power cut right
    after cannot undo the rename. A node that forgot a ticket it spent would take it again (a
    real-boot node showed it: killed seconds after enrollment, it kept only the temporary file)."""
    import os
    import secrets

    tmp = f"{path}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # whatever the umask took away
        durable_replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def durable_remove(path: str) -> None:
    """Remove a file or a whole folder (gone already is fine) and fsync the directory that held
    it, so a power cut right after cannot bring it back: a node that settled a migration or
    destroyed a VM must not boot again with the VM's disk, key or unsettled record in place."""
    import os
    import shutil

    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    _fsync_directory(os.path.dirname(os.path.abspath(path)))


def durable_replace(src: str, dst: str) -> None:
    """Rename src over dst and fsync the directory, so the rename survives a power cut (a
    rename lives in the directory, and fsyncing the file does not write the directory)."""
    import os

    os.replace(src, dst)
    _fsync_directory(os.path.dirname(os.path.abspath(dst)))


def _fsync_directory(path: str) -> None:
    import os

    directory = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
