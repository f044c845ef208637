"""The local lab on real sshd and swtpm: reachable, measured, faultable, and cleaned up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding

from tccdeploy.eventlog import parse_file
from tccdeploy.lab import procs, tpm
from tccdeploy.lab.builds import POLICY_PCRS
from tccdeploy.lab.lab import Lab
from tccdeploy.lab.tpm import LabError

from .conftest import lab_directory

pytestmark = pytest.mark.slow


def ssh(lab: Lab, node, command: str = "true", timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["ssh", "-i", lab.ssh_key, "-o", f"UserKnownHostsFile={lab.known_hosts}", "-o", "StrictHostKeyChecking=yes",
         "-o", "BatchMode=yes", "-o", "ConnectTimeout=3", "-F", "/dev/null", "-p", str(lab.ssh_port),
         f"tccnode@{node.address}", command],
        capture_output=True, text=True, timeout=timeout,
    )


def pcrs(lab: Lab, node) -> dict[int, str]:
    """tpm2_pcrread's view of the node's TPM (tpm2-tools, not our code)."""
    out = subprocess.run(
        ["tpm2_pcrread", "-T", lab.tcti(node), f"sha256:{','.join(map(str, POLICY_PCRS))}"],
        capture_output=True, text=True, check=True,
    ).stdout
    values = yaml.safe_load(out)["sha256"]
    return {int(k): f"{v:064x}" for k, v in values.items()}


def replay(node_dir: str) -> dict[int, str]:
    log = parse_file(os.path.join(node_dir, "eventlog.bin"))
    return {k: v.hex() for k, v in log.replay("sha256", list(POLICY_PCRS)).items()}


def test_every_node_is_reachable_with_strict_host_key_checking(lab: Lab):
    for node in lab.nodes:
        proc = ssh(lab, node, "echo $TCCDEPLOY_NODE")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == node.name


def test_a_host_key_the_lab_did_not_write_is_refused(lab: Lab, tmp_path: Path):
    node = lab.nodes[0]
    other = lab.nodes[1]
    with open(lab.known_hosts) as fh:
        lines = fh.read().splitlines()
    other_key = next(line for line in lines if other.address in line).split(" ", 1)[1]
    forged = tmp_path / "known_hosts"
    forged.write_text(f"[{node.address}]:{lab.ssh_port} {other_key}\n")
    proc = subprocess.run(
        ["ssh", "-i", lab.ssh_key, "-o", f"UserKnownHostsFile={forged}", "-o", "StrictHostKeyChecking=yes",
         "-o", "BatchMode=yes", "-F", "/dev/null", "-p", str(lab.ssh_port), f"tccnode@{node.address}", "true"],
        capture_output=True, text=True, timeout=10,
    )
    assert proc.returncode != 0 and "HOST IDENTIFICATION HAS CHANGED" in proc.stderr


def test_each_nodes_pcrs_equal_the_replay_of_its_event_log(lab: Lab):
    for node in lab.nodes:
        assert pcrs(lab, node) == replay(lab.node_dir(node)), node.name


def test_tpm2_eventlog_reads_the_lab_log_with_the_same_pcrs(lab: Lab):
    node = lab.nodes[0]
    out = subprocess.run(["tpm2_eventlog", lab.node_dir(node, "eventlog.bin")], capture_output=True, text=True, check=True)
    document = yaml.safe_load(out.stdout)
    theirs = {int(k): f"{v:064x}" for k, v in document["pcrs"]["sha256"].items()}
    assert theirs == replay(lab.node_dir(node))
    log = parse_file(lab.node_dir(node, "eventlog.bin"))
    for event, entry in zip(log.events, document["events"][1:], strict=True):
        digests = {d["AlgorithmId"]: d["Digest"] for d in entry["Digests"]}
        assert {k: v.hex() for k, v in event.digests.items()} == digests


def test_lab_manifests_and_inventory_are_valid(lab: Lab):
    proc = subprocess.run([sys.executable, "-m", "tccdeploy", "validate", "--format", "json",
                           lab.manifests_dir, lab.inventory_dir], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
    report = yaml.safe_load(proc.stdout)
    assert [p["code"] for p in report["problems"]] == ["xref.no-site"]  # the outside node, by design


def _ek_certificate(lab: Lab, node) -> x509.Certificate:
    out = subprocess.run(["tpm2_nvread", "-T", lab.tcti(node), "0x1c00002"], capture_output=True, check=True).stdout
    return x509.load_der_x509_certificate(out)


def _signed_by(cert: x509.Certificate, ca_path: str) -> bool:
    ca = x509.load_pem_x509_certificate(Path(ca_path).read_bytes())
    try:
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
    except Exception:  # noqa: BLE001 - any verification failure means "not signed by it"
        return False
    return True


def test_ek_certificates_come_from_the_lab_vendor_and_rogue_tpms_from_the_other_ca(lab: Lab):
    trusted, rogue = lab.path("ca", "manufacturer", "cert.pem"), lab.path("ca", "rogue", "cert.pem")
    for node in lab.nodes:
        cert = _ek_certificate(lab, node)
        assert _signed_by(cert, rogue if node.rogue_tpm else trusted), node.name
        assert not _signed_by(cert, trusted if node.rogue_tpm else rogue), node.name
    assert any(n.rogue_tpm for n in lab.nodes)


def test_site_two_nodes_hold_their_asset_tag(lab: Lab):
    for node in lab.nodes:
        proc = subprocess.run(["tpm2_nvread", "-T", lab.tcti(node), "-C", "o", "0x01500001"], capture_output=True)
        if node.asset_tag:
            assert proc.returncode == 0 and proc.stdout.decode() == node.asset_tag
        else:
            assert proc.returncode != 0


def test_reboot_resets_the_tpm_and_measures_the_boot_again(lab: Lab, lab_node):
    node = lab_node("node2")
    before = tpm.counters(lab.tpm_socket(node))
    lab.tamper(node.name)
    assert pcrs(lab, node)[4] != pcrs(lab, lab.node("node1"))[4]
    node = lab.reboot(node.name)
    after = tpm.counters(lab.tpm_socket(node))
    assert after[0] == before[0] + 1
    now, model_a = pcrs(lab, node), pcrs(lab, lab.node("node1"))
    assert now == replay(lab.node_dir(node))
    # the same build as node1 on the other hardware model: only the firmware's PCR differs
    assert lab.node("node1").model != node.model and now[0] != model_a[0]
    assert {p: v for p, v in now.items() if p != 0} == {p: v for p, v in model_a.items() if p != 0}
    assert ssh(lab, node).returncode == 0


def test_tamper_adds_a_logged_rogue_measurement(lab: Lab, lab_node):
    node = lab_node("node2")
    lab.tamper(node.name)
    log = parse_file(lab.node_dir(node, "eventlog.bin"))
    assert log.events[-1].pcr == 4
    assert pcrs(lab, node) == replay(lab.node_dir(node))


def test_hidden_tamper_makes_the_log_disagree_with_the_pcrs(lab: Lab, lab_node):
    node = lab_node("node2")
    lab.tamper(node.name, hide=True)
    assert pcrs(lab, node)[4] != replay(lab.node_dir(node))[4]


def test_boot_into_another_build_measures_that_build(lab: Lab, lab_node):
    node = lab_node("node2")
    good = pcrs(lab, node)
    node = lab.reboot(node.name, "tvmm-2025.4")
    assert node.build == "tvmm-2025.4"
    now = pcrs(lab, node)
    assert now == replay(lab.node_dir(node))
    assert now[0] == good[0] and now[4] != good[4]  # the firmware (PCR 0) is the model's, not the build's


def test_stop_ssh_makes_the_node_unreachable_and_start_ssh_brings_it_back(lab: Lab, lab_node):
    node = lab_node("node3")
    lab.stop_ssh(node.name)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((node.address, lab.ssh_port), timeout=2).close()
    assert ssh(lab, node).returncode == 255
    lab.start_ssh(node.name)
    assert ssh(lab, lab.node(node.name)).returncode == 0


def test_freeze_makes_ssh_hang_and_thaw_releases_it(lab: Lab, lab_node):
    node = lab_node("node3")
    lab.freeze(node.name)
    start = time.monotonic()
    proc = ssh(lab, node, timeout=20)
    assert proc.returncode == 255 and "timed out" in proc.stderr.lower()
    assert time.monotonic() - start >= 2.5
    assert [r["state"] for r in lab.status() if r["name"] == node.name] == ["frozen"]
    lab.thaw(node.name)
    assert ssh(lab, node).returncode == 0


def test_unknown_node_is_a_clear_error(lab: Lab):
    with pytest.raises(LabError, match="no node 'node99'.*nodes: node1"):
        lab.tamper("node99")


def test_second_lab_up_on_a_live_lab_is_refused(lab: Lab):
    with pytest.raises(LabError, match="already exists"):
        Lab(lab.dir).up(nodes=1, sites=1, outside=0, lab_index=250)
    assert all(procs.belongs(n.swtpm_pid, lab.dir) for n in lab.nodes)


def _lab_processes(directory: str) -> list[int]:
    return procs.processes_mentioning(directory)


def test_lab_down_leaves_no_process_and_no_file(tmp_path: Path):
    directory = lab_directory()
    lab = Lab(directory).up(nodes=2, sites=1, outside=1, lab_index=101)
    pids = [p for n in lab.nodes for p in (n.sshd_pid, n.swtpm_pid)]
    assert all(procs.alive(p) for p in pids)
    lab.freeze("node1")  # a frozen node must not survive down either
    stopped = Lab(directory).down()
    assert set(pids) <= set(stopped)
    assert not any(procs.alive(p) for p in pids)
    assert not os.path.exists(directory)
    assert _lab_processes(directory) == []
    assert Lab(directory).down() == []  # safe twice


def test_a_taken_port_is_an_error_and_nothing_is_left_running(tmp_path: Path):
    directory = lab_directory()
    with socket.socket() as blocker:
        blocker.bind(("127.102.1.2", 2222))
        blocker.listen()
        with pytest.raises(LabError, match=r"127\.102\.1\.2:2222"):
            Lab(directory).up(nodes=2, sites=1, outside=0, lab_index=102)
    assert os.listdir(directory) == []  # refused before anything was made (the folder is the test's)
    os.rmdir(directory)
    assert _lab_processes(directory) == []


def test_missing_swtpm_is_an_error_naming_the_package(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    directory = str(tmp_path / "lab")
    with pytest.raises(LabError, match=r"swtpm \(Debian package swtpm\)"):
        Lab(directory).up(nodes=1, sites=1, outside=0, lab_index=103)
    assert not os.path.exists(directory)


def test_down_cleans_up_after_a_crashed_up(tmp_path: Path):
    directory = lab_directory()
    proc = subprocess.Popen([sys.executable, "-m", "tccdeploy", "lab", "up", "--dir", directory, "--nodes", "3",
                             "--sites", "1", "--outside", "0", "--lab-index", "104", "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def served_tpms() -> list[int]:
        # The nodes' own swtpm (TCP server), not swtpm_setup's short-lived helper, which exits by itself.
        return [p for p in _lab_processes(directory) if "type=tcp" in procs.cmdline(p)]

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not served_tpms():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # a crash: no cleanup code runs
    proc.wait()
    left = served_tpms()
    assert left, "the crash should have left processes behind for down to find"
    Lab(directory).down()
    assert _lab_processes(directory) == []
    assert not os.path.exists(directory)


def test_cli_status_and_faults(lab: Lab, lab_node):
    node = lab_node("node4")
    run = [sys.executable, "-m", "tccdeploy", "lab"]
    out = subprocess.run([*run, "status", "--dir", lab.dir], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0].split() == ["NODE", "ADDRESS", "SITE", "SSHD", "SWTPM", "BUILD", "STATE"]
    assert "outside1" in out and "roguetpm1" in out
    proc = subprocess.run([*run, "tamper", node.name, "--dir", lab.dir], capture_output=True, text=True)
    assert proc.returncode == 0 and "tamper" in proc.stdout
    proc = subprocess.run([*run, "reboot", "nosuch", "--dir", lab.dir], capture_output=True, text=True)
    assert proc.returncode == 1 and "no node 'nosuch'" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_defaults_match_the_lab():
    from tccdeploy.commands import lab as cli
    from tccdeploy.lab import lab

    assert (cli.DEFAULT_BUILD, cli.SSH_PORT) == (lab.DEFAULT_BUILD, lab.SSH_PORT)
