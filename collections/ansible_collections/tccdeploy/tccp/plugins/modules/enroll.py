#!/usr/bin/python
# The documentation of tccdeploy.tccp.enroll; the work is done by its action plugin
# (plugins/action/enroll.py), on the controller, through tccdeploy itself.

DOCUMENTATION = r"""
module: enroll
short_description: Enroll a node's TPM with the trusted coordinator
description:
- 'enroll: enroll the node''s TPM with the trusted coordinator (EK certificate on the TC''s roster, AK,
  credential activation). Takes no arguments: a changed TPM is the TC operator''s decision (tccdeploy
  tc nodes replace-tpm NODE), not the playbook''s.'
extends_documentation_fragment:
- tccdeploy.tccp.tc
options: {}
author:
- tccdeploy developers
"""

EXAMPLES = r"""
- name: Enroll the node's TPM
  tccdeploy.tccp.enroll:
    tc_url: https://tc.example:8443
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

    refuse_on_node("enroll")


if __name__ == "__main__":
    main()
