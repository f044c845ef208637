# tccdeploy.tccp.enforce on the controller: the same module `tccdeploy apply` runs.
from ansible_collections.tccdeploy.tccp.plugins.plugin_utils.bridge import TccpAction


class ActionModule(TccpAction):
    MODULE = "enforce"
