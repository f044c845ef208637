#!/usr/bin/python
# The documentation of tccdeploy.tccp.attest; the work is done by its action plugin
# (plugins/action/attest.py), on the controller, through tccdeploy itself.

DOCUMENTATION = r"""
module: attest
short_description: Attest a node with a fresh TPM quote, and admit it when trusted
description:
- 'attest: attest the node with a fresh quote; with admit, create and certify its trusted key and admit
  it.'
extends_documentation_fragment:
- tccdeploy.tccp.tc
options:
  admit:
    description:
    - Admit the node when the verdict is trusted. Default false.
    type: bool
author:
- tccdeploy developers
"""

EXAMPLES = r"""
- name: Attest and admit when trusted
  tccdeploy.tccp.attest:
    admit: true
"""

RETURN = r"""
changed:
  description: Whether the module changed anything (the TC's registry or the node).
  type: bool
  returned: always
reason:
  description: The reason code of a refusal (the TC's or the engine's), when it failed.
  type: str
  returned: on refusal
"""


def main() -> None:
    from ansible_collections.tccdeploy.tccp.plugins.module_utils.controller import refuse_on_node

    refuse_on_node("attest")


if __name__ == "__main__":
    main()
