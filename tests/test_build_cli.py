"""`tccdeploy eventlog` and `tccdeploy build predict` from the command line: what an operator
sees, and the clear refusals for bad input (build capture, which needs a lab, is in
test_build_capture_lab.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tccdeploy.cli import main
from tccdeploy.lab.builds import ARTIFACTS, LAB_BUILDS, artifact_bytes, build_manifest

CORPUS = Path(__file__).parent / "vectors" / "eventlogs"
UBUNTU = str(CORPUS / "go-tpm-tools" / "ubuntu-2104-no-dbx.bin")


def test_eventlog_shows_each_event_decoded_its_digest_checked_and_the_replayed_pcrs(capsys):
    assert main(["eventlog", UBUNTU, "--pcr", "8", "--bank", "sha256"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("111 events; banks sha1, sha256, sha384; PCR 0 started at locality 0\n")
    assert 'PCR  8 EV_IPL                             "grub_cmd: set prefix=(hd0,gpt1)/boot/grub"' in out
    assert "(= its data)" in out and "sha1 " not in out
    assert "\nreplayed sha256:\n  PCR  8 " in out and "PCR  4" not in out.split("replayed")[1]


def test_eventlog_json_has_every_event_and_each_banks_pcrs(capsys):
    assert main(["eventlog", str(CORPUS / "go-tpm-tools" / "glinux-alex.bin"), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["startup_locality"] == 3 and shown["banks"] == ["sha1", "sha256"]
    assert shown["events"][0] == {"pcr": 0, "type": "EV_NO_ACTION", "digests": {"sha1": "00" * 20, "sha256": "00" * 32},
                                  "description": "StartupLocality 3 (PCR 0 started at 3)", "data_check": {"sha1": "", "sha256": ""}}
    assert set(shown["pcrs"]) == {"sha1", "sha256"} and "0" in {str(k) for k in shown["pcrs"]["sha256"]}


def test_eventlog_refuses_what_it_cannot_read_saying_what_and_why(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a log\n")
    with pytest.raises(SystemExit, match=r"notes.txt is not an event log tccdeploy can read: truncated: first event"):
        main(["eventlog", str(text)])
    with pytest.raises(SystemExit, match=r"cannot read .*missing.bin: No such file"):
        main(["eventlog", str(tmp_path / "missing.bin")])
    assert main(["eventlog", UBUNTU, "--bank", "sha512"]) == 2
    assert "the log has no sha512 bank (banks: sha1, sha256, sha384)" in capsys.readouterr().err


def test_predict_writes_the_lab_build_from_its_files_and_refuses_bad_input(tmp_path, capsys):
    lab = LAB_BUILDS[1]
    args = []
    for name in ARTIFACTS:
        if name != "cmdline":
            (tmp_path / name).write_bytes(artifact_bytes(lab.name, name))
            args.append(f"{name}={tmp_path / name}")
    cmdline = artifact_bytes(lab.name, "cmdline").decode()
    out = tmp_path / "out"
    common = ["--cmdline", cmdline, "--name", lab.name, "--version", lab.version, "--rollout", "node1,node2"]
    assert main(["build", "predict", *args, *common, "--out", str(out)]) == 0
    written = yaml.safe_load((out / f"{lab.name}.yml").read_text())
    assert written["spec"]["measurements"] == build_manifest(lab)["spec"]["measurements"]
    assert written["spec"]["rollout"] == {"nodes": ["node1", "node2"]} and written["spec"]["status"] == "candidate"
    assert written["spec"]["artifacts"]["kernel"]["path"] == "../kernel"  # relative to where it was written
    with pytest.raises(SystemExit, match="exists; choose another --name or --out"):
        main(["build", "predict", *args, *common, "--out", str(out)])
    capsys.readouterr()
    assert main(["build", "predict", "kernel", *common]) == 2
    assert "give each artifact as NAME=FILE" in capsys.readouterr().err
    assert main(["build", "predict", f"firmware={tmp_path / 'kernel'}", *common]) == 2
    assert "the lab boot path measures no firmware" in capsys.readouterr().err
    assert main(["build", "predict", *args[1:], *common]) == 2
    assert "the lab boot path measures bootloader: give each as NAME=FILE" in capsys.readouterr().err
