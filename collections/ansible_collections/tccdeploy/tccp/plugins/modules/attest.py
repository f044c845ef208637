#!/usr/bin/python
# Only the documentation of tccdeploy.tccp.attest; the work is done by its action plugin
# (plugins/action/attest.py), on the controller, through tccdeploy itself.

DOCUMENTATION = r"""
module: attest
short_description: Attest a node with a fresh TPM quote, and admit it when trusted
description:
- 'attest: attest the node with a fresh quote; with admit, create and certify its trusted key and admit
  it.'
extends_documentation_fragment:
- tccdeploy.tccp.tc
options:
  admit:
    description:
    - Admit the node when the verdict is trusted. Default false.
    type: bool
author:
- tccdeploy developers
"""

EXAMPLES = r"""
- name: Attest and admit when trusted
  tccdeploy.tccp.attest:
    admit: true
"""
