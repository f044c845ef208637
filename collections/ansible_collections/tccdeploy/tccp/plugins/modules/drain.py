#!/usr/bin/python
# Only the documentation of tccdeploy.tccp.drain; the work is done by its action plugin
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
