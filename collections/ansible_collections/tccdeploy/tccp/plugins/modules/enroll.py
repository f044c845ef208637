#!/usr/bin/python
# Only the documentation of tccdeploy.tccp.enroll; the work is done by its action plugin
# (plugins/action/enroll.py), on the controller, through tccdeploy itself.

DOCUMENTATION = r"""
module: enroll
short_description: Enroll a node's TPM with the trusted coordinator
description:
- 'enroll: enroll the node''s TPM with the trusted coordinator (EK certificate on the TC''s roster, AK,
  credential activation). Takes no arguments: a changed TPM is the TC operator''s decision (tccdeploy
  tc nodes replace-tpm NODE), not the playbook''s.'
extends_documentation_fragment:
- tccdeploy.tccp.tc
options: {}
author:
- tccdeploy developers
"""

EXAMPLES = r"""
- name: Enroll the node's TPM
  tccdeploy.tccp.enroll:
    tc_url: https://tc.example:8443
"""
