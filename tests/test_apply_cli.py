"""`tccdeploy apply` as a command: the recap and exit status ansible-playbook gives for the same
playbook, and a broken playbook refused before any host is touched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from .helpers_apply import BIN, ansible_playbook, apply, recap

HERE = Path(__file__).parent / "playbooks"
INVENTORY = str(HERE / "local-inventory.yml")
needs_ansible = pytest.mark.skipif(not (BIN / "ansible-playbook").exists() or shutil.which("python3") is None,
                                   reason="ansible-core is not installed (pip install -e '.[test]')")


@pytest.mark.slow
@needs_ansible
@pytest.mark.parametrize("playbook", ["semantics.yml", "serial-stop.yml", "max-fail-batch.yml"])
def test_recap_and_exit_status_match_ansible_playbook(playbook, tmp_path):
    ours = apply(str(HERE / playbook), "-i", INVENTORY, "--state", str(tmp_path))
    theirs = ansible_playbook(str(HERE / playbook), "-i", INVENTORY)
    assert recap(theirs.stdout), theirs.stdout + theirs.stderr
    assert recap(ours.stdout) == recap(theirs.stdout), ours.stdout
    assert ours.returncode == theirs.returncode == 2


def test_the_semantics_playbook_counts_as_ansible_does(tmp_path):
    """The figures ansible-playbook 2.19 printed for this playbook, kept so the fast tests check them too."""
    ours = apply(str(HERE / "semantics.yml"), "-i", INVENTORY, "--state", str(tmp_path))
    assert recap(ours.stdout) == {
        "a": {"ok": 5, "changed": 3, "unreachable": 0, "failed": 0, "skipped": 3, "rescued": 0, "ignored": 0},
        "b": {"ok": 2, "changed": 0, "unreachable": 0, "failed": 1, "skipped": 0, "rescued": 0, "ignored": 0},
        "c": {"ok": 6, "changed": 3, "unreachable": 0, "failed": 0, "skipped": 2, "rescued": 0, "ignored": 1},
    }
    assert ours.returncode == 2
    assert '"msg": "hello a likes blue"' in ours.stdout  # debug prints, substitution across registered vars


def test_serial_stops_at_the_first_failed_batch_and_later_plays_do_not_run(tmp_path):
    ours = apply(str(HERE / "serial-stop.yml"), "-i", INVENTORY, "--state", str(tmp_path))
    assert set(recap(ours.stdout)) == {"a", "b"}
    assert "NO MORE HOSTS LEFT" in ours.stdout and "never reached" not in ours.stdout
    assert ours.returncode == 2


def test_max_fail_percentage_ends_the_play_after_the_task_that_crossed_it_in_the_batch(tmp_path):
    """As ansible-playbook 2.19 printed for this playbook: a fails in the first batch of two (50%
    > 49%); b gets no more tasks (its "after the failure" never runs), c's batch never starts."""
    ours = apply(str(HERE / "max-fail-batch.yml"), "-i", INVENTORY, "--state", str(tmp_path))
    assert recap(ours.stdout) == {
        "a": {"ok": 0, "changed": 0, "unreachable": 0, "failed": 1, "skipped": 0, "rescued": 0, "ignored": 0},
        "b": {"ok": 0, "changed": 0, "unreachable": 0, "failed": 0, "skipped": 1, "rescued": 0, "ignored": 0},
    }
    assert "TASK [after the failure]" not in ours.stdout and "NO MORE HOSTS LEFT" in ours.stdout
    assert ours.returncode == 2


def _task_output(stdout: str) -> str:
    """The task sections of a run's output, from the first TASK banner to the recap."""
    return stdout[stdout.index("TASK ["):stdout.index("PLAY RECAP")]


@pytest.mark.slow
@needs_ansible
def test_debug_prints_each_items_body_as_ansible_playbook_does(tmp_path):
    ours = apply(str(HERE / "debug-loop.yml"), "-i", INVENTORY, "--state", str(tmp_path))
    theirs = ansible_playbook(str(HERE / "debug-loop.yml"), "-i", INVENTORY)
    assert _task_output(ours.stdout) == _task_output(theirs.stdout)


def test_debug_in_a_loop_prints_each_items_message_or_variable(tmp_path):
    """What ansible-playbook 2.19 printed for this playbook, kept so the fast tests check it too."""
    ours = apply(str(HERE / "debug-loop.yml"), "-i", INVENTORY, "--state", str(tmp_path))
    assert 'ok: [a] => (item=1) => {\n    "msg": "item 1 on a"\n}\n' in ours.stdout, ours.stdout
    assert 'ok: [a] => (item=y) => {\n    "item": "y"\n}\n' in ours.stdout, ours.stdout
    assert 'ok: [a] => {\n    "color": "blue"\n}\n' in ours.stdout, ours.stdout


def test_a_schema_error_fails_before_touching_any_host_with_file_and_line(tmp_path):
    inventory = tmp_path / "hosts.yml"
    inventory.write_text("all:\n  hosts:\n    far: {ansible_host: 127.0.0.1, ansible_port: 1}\n")
    result = apply(str(HERE / "bad-key.yml"), "-i", str(inventory), "--state", str(tmp_path))
    assert result.returncode == 4
    assert f"{HERE / 'bad-key.yml'}:7" in result.stderr and "regsiter" in result.stderr
    assert "PLAY [" not in result.stdout and "UNREACHABLE" not in result.stdout
    assert "nothing was changed" in result.stderr


def test_json_output_for_ci_has_every_task_and_the_stats(tmp_path):
    result = apply(str(HERE / "semantics.yml"), "-i", INVENTORY, "--json", "--state", str(tmp_path))
    report = json.loads(result.stdout)
    assert report["stats"]["b"]["failed"] == 1 and report["stats"]["c"]["ignored"] == 1
    tasks = [t["task"]["name"] for t in report["plays"][0]["tasks"]]
    assert tasks[:3] == ["echo", "show", "fail b"]
    assert report["plays"][0]["tasks"][0]["hosts"]["a"]["stdout"] == "hello a"
    assert report["refused"]["b"]["task"] == "fail b"


def test_tags_start_at_task_and_check_mode(tmp_path):
    playbook = tmp_path / "p.yml"
    marker = tmp_path / "made"
    playbook.write_text(f"""
- hosts: a
  gather_facts: false
  tasks:
    - name: first
      command: touch {marker}
      tags: [make]
    - name: second
      debug: {{msg: second}}
      tags: [show]
""")
    result = apply(str(playbook), "-i", INVENTORY, "--tags", "show", "--state", str(tmp_path))
    assert "TASK [first]" not in result.stdout and "TASK [second]" in result.stdout and not marker.exists()
    result = apply(str(playbook), "-i", INVENTORY, "--check", "--state", str(tmp_path))
    assert "skipping: [a]" in result.stdout and not marker.exists()  # command does not run in check mode
    result = apply(str(playbook), "-i", INVENTORY, "--start-at-task", "sec*", "--state", str(tmp_path))
    assert "TASK [first]" not in result.stdout and not marker.exists()
    result = apply(str(playbook), "-i", INVENTORY, "--state", str(tmp_path))
    assert marker.exists() and result.returncode == 0


def test_templating_errors_name_the_task_and_fail_only_that_host(tmp_path):
    playbook = tmp_path / "p.yml"
    playbook.write_text("- hosts: all\n  gather_facts: false\n  tasks:\n    - name: uses color2\n"
                        "      debug: {msg: '{{ color2 }}'}\n      when: inventory_hostname != 'a'\n")
    result = apply(str(playbook), "-i", INVENTORY, "--state", str(tmp_path))
    assert "'color2' is undefined" in result.stdout and f"{playbook}:4" in result.stdout
    assert recap(result.stdout)["a"]["skipped"] == 1 and recap(result.stdout)["b"]["failed"] == 1


def test_step_asks_before_each_task(tmp_path):
    import subprocess

    playbook = tmp_path / "p.yml"
    playbook.write_text("- hosts: a\n  gather_facts: false\n  tasks:\n"
                        "    - name: one\n      debug: {msg: one}\n    - name: two\n      debug: {msg: two}\n"
                        "    - name: three\n      debug: {msg: three}\n")
    run = [str(BIN / "tccdeploy"), "apply", str(playbook), "-i", INVENTORY, "--step", "--state", str(tmp_path)]
    answered = subprocess.run(run, input="n\ny\n", capture_output=True, text=True)
    assert "TASK [one]" not in answered.stdout and "TASK [two]" in answered.stdout
    assert "TASK [three]" not in answered.stdout  # no answer left: not performed
    assert answered.stderr.count("Perform task: TASK:") == 3
    continued = subprocess.run(run, input="c\n", capture_output=True, text=True)
    assert all(f"TASK [{t}]" in continued.stdout for t in ("one", "two", "three"))
    assert continued.stderr.count("Perform task: TASK:") == 1


def test_what_apply_does_not_run_is_refused_by_name_with_file_and_line_before_any_host(tmp_path):
    playbook = HERE / "refused.yml"
    result = apply(str(playbook), "-i", INVENTORY, "--state", str(tmp_path))
    assert result.returncode == 4, result.stdout + result.stderr
    assert "TASK [" not in result.stdout
    for line, text in ((6, "the filter 'ipaddr' is not one tccdeploy apply runs"),
                       (8, "lookup()/query() are not run"),
                       (11, "the test 'exists' is not one tccdeploy apply runs"),
                       (12, "the filter 'community.general.json_query' is not one"),
                       (14, "template syntax error")):
        assert any(f"{playbook}:{line}:" in row and text in row for row in result.stderr.splitlines()), \
            (line, text, result.stderr)
    assert "its filters are: abs, attr, b64decode" in result.stderr
