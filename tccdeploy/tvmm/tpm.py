"""The service's TPM operations (tpm2-pytss) on the node's own TPM (its configuration says
which; the engine never does). Every transient object is flushed: swtpm has three slots, and a
service that leaks one breaks the next operation.

The attestation key (AK) is a primary key of the endorsement hierarchy (so the TPM does not
obfuscate resetCount/restartCount in its quotes), re-created on demand from its template: the
template's random `unique` field, kept in the service's state directory, is not secret.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
from contextlib import contextmanager
from typing import Any

from ..crypto.files import atomic_write, durable_replace
from . import config
from .interface import ServiceError, operation

EK_RSA_CERT_INDEX = 0x01C00002
EK_ECC_CERT_INDEX = 0x01C0000A
AK_FILE = "ak.json"
TK_CHECK_LABEL = b"tccdeploy-tk-check"  # the TC's admission challenge; fixed, so tk_check opens nothing else
AK_PENDING_FILE = "ak-pending.json"  # made by ak_create, the node's AK only once the TC's credential activates it


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


@contextmanager
def _esapi():  # type: ignore[no-untyped-def]
    os.environ.setdefault("TSS2_LOG", "all+NONE")  # the TSS's own warnings are not ours to show
    from tpm2_pytss import ESAPI, TSS2_Exception

    tcti = config.current().tpm
    try:
        esys = ESAPI(tcti)
    except TSS2_Exception as exc:
        raise ServiceError("tvmm.tpm", f"cannot open the TPM at {tcti}: {exc}") from None
    handles: list[Any] = []
    try:
        yield esys, handles
    finally:
        # Sessions too: ESAPI starts them with continueSession, so they stay loaded after use.
        for handle in handles:
            try:
                esys.flush_context(handle)
            except Exception:  # noqa: BLE001 - flushing is best effort; the TPM may have reset
                pass
        esys.close()


def _nv_read_all(esys: Any, index: int) -> bytes:
    from tpm2_pytss import TPM2_HANDLE

    handle = esys.tr_from_tpmpublic(TPM2_HANDLE(index))
    public, _ = esys.nv_read_public(handle)
    size = public.nvPublic.dataSize
    data = b""
    while len(data) < size:
        chunk = min(1024, size - len(data))
        data += bytes(esys.nv_read(handle, chunk, len(data)))
    return data


def _ek(esys: Any, handles: list[Any]) -> tuple[Any, Any]:
    """Create (load) the RSA EK from the TCG default template; return (handle, public)."""
    from tpm2_pytss import ESYS_TR, TSS2_Exception
    from tpm2_pytss.utils import NoSuchIndex, create_ek_template

    def nv_read(index: Any) -> bytes:
        # Templates/nonces in NV are optional (TCG EK profile); absent means the default.
        try:
            return _nv_read_all(esys, int(index))
        except TSS2_Exception:
            raise NoSuchIndex(int(index)) from None

    _, template = create_ek_template("EK-RSA2048", nv_read)
    handle, public, _, _, _ = esys.create_primary(None, template, ESYS_TR.ENDORSEMENT)
    handles.append(handle)
    return handle, public


def _ak_template(unique: bytes) -> Any:
    from tpm2_pytss import (
        TPM2_ALG,
        TPM2_ECC,
        TPM2B_PUBLIC,
        TPMA_OBJECT,
        TPMS_ECC_PARMS,
        TPMS_ECC_POINT,
        TPMT_ECC_SCHEME,
        TPMT_KDF_SCHEME,
        TPMT_PUBLIC,
        TPMT_SYM_DEF_OBJECT,
        TPMU_PUBLIC_ID,
        TPMU_PUBLIC_PARMS,
    )

    # NODA: the AK's authValue is empty, so dictionary-attack protection guards nothing, and a
    # lockout (provoked by failed credential activations) must not stop attestation.
    attributes = (
        TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA
    )
    scheme = TPMT_ECC_SCHEME(scheme=TPM2_ALG.ECDSA)
    scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
    params = TPMU_PUBLIC_PARMS(
        eccDetail=TPMS_ECC_PARMS(
            symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
            scheme=scheme,
            curveID=TPM2_ECC.NIST_P256,
            kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
        )
    )
    area = TPMT_PUBLIC(type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256, objectAttributes=attributes, parameters=params,
                       unique=TPMU_PUBLIC_ID(ecc=TPMS_ECC_POINT(x=unique[:32], y=b"")))
    return TPM2B_PUBLIC(publicArea=area)


def _ak(esys: Any, handles: list[Any], pending: bool = False) -> tuple[Any, Any]:
    from tpm2_pytss import ESYS_TR

    path = os.path.join(config.current().state_dir, AK_PENDING_FILE if pending else AK_FILE)
    try:
        with open(path) as fh:
            unique = _unb64(json.load(fh)["unique"])
    except (OSError, ValueError, KeyError):
        raise ServiceError("tvmm.no-ak", "no attestation key on this node: enroll it first") from None
    handle, public, _, _, _ = esys.create_primary(None, _ak_template(unique), ESYS_TR.ENDORSEMENT)
    handles.append(handle)
    return handle, public


@operation("identity")
def identity() -> dict[str, Any]:
    """The EK certificate(s) from NV and the RSA EK's public area, for enrollment."""
    with _esapi() as (esys, handles):
        try:
            cert = _nv_read_all(esys, EK_RSA_CERT_INDEX)
        except Exception as exc:  # noqa: BLE001 - reported as a plain, named failure
            raise ServiceError("tvmm.ek-certificate", f"no RSA EK certificate in NV 0x{EK_RSA_CERT_INDEX:08x}: {exc}") from None
        try:
            ecc_cert = _nv_read_all(esys, EK_ECC_CERT_INDEX)
        except Exception:  # noqa: BLE001 - the ECC certificate is optional
            ecc_cert = b""
        _, public = _ek(esys, handles)
        return {"changed": False, "ek_certificate": _b64(cert), "ek_certificate_ecc": _b64(ecc_cert),
                "ek_public": _b64(public.marshal())}


@operation("ak_create")
def ak_create() -> dict[str, Any]:
    """A fresh AK (new random template), pending: it replaces the node's AK only when ak_activate
    proves the TC bound it to this TPM's EK, so an enrollment the TC refuses (or finds already
    done) leaves the AK the TC knows in place."""
    unique = secrets.token_bytes(32)
    with _esapi() as (esys, handles):
        from tpm2_pytss import ESYS_TR

        handle, public, _, _, _ = esys.create_primary(None, _ak_template(unique), ESYS_TR.ENDORSEMENT)
        handles.append(handle)
    atomic_write(config.current().path(AK_PENDING_FILE), json.dumps({"unique": _b64(unique)}).encode())
    return {"changed": True, "ak_public": _b64(public.marshal())}


@operation("ak_activate")
def ak_activate(credential: str, secret: str) -> dict[str, Any]:
    """TPM2_ActivateCredential: only the TPM holding both the EK and the AK can answer."""
    from_b64_blob, from_b64_secret = _unb64(credential), _unb64(secret)
    with _esapi() as (esys, handles):
        from tpm2_pytss import ESYS_TR, TPM2_ALG, TPM2_SE, TPM2B_ENCRYPTED_SECRET, TPM2B_ID_OBJECT, TPMT_SYM_DEF

        ek, _ = _ek(esys, handles)
        ak, _ = _ak(esys, handles, pending=True)
        session = esys.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
                                          TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256)
        handles.append(session)
        esys.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
        try:
            cert_info = esys.activate_credential(ak, ek, TPM2B_ID_OBJECT(from_b64_blob),
                                                 TPM2B_ENCRYPTED_SECRET(from_b64_secret),
                                                 session1=ESYS_TR.PASSWORD, session2=session)
        except Exception as exc:  # noqa: BLE001 - the TPM refused: a named failure, not a crash
            raise ServiceError("tvmm.activate", f"the TPM refused to activate the credential: {exc}") from None
    durable_replace(config.current().path(AK_PENDING_FILE), config.current().path(AK_FILE))
    return {"changed": True, "secret": _b64(bytes(cert_info))}


@operation("quote")
def quote(nonce: str, bank: str, pcrs: list[int]) -> dict[str, Any]:
    """TPM2_Quote over pcrs with the TC's nonce, the PCR values, and the event log."""
    with _esapi() as (esys, handles):
        from tpm2_pytss import TPM2_ALG, TPML_PCR_SELECTION, TPMT_SIG_SCHEME

        ak, _ = _ak(esys, handles)
        selection = TPML_PCR_SELECTION.parse(f"{bank}:{','.join(str(p) for p in sorted(pcrs))}")
        attest, signature = esys.quote(ak, selection, _unb64(nonce), TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
        values: dict[str, str] = {}
        ordered = sorted(pcrs)
        for start in range(0, len(ordered), 8):
            chunk = ordered[start:start + 8]
            _, _, digests = esys.pcr_read(TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, chunk))}"))
            for pcr, digest in zip(chunk, digests, strict=True):
                values[str(pcr)] = bytes(digest).hex()
    eventlog = config.current().eventlog  # the firmware's log, where this build's kernel exposes it
    try:
        with open(eventlog, "rb") as fh:
            log = fh.read(16 * 1024 * 1024 + 1)
    except OSError as exc:
        raise ServiceError("tvmm.eventlog", f"cannot read the event log {eventlog}: {exc.strerror}") from None
    return {"changed": False, "attest": _b64(bytes(attest)), "signature": _b64(signature.marshal()),
            "pcrs": values, "eventlog": _b64(log)}


@operation("nv_certify")
def nv_certify(index: int, nonce: str) -> dict[str, Any]:
    """TPM2_NV_Certify of an NV index (the site's asset tag), signed by the AK over the TC's nonce."""
    with _esapi() as (esys, handles):
        from tpm2_pytss import ESYS_TR, TPM2_ALG, TPM2_HANDLE, TPMT_SIG_SCHEME, TSS2_Exception

        ak, _ = _ak(esys, handles)
        try:
            nv = esys.tr_from_tpmpublic(TPM2_HANDLE(index))
            public, _ = esys.nv_read_public(nv)
        except TSS2_Exception:
            raise ServiceError("tvmm.nv-index", f"NV index 0x{index:08x} does not exist on this TPM") from None
        attest, signature = esys.nv_certify(ak, nv, _unb64(nonce), TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                                            public.nvPublic.dataSize, 0, auth_handle=nv,
                                            session1=ESYS_TR.PASSWORD, session2=ESYS_TR.PASSWORD)
    return {"changed": False, "attest": _b64(bytes(attest)), "signature": _b64(signature.marshal()),
            "nv_public": _b64(public.marshal())}


TK_FILE = "tk.json"


def _srk(esys: Any, handles: list[Any]) -> Any:
    """The owner hierarchy's storage root key (ECC P-256, the TCG's SRK template), re-derived."""
    from tpm2_pytss import ESYS_TR, TPM2B_PUBLIC, TPMA_OBJECT

    attributes = (TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
                  | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA)
    template = TPM2B_PUBLIC.parse("ecc256:aes128cfb", objectAttributes=attributes)
    handle, _, _, _, _ = esys.create_primary(None, template, ESYS_TR.OWNER)
    handles.append(handle)
    return handle


def _policy_session(esys: Any, handles: list[Any], bank: str, pcrs: list[int], ca_der: bytes,
                    trial: bool) -> tuple[Any, bytes]:
    """A session through the TK's policy (crypto.ticket.pinned_policy): PolicyPCR over the PCRs as
    they are, then PolicyOR with the pinned CA's branch. Returns it and the PolicyPCR digest."""
    from tpm2_pytss import ESYS_TR, TPM2_ALG, TPM2_SE, TPM2B_DIGEST, TPML_DIGEST, TPML_PCR_SELECTION, TPMT_SYM_DEF

    from ..crypto.ticket import pin_branch

    session = esys.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL if trial else TPM2_SE.POLICY,
                                      TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256)
    handles.append(session)
    esys.policy_pcr(session, b"", TPML_PCR_SELECTION.parse(f"{bank}:{','.join(map(str, sorted(pcrs)))}"))
    pcr_policy = bytes(esys.policy_get_digest(session))
    esys.policy_or(session, TPML_DIGEST([TPM2B_DIGEST(pcr_policy), TPM2B_DIGEST(pin_branch(ca_der))]))
    return session, pcr_policy


@operation("tk_create")
def tk_create(bank: str, pcrs: list[int], nonce: str, tc_ca: str) -> dict[str, Any]:
    """The trusted key: RSA-2048 decrypt key under the SRK, usable only under PolicyPCR over the
    PCRs as they are now, certified by the AK over the TC's nonce and the TC CA certificate the
    service pins with it (it checks tickets against that CA from now on). The TC admits the TK
    only if that is its own CA, so an engine that hands over another CA gets a TK no key reaches."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from ..crypto.ticket import pin_qualifier, pinned_policy

    try:
        ca_der = x509.load_pem_x509_certificate(tc_ca.encode()).public_bytes(serialization.Encoding.DER)
    except ValueError:
        raise ServiceError("tvmm.tc-ca", "the TC CA certificate to pin does not parse") from None
    qualifier = pin_qualifier(_unb64(nonce), ca_der)
    boot = reset_count()
    _check_pin(ca_der, boot)
    with _esapi() as (esys, handles):
        from tpm2_pytss import TPM2_ALG, TPM2B_PUBLIC, TPMA_OBJECT, TPMT_SIG_SCHEME

        trial, pcr_policy = _policy_session(esys, handles, bank, pcrs, ca_der, trial=True)
        policy = bytes(esys.policy_get_digest(trial))
        if policy != pinned_policy(pcr_policy, ca_der):
            raise ServiceError("tvmm.tk-pin", "the TPM's policy digest is not the pinned policy the TC will expect")
        esys.flush_context(trial)
        handles.remove(trial)
        # No USERWITHAUTH: a password can never stand in for the policy to use the key. The
        # admin role (Certify, below) keeps its empty authValue: it cannot decrypt, and with
        # fixedTPM/fixedParent the key cannot be duplicated.
        attributes = (TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
                      | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.NODA)
        # Decrypt-only: an OAEP-SHA256 scheme fixed in the key, so the TPM never uses it as a raw
        # RSA primitive (with scheme NULL, RSA_Decrypt without padding is an RSA signature).
        template = TPM2B_PUBLIC.parse("rsa2048:oaep-sha256:null", objectAttributes=attributes, authPolicy=policy)
        srk = _srk(esys, handles)
        private, public, _, _, _ = esys.create(srk, None, template)
        tk = esys.load(srk, private, public)
        handles.append(tk)
        ak, _ = _ak(esys, handles)
        from tpm2_pytss import ESYS_TR

        attest, signature = esys.certify(tk, ak, qualifier, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                                         session1=ESYS_TR.PASSWORD, session2=ESYS_TR.PASSWORD)
    atomic_write(config.current().path(TK_FILE), json.dumps({
        "private": _b64(private.marshal()), "public": _b64(public.marshal()), "bank": bank, "pcrs": sorted(pcrs),
        "tc_ca": tc_ca, "pcr_policy": _b64(pcr_policy), "reset_count": boot}).encode())
    return {"changed": True, "tk_public": _b64(public.marshal()), "attest": _b64(bytes(attest)),
            "signature": _b64(signature.marshal())}


def _running_vms() -> list[str]:
    """VMs whose QEMU runs here now (their memory is on this node)."""
    folder = config.current().path("vms")
    out = []
    for vm_id in os.listdir(folder) if os.path.isdir(folder) else []:
        try:
            with open(os.path.join(folder, vm_id, "qemu.pid")) as fh:
                os.kill(int(fh.read().strip()), 0)
            out.append(vm_id)
        except (OSError, ValueError):
            continue
    return out


def _check_pin(ca_der: bytes, boot: int) -> None:
    """While VMs run here, the pinned TC CA does not change within the boot. Otherwise an engine
    could have a new TK made under a CA of its own, sign tickets with it and order a running
    VM's state out under a Kmig it chose. With no VM running (or after a TPM reset, which ends
    every VM of the old boot) a node may be admitted by another TC: nothing of the old one's is
    here to take, and keys at rest were wrapped to the old TK, which is gone."""
    try:
        with open(config.current().path(TK_FILE)) as fh:
            stored = json.load(fh)
    except (OSError, ValueError):
        return
    if stored.get("reset_count") != boot or not stored.get("tc_ca") or not _running_vms():
        return
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    pinned = x509.load_pem_x509_certificate(stored["tc_ca"].encode()).public_bytes(serialization.Encoding.DER)
    if pinned != ca_der:
        raise ServiceError("tvmm.tc-ca-pinned", "VMs of another TC run here: a node changes TC only once they are "
                                                "gone (or through a reboot)")


def _stored_tk() -> dict[str, Any]:
    try:
        with open(config.current().path(TK_FILE)) as fh:
            stored = json.load(fh)
    except (OSError, ValueError):
        raise ServiceError("tvmm.no-tk", "no trusted key on this node: it was never admitted") from None
    return stored  # type: ignore[no-any-return]


def trusted_key() -> tuple[bytes, Any]:
    """(the TK's TPM name, the TC CA certificate pinned with it): whom tickets must name, and
    who must have signed them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from tpm2_pytss import TPM2B_PUBLIC

    from ..crypto.ticket import pinned_policy

    stored = _stored_tk()
    if "tc_ca" not in stored or "pcr_policy" not in stored:
        raise ServiceError("tvmm.no-tk", "the trusted key was made without a TC CA pinned in its policy: admit the "
                                         "node again")
    public, _ = TPM2B_PUBLIC.unmarshal(_unb64(stored["public"]))
    ca = x509.load_pem_x509_certificate(stored["tc_ca"].encode())
    # The pin is the TK's own: a CA written beside it (from another boot, as root) is not in its policy.
    if bytes(public.publicArea.authPolicy) != pinned_policy(_unb64(stored["pcr_policy"]),
                                                            ca.public_bytes(serialization.Encoding.DER)):
        raise ServiceError("tvmm.tk-pin", "the TC CA kept with the trusted key is not the one its policy pins: the "
                                          "service's state was changed outside it")
    return bytes(public.get_name()), ca


def tk_decrypt(ciphertext: bytes, label: bytes) -> bytes:
    """Decrypt with the TK inside the TPM, under a PolicyPCR session: fails if the boot changed.

    For callers inside the service only: no operation returns the plaintext.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    stored = _stored_tk()
    with _esapi() as (esys, handles):
        from tpm2_pytss import TPM2_ALG, TPM2B_PRIVATE, TPM2B_PUBLIC, TPMT_RSA_DECRYPT, TSS2_Exception

        srk = _srk(esys, handles)
        private, _ = TPM2B_PRIVATE.unmarshal(_unb64(stored["private"]))
        public, _ = TPM2B_PUBLIC.unmarshal(_unb64(stored["public"]))
        tk = esys.load(srk, private, public)
        handles.append(tk)
        ca_der = x509.load_pem_x509_certificate(stored["tc_ca"].encode()).public_bytes(serialization.Encoding.DER)
        session, _ = _policy_session(esys, handles, stored["bank"], stored["pcrs"], ca_der, trial=False)
        scheme = TPMT_RSA_DECRYPT(scheme=TPM2_ALG.NULL)  # the key's own scheme: OAEP-SHA256
        try:
            plain = bytes(esys.rsa_decrypt(tk, ciphertext, scheme, label + b"\x00", session1=session))
        except TSS2_Exception as exc:
            raise ServiceError("tvmm.tk-refused", f"the TPM refused to use the trusted key: {exc}") from None
        return plain


@operation("tk_check")
def tk_check(ciphertext: str) -> dict[str, Any]:
    """Prove the TK works now: decrypt the TC's random challenge and return only its SHA-256."""
    import hashlib

    plain = tk_decrypt(_unb64(ciphertext), TK_CHECK_LABEL)
    return {"changed": False, "digest": hashlib.sha256(plain).hexdigest()}


def reset_count() -> int:
    """The TPM's resetCount: which boot (TPM reset) the runtime PCR's events belong to."""
    with _esapi() as (esys, _):
        return int(esys.read_clock().clockInfo.resetCount)


def extend_runtime(pcr: int, digest: bytes) -> None:
    """Extend the runtime PCR's sha256 bank with one VM event's digest."""
    with _esapi() as (esys, _):
        from tpm2_pytss import ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

        values = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=digest))])
        esys.pcr_extend(ESYS_TR.PCR0 + pcr, values)


def runtime_quote(pcr: int, qualifying: bytes) -> tuple[bytes, bytes, bytes]:
    """(attest, signature, PCR value): the AK's quote over the runtime PCR alone."""
    with _esapi() as (esys, handles):
        from tpm2_pytss import TPM2_ALG, TPML_PCR_SELECTION, TPMT_SIG_SCHEME

        ak, _ = _ak(esys, handles)
        selection = TPML_PCR_SELECTION.parse(f"sha256:{pcr}")
        attest, signature = esys.quote(ak, selection, qualifying, TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL))
        _, _, digests = esys.pcr_read(selection)
        return bytes(attest), signature.marshal(), bytes(digests[0])


def runtime_value(pcr: int) -> bytes:
    with _esapi() as (esys, _):
        from tpm2_pytss import TPML_PCR_SELECTION

        _, _, digests = esys.pcr_read(TPML_PCR_SELECTION.parse(f"sha256:{pcr}"))
        return bytes(digests[0])
