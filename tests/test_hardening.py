"""Small guarantees the security rules ask for: canonical JSON refuses what JSON cannot say,
signatures are bound to the kind of document, files are written whole and never through a
planted symlink, state directories stay private, and a damaged bundle is refused by name."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tccdeploy.config import state_dir
from tccdeploy.crypto.canonical import CUSTOMER_QUERY, PLACEMENT_REQUEST, canonical, signed_bytes
from tccdeploy.crypto.files import atomic_write


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_canonical_json_refuses_numbers_json_does_not_have(value):
    with pytest.raises(ValueError):
        canonical({"x": value})


def test_a_signature_is_bound_to_its_kind_of_document():
    key = Ed25519PrivateKey.generate()
    document = {"op": "status", "request": "r1", "time": "2026-12-01T00:00:00+00:00"}
    signature = key.sign(signed_bytes(CUSTOMER_QUERY, document))
    key.public_key().verify(signature, signed_bytes(CUSTOMER_QUERY, document))
    with pytest.raises(Exception):  # noqa: B017 - InvalidSignature
        key.public_key().verify(signature, signed_bytes(PLACEMENT_REQUEST, document))
    with pytest.raises(Exception):  # noqa: B017
        key.public_key().verify(signature, canonical(document))


def test_atomic_write_replaces_a_planted_symlink_rather_than_writing_through_it(tmp_path: Path):
    target, victim = tmp_path / "tk.json", tmp_path / "elsewhere"
    victim.write_text("untouched")
    os.symlink(victim, target)
    atomic_write(str(target), b"secret", 0o600)
    assert victim.read_text() == "untouched" and not target.is_symlink()
    assert target.read_bytes() == b"secret" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "tk.json"]  # no temporary left behind


def test_atomic_write_never_has_a_secret_readable_by_others_even_before_its_chmod(tmp_path: Path, monkeypatch):
    seen: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # the file is complete and not yet renamed or chmod-ed
        if stat.S_ISREG(os.fstat(fd).st_mode):
            seen.append(stat.S_IMODE(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    old = os.umask(0)  # an umask that takes nothing away: only the mode given at creation protects it
    try:
        atomic_write(str(tmp_path / "key"), b"secret", 0o600)
    finally:
        os.umask(old)
    assert seen == [0o600] and stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600


def test_atomic_write_refuses_a_temporary_name_someone_planted_and_leaves_their_file_alone(tmp_path: Path, monkeypatch):
    import secrets

    monkeypatch.setattr(secrets, "token_hex", lambda n: "0" * 12)  # as if the random name were guessed
    victim = tmp_path / "victim"
    victim.write_bytes(b"theirs")
    (tmp_path / "key.000000000000.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        atomic_write(str(tmp_path / "key"), b"secret")
    assert victim.read_bytes() == b"theirs" and not (tmp_path / "key").exists()


def test_atomic_write_that_fails_leaves_no_temporary_file(tmp_path: Path, monkeypatch):
    def refuse(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(str(tmp_path / "key"), b"secret")
    assert list(tmp_path.iterdir()) == []


def test_a_state_directory_opened_up_is_made_private_again(tmp_path: Path):
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)
    assert state_dir(str(state)) == str(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700


@pytest.mark.parametrize("content", ['{"descriptor": {"vm_id": 5}, "signature": "x"}', "[1]", "not json"])
def test_image_inspect_refuses_a_damaged_bundle_by_name(tmp_path: Path, content: str):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "descriptor.json").write_text(content)
    proc = subprocess.run([sys.executable, "-m", "tccdeploy", "image", "inspect", str(tmp_path / "b")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.startswith("refused: bundle.descriptor:"), proc.stderr
    assert "unexpected" not in proc.stderr  # a refusal, not a crash
