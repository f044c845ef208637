"""A node that answers with templates: what a compromised node prints must stay data.

`apply` renders Jinja2. A node controls what its tasks return (a command's stdout, a file's
content): if a registered result, a fact set from it or a loop over it were templated again,
a node could run expressions on the provider's controller (read its variables, other hosts'
secrets through hostvars, or worse). Ansible marks such data "unsafe"; tccdeploy keeps it
in the scope's `final` values, which are never rendered. Without that, these tests fail: the
node's `{{ 7 * 7 }}` comes back as 49 and its `{{ hostvars }}` as other hosts' variables.
"""

from __future__ import annotations

import json
import textwrap

from tccdeploy.playbook.templar import Scope, TemplateError, render

from ..helpers_apply import apply

PAYLOAD = "{{ 7 * 7 }}"


def test_a_registered_result_is_never_templated_again():
    scope = Scope({"greeting": "{{ 'hi' }}"}, {"out": {"stdout": PAYLOAD}})
    assert render("{{ out.stdout }}", scope) == PAYLOAD
    assert render("said {{ out.stdout }}", scope) == f"said {PAYLOAD}"
    assert render("{{ greeting }}", scope) == "hi"  # the operator's own variables still are


def test_a_loop_item_from_a_node_is_data():
    scope = Scope({}).child(item=PAYLOAD)
    assert render("{{ item }}", scope) == PAYLOAD


def test_a_node_cannot_reach_the_sandbox_escape_either():
    scope = Scope({}, {"out": {"stdout": "{{ ''.__class__.__mro__[1].__subclasses__() }}"}})
    assert render("{{ out.stdout }}", scope).startswith("{{ ''.__class__")
    try:
        render("{{ ''.__class__.__mro__[1].__subclasses__() }}", Scope({}))
    except TemplateError:
        pass
    else:  # pragma: no cover - the sandbox is the second wall
        raise AssertionError("the sandbox let a template reach object.__subclasses__")


def test_a_node_printing_templates_gets_its_text_back_through_apply(tmp_path):
    """End to end: a host's command prints templates; the registered result, a fact set from it
    and a loop over its lines all reach debug as the node's text, never evaluated."""
    playbook = tmp_path / "node-data.yml"
    playbook.write_text(textwrap.dedent("""\
        - hosts: a
          gather_facts: false
          vars:
            secret: do-not-leak
          tasks:
            - name: the node answers
              command: printf '%s\\n%s' "{{ '{{' }} 7 * 7 }}" "{{ '{{' }} secret }}"
              register: out
            - set_fact:
                copied: "{{ out.stdout_lines }}"
            - debug:
                msg: "{{ out.stdout }}"
            - debug:
                msg: "{{ item }}"
              loop: "{{ copied }}"
        """))
    inventory = tmp_path / "inv.yml"
    inventory.write_text("all:\n  vars: {ansible_connection: local}\n  hosts:\n    a: {}\n")
    result = apply(str(playbook), "-i", str(inventory), "--state", str(tmp_path / "s"), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    # (the playbook's path is in the report, and pytest's folder number may hold a 49)
    shown = json.dumps(json.loads(result.stdout)["plays"]).replace(str(tmp_path), "TMP")
    assert "49" not in shown and "do-not-leak" not in shown, shown
    assert "{{ 7 * 7 }}" in shown and "{{ secret }}" in shown
