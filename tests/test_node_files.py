"""The node's file and boot-directory operations: content by digest, atomic, never half-written."""

from __future__ import annotations

import hashlib

import pytest

from tccdeploy.node.files import boot_prepare, boot_reuse, boot_set_next, boot_state, file_install, file_state
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


def test_an_artifact_another_installed_build_holds_is_found_by_digest_and_installed_from_it(tmp_path):
    """A new kernel's build shares the initramfs with the running one: the node says where it has
    it, and `boot_reuse` installs it from there (checked against the digest, as an upload is)."""
    boot = tmp_path / "boot"
    (tmp_path / "cmdline").write_text("tccdeploy.build=tvmm-1\n")
    boot_prepare(str(boot), "tvmm-1")
    (boot / "tvmm-1" / "initrd").write_bytes(b"shared initrd")
    (boot / "tvmm-1" / "kernel").write_bytes(b"old kernel")
    boot_prepare(str(boot), "tvmm-2")
    boot_set_next(str(boot), "tvmm-1")  # a file beside the builds' folders
    wanted = {"kernel": _sha(b"new kernel"), "initrd": _sha(b"shared initrd")}
    state = boot_state(str(boot), str(tmp_path / "cmdline"), "tvmm-2", wanted)
    assert state["present"] == {"kernel": False, "initrd": False}
    assert state["elsewhere"] == {"initrd": "tvmm-1"}  # not the kernel: no installed build has that one
    boot_reuse(str(boot), "tvmm-2", "initrd", "tvmm-1", wanted["initrd"])
    assert (boot / "tvmm-2" / "initrd").read_bytes() == b"shared initrd"
    assert boot_state(str(boot), str(tmp_path / "cmdline"), "tvmm-2", wanted)["present"]["initrd"]
    assert sorted(p.name for p in (boot / "tvmm-2").iterdir()) == ["initrd"]  # nothing staged is left


def test_a_reused_artifact_whose_bytes_changed_since_is_refused_and_nothing_is_installed(tmp_path):
    boot = tmp_path / "boot"
    boot_prepare(str(boot), "tvmm-1")
    boot_prepare(str(boot), "tvmm-2")
    (boot / "tvmm-1" / "initrd").write_bytes(b"changed after boot_state")
    with pytest.raises(OpError, match="corrupt"):
        boot_reuse(str(boot), "tvmm-2", "initrd", "tvmm-1", _sha(b"shared initrd"))
    assert list((boot / "tvmm-2").iterdir()) == []
    assert (boot / "tvmm-1" / "initrd").read_bytes() == b"changed after boot_state"
    for bad in ("../etc", "a/b"):
        with pytest.raises(OpError, match="invalid build"):
            boot_reuse(str(boot), "tvmm-2", "initrd", bad, _sha(b"x"))
    with pytest.raises(OpError, match="invalid artifact"):
        boot_reuse(str(boot), "tvmm-2", "../initrd", "tvmm-1", _sha(b"x"))
