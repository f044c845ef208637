"""The one action every tccdeploy.tccp module runs on the controller: tccdeploy's own module."""

from ansible.plugins.action import ActionBase


class TccpAction(ActionBase):
    """Subclasses name MODULE; tccdeploy (in ansible-core's Python) does the work."""

    MODULE = ""
    TRANSFERS_FILES = False
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        from tccdeploy.ansible_bridge import run

        result = super().run(tmp, task_vars)
        result.update(run(self.MODULE, self._task.args, task_vars or {}, check=bool(self._play_context.check_mode),
                          diff=bool(self._play_context.diff)))
        return result
