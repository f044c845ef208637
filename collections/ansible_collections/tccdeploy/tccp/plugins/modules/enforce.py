#!/usr/bin/python
# The documentation of tccdeploy.tccp.enforce; the work is done by its action plugin
# (plugins/action/enforce.py), on the controller, through tccdeploy itself.

DOCUMENTATION = r"""
module: enforce
short_description: Re-attest a node now and quarantine it if it no longer complies
description:
- 'enforce: one enforcement round: re-attest and quarantine what fails.'
extends_documentation_fragment:
- tccdeploy.tccp.tc
options: {}
author:
- tccdeploy developers
"""

EXAMPLES = r"""
- name: Enforce the perimeter
  tccdeploy.tccp.enforce:
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

    refuse_on_node("enforce")


if __name__ == "__main__":
    main()
