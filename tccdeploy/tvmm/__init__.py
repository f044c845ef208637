"""The TVMM service: the node side of TCCP, shipped inside the measured TVMM build.

It runs as the node's TVMM user, which alone reaches the TPM, the VM directories and the VMs'
QMP sockets, and the engine reaches it only through an SSH key whose `authorized_keys` line
forces `tccdeploy-tvmm serve`. Its operations are fixed (interface.py), each argument checked
against the operation's JSON schema, none free-form (no paths, no commands, no QEMU options),
and none returns VM memory, disk contents or a key in clear. Its file is an artifact of every
TVMMBuild, measured at boot like the kernel: a changed service is a different boot, whose
trusted key no longer opens anything.
"""

PROTOCOL = 2  # 2: byte streams after an answer (node.protocol): migration and disk copies
