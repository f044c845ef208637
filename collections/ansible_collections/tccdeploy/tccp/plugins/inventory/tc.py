# The TC's nodes as an Ansible inventory: groups by state and build.

DOCUMENTATION = r"""
name: tc
short_description: The trusted coordinator's nodes, grouped by state and build
description:
  - Lists the nodes a served tccdeploy TC (C(tccdeploy tc serve)) knows, with the engine's
    client certificate, as hosts in groups C(tcc_<state>) (tcc_admitted, tcc_quarantined,
    tcc_enrolled...), C(tcc_build_<build>) and C(tcc_site_<site>).
  - Each host gets C(tcc_state), C(tcc_build), C(tcc_site), C(tcc_address) and
    C(tcc_verdict). How to reach a node (ansible_host, ansible_user...) comes from the
    operator's own inventory, given with a second C(-i).
  - The file must be named C(*.tcc.yml) or C(*.tcc.yaml).
options:
  plugin:
    description: This plugin's name.
    required: true
    choices: [tccdeploy.tccp.tc]
  url:
    description: The served TC, an https URL. Defaults to C($TCCDEPLOY_TC).
    type: str
    env:
      - name: TCCDEPLOY_TC
  engine_dir:
    description: The folder with the engine's client certificate and key.
    type: path
    env:
      - name: TCCDEPLOY_ENGINE_DIR
requirements:
  - tccdeploy installed in the Python that runs ansible-core.
"""

EXAMPLES = r"""
# tc.tcc.yml
plugin: tccdeploy.tccp.tc
url: https://tc.example:8443
engine_dir: /var/lib/tccdeploy/engine
"""

from ansible.errors import AnsibleParserError
from ansible.plugins.inventory import BaseInventoryPlugin


class InventoryModule(BaseInventoryPlugin):
    NAME = "tccdeploy.tccp.tc"

    def verify_file(self, path):
        return super().verify_file(path) and path.endswith((".tcc.yml", ".tcc.yaml"))

    def parse(self, inventory, loader, path, cache=True):
        super().parse(inventory, loader, path, cache)
        self._read_config_data(path)
        url, engine_dir = self.get_option("url"), self.get_option("engine_dir")
        if not url or not engine_dir:
            raise AnsibleParserError(f"{path}: url and engine_dir are required (or $TCCDEPLOY_TC and "
                                     "$TCCDEPLOY_ENGINE_DIR)")
        from tccdeploy.ansible_bridge import group_name, tc_nodes

        try:
            nodes = tc_nodes(url, engine_dir)
        except Exception as exc:  # the TC's own error says what failed and what to check
            raise AnsibleParserError(f"{path}: cannot list the TC's nodes: {exc}") from exc
        for node in nodes:
            name = node["name"]
            self.inventory.add_host(name)
            groups = [f"tcc_{group_name(node['state'])}"]
            if node.get("build"):
                groups.append(f"tcc_build_{group_name(node['build'])}")
            if node.get("site"):
                groups.append(f"tcc_site_{group_name(node['site'])}")
            for group in groups:
                self.inventory.add_group(group)
                self.inventory.add_child(group, name)
            for key in ("state", "build", "site", "address", "verdict"):
                self.inventory.set_variable(name, f"tcc_{key}", node.get(key))
