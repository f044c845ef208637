"""Every reason code the source can produce is in the catalogue (tccdeploy/reasons.py) with a
meaning, and every code there is produced somewhere: the catalogue is the code's, not prose."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tccdeploy.reasons import REASONS

PACKAGE = Path(__file__).resolve().parent.parent / "tccdeploy"
CODE = re.compile(r"^[a-z][a-z0-9]*(\.[a-z0-9][a-z0-9-]*)+$")
# The calls whose string arguments are reason codes, and the (code, message) pairs the
# perimeter checks return.
CALLS = {"Refused", "EnrollmentRefused", "AdmissionRefused", "Conflict", "BundleError", "fail", "warn", "NonceCheck",
         "ApiError", "HostResult", "Verification", "ServiceError", "failure", "TicketError", "Problem",
         "ReceiptError", "coded", "trusted_boot", "StoreFailure"}


def produced() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "reasons.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            values: list[ast.expr] = []
            if isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                if name in CALLS:
                    values = [*node.args[:2], *(k.value for k in node.keywords if k.arg in ("reason", "code"))]
            elif isinstance(node, ast.Tuple) and len(node.elts) == 2 and "coordinator" in path.parts:
                values = [node.elts[0]]
            elif isinstance(node, ast.Return) and node.value is not None and "coordinator" in path.parts:
                values = [node.value]  # (a classifier's answer: db.store_failure)
            for value in values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str) and CODE.match(value.value):
                    found.setdefault(value.value, set()).add(str(path.relative_to(PACKAGE)))
    return found


def test_every_code_the_source_produces_is_in_the_catalogue():
    missing = {code: sorted(where) for code, where in produced().items() if code not in REASONS}
    assert not missing, f"add these to tccdeploy/reasons.py: {missing}"


def test_every_code_in_the_catalogue_is_produced_and_explained():
    made = produced()
    assert not [code for code in REASONS if code not in made], "codes in the catalogue that nothing produces"
    assert all(text and not text.endswith(".") for text in REASONS.values())
