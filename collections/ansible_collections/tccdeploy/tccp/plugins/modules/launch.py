#!/usr/bin/python
# The documentation of tccdeploy.tccp.launch; the work is done by its action plugin
# (plugins/action/launch.py), on the controller, through tccdeploy itself.

DOCUMENTATION = r"""
module: launch
short_description: Launch a confidential VM from a signed placement request
description:
- 'launch: submit a signed placement request and start the VM where the TC releases its key.'
extends_documentation_fragment:
- tccdeploy.tccp.tc
options:
  request:
    description:
    - The signed placement request (JSON, from `tccdeploy request sign`); relative to the playbook's folder.
    type: str
    required: true
  receipt:
    description:
    - 'Where to write the TC''s signed receipt. Default: <vm name>.receipt.json next to the request.'
    type: str
author:
- tccdeploy developers
"""

EXAMPLES = r"""
- name: Launch web-1
  tccdeploy.tccp.launch:
    request: web-1.signed.json
  delegate_to: localhost
  run_once: true
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

    refuse_on_node("launch")


if __name__ == "__main__":
    main()
