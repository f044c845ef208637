"""The node helper as one content-addressed file.

The helper package (tccdeploy/node) is zipped deterministically (fixed timestamps, sorted
names), so its sha256 names a version: the engine uploads it once per version into the
node's private directory and reuses it from then on.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from functools import cache
from importlib import resources

SHARED_CRYPTO = ("files.py", "stream.py", "wrap.py")
MAIN = b"import sys\nfrom tccdeploy.node.main import main\nsys.exit(main())\n"


@cache
def helper_bundle() -> tuple[bytes, str]:
    """(zip bytes, sha256 hex) of the helper; python runs the zip directly."""
    buffer = io.BytesIO()
    files: list[tuple[str, bytes]] = [("__main__.py", MAIN), ("tccdeploy/__init__.py", b"")]
    package = resources.files("tccdeploy.node")
    for entry in sorted(package.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".py"):
            files.append((f"tccdeploy/node/{entry.name}", entry.read_bytes()))
    # The stream cipher and key wrapping, shared with the engine and the TC (one implementation).
    crypto = resources.files("tccdeploy.crypto")
    files.append(("tccdeploy/crypto/__init__.py", b""))
    for name in SHARED_CRYPTO:
        files.append((f"tccdeploy/crypto/{name}", crypto.joinpath(name).read_bytes()))
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o600 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()
