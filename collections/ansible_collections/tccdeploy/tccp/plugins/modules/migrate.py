#!/usr/bin/python
# Only the documentation of tccdeploy.tccp.migrate; the work is done by its action plugin
# (plugins/action/migrate.py), on the controller, through tccdeploy itself.

DOCUMENTATION = r"""
module: migrate
short_description: Migrate a VM, encrypted, to another trusted node
description:
- 'migrate: move a VM to another trusted node, encrypted end to end.'
extends_documentation_fragment:
- tccdeploy.tccp.tc
options:
  vm:
    description:
    - The VM's name.
    type: str
    required: true
  to:
    description:
    - Destination node, or auto (the default) for placement to choose.
    type: str
author:
- tccdeploy developers
"""

EXAMPLES = r"""
- name: Move web-1 to node3
  tccdeploy.tccp.migrate:
    vm: web-1
    to: node3
"""
