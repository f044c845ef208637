#!/usr/bin/python
# Only the documentation of tccdeploy.tccp.enforce; the work is done by its action plugin
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
