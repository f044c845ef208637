#!/usr/bin/python
# Only the documentation of tccdeploy.tccp.tvmm_deploy; the work is done by its action plugin
# (plugins/action/tvmm_deploy.py), on the controller, through tccdeploy itself.

DOCUMENTATION = r"""
module: tvmm_deploy
short_description: Install and boot a TVMM build on a node
description:
- 'tvmm_deploy: install a TVMM build''s artifacts on the node by digest, make it the next boot and (with
  reboot) reboot into it.'
extends_documentation_fragment:
- tccdeploy.tccp.tc
options:
  build:
    description:
    - The TVMMBuild's name.
    type: str
    required: true
  reboot:
    description:
    - Reboot into the build after installing it (through tcc_reboot_command) and wait for SSH. Default
      true.
    type: bool
  timeout:
    description:
    - Seconds to wait for the node after reboot. Default 300.
    type: int
  check_only:
    description:
    - 'Only check that the build may go on this node (admissible; a candidate only on its rollout''s nodes;
      artifacts listed), changing nothing: a rollout asks it before draining the node. Default false.'
    type: bool
author:
- tccdeploy developers
"""

EXAMPLES = r"""
- name: Roll out a build
  tccdeploy.tccp.tvmm_deploy:
    build: tvmm-2026.2
"""
