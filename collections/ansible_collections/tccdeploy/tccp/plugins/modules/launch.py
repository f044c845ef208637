#!/usr/bin/python
# Only the documentation of tccdeploy.tccp.launch; the work is done by its action plugin
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
