"""tccdeploy's admin helper: the small program the engine ships to each node and talks to, as the
node's admin login (agentless: nothing to install).

It runs under the node's Python with only the standard library, speaks newline-delimited JSON
on stdin/stdout (protocol.py), and offers what an operator could do with SSH anyway (ops.py,
files.py). It cannot reach the TPM, the VM directories or QMP: the node's TVMM service
(tccdeploy.tvmm), part of the measured build, alone can.
"""

PROTOCOL = 1
