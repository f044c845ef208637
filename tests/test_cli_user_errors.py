"""A user's mistake is an error that says what and how to fix it, never "unexpected error", and a
command that fails on a wrong --state leaves nothing behind (issue 19, item 6).

The walk goes over every subcommand of the CLI that takes --state (the TC's and the engine's
commands), gives each the inputs a user gets wrong (a path that does not exist for every required
argument, a state folder that does not exist) and checks the outcome. `tc init` (it makes the
state) and `tc serve` (it runs a server) are left out; `lab` commands have no --state.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

import pytest

from tccdeploy.cli import build_parser, main

SKIPPED = {("tc", "init"), ("tc", "serve")}


def _leaves(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _leaves(sub, (*prefix, name))


def _with_missing_inputs(words: tuple[str, ...], parser: argparse.ArgumentParser) -> list[str]:
    """words plus a value for every required argument: a file that does not exist (or the first
    choice where the argument has choices)."""
    argv = list(words)
    for action in parser._actions:
        if action.option_strings:
            if action.required:
                argv += [action.option_strings[0], f"missing-{action.dest}"]
        elif action.nargs not in ("?", "*", argparse.SUPPRESS):
            argv.append(sorted(action.choices)[0] if action.choices else f"missing-{action.dest}")
    return argv


COMMANDS = [(words, _with_missing_inputs(words, parser)) for words, parser in _leaves(build_parser())
            if "--state" in {o for a in parser._actions for o in a.option_strings} and words not in SKIPPED]


def test_the_walk_covers_the_tcs_and_the_engines_commands():
    names = {" ".join(words) for words, _ in COMMANDS}
    assert {"nodes", "vms", "audit show", "request submit", "tc show", "tc customers", "enforce", "migrate"} <= names
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("argv", [argv for _, argv in COMMANDS], ids=[" ".join(w) for w, _ in COMMANDS])
def test_every_command_given_missing_inputs_and_no_state_says_what_is_wrong_and_creates_nothing(
        argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for variable in ("TCCDEPLOY_TC", "TCCDEPLOY_INVENTORY", "TCCDEPLOY_MANIFESTS", "TCCDEPLOY_REGISTRY"):
        monkeypatch.delenv(variable, raising=False)
    absent = tmp_path / "no-state-here"
    try:
        status = main([*argv, "--state", str(absent)])
    except SystemExit as exc:  # argparse, or a command's own "error: ..."
        status = exc.code
    err = capsys.readouterr().err
    if isinstance(status, str):
        err, status = err + status, 1
    assert status not in (0, None), err
    assert "unexpected error" not in err and "Traceback" not in err, err
    assert "error" in err or "refused" in err, err
    assert not absent.exists(), f"{' '.join(argv)} created {absent}"
    assert os.listdir(tmp_path) == ["no-state-here"] or not os.listdir(tmp_path), os.listdir(tmp_path)


def test_a_file_that_is_not_there_is_named_with_where_it_was_looked_for(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["request", "submit", "missing.json", "--state", str(tmp_path / "state")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"error: missing.json: no such file or folder (relative to {tmp_path}): check the path"


def _run(argv: list[str], capsys) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    try:
        status = main(argv)
    except SystemExit as exc:
        status, message = (1, exc.code) if isinstance(exc.code, str) else (exc.code, "")
        return status, capsys.readouterr().err + str(message)
    return status, capsys.readouterr().err


def test_read_only_commands_on_a_folder_without_a_tc_say_how_to_make_one_and_leave_it_absent(tmp_path, capsys):
    absent = tmp_path / "absent"
    status, err = _run(["nodes", "--state", str(absent)], capsys)
    assert status == 1 and f"no TC registry at {absent}/registry.sqlite" in err and "tccdeploy tc init" in err, err
    status, err = _run(["tc", "show", "--state", str(absent)], capsys)
    assert status == 1 and err.strip() == f"error: no TC identity in {absent}: run `tccdeploy tc init`", err
    status, err = _run(["tc", "customers", "list", "--state", str(absent)], capsys)
    assert status == 1 and f"no TC in {absent}" in err, err
    assert not absent.exists()


TC_COMMANDS = [(words, _with_missing_inputs(words, parser), "--engine-dir" in {o for a in parser._actions for o in a.option_strings})
               for words, parser in _leaves(build_parser())
               if "--tc" in {o for a in parser._actions for o in a.option_strings} and words not in SKIPPED]


@pytest.fixture(scope="module")
def engine_credentials(tmp_path_factory):
    """An engine's credentials from a TC that is not served anywhere."""
    state = tmp_path_factory.mktemp("tc-nowhere")
    assert main(["tc", "init", "--state", str(state / "tc")]) == 0
    assert main(["tc", "engines", "add", "ops", "-o", str(state / "engine"), "--state", str(state / "tc")]) == 0
    return str(state / "engine")


def test_the_tc_walk_covers_the_commands_that_talk_to_a_served_tc():
    names = {" ".join(words) for words, _, _ in TC_COMMANDS}
    assert {"nodes", "enroll", "attest", "request submit", "enforce", "migrate"} <= names


@pytest.mark.parametrize("url", ["https://127.0.0.1:1", "http://127.0.0.1:1", "https://[::1", "tc.example"])
@pytest.mark.parametrize("words, argv, engine_dir", TC_COMMANDS, ids=[" ".join(w) for w, _, _ in TC_COMMANDS])
def test_a_tc_that_does_not_answer_or_a_url_that_is_not_one_is_a_named_error(
        words, argv, engine_dir, url, engine_credentials, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for variable in ("TCCDEPLOY_TC", "TCCDEPLOY_INVENTORY", "TCCDEPLOY_MANIFESTS", "TCCDEPLOY_REGISTRY"):
        monkeypatch.delenv(variable, raising=False)
    extra = ["--engine-dir", engine_credentials] if engine_dir else []
    extra += ["--once"] if words == ("enforce",) else []  # the loop itself waits for the TC, round after round
    status, err = _run([*argv, "--tc", url, *extra, "--state", str(tmp_path / "engine-state")], capsys)
    assert status not in (0, 250) and "unexpected error" not in err, err
    assert err.strip(), "a failure says why"


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PERIMETER = os.path.join(REPO, "examples", "perimeter.yml")
INVENTORY = os.path.join(REPO, "tests", "playbooks", "local-inventory.yml")
WRONG_KINDS = [
    (["request", "sign", PERIMETER, "-o", "x.json"], "it holds a Perimeter"),
    (["request", "submit", PERIMETER, "--tc", "https://127.0.0.1:1"], "it holds a Perimeter"),
    (["enforce", "--once", "-i", INVENTORY, "-m", INVENTORY], "it holds an inventory"),
    (["attest", "all", "-i", INVENTORY, "-m", INVENTORY], "it holds an inventory"),
    (["apply", PERIMETER, "-i", INVENTORY], "it holds a Perimeter"),
    (["ping", "all", "-i", PERIMETER], "inventory"),
    (["receipt", "verify", PERIMETER, "--tc", PERIMETER], "holds no PEM certificates"),
    (["request", "status", "abc", "--tc", "https://127.0.0.1:1", "--tc-cert", PERIMETER], "holds no certificate TLS"),
    (["receipt", "fetch", "abc", "--tc", "https://127.0.0.1:1", "--tc-cert", PERIMETER, "-o", "r.json"],
     "holds no certificate TLS"),
]


@pytest.mark.parametrize("argv, says", WRONG_KINDS, ids=[" ".join(a[:2]) for a, _ in WRONG_KINDS])
def test_a_file_of_the_wrong_kind_is_named_with_what_it_holds(argv, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TCCDEPLOY_CUSTOMER_KEY", str(tmp_path / "customer.pem"))
    from tccdeploy.crypto import customer

    customer.init(str(tmp_path / "customer.pem"))
    try:
        status = main([*argv, "--state", str(tmp_path / "state")] if argv[0] not in ("request", "receipt") else argv)
    except SystemExit as exc:
        status = exc.code
    err = capsys.readouterr().err
    if isinstance(status, str):
        err, status = err + status, 1
    assert status not in (0, None), err
    assert says in err and "unexpected error" not in err and "Traceback" not in err, err
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("name, says", [("local", "embedded TC"), ("../elsewhere", "lowercase letters"),
                                        ("Ops", "lowercase letters"), ("", "usage")])
def test_an_engine_name_that_would_share_leases_or_leave_its_folder_is_refused(name, says, tmp_path, capsys):
    """"local" is the embedded TC's own engine: a served engine of that name would hold its leases
    (and was exempt from the lease's engine check); a path put the engine's key elsewhere."""
    state = tmp_path / "tc"
    assert main(["tc", "init", "--state", str(state)]) == 0
    capsys.readouterr()
    assert main(["tc", "engines", "add", name, "--state", str(state)]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists() and not (state / "engines").exists()
