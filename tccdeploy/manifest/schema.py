"""The published JSON Schemas (2020-12) and validation against them.

The schema files in schemas/ are the contract CI pipelines and editors use; tccdeploy
validates with exactly those files, so there is one definition of what a manifest may say.
Errors are turned into messages that say how to fix them, pointing at the key or value.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
from collections.abc import Callable, Iterator
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from .problems import JsonPath, Problem
from .yamlload import Document

if TYPE_CHECKING:
    import jsonschema
    from jsonschema import Draft202012Validator, FormatChecker
    from referencing import Registry

# jsonschema (with referencing, attrs, rpds) costs ~0.1 s to import; valid input never needs
# it (the compiled fast path answers), so it is imported only to explain problems.

# Schema file stem by kind; "vars" is for group_vars/ and host_vars/ files.
KINDS: dict[str, str] = {
    "Perimeter": "perimeter",
    "TVMMBuild": "tvmmbuild",
    "Platform": "platform",
    "PlacementRequest": "placementrequest",
    "NodeRoster": "noderoster",
    "Inventory": "inventory",
    "Playbook": "playbook",
    "Vars": "hostvars",
}
MANIFEST_KINDS = ("Perimeter", "TVMMBuild", "Platform", "PlacementRequest", "NodeRoster")


def kind_for_name(name: str) -> str | None:
    """Map a user's spelling (perimeter, TVMMBuild, hostvars, vars...) to a kind."""
    wanted = name.lower().replace("-", "").replace("_", "")
    for kind, stem in KINDS.items():
        if wanted in (kind.lower(), stem):
            return kind
    return None


def schema_text(kind: str) -> str:
    return resources.files("tccdeploy.schemas").joinpath(f"{KINDS[kind]}.schema.json").read_text()


@cache
def _registry() -> Registry:
    from referencing import Registry, Resource

    resources_list = []
    for entry in resources.files("tccdeploy.schemas").iterdir():
        if entry.name.endswith(".schema.json"):
            contents = json.loads(entry.read_text())
            resources_list.append((contents["$id"], Resource.from_contents(contents)))
    return Registry().with_resources(resources_list)


def _format_checker() -> FormatChecker:
    from jsonschema import FormatChecker

    checker = FormatChecker(formats=())

    @checker.checks("cidr", raises=ValueError)
    def _cidr(value: object) -> bool:
        if isinstance(value, str):
            ipaddress.ip_network(value, strict=True)
        return True

    @checker.checks("ip-address", raises=ValueError)
    def _ip(value: object) -> bool:
        if isinstance(value, str):
            ipaddress.ip_address(value)
        return True

    return checker


@cache
def validator(kind: str) -> Draft202012Validator:
    from jsonschema import Draft202012Validator

    schema = json.loads(schema_text(kind))
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=_registry(), format_checker=_format_checker())


@cache
def _fast(kind: str) -> Callable[[Any], Any] | None:
    """A compiled checker for the common case, valid input: about 20x faster than jsonschema.

    It answers only "valid or not"; any doubt goes to jsonschema, which finds and explains every
    problem. A test checks that both agree on every example and invalid case.
    """
    try:
        import fastjsonschema
    except ImportError:  # pragma: no cover - optional speed-up
        return None
    return fastjsonschema.compile(json.loads(schema_text(kind)), formats=_FAST_FORMATS)


def _is_cidr(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError:
        return False
    return True


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


_FAST_FORMATS = {"cidr": _is_cidr, "ip-address": _is_ip}


def is_valid_fast(kind: str, instance: Any) -> bool | None:
    """True when the compiled checker accepts instance; None when it cannot tell."""
    checker = _fast(kind)
    if checker is None:
        return None
    import fastjsonschema

    try:
        checker(instance)
    except fastjsonschema.JsonSchemaException:
        return False
    except Exception:  # noqa: BLE001 - any surprise in generated code: let jsonschema decide
        return None
    return True


def validate(doc: Document, kind: str, data: Any = None, base: JsonPath = ()) -> list[Problem]:
    """Every schema problem of doc (or of data found at base inside it)."""
    instance = doc.data if data is None else data
    if is_valid_fast(kind, instance):
        return []
    problems: list[Problem] = []
    for error in _leaves(validator(kind).iter_errors(instance)):
        problems.append(_to_problem(doc, base + tuple(error.absolute_path), error))
    return problems


def _leaves(errors: Iterator[jsonschema.ValidationError]) -> Iterator[jsonschema.ValidationError]:
    """For oneOf/anyOf, report the branch that got furthest instead of 'is not valid under any'."""
    import jsonschema.exceptions

    for error in errors:
        if error.validator in ("oneOf", "anyOf") and error.context:
            if error.schema.get("x-hint"):
                yield error
                continue
            best = jsonschema.exceptions.best_match(error.context)
            yield best if best is not None else error
        else:
            yield error


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_NAMES = {
    "object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
    "number": "a number", "boolean": "true or false", "null": "null",
}


def _to_problem(doc: Document, path: JsonPath, error: jsonschema.ValidationError) -> Problem:
    schema = error.schema if isinstance(error.schema, dict) else {}
    hint = schema.get("x-hint", "")
    v = error.validator
    code = f"schema.{v}"
    if "propertyNames" in error.relative_schema_path or "propertyNames" in error.schema_path:
        parent = error.parent
        name = error.instance
        code = "schema.property-name"
        message = f"{_describe(name)} is not allowed here"
        choices = [str(o) for o in schema.get("enum", [])]
        close = difflib.get_close_matches(str(name), choices, n=1)
        if close:
            hint = f"did you mean {close[0]!r}?"
        elif not hint and parent is not None and isinstance(parent.schema, dict):
            hint = parent.schema.get("x-hint", "")
        hint = hint or (f"allowed: {', '.join(choices)}" if choices else "")
        return doc.problem(path, code, message, hint)
    if v == "required":
        missing = error.message.split("'")[1] if "'" in error.message else str(error.message)
        prop = schema.get("properties", {}).get(missing, {})
        message = f"missing required property {missing!r}"
        hint = hint or prop.get("description", "")
    elif v == "additionalProperties" and schema.get("additionalProperties") is False:
        allowed = sorted(schema.get("properties", {}))
        extras = [k for k in (error.instance or {}) if k not in allowed]
        name = extras[0] if extras else "?"
        path = path + (name,)
        code = "schema.unknown-property"
        message = f"unknown property {name!r}"
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"allowed here: {', '.join(allowed)}"
    elif v == "not" and schema.get("not") == {}:
        name = path[-1] if path else "?"
        code = "schema.unknown-property"
        message = f"unknown variable {name!r}"
        known = [k for k in _known_tcc_vars()]
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else hint
    elif v == "propertyNames":
        code = "schema.property-name"
        message = f"{_describe(error.instance)} is not allowed as a name here"
        if "enum" in error.validator_value:
            close = difflib.get_close_matches(str(error.instance), error.validator_value["enum"], n=1)
            if close:
                hint = f"did you mean {close[0]!r}?"
    elif v == "enum":
        options = ", ".join(str(o) for o in error.validator_value)
        message = f"{_describe(error.instance)} is not one of: {options}"
        close = difflib.get_close_matches(str(error.instance), [str(o) for o in error.validator_value], n=1)
        hint = f"did you mean {close[0]!r}?" if close else hint
    elif v == "const":
        message = f"{_describe(error.instance)} must be {error.validator_value!r}"
    elif v == "type":
        wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        names = " or ".join(_TYPE_NAMES.get(w, str(w)) for w in wanted)
        message = f"expected {names}, got {_describe(error.instance)}"
        if "string" in wanted and isinstance(error.instance, (int, float)) and not isinstance(error.instance, bool):
            hint = f"YAML read this as a number; quote it: '{error.instance}'"
        elif "string" in wanted and isinstance(error.instance, bool):
            hint = "YAML reads yes/no/on/off/true/false as booleans; quote the value"
    elif v == "pattern":
        message = f"{_describe(error.instance)} is not in the expected form"
        hint = hint or f"it must match {error.validator_value}"
    elif v == "format":
        cause = f": {error.cause}" if error.cause else ""
        message = f"{_describe(error.instance)} is not a valid {error.validator_value}{cause}"
    elif v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        message = f"{_describe(error.instance)} is out of range ({v} {error.validator_value})"
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None and high is not None:
            hint = hint or f"use a value from {low} to {high}"
        else:
            hint = hint or f"use a value {'at least' if 'min' in v.lower() else 'at most'} {error.validator_value}"
    elif v in ("minItems", "maxItems"):
        message = f"needs {'at least' if v == 'minItems' else 'at most'} {error.validator_value} item(s)"
    elif v == "uniqueItems":
        message = "items must be unique; a value is listed twice"
    elif v in ("minLength", "maxLength"):
        message = f"{_describe(error.instance)} is too {'short' if v == 'minLength' else 'long'}"
    elif v == "minProperties":
        message = f"needs at least {error.validator_value} entr{'y' if error.validator_value == 1 else 'ies'}"
    elif v == "oneOf":
        message = f"{_describe(error.instance)} does not match any accepted form"
    else:
        message = error.message
    if not hint and schema.get("description") and v in ("type", "pattern", "format", "const"):
        hint = schema["description"]
    return doc.problem(path, code, message, hint)


@cache
def _known_tcc_vars() -> tuple[str, ...]:
    schema = json.loads(schema_text("Vars"))
    return tuple(k for k in schema["properties"] if k.startswith("tcc_"))


@cache
def _tasks_validator() -> Draft202012Validator:
    from jsonschema import Draft202012Validator

    playbook_id = json.loads(schema_text("Playbook"))["$id"]
    return Draft202012Validator({"type": "array", "items": {"$ref": f"{playbook_id}#/$defs/task"}},
                                registry=_registry(), format_checker=_format_checker())


def validate_tasks(doc: Document) -> list[Problem]:
    """Problems of a file of tasks (import_tasks, include_tasks, a role's tasks/ or handlers/):
    a list of tasks as a play's `tasks:` holds, checked against the playbook schema's task."""
    if doc.data is None:
        return []
    return [_to_problem(doc, tuple(error.absolute_path), error)
            for error in _leaves(_tasks_validator().iter_errors(doc.data))]


@cache
def _args_validator(module: str) -> Draft202012Validator:
    from jsonschema import Draft202012Validator

    playbook_id = json.loads(schema_text("Playbook"))["$id"]
    return Draft202012Validator({"$ref": f"{playbook_id}#/$defs/task/properties/{module}"},
                                registry=_registry(), format_checker=_format_checker())


def module_args_problems(module: str, args: Any) -> list[str]:
    """What is wrong with a module's arguments once their templates are rendered (the schema
    let `{{ ... }}` through where a boolean, number or pattern was due): one line each."""
    out = []
    for error in _leaves(_args_validator(module).iter_errors(args)):
        where = ".".join(str(p) for p in error.absolute_path) or module
        out.append(f"{module}: {where}: {_describe(error.instance)} after templating: {error.message}")
    return out
