"""The lab's side of a node's TPM: manufacture it, power it, and measure a boot into it.

This is the "hardware" of a lab node, so it runs as the lab (root), not through the node
helper: manufacturing (swtpm_setup with an EK certificate from a lab CA), power cycles
(swtpm's control channel), and the firmware's role of extending PCRs during boot.
"""

from __future__ import annotations

import subprocess

from ..eventlog import ALG_BY_NAME

BANKS = ("sha1", "sha256")


class LabError(RuntimeError):
    """A lab operation failed; the message says what and how to fix it."""


def manufacture(state_dir: str, ca_dir: str, log_path: str, timeout: float = 60.0) -> None:
    """Create the TPM's state: EKs (RSA and ECC) with certificates signed by the CA in ca_dir."""
    argv = [
        "swtpm_setup", "--tpm2", "--tpmstate", state_dir, "--create-ek-cert", "--lock-nvram",
        "--config", f"{ca_dir}/swtpm_setup.conf", "--pcr-banks", ",".join(BANKS),
        "--logfile", log_path, "--overwrite",
    ]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LabError(f"swtpm_setup did not finish in {timeout:.0f} s (log: {log_path})") from None
    if proc.returncode != 0:
        tail = _tail(log_path) or proc.stderr.strip()
        raise LabError(f"swtpm_setup failed for {state_dir}: {tail}")


def swtpm_argv(state_dir: str, address: str, port: int, log_path: str) -> list[str]:
    return [
        "swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state_dir}",
        "--server", f"type=tcp,port={port},bindaddr={address}",
        "--ctrl", f"type=tcp,port={port + 1},bindaddr={address}",
        "--flags", "not-need-init,startup-clear",
        "--log", f"file={log_path},level=1",
    ]


def tcti(address: str, port: int) -> str:
    return f"swtpm:host={address},port={port}"


def power_cycle(address: str, port: int) -> None:
    """A reboot as the TPM sees it: _TPM_Init then TPM2_Startup(CLEAR); resetCount goes up."""
    proc = subprocess.run(
        ["swtpm_ioctl", "--tcp", f"{address}:{port + 1}", "-i"], capture_output=True, text=True, timeout=10
    )
    if proc.returncode != 0:
        raise LabError(f"cannot reset the TPM at {address}:{port + 1}: {proc.stderr.strip() or proc.stdout.strip()}")
    from tpm2_pytss import ESAPI, TPM2_SU

    with ESAPI(tcti(address, port)) as esys:
        esys.startup(TPM2_SU.CLEAR)


def ek_certificate(address: str, port: int) -> bytes:
    """The EK certificate swtpm_setup stored in NV (RSA, 0x01c00002), in DER: what the TC's
    operator writes down in the roster when the machine is racked."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from tpm2_pytss import ESAPI, TPM2_HANDLE

    with ESAPI(tcti(address, port)) as esys:
        handle = esys.tr_from_tpmpublic(TPM2_HANDLE(0x01C00002))
        public, _ = esys.nv_read_public(handle)
        data = b""
        while len(data) < public.nvPublic.dataSize:
            data += bytes(esys.nv_read(handle, min(1024, public.nvPublic.dataSize - len(data)), len(data)))
    return x509.load_der_x509_certificate(data).public_bytes(serialization.Encoding.DER)


def disable_platform_hierarchy(address: str, port: int) -> None:
    """What firmware does before the OS runs (phEnable cleared until the next TPM2_Startup): no
    one on the booted node can make platform-created NV indices, so an asset tag in one was
    written at racking time, not by the provider's root."""
    from tpm2_pytss import ESAPI, ESYS_TR

    with ESAPI(tcti(address, port)) as esys:
        esys.hierarchy_control(ESYS_TR.PLATFORM, ESYS_TR.PLATFORM, False)


def extend(address: str, port: int, measurements: list[tuple[int, dict[str, bytes]]]) -> None:
    """Extend each (pcr, {bank: digest}) in order, as firmware does during boot."""
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

    with ESAPI(tcti(address, port)) as esys:
        for pcr, digests in measurements:
            values = TPML_DIGEST_VALUES([
                TPMT_HA(hashAlg=TPM2_ALG(ALG_BY_NAME[bank]), digest=TPMU_HA(**{bank: digest}))
                for bank, digest in digests.items()
            ])
            esys.pcr_extend(ESYS_TR.PCR0 + pcr, values)


def read_pcrs(address: str, port: int, bank: str, pcrs: list[int]) -> dict[int, bytes]:
    """Read PCRs (several reads: a TPM returns at most eight per TPM2_PCR_Read)."""
    from tpm2_pytss import ESAPI, TPML_PCR_SELECTION

    out: dict[int, bytes] = {}
    with ESAPI(tcti(address, port)) as esys:
        todo = sorted(pcrs)
        for start in range(0, len(todo), 8):
            chunk = todo[start:start + 8]
            selection = TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, chunk))}")
            _, _, values = esys.pcr_read(selection)
            out.update(zip(chunk, (bytes(v) for v in values), strict=True))
    return out


def reset_lockout(address: str, port: int) -> None:
    """Clear dictionary-attack lockout (the lab's lockout auth is empty), after tests that make
    the TPM refuse authorizations on purpose."""
    from tpm2_pytss import ESAPI, ESYS_TR

    with ESAPI(tcti(address, port)) as esys:
        esys.dictionary_attack_lock_reset(ESYS_TR.LOCKOUT)


def counters(address: str, port: int) -> tuple[int, int]:
    """(resetCount, restartCount) as the TPM reports them in its clock info."""
    from tpm2_pytss import ESAPI

    with ESAPI(tcti(address, port)) as esys:
        info = esys.read_clock().clockInfo
        return int(info.resetCount), int(info.restartCount)


def _tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, errors="replace") as fh:
            return " | ".join(fh.read().strip().splitlines()[-lines:])
    except OSError:
        return ""
