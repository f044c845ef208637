"""What a tccdeploy.tccp module does if Ansible ever runs it on a node instead of through its
action plugin: refuse, saying where it runs."""


def refuse_on_node(name: str) -> None:
    from ansible.module_utils.basic import AnsibleModule

    module = AnsibleModule(argument_spec={}, supports_check_mode=True, bypass_checks=True)
    module.fail_json(msg=f"tccdeploy.tccp.{name} runs on the controller through its action plugin; "
                         "it cannot run as a module on the node")
