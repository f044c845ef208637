#!/usr/bin/python
# Only the documentation of tccdeploy.tccp.evict; the work is done by its action plugin
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
