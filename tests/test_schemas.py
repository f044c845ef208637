"""The published schemas: well-formed 2020-12, documented for editors, and strict on form."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from tccdeploy.manifest import schema
from tccdeploy.manifest.yamlload import load_text

SCHEMAS = sorted((Path(schema.__file__).parent.parent / "schemas").glob("*.schema.json"))


def test_every_kind_has_a_schema_file():
    names = {p.name for p in SCHEMAS}
    for stem in schema.KINDS.values():
        assert f"{stem}.schema.json" in names


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.name)
def test_schema_is_valid_2020_12_with_id_and_title(path: Path):
    document = json.loads(path.read_text())
    Draft202012Validator.check_schema(document)
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert document["$id"].endswith("/" + path.name)
    assert document["title"] and document["description"]


def _resolve(ref: str, here: dict, by_name: dict[str, dict]) -> dict:
    file, _, pointer = ref.partition("#")
    target = by_name[file] if file else here
    for part in [p for p in pointer.split("/") if p]:
        target = target[part]
    return target


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.name)
def test_every_property_has_a_description(path: Path):
    by_name = {p.name: json.loads(p.read_text()) for p in SCHEMAS}
    root = by_name[path.name]
    missing: list[str] = []

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            for name, sub in node.get("properties", {}).items():
                described = sub.get("description") or (
                    "$ref" in sub and _resolve(sub["$ref"], root, by_name).get("description")
                )
                if not described:
                    missing.append(f"{where}/properties/{name}")
            for key, value in node.items():
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}/{i}")

    walk(root, "#")
    assert not missing, missing


def _problems(kind: str, text: str):
    return schema.validate(load_text("t.yml", text)[0], kind)


@pytest.mark.parametrize(
    "digest, ok",
    [("a" * 64, True), ("a" * 63, False), ("A" * 64, False), ("g" * 64, False), ("a" * 65, False)],
)
def test_sha256_is_64_lowercase_hex(digest: str, ok: bool):
    build = (
        "apiVersion: tccdeploy/v1\nkind: TVMMBuild\nmetadata: {name: b}\nspec:\n  version: '1.0'\n"
        f"  status: approved\n  artifacts: {{kernel: {{sha256: '{digest}'}}}}\n"
        "  measurements: {bank: sha256, pcrs: [{pcr: 4, events: [{artifact: kernel}]}]}\n"
    )
    assert (not _problems("TVMMBuild", build)) is ok


@pytest.mark.parametrize(
    "network, ok",
    [("10.0.0.0/8", True), ("10.0.0.1/8", False), ("10.0.0.0/33", False), ("fd00::/8", True), ("10.0.0.0", False), ("x/8", False)],
)
def test_cidr_form_is_checked(network: str, ok: bool):
    text = (
        "apiVersion: tccdeploy/v1\nkind: Perimeter\nmetadata: {name: p}\nspec:\n"
        f"  sites: [{{name: s, networks: ['{network}']}}]\n"
        "  manufacturerCAs: [{name: c, certificate: c.pem}]\n  attestation: {bank: sha256, pcrs: [0]}\n"
    )
    assert (not _problems("Perimeter", text)) is ok


@pytest.mark.parametrize("port, ok", [(22, True), (0, False), (65536, False), ("22", False)])
def test_port_is_checked(port: object, ok: bool):
    assert (not _problems("Vars", f"ansible_port: {port!r}\n".replace("'", '"'))) is ok


@pytest.mark.parametrize("pcr, ok", [(0, True), (23, True), (24, False), (-1, False)])
def test_pcr_index_is_checked(pcr: int, ok: bool):
    text = (
        "apiVersion: tccdeploy/v1\nkind: Perimeter\nmetadata: {name: p}\nspec:\n"
        "  sites: [{name: s, networks: [10.0.0.0/8]}]\n"
        f"  manufacturerCAs: [{{name: c, certificate: c.pem}}]\n  attestation: {{bank: sha256, pcrs: [{pcr}]}}\n"
    )
    assert (not _problems("Perimeter", text)) is ok


@pytest.mark.parametrize("version, ok", [("2026.1.0", True), ("1", True), ("1.2.3-rc1", True), ("v1", False), ("1..2", False)])
def test_version_form_is_checked(version: str, ok: bool):
    text = (
        "apiVersion: tccdeploy/v1\nkind: PlacementRequest\nmetadata: {name: vm}\n"
        f"spec: {{image: i, vcpus: 1, memoryMiB: 64, constraints: {{minBuildVersion: '{version}'}}}}\n"
    )
    assert (not _problems("PlacementRequest", text)) is ok


def test_unquoted_version_read_as_number_says_to_quote_it():
    text = (
        "apiVersion: tccdeploy/v1\nkind: PlacementRequest\nmetadata: {name: vm}\n"
        "spec: {image: i, vcpus: 1, memoryMiB: 64, constraints: {minBuildVersion: 2026.1}}\n"
    )
    (problem,) = _problems("PlacementRequest", text)
    assert problem.code == "schema.type" and "quote" in problem.hint


def test_unknown_tcc_variable_suggests_the_right_name():
    (problem,) = _problems("Vars", "tcc_capacty: 3\n")
    assert problem.code == "schema.unknown-property" and "tcc_capacity" in problem.hint


def test_all_schema_errors_are_reported_at_once():
    text = (
        "apiVersion: tccdeploy/v1\nkind: Perimeter\nmetadata: {name: P}\nspec:\n"
        "  sites: [{name: s, networks: [10.0.0.1/8]}]\n"
        "  manufacturerCAs: [{name: c, certificate: c.pem}]\n  attestation: {bank: md5, pcrs: [99]}\n"
    )
    codes = sorted(p.code for p in _problems("Perimeter", text))
    assert codes == ["schema.enum", "schema.format", "schema.maximum", "schema.pattern"]


def test_published_schemas_are_self_contained_and_in_sync():
    from tccdeploy.manifest.schemasync import sync

    assert sync(write=False) == [], "run: python -m tccdeploy.manifest.schemasync"
    for path in SCHEMAS:
        text = path.read_text()
        assert '"$ref": "#/' in text or path.name in ("common.schema.json", "playbook.schema.json") or "$ref" not in text
        assert ".schema.json#" not in text  # no reference to another file


def _all_example_documents():
    from tccdeploy.manifest.yamlload import load_file

    repo = Path(__file__).resolve().parent.parent
    for base in ("examples", "inventory", "playbooks", "tests/invalid"):
        for path in sorted((repo / base).rglob("*.yml")):
            try:
                docs = load_file(str(path))
            except Exception:  # noqa: BLE001 - unloadable files are not about schemas
                continue
            for doc in docs:
                yield path, doc


def _kind_of(path: Path, data: object) -> str | None:
    if "group_vars" in path.parts or "host_vars" in path.parts:
        return "Vars"
    if isinstance(data, list):
        return "Playbook"
    if isinstance(data, dict):
        kind = data.get("kind")
        if kind in ("Perimeter", "TVMMBuild", "PlacementRequest"):
            return kind
        if "apiVersion" not in data:
            return "Inventory"
    return None


def test_fast_checker_agrees_with_jsonschema_on_every_example_and_invalid_case():
    checked = 0
    for path, doc in _all_example_documents():
        kind = _kind_of(path, doc.data)
        if kind is None:
            continue
        fast = schema.is_valid_fast(kind, doc.data)
        full = schema.validator(kind).is_valid(doc.data)
        assert fast is full, f"{path}: fastjsonschema says {fast}, jsonschema says {full}"
        checked += 1
    assert checked > 30
