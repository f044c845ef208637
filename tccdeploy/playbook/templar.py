"""Ansible's templating: Jinja2 in a sandbox, with Ansible's common filters and tests.

Why a sandbox: a playbook (and every variable an inventory or `-e` gives it) is text the
operator may have copied from elsewhere; `ImmutableSandboxedEnvironment` keeps a template from
reaching Python internals or changing the data it reads. Lookups and controller-side tests are
not offered, and a template naming any filter, test or function that is not offered is refused
with that name and the list of what is (`filters.py`), never half-run.

As in Ansible 2.19: a string that is exactly one `{{ expression }}` keeps the expression's type
(a list stays a list, `{{ 1 + 2 }}` is 3); text around expressions makes a string (None as
''); variables are templated lazily, when a template reads them, so an inventory variable may
say `{{ inventory_hostname }}` and an unused broken variable harms nothing; a loop of
variables that name each other is caught and named.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Iterable, Iterator, Mapping
from itertools import chain, islice
from types import GeneratorType
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.lexer import TOKEN_STRING, Lexer, Token
from jinja2.nativetypes import NativeCodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment

from . import filters as ansible

MAX_DEPTH = 20
OMIT = f"__omit_place_holder__{secrets.token_hex(20)}"  # as Ansible's: a per-run token no real value equals


class TemplateError(ValueError):
    """A template that cannot be rendered: undefined variable, unknown filter, bad syntax."""


class Undefined(TemplateError):
    def __init__(self, name: str, message: str | None = None):
        super().__init__(message or f"'{name}' is undefined")
        self.name = name


class _Undefined(jinja2.StrictUndefined):
    """Strict (using it fails, naming it), but chainable: `a.b.c is defined` is false, not an
    error, when `a` is undefined, as in Ansible."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        if self._undefined_hint:
            return self._undefined_hint
        if self._undefined_obj is jinja2.utils.missing:
            return f"'{self._undefined_name}' is undefined"
        return f"object of type '{type(self._undefined_obj).__name__}' has no attribute '{self._undefined_name}'"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Undefined(name=f"{self._undefined_name}.{name}" if self._undefined_name else name)

    def __getitem__(self, key: Any) -> Any:
        return _Undefined(name=f"{self._undefined_name}[{key!r}]" if self._undefined_name else repr(key))


def _finalize(value: Any) -> Any:
    """A lazy sequence (map, select...) becomes the list it yields, as Ansible finalizes it."""
    if isinstance(value, (GeneratorType, map, filter, zip, reversed)):
        return list(value)
    return value


def _concat(values: Iterator[Any]) -> Any:
    """One expression keeps its value's type; several parts make text, None as ''."""
    head = list(islice(values, 2))
    if len(head) == 1:
        return _finalize(head[0])
    return "".join("" if v is None else str(_finalize(v)) for v in chain(head, values))


class _CodeGenerator(NativeCodeGenerator):
    """Native output, but no expression folded into text at compile time: `x{{ none }}` is 'x'
    and `{{ none }}` is None, as a variable holding None gives."""

    def _output_child_to_const(self, node: nodes.Expr, frame: Any, finalize: Any) -> str:
        if isinstance(node, nodes.TemplateData):
            return super()._output_child_to_const(node, frame, finalize)  # type: ignore[no-any-return]
        raise nodes.Impossible()


class _Lexer(Lexer):
    """String literals as Ansible reads them: verbatim between the quotes, no escape sequences,
    so `regex_replace('(\\d+)', 'n\\1')` written in YAML's double quotes means what it says."""

    def wrap(self, stream: Iterable[tuple[int, str, str]], name: str | None = None,
             filename: str | None = None) -> Iterator[Token]:
        for lineno, token, value in stream:
            if token == TOKEN_STRING:
                yield Token(lineno, TOKEN_STRING, self._normalize_newlines(value[1:-1]))
            else:
                yield from super().wrap([(lineno, token, value)], name, filename)


class _Environment(ImmutableSandboxedEnvironment):
    code_generator_class = _CodeGenerator
    concat = staticmethod(_concat)  # type: ignore[assignment]

    @functools.cached_property
    def lexer(self) -> Lexer:  # type: ignore[override]
        return _Lexer(self)


def _refuse_lookup(*_: Any, **__: Any) -> Any:
    raise TemplateError("lookup()/query() are not run by tccdeploy apply: they read the controller's files, "
                        "environment and commands; give the value with -e, vars or vars_files instead")


@functools.cache
def environment(trim_blocks: bool = False) -> _Environment:
    """The sandbox; trim_blocks (a newline after a block tag dropped) is the template module's
    default in Ansible, not its playbooks'."""
    env = _Environment(undefined=_Undefined, keep_trailing_newline=True, autoescape=False, trim_blocks=trim_blocks)
    env.filters.update(ansible.FILTERS)
    env.tests.update(ansible.TESTS)
    env.globals.update(omit=OMIT, lookup=_refuse_lookup, query=_refuse_lookup, q=_refuse_lookup)
    return env


def filter_names() -> list[str]:
    return sorted(environment().filters)


def test_names() -> list[str]:
    return sorted(environment().tests)


class Scope(Mapping[str, Any]):
    """Variables as a template sees them: each templated when first read, at most once.

    `raw` holds the variables as the operator wrote them (inventory, play, vars files, -e).
    Jinja reads them through this mapping (a shared context, not a copy), so only what a
    template names is rendered. `final` holds values that are data, never templates: what
    modules returned (registered results, set_fact, loop items), which a node may control. A
    node whose command prints `{{ ... }}` gets that text back, not run: Ansible's "unsafe"."""

    def __init__(self, raw: Mapping[str, Any], final: Mapping[str, Any] | None = None):
        self.raw = raw
        self.final = final or {}
        self._done: dict[str, Any] = {}
        self._busy: list[str] = []

    def __getitem__(self, key: str) -> Any:
        if key in self.final:
            return self.final[key]
        if key in self._done:
            return self._done[key]
        if key not in self.raw:
            return environment().globals[key]
        value = self.raw[key]
        if has_template(value):
            if key in self._busy:
                chain_ = " -> ".join([*self._busy[self._busy.index(key):], key])
                raise TemplateError(f"variables refer to each other in a loop: {chain_}")
            if len(self._busy) >= MAX_DEPTH:
                raise TemplateError(f"variables refer to each other more than {MAX_DEPTH} levels deep")
            self._busy.append(key)
            try:
                value = render(value, self)
            finally:
                self._busy.pop()
        self._done[key] = value
        return value

    def __contains__(self, key: object) -> bool:
        return key in self.final or key in self.raw or key in environment().globals

    def __iter__(self) -> Iterator[str]:
        return iter({**self.raw, **self.final})

    def __len__(self) -> int:
        return len({**self.raw, **self.final})

    def child(self, **extra: Any) -> Scope:
        """This scope with a few more values that are data (a loop's item, a registered result)."""
        return Scope(self.raw, {**self.final, **extra})


def scope(variables: Mapping[str, Any]) -> Scope:
    return variables if isinstance(variables, Scope) else Scope(variables)


@functools.lru_cache(maxsize=4096)
def _compile(text: str, trim_blocks: bool = False) -> jinja2.Template:
    env = environment(trim_blocks)
    try:
        template = env.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(_syntax_message(text, exc)) from None
    return template


def _syntax_message(text: str, exc: jinja2.TemplateSyntaxError) -> str:
    message = str(exc.message or exc)
    for kind, names in (("filter", filter_names), ("test", test_names)):
        prefix = f"No {kind} named '"
        if message.startswith(prefix):
            name = message[len(prefix):].split("'", 1)[0]
            return (f"{text!r}: the {kind} {name!r} is not one tccdeploy apply runs; its {kind}s are: "
                    f"{', '.join(names())}")
    return f"{text!r}: template syntax error: {message}"


def _run(template: jinja2.Template, variables: Scope, text: str) -> Any:
    context = template.new_context(variables, shared=True)  # type: ignore[arg-type]
    try:
        value = template.environment.concat(template.root_render_func(context))  # type: ignore[attr-defined]
    except jinja2.UndefinedError as exc:
        raise Undefined(_undefined_name(exc), f"{exc.message} (in {text!r})") from None
    except jinja2.exceptions.SecurityError as exc:
        raise TemplateError(f"{text!r}: refused by the template sandbox: {exc}") from None
    except ansible.FilterError as exc:
        raise TemplateError(f"{text!r}: {exc}") from None
    except TemplateError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError) as exc:
        raise TemplateError(f"{text!r}: {type(exc).__name__}: {exc}") from None
    if isinstance(value, jinja2.Undefined):
        raise Undefined(value._undefined_name or "a value", f"{value._undefined_message} (in {text!r})")
    return value


def _undefined_name(exc: jinja2.UndefinedError) -> str:
    message = exc.message or ""
    return message.split("'")[1] if message.count("'") >= 2 else message


def render(value: Any, variables: Mapping[str, Any]) -> Any:
    """value with every template in it rendered, recursively through lists and mappings."""
    variables = scope(variables)
    if isinstance(value, str):
        if "{{" not in value and "{%" not in value and "{#" not in value:
            return value
        return _run(_compile(value), variables, value)
    if isinstance(value, list):
        return [render(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: render(v, variables) for k, v in value.items()}
    return value


def render_text(text: str, variables: Mapping[str, Any]) -> str:
    """A whole file (the template module): always text, as Ansible's template module writes."""
    value = _run(_compile(text, True), scope(variables), text)
    return "" if value is None else str(value)


def expression(text: str, variables: Mapping[str, Any]) -> Any:
    """The value of a bare Jinja expression (`when`, `debug: var`), templates in it allowed."""
    source = text.strip()
    if source.startswith("{{") and source.endswith("}}") and source.count("{{") == 1:
        source = source[2:-2].strip()  # Ansible accepts (and warns about) a templated condition
    if not source:
        raise TemplateError("an empty expression")
    env = environment()
    try:
        parsed = env.parse("{{ (" + source + ") }}")
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(_syntax_message(source, exc)) from None
    output = parsed.body[0]
    if not isinstance(output, nodes.Output) or len(output.nodes) != 1:
        raise TemplateError(f"{source!r} is not a single expression")
    return _run(_compile("{{ (" + source + ") }}"), scope(variables), source)


def problems(value: Any, condition: bool = False) -> Iterator[str]:
    """What in value would be refused when rendered, found before anything runs: syntax errors
    and filters, tests or functions tccdeploy does not offer (by name). condition: value is a
    bare expression (when, changed_when, failed_when, until)."""
    if isinstance(value, list):
        for v in value:
            yield from problems(v, condition)
    elif isinstance(value, dict):
        for v in value.values():
            yield from problems(v, condition)
    elif isinstance(value, str):
        source = value
        if condition:
            text = value.strip()
            if text.startswith("{{") and text.endswith("}}") and text.count("{{") == 1:
                text = text[2:-2].strip()
            source = "{{ (" + text + ") }}"
        elif "{{" not in value and "{%" not in value and "{#" not in value:
            return
        try:
            _compile(source)
        except TemplateError as exc:
            yield str(exc).replace(repr(source), repr(value))
            return
        calls = environment().parse(source).find_all(nodes.Call)
        if any(isinstance(call.node, nodes.Name) and call.node.name in ("lookup", "query", "q") for call in calls):
            yield f"{value!r}: lookup()/query() are not run by tccdeploy apply (they read the controller's files)"


def omit_keys(args: Any) -> Any:
    """Arguments with every `{{ ... | default(omit) }}` that chose omit taken out."""
    if isinstance(args, dict):
        return {k: omit_keys(v) for k, v in args.items() if v != OMIT}
    if isinstance(args, list):
        return [omit_keys(v) for v in args if v != OMIT]
    return args


def has_template(value: Any) -> bool:
    if isinstance(value, str):
        return "{{" in value or "{%" in value
    if isinstance(value, list):
        return any(has_template(v) for v in value)
    if isinstance(value, dict):
        return any(has_template(v) for v in value.values())
    return False
