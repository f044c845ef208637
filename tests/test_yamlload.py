"""The YAML loader: positions kept, and hostile input refused cleanly in bounded time."""

from __future__ import annotations

import os
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tccdeploy.manifest.problems import ManifestError
from tccdeploy.manifest.yamlload import load_file, load_text

BILLION_LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)
)


def _error(text: str) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        load_text("f.yml", text)
    return info.value


def test_every_path_keeps_its_line_and_column():
    doc = load_text("f.yml", "spec:\n  sites:\n    - name: a\n      networks: [10.0.0.0/8]\n")[0]
    assert doc.locate(("spec", "sites", 0, "name")) == (3, 7)
    assert doc.locate(("spec", "sites", 0, "networks", 0)) == (4, 18)
    assert doc.locate(("spec", "sites", 0, "missing")) == (3, 7)  # nearest written ancestor


def test_scalars_are_typed_as_ansible_types_them():
    data = load_text("f.yml", "a: yes\nb: 0x10\nc: '0x10'\nd: 2026.1\ne: ~\nf: 2024-01-01\n")[0].data
    assert data == {"a": True, "b": 16, "c": "0x10", "d": 2026.1, "e": None, "f": "2024-01-01"}


def test_merge_keys_explicit_keys_win():
    data = load_text("f.yml", "base: &b {x: 1, y: 1}\nc:\n  <<: *b\n  y: 2\n")[0].data
    assert data["c"] == {"x": 1, "y": 2}


def test_several_documents_in_one_file():
    docs = load_text("f.yml", "a: 1\n---\nb: 2\n")
    assert [d.data for d in docs] == [{"a": 1}, {"b": 2}]


def test_duplicate_key_is_an_error_at_the_second_key():
    error = _error("a: 1\nb:\n  c: 1\n  c: 2\n")
    (problem,) = error.problems
    assert (problem.line, problem.column, problem.code) == (4, 3, "yaml.duplicate-key")
    assert "line 3" in problem.message


@pytest.mark.parametrize("text", ["!!python/object/apply:os.system ['true']", "a: !!python/name:os.system", "a: !vault |\n  abc\n"])
def test_python_and_custom_tags_are_refused(text: str):
    assert _error(text).problems[0].code == "yaml.tag"


def test_billion_laughs_is_refused_quickly():
    start = time.perf_counter()
    error = _error(BILLION_LAUGHS)
    assert error.problems[0].code == "yaml.too-many-nodes"
    assert time.perf_counter() - start < 10  # generous: the point is that it ends


@pytest.mark.parametrize("text", ["[" * 100_000, "a:\n" + "".join(" " * i + "- \n" for i in range(1, 300)), "{a: " * 5000])
def test_deep_nesting_is_refused_without_a_traceback(text: str):
    assert _error(text).problems[0].code in ("yaml.too-deep", "yaml.syntax")


def test_binary_garbage_is_refused(tmp_path):
    path = tmp_path / "garbage.yml"
    path.write_bytes(os.urandom(4096) + b"\xff\xfe\x00")
    with pytest.raises(ManifestError) as info:
        load_file(str(path))
    assert info.value.problems[0].code in ("yaml.encoding", "yaml.syntax")


def test_control_characters_are_refused():
    assert _error("a: b\x00c\n").problems[0].code == "yaml.syntax"


def test_a_100_mb_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.yml"
    with open(path, "wb") as fh:
        fh.truncate(100 * 1024 * 1024)
    with pytest.raises(ManifestError) as info:
        load_file(str(path))
    assert info.value.problems[0].code == "file.too-large"
    assert "100.0 MiB" in info.value.problems[0].message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_any_text_loads_or_is_refused_cleanly(text: str):
    try:
        load_text("f.yml", text)
    except ManifestError as exc:
        assert exc.problems and exc.problems[0].line >= 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_load_or_are_refused_cleanly(tmp_path_factory, data: bytes):
    path = tmp_path_factory.mktemp("fuzz") / "f.yml"
    path.write_bytes(data)
    try:
        load_file(str(path))
    except ManifestError as exc:
        assert exc.problems
