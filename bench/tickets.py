"""Benchmark: what the TC's tickets and the nodes' runtime evidence cost, against the bare
signature operations they are built on, measured in the same run.

1. Issuing a launch ticket at the TC (canonical encoding, ECDSA P-256 with the ticket key)
   against a bare ECDSA P-256 signature over the same bytes.
2. Checking it (the ticket key's certificate against the pinned CA and its purpose, the
   signature, the expiry) against a bare ECDSA verification of the same signature.
3. The TC's check of a node's runtime evidence (AK signature over the quote, nonce bound to the
   ticket, PCR selection and digest, the event list replayed) against the bare verification of
   the quote's signature.
Run: .venv/bin/python bench/tickets.py [--repeat 2000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from cryptography.hazmat.primitives import hashes  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402

from tccdeploy.coordinator import identity, runtime, tpm2  # noqa: E402
from tccdeploy.crypto import ticket as tickets  # noqa: E402
from tccdeploy.crypto.canonical import signed_bytes  # noqa: E402


def per_call_ms(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    """Median of 5 batches, in ms per call."""
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeat):
            fn()
        runs.append((time.perf_counter() - start) * 1000 / repeat)
    return statistics.median(runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--json", action="store_true", help="print only the JSON result (what bench/run reads)")
    args = parser.parse_args()
    from attestkit import Node  # the tests' software TPM: a real AK key, TPM-format quotes

    with tempfile.TemporaryDirectory() as state:
        tc, _ = identity.init(state)
        signer = tc.purpose("ticket")
        now = int(time.time())
        body = {"v": 1, "kind": "launch", "id": tickets.new_id(), "node": "node1", "node_serial": "ab12",
                "tk_name": "00" * 34, "vm_id": "1" * 32, "name": "web", "customer": "2" * 32, "request": "3" * 32,
                "image_sha256": "4" * 64, "vcpus": 1, "memory_mib": 64, "issued": now, "expires": now + tickets.TTL,
                "kvm": "A" * 344, "runtime_pcr": 15}
        message = signed_bytes(tickets.DOMAIN, body)
        envelope = tickets.issue(signer.key, signer.certificate, body)
        signature = signer.key.sign(message, ec.ECDSA(hashes.SHA256()))
        public = signer.certificate.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        issue_ms = per_call_ms(lambda: tickets.issue(signer.key, signer.certificate, body), args.repeat)
        sign_ms = per_call_ms(lambda: signer.key.sign(message, ec.ECDSA(hashes.SHA256())), args.repeat)
        verify_ms = per_call_ms(lambda: tickets.verify(envelope, tc.certificate), args.repeat)
        bare_verify_ms = per_call_ms(lambda: public.verify(signature, message, ec.ECDSA(hashes.SHA256())), args.repeat)

        node = Node()
        ticket = {"ticket": body}
        evidence = node.runtime_evidence(ticket)
        ak_public = node.ak_public
        runtime.verify(evidence, ak_public, 15, body["id"])
        import base64

        attest = base64.b64decode(evidence["attest"])
        quote_signature = tpm2.parse_signature(base64.b64decode(evidence["signature"]))
        ak = tpm2.parse_public(ak_public)
        evidence_ms = per_call_ms(lambda: runtime.verify(evidence, ak_public, 15, body["id"]), args.repeat)
        bare_quote_ms = per_call_ms(lambda: tpm2.verify_signature(ak, attest, quote_signature), args.repeat)
    result = {
        "benchmark": "tickets",
        "issue_ms": round(issue_ms, 4), "bare_sign_ms": round(sign_ms, 4), "issue_ratio": round(issue_ms / sign_ms, 2),
        "verify_ms": round(verify_ms, 4), "bare_verify_ms": round(bare_verify_ms, 4),
        "verify_ratio": round(verify_ms / bare_verify_ms, 2),
        "evidence_ms": round(evidence_ms, 4), "bare_quote_verify_ms": round(bare_quote_ms, 4),
        "evidence_ratio": round(evidence_ms / bare_quote_ms, 2),
    }
    if not args.json:
        print(f"issue a launch ticket: {issue_ms:.3f} ms (bare ECDSA sign {sign_ms:.3f} ms)\n"
              f"check a ticket: {verify_ms:.3f} ms (bare ECDSA verify {bare_verify_ms:.3f} ms)\n"
              f"check runtime evidence: {evidence_ms:.3f} ms (bare quote signature {bare_quote_ms:.3f} ms)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
