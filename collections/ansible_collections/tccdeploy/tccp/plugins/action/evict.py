# tccdeploy.tccp.evict on the controller: the same module `tccdeploy apply` runs.
from ansible.plugins.action import ActionBase


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        from tccdeploy.ansible_bridge import run

        result = super().run(tmp, task_vars)
        result.update(run("evict", self._task.args, task_vars or {}, check=bool(self._play_context.check_mode),
                          diff=bool(self._play_context.diff)))
        return result
