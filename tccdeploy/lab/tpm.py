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


def swtpm_argv(state_dir: str, sock: str, uid: int, log_path: str) -> list[str]:
    """swtpm serving the node's TPM on a unix socket only the node's TVMM user may open (0600,
    owned by uid, in that user's 0700 folder): on a real node, /dev/tpmrm0 owned by the TVMM
    user. The control channel is that user's too, because the TSS's swtpm TCTI sets the
    locality through it on every open; the admin login reaches neither."""
    return [
        "swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state_dir}",
        "--server", f"type=unixio,path={sock},mode=0600,uid={uid}",
        "--ctrl", f"type=unixio,path={sock}.ctrl,mode=0600,uid={uid}",
        "--flags", "not-need-init,startup-clear",
        "--log", f"file={log_path},level=1",
    ]


def tcti(sock: str) -> str:
    return f"swtpm:path={sock}"


def power_cycle(sock: str) -> None:
    """A reboot as the TPM sees it: _TPM_Init then TPM2_Startup(CLEAR); resetCount goes up."""
    proc = subprocess.run(["swtpm_ioctl", "--unix", f"{sock}.ctrl", "-i"], capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise LabError(f"cannot reset the TPM at {sock}.ctrl: {proc.stderr.strip() or proc.stdout.strip()}")
    from tpm2_pytss import ESAPI, TPM2_SU

    with ESAPI(tcti(sock)) as esys:
        esys.startup(TPM2_SU.CLEAR)


def ek_certificate(sock: str) -> bytes:
    """The EK certificate swtpm_setup stored in NV (RSA, 0x01c00002), in DER: what the TC's
    operator writes down in the roster when the machine is racked."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from tpm2_pytss import ESAPI, TPM2_HANDLE

    with ESAPI(tcti(sock)) as esys:
        handle = esys.tr_from_tpmpublic(TPM2_HANDLE(0x01C00002))
        public, _ = esys.nv_read_public(handle)
        data = b""
        while len(data) < public.nvPublic.dataSize:
            data += bytes(esys.nv_read(handle, min(1024, public.nvPublic.dataSize - len(data)), len(data)))
    return x509.load_der_x509_certificate(data).public_bytes(serialization.Encoding.DER)


def disable_platform_hierarchy(sock: str) -> None:
    """What firmware does before the OS runs (phEnable cleared until the next TPM2_Startup): no
    one on the booted node can make platform-created NV indices, so an asset tag in one was
    written at racking time, not by the provider's root."""
    from tpm2_pytss import ESAPI, ESYS_TR

    with ESAPI(tcti(sock)) as esys:
        esys.hierarchy_control(ESYS_TR.PLATFORM, ESYS_TR.PLATFORM, False)


def extend(sock: str, measurements: list[tuple[int, dict[str, bytes]]]) -> None:
    """Extend each (pcr, {bank: digest}) in order, as firmware does during boot."""
    from tpm2_pytss import ESAPI, ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

    with ESAPI(tcti(sock)) as esys:
        for pcr, digests in measurements:
            values = TPML_DIGEST_VALUES([
                TPMT_HA(hashAlg=TPM2_ALG(ALG_BY_NAME[bank]), digest=TPMU_HA(**{bank: digest}))
                for bank, digest in digests.items()
            ])
            esys.pcr_extend(ESYS_TR.PCR0 + pcr, values)


def read_pcrs(sock: str, bank: str, pcrs: list[int]) -> dict[int, bytes]:
    """Read PCRs (several reads: a TPM returns at most eight per TPM2_PCR_Read)."""
    from tpm2_pytss import ESAPI, TPML_PCR_SELECTION

    out: dict[int, bytes] = {}
    with ESAPI(tcti(sock)) as esys:
        todo = sorted(pcrs)
        for start in range(0, len(todo), 8):
            chunk = todo[start:start + 8]
            selection = TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, chunk))}")
            _, _, values = esys.pcr_read(selection)
            out.update(zip(chunk, (bytes(v) for v in values), strict=True))
    return out


def reset_lockout(sock: str) -> None:
    """Clear dictionary-attack lockout (the lab's lockout auth is empty), after tests that make
    the TPM refuse authorizations on purpose."""
    from tpm2_pytss import ESAPI, ESYS_TR

    with ESAPI(tcti(sock)) as esys:
        esys.dictionary_attack_lock_reset(ESYS_TR.LOCKOUT)


def counters(sock: str) -> tuple[int, int]:
    """(resetCount, restartCount) as the TPM reports them in its clock info."""
    from tpm2_pytss import ESAPI

    with ESAPI(tcti(sock)) as esys:
        info = esys.read_clock().clockInfo
        return int(info.resetCount), int(info.restartCount)


def _tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, errors="replace") as fh:
            return " | ".join(fh.read().strip().splitlines()[-lines:])
    except OSError:
        return ""
