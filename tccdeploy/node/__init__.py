"""tccdeploy's node helper: the small program the engine ships to each node and talks to.

It runs under the node's Python with only the standard library (and tpm2-pytss for TPM
operations), speaks newline-delimited JSON on stdin/stdout, and offers a fixed, small set of
operations (ops.py). None of them returns VM memory, disk contents or a key in clear.
"""

PROTOCOL = 1
