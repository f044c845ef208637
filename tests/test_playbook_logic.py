"""The playbook runner's pure logic: substitution, conditions, batches, tags, -e, banners."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tccdeploy.commands.apply import parse_extra_vars
from tccdeploy.playbook.callback import banner
from tccdeploy.playbook.conditions import ConditionError, evaluate
from tccdeploy.playbook.model import batches
from tccdeploy.playbook.runner import selected
from tccdeploy.playbook.templar import TemplateError, Undefined, omit_keys, render

VARS = {"name": "node1", "n": 3, "items": ["a", "b"], "r": {"rc": 0, "changed": True, "failed": False, "stdout": "ok"},
        "cmd": "reboot {{ name }}", "loop1": "{{ loop2 }}", "loop2": "{{ loop1 }}", "flag": "yes"}


def test_a_whole_expression_keeps_its_type_and_embedded_ones_become_text():
    assert render("{{ items }}", VARS) == ["a", "b"]
    assert render("{{ n }}", VARS) == 3
    assert render("n={{ n }} first={{ items[0] }} rc={{ r.rc }} {{ r['stdout'] }}", VARS) == "n=3 first=a rc=0 ok"
    assert render({"k": ["{{ name }}", 1]}, VARS) == {"k": ["node1", 1]}


def test_variables_that_refer_to_variables_are_rendered_and_loops_are_caught():
    assert render("{{ cmd }}", VARS) == "reboot node1"
    with pytest.raises(TemplateError, match="loop: loop1 -> loop2 -> loop1"):
        render("{{ loop1 }}", VARS)


def test_expressions_filters_and_tests_render_as_ansible_2_19_renders_them():
    """Figures from ansible-playbook 2.19 on the same expressions (debug msg output)."""
    assert render("{{ n + 1 }}", VARS) == 4
    assert render("{{ name | upper }}", VARS) == "NODE1"
    assert render("x {{ items }} {{ none }} {{ true }} {{ {'a': 1} }}", VARS) == "x ['a', 'b']  True {'a': 1}"
    assert render("{{ items | map('upper') | join(',') }}", VARS) == "A,B"
    assert render("{{ {'a': {'b': 1}} | combine({'a': {'c': 2}}, recursive=True) }}", VARS) == {"a": {"b": 1, "c": 2}}
    assert render("{{ r | dict2items | selectattr('key', 'eq', 'rc') | items2dict }}", VARS) == {"rc": 0}
    assert render("{{ '1.10' is version('1.9', '>') }}", VARS) is True
    assert render("{{ 'yes' | bool }}", VARS) is True
    assert render("{{ missing | default(7) }}", VARS) == 7
    assert render("{{ 'a-b-c' | regex_replace('-', '_') }}", VARS) == "a_b_c"
    assert render("{{ 'hi' | b64encode | b64decode }}", VARS) == "hi"
    assert render("{% for i in items %}{{ i }};{% endfor %}", VARS) == "a;b;"


@pytest.mark.parametrize("text, message", [
    ("{{ name | ipaddr }}", "the filter 'ipaddr' is not one tccdeploy apply runs"),
    ("{{ name is exists }}", "the test 'exists' is not one tccdeploy apply runs"),
    ("{{ lookup('file', '/etc/passwd') }}", "lookup"),
    ("{{ name", "syntax error"),
    ("{{ items.append(1) }}", "undefined"),
    ("{{ name.__class__.__mro__ }}", "undefined"),
])
def test_what_tccdeploy_does_not_run_is_refused_by_name(text, message):
    with pytest.raises(TemplateError, match=message):
        render(text, VARS)


def test_an_undefined_variable_is_named():
    with pytest.raises(Undefined, match="object of type 'dict' has no attribute 'nope'"):
        render("{{ r.nope }}", VARS)
    with pytest.raises(Undefined, match="'missing' is undefined"):
        render("{{ missing }}", VARS)
    with pytest.raises(Undefined, match="'missing.a.b' is undefined"):
        render("x {{ missing.a.b }}", VARS)


def test_omit_removes_the_argument():
    args = render({"a": "{{ missing | default(omit) }}", "b": "{{ n }}"}, VARS)
    assert omit_keys(args) == {"b": 3}


@pytest.mark.parametrize("condition, expected", [
    (True, True), (False, False), ("r is succeeded", True), ("r is failed", False), ("r is changed", True),
    ("missing is defined", False), ("missing is undefined", True), ("name is not defined", False),
    ("missing.a.b is defined", False),
    ("name == 'node1'", True), ("name != \"node1\"", False), ("n > 2", True), ("n <= 2", False),
    ("'a' in items", True), ("'z' not in items", True), ("not r is failed", True),
    ("name == 'node1' and n == 3", True), ("name == 'x' or n == 3", True), ("name == 'x' and n == 3 or false", False),
    (["name == 'node1'", "n == 3"], True), (["name == 'node1'", "n == 4"], False), ("flag | bool", True),
    ("{{ n == 3 }}", True), ("r.rc == 0", True), ("(n > 2) and (items | length == 2)", True),
])
def test_conditions(condition, expected):
    assert evaluate(condition, VARS) is expected


@pytest.mark.parametrize("condition, message", [
    ("flag", "derived from value of type 'str'"),
    ("n", "derived from value of type 'int'"),
    ("items", "derived from value of type 'list'"),
    ("missing == 1", "'missing' is undefined"),
    ("n ==", "syntax error"),
])
def test_conditions_must_be_booleans_as_in_ansible_2_19(condition, message):
    with pytest.raises(ConditionError if "type" in message else TemplateError, match=message):
        evaluate(condition, VARS)


@pytest.mark.parametrize("serial, sizes", [
    ([], [10]), ([1], [1] * 10), ([3], [3, 3, 3, 1]), (["25%"], [2, 2, 2, 2, 2]), ([1, 2, "50%"], [1, 2, 5, 2]),
    (["1%"], [1] * 10),
])
def test_serial_batches_as_ansible_makes_them(serial, sizes):
    assert [len(b) for b in batches(list(range(10)), serial)] == sizes


@given(st.lists(st.integers(), max_size=30), st.lists(st.one_of(st.integers(1, 5), st.sampled_from(["10%", "50%"])),
                                                       max_size=3))
def test_batches_cover_every_host_once_in_order(hosts, serial):
    assert [h for b in batches(hosts, serial) for h in b] == hosts


@pytest.mark.parametrize("tags, only, skip, expected", [
    (set(), set(), set(), True), ({"x"}, {"x"}, set(), True), ({"y"}, {"x"}, set(), False),
    ({"always"}, {"x"}, set(), True), ({"always"}, set(), {"always"}, False), ({"never"}, set(), set(), False),
    ({"never", "debug"}, {"debug"}, set(), True), ({"x"}, {"tagged"}, set(), True), (set(), {"untagged"}, set(), True),
    ({"x"}, set(), {"x"}, False), ({"x"}, {"all"}, set(), True),
])
def test_tag_selection_follows_ansible(tags, only, skip, expected):
    assert selected(frozenset(tags), only, skip) is expected


def test_extra_vars_in_every_form_ansible_takes(tmp_path):
    (tmp_path / "vars.yml").write_text("a: 1\nb: [x]\n")
    assert parse_extra_vars(["x=1 y='two words'", '{"z": 3}', f"@{tmp_path / 'vars.yml'}"]) == \
        {"x": "1", "y": "two words", "z": 3, "a": 1, "b": ["x"]}
    with pytest.raises(ValueError, match="key=value"):
        parse_extra_vars(["novalue"])


def test_banners_are_padded_to_80_columns_like_ansible():
    assert len(banner("PLAY [demo]").strip("\n")) == 80
    assert banner("TASK [" + "x" * 100 + "]").endswith(" ***")


def test_become_keeps_the_password_out_of_argv_and_fails_fast_without_one():
    from tccdeploy.playbook.modules import Become

    with_password = Become("deploy", "s3cret")
    argv = with_password.wrap(["id", "-un"])
    assert "s3cret" not in " ".join(argv) and "s3cret" not in repr(with_password)
    assert argv[:5] == ["sudo", "-H", "-S", "-p", ""] and argv[-3:] == ["--", "id", "-un"]
    assert with_password.stdin == b"s3cret\n"
    assert Become().wrap(["id"]) == ["sudo", "-H", "-n", "-u", "root", "--", "id"]
    assert Become().stdin is None
