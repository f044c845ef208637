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
from tccdeploy.playbook.templar import TemplateError, Undefined, render

VARS = {"name": "node1", "n": 3, "items": ["a", "b"], "r": {"rc": 0, "changed": True, "failed": False, "stdout": "ok"},
        "cmd": "reboot {{ name }}", "loop1": "{{ loop2 }}", "loop2": "{{ loop1 }}", "flag": "yes"}


def test_a_whole_expression_keeps_its_type_and_embedded_ones_become_text():
    assert render("{{ items }}", VARS) == ["a", "b"]
    assert render("{{ n }}", VARS) == 3
    assert render("n={{ n }} first={{ items[0] }} rc={{ r.rc }} {{ r['stdout'] }}", VARS) == "n=3 first=a rc=0 ok"
    assert render({"k": ["{{ name }}", 1]}, VARS) == {"k": ["node1", 1]}


def test_variables_that_refer_to_variables_are_rendered_and_loops_are_caught():
    assert render("{{ cmd }}", VARS) == "reboot node1"
    with pytest.raises(TemplateError, match="levels deep"):
        render("{{ loop1 }}", VARS)


@pytest.mark.parametrize("text, message", [
    ("{{ name | upper }}", "filters are not supported"),
    ("{{ n + 1 }}", "not supported"),
    ("{% if x %}y{% endif %}", "blocks"),
    ("{{ name", "without its"),
])
def test_jinja_beyond_substitution_is_refused_with_what_is_supported(text, message):
    with pytest.raises(TemplateError, match=message):
        render(text, VARS)


def test_an_undefined_variable_is_named():
    with pytest.raises(Undefined, match="'r.nope' is undefined"):
        render("{{ r.nope }}", VARS)


@pytest.mark.parametrize("condition, expected", [
    (True, True), (False, False), ("r is succeeded", True), ("r is failed", False), ("r is changed", True),
    ("missing is defined", False), ("missing is undefined", True), ("name is not defined", False),
    ("name == 'node1'", True), ("name != \"node1\"", False), ("n > 2", True), ("n <= 2", False),
    ("'a' in items", True), ("'z' not in items", True), ("not r is failed", True),
    ("name == 'node1' and n == 3", True), ("name == 'x' or n == 3", True), ("name == 'x' and n == 3 or false", False),
    (["name == 'node1'", "n == 3"], True), (["name == 'node1'", "n == 4"], False), ("flag", True),
    ("{{ n == 3 }}", True), ("r.rc == 0", True),
])
def test_conditions(condition, expected):
    assert evaluate(condition, VARS) is expected


@pytest.mark.parametrize("condition, message", [
    ("(n == 3)", "parentheses"), ("name | bool", "filters"), ("name", "not a boolean"),
    ("n is odd", "unknown test"), ("missing == 1", "undefined"), ("n == ", "not a condition"),
])
def test_conditions_outside_the_grammar_are_refused(condition, message):
    with pytest.raises((ConditionError, TemplateError), match=message):
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
