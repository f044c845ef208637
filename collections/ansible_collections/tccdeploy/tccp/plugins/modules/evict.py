#!/usr/bin/python
# The documentation of tccdeploy.tccp.evict; the work is done by its action plugin
# (plugins/action/evict.py), on the controller, through tccdeploy itself.

DOCUMENTATION = r"""
module: evict
short_description: Quarantine a node and handle its VMs by policy
description:
- 'evict: quarantine the node (revoke its certificate) and handle its VMs by policy.'
extends_documentation_fragment:
- tccdeploy.tccp.tc
options:
  reason:
    description:
    - Why, for the audit log.
    type: str
author:
- tccdeploy developers
"""

EXAMPLES = r"""
- name: Take the node out for a disk swap
  tccdeploy.tccp.evict:
    reason: maintenance.disk
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

    refuse_on_node("evict")


if __name__ == "__main__":
    main()
