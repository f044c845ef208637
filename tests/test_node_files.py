"""The node's file and boot-directory operations: content by digest, atomic, never half-written."""

from __future__ import annotations

import hashlib

import pytest

from tccdeploy.node.files import boot_prepare, boot_set_next, boot_state, file_install, file_state
from tccdeploy.node.ops import OpError


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_staged_upload_is_renamed_into_place_only_with_the_right_digest(tmp_path):
    staged, dest = tmp_path / "dest.tmp", tmp_path / "dest"
    staged.write_bytes(b"new")
    dest.write_bytes(b"old")
    with pytest.raises(OpError, match="corrupt"):
        file_install(str(staged), str(dest), _sha(b"other"))
    assert dest.read_bytes() == b"old" and not staged.exists()
    staged.write_bytes(b"new")
    file_install(str(staged), str(dest), _sha(b"new"), "0640")
    assert dest.read_bytes() == b"new" and file_state(str(dest))["mode"] == "0640"


def test_an_installed_file_is_on_disk_contents_and_rename_before_it_is_reported(tmp_path, fsyncs):
    """`tvmm_deploy` power-cycles the node right after its uploads: the boot must find each
    file whole, so the staged file's contents and then the directory holding the rename are
    fsynced before file_install returns (a real-boot node booted its old build without it)."""
    synced = fsyncs
    staged, dest = tmp_path / "kernel.tmp", tmp_path / "kernel"
    staged.write_bytes(b"vmlinuz")
    file_install(str(staged), str(dest), _sha(b"vmlinuz"))
    assert dest.read_bytes() == b"vmlinuz" and synced == [str(staged), str(tmp_path)]


def test_file_state_reports_small_text_for_diffs_and_nothing_for_binary(tmp_path):
    (tmp_path / "t").write_text("hello\n")
    (tmp_path / "b").write_bytes(b"\xff\xfe")
    assert file_state(str(tmp_path / "t"), text_limit=100)["text"] == "hello\n"
    assert "text" not in file_state(str(tmp_path / "b"), text_limit=100)
    assert file_state(str(tmp_path / "absent")) == {"exists": False}
    assert file_state(str(tmp_path))["regular"] is False


def test_boot_state_reads_the_running_build_from_the_command_line_and_checks_artifacts(tmp_path):
    boot = tmp_path / "boot"
    folder = boot_prepare(str(boot), "tvmm-2")["folder"]
    (tmp_path / "cmdline").write_text("console=ttyS0 ro tccdeploy.build=tvmm-1\n")
    (boot / "tvmm-2" / "kernel").write_bytes(b"k")
    state = boot_state(str(boot), str(tmp_path / "cmdline"), "tvmm-2", {"kernel": _sha(b"k"), "initrd": _sha(b"i")})
    assert folder.endswith("tvmm-2")
    assert state["running"] == "tvmm-1" and state["next"] is None
    assert state["present"] == {"kernel": True, "initrd": False}
    boot_set_next(str(boot), "tvmm-2")
    assert boot_state(str(boot), str(tmp_path / "cmdline"), "tvmm-2", {})["next"] == "tvmm-2"


def test_the_next_boot_must_be_an_installed_build_and_names_cannot_escape(tmp_path):
    with pytest.raises(OpError, match="not installed"):
        boot_set_next(str(tmp_path), "tvmm-9")
    for bad in ("../etc", "a/b", ""):
        with pytest.raises(OpError):
            boot_prepare(str(tmp_path), bad)
    with pytest.raises(OpError, match="artifact"):
        boot_state(str(tmp_path), "/nonexistent", "tvmm-1", {"../x": "00"})
