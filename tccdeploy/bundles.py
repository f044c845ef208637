"""The two programs tccdeploy puts on nodes, each as one deterministic zip file.

- The admin helper (tccdeploy/node): the engine's agentless tool, uploaded by the engine once
  per version into the admin login's private directory and named by its digest.
- The TVMM service (tccdeploy/tvmm): an artifact of the TVMM build, installed with the build
  and measured at boot like the kernel. Its sha256 is the digest a TVMMBuild lists.

Both zip their sources with fixed timestamps, modes and order, so the same sources give the same
bytes (and digest) on every machine: a build's reference value can be computed from a checkout.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from functools import cache
from importlib import resources

SHARED_CRYPTO = ("canonical.py", "files.py", "purpose.py", "reasoned.py", "runtime.py", "stream.py", "ticket.py", "wrap.py")
HELPER_MAIN = b"import sys\nfrom tccdeploy.node.main import main\nsys.exit(main())\n"
SERVICE_MAIN = b"import sys\nfrom tccdeploy.tvmm.service import main\nsys.exit(main())\n"


def _package(name: str) -> list[tuple[str, bytes]]:
    folder = resources.files(f"tccdeploy.{name}")
    return [(f"tccdeploy/{name}/{entry.name}", entry.read_bytes())
            for entry in sorted(folder.iterdir(), key=lambda e: e.name) if entry.name.endswith(".py")]


def _crypto() -> list[tuple[str, bytes]]:
    """The stream cipher and key wrapping, shared with the engine and the TC (one implementation)."""
    crypto = resources.files("tccdeploy.crypto")
    return [("tccdeploy/crypto/__init__.py", b""),
            *((f"tccdeploy/crypto/{name}", crypto.joinpath(name).read_bytes()) for name in SHARED_CRYPTO)]


def _zip(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()


@cache
def helper_bundle() -> tuple[bytes, str]:
    """(zip bytes, sha256 hex) of the admin helper; python runs the zip directly."""
    return _zip([("__main__.py", HELPER_MAIN), ("tccdeploy/__init__.py", b""), *_package("node"), *_crypto()])


@cache
def service_bundle() -> tuple[bytes, str]:
    """(zip bytes, sha256 hex) of the TVMM service, `tccdeploy-tvmm` as a build artifact."""
    node = [(name, data) for name, data in _package("node") if name.endswith(("/__init__.py", "/protocol.py"))]
    return _zip([("__main__.py", SERVICE_MAIN), ("tccdeploy/__init__.py", b""), *node, *_package("tvmm"),
                 *_crypto()])
