#!/usr/bin/python
# The documentation of tccdeploy.tccp.drain; the work is done by its action plugin
# (plugins/action/drain.py), on the controller, through tccdeploy itself.

DOCUMENTATION = r"""
module: drain
short_description: Migrate every running VM off a node
description:
- 'drain: migrate every running VM off the node (for maintenance), each to a trusted node placement picks;
  no arguments.'
extends_documentation_fragment:
- tccdeploy.tccp.tc
options: {}
author:
- tccdeploy developers
"""

EXAMPLES = r"""
- name: Drain for maintenance
  tccdeploy.tccp.drain:
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

    refuse_on_node("drain")


if __name__ == "__main__":
    main()
