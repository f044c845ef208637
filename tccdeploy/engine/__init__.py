"""The engine: reaches nodes over SSH, runs tccdeploy's helper there, fans work out.

The engine is untrusted in TCCP's model: it moves evidence and ciphertext, and every decision
that matters is taken by the trusted coordinator. It still must be correct and fast: strict
host-key checking, one SSH connection and one helper process per host for a whole run.
"""
