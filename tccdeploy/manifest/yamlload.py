"""Safe YAML loading that keeps a line and column for every node.

Manifests come from people and from CI, and sometimes from an adversary (the provider's staff
are in the threat model). So the loader:

- builds plain data from parser events itself, iteratively: no Python object tags, no
  recursion that deep nesting could exhaust, no constructor that runs code;
- counts every node an alias would expand to, so a "billion laughs" document is refused
  long before it costs memory or time in the schema validator that walks it later;
- refuses duplicate keys (PyYAML silently keeps the last one), bytes that are not UTF-8 and
  files over a size limit, each with a position and a way out;
- records, for every JSON path, where it was written, so later layers can point at it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.constructor import SafeConstructor
from yaml.events import ScalarEvent
from yaml.resolver import Resolver

from .problems import JsonPath, ManifestError, Problem, format_path

try:  # libyaml's parser is ~10x faster; the pure-Python one gives identical events.
    from yaml._yaml import CParser as _FastParser  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    _FastParser = None  # type: ignore[misc,assignment]

MAX_BYTES = int(os.environ.get("TCCDEPLOY_MAX_MANIFEST_BYTES", 32 * 1024 * 1024))
MAX_DEPTH = 100
MAX_NODES = 5_000_000

STR = "tag:yaml.org,2002:str"
_ALLOWED_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
    "tag:yaml.org,2002:timestamp",
    "!",
}


@dataclass
class Document:
    """One YAML document: its data and where each JSON path was written (1-based)."""

    file: str
    data: Any
    marks: dict[JsonPath, tuple[int, int]] = field(default_factory=dict)
    index: int = 0

    def locate(self, path: JsonPath) -> tuple[int, int]:
        """Position of path, or of its nearest written ancestor (aliases share their anchor's)."""
        for end in range(len(path), -1, -1):
            mark = self.marks.get(tuple(path[:end]))
            if mark is not None:
                return mark
        return (1, 1)

    def problem(
        self,
        path: JsonPath,
        code: str,
        message: str,
        hint: str = "",
        severity: str = "error",
    ) -> Problem:
        line, column = self.locate(path)
        return Problem(
            self.file, line, column, format_path(path), code, message, severity, hint  # type: ignore[arg-type]
        )


class _Scalars(SafeConstructor):
    """YAML 1.1 scalar typing exactly as Ansible (PyYAML's SafeLoader) types them."""


_RESOLVER = Resolver()
_CONSTRUCTOR = _Scalars()


def _scalar_value(event: yaml.ScalarEvent) -> Any:
    tag = event.tag
    if tag is None or tag == "!":
        tag = _RESOLVER.resolve(yaml.ScalarNode, event.value, event.implicit)
    if tag == STR or tag not in _CONSTRUCTOR.yaml_constructors:
        # Includes YAML 1.1's implicit '=' (value) and '<<' (merge) outside a key.
        return event.value
    if tag == "tag:yaml.org,2002:timestamp":
        # Manifests are JSON-shaped; a date stays the text the author wrote.
        return event.value
    node = yaml.ScalarNode(tag, event.value, event.start_mark, event.end_mark)  # type: ignore[arg-type]  # libyaml's Mark
    return _CONSTRUCTOR.yaml_constructors[tag](_CONSTRUCTOR, node)


def _fail(file: str, mark: Any, code: str, message: str, hint: str = "") -> ManifestError:
    line = (mark.line + 1) if mark is not None else 1
    column = (mark.column + 1) if mark is not None else 1
    return ManifestError([Problem(file, line, column, "$", code, message, "error", hint)])


class _Frame:
    __slots__ = ("kind", "value", "path", "key", "key_mark", "anchor", "nodes", "merges", "seen")

    def __init__(self, kind: str, value: Any, path: JsonPath, anchor: str | None):
        self.kind = kind
        self.value = value
        self.path = path
        self.key: Any = _NO_KEY
        self.key_mark: tuple[int, int] | None = None
        self.anchor = anchor
        self.nodes = 1
        self.merges: list[dict] = []
        self.seen: dict[str, tuple[int, int]] = {}


_NO_KEY = object()
_MERGE = "<<"


def read_text(path: str, max_bytes: int = MAX_BYTES) -> str:
    """Read a manifest file as UTF-8, refusing what is too big or not text."""
    try:
        size = os.stat(path).st_size
    except OSError as exc:
        raise ManifestError(
            [Problem(path, 1, 1, "$", "file.unreadable", f"cannot read file: {exc.strerror}")]
        ) from None
    if size > max_bytes:
        raise ManifestError(
            [
                Problem(
                    path, 1, 1, "$", "file.too-large",
                    f"file is {size / 1048576:.1f} MiB; manifests are limited to "
                    f"{max_bytes / 1048576:.0f} MiB",
                    "error",
                    "split it into several files, or raise TCCDEPLOY_MAX_MANIFEST_BYTES",
                )
            ]
        )
    with open(path, "rb") as fh:
        raw = fh.read(max_bytes + 1)
    return decode_text(path, raw)


def decode_text(path: str, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = raw[: exc.start]
        line = before.count(b"\n") + 1
        column = exc.start - (before.rfind(b"\n") + 1) + 1
        raise ManifestError(
            [
                Problem(
                    path, line, column, "$", "yaml.encoding",
                    f"byte 0x{raw[exc.start]:02x} at offset {exc.start} is not UTF-8: "
                    "this is not a text file",
                    "error",
                    "manifests are UTF-8 YAML; check that the right file was given",
                )
            ]
        ) from None


def load_file(path: str, max_bytes: int = MAX_BYTES) -> list[Document]:
    return load_text(path, read_text(path, max_bytes))


def load_text(
    file: str, text: str, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES
) -> list[Document]:
    """Parse every document in text; raise ManifestError with a position on any problem."""
    parser: Any = None
    try:
        parser = _FastParser(text) if _FastParser is not None else yaml.SafeLoader(text)
        return _compose(file, parser, max_depth, max_nodes)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "malformed YAML"
        context = f" {exc.context}" if exc.context else ""
        raise _fail(
            file, mark, "yaml.syntax", f"YAML syntax error: {problem}{context}",
            "fix the YAML at this position (indentation, quoting, a missing ':')",
        ) from None
    except yaml.YAMLError as exc:  # ReaderError: control characters and the like
        mark = getattr(exc, "position", None)
        line, column = _offset_to_mark(text, mark) if isinstance(mark, int) else (1, 1)
        raise ManifestError(
            [
                Problem(
                    file, line, column, "$", "yaml.syntax",
                    f"not valid YAML text: {getattr(exc, 'reason', exc)}",
                    "error",
                    "manifests are printable UTF-8 text",
                )
            ]
        ) from None
    finally:
        dispose = getattr(parser, "dispose", None) if parser is not None else None
        if dispose:
            dispose()


def _offset_to_mark(text: str, offset: int) -> tuple[int, int]:
    before = text[:offset]
    return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1


def _compose(file: str, parser: Any, max_depth: int, max_nodes: int) -> list[Document]:
    docs: list[Document] = []
    get_event = parser.get_event
    event = get_event()  # StreamStart
    while True:
        event = get_event()
        if isinstance(event, yaml.StreamEndEvent):
            break
        # DocumentStartEvent
        doc = Document(file, None, {}, len(docs))
        anchors: dict[str, tuple[Any, int]] = {}
        total = 0
        stack: list[_Frame] = []
        root_done = False
        while True:
            event = get_event()
            if isinstance(event, yaml.DocumentEndEvent):
                break
            mark = (event.start_mark.line + 1, event.start_mark.column + 1)
            cls = event.__class__
            if cls is ScalarEvent and event.anchor is None and event.tag is None and stack:
                # The common case, first: an untagged scalar inside a collection.
                frame = stack[-1]
                frame.nodes += 1
                total += 1
                if frame.kind == "map" and frame.key is _NO_KEY:
                    _set_key(file, doc, frame, event, mark)
                else:
                    _attach(doc, frame, _scalar_value(event), mark)
                continue
            if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                frame = stack.pop()
                if frame.kind == "map" and frame.merges:
                    for merged in frame.merges:
                        for k, v in merged.items():
                            frame.value.setdefault(k, v)
                if frame.anchor is not None:
                    anchors[frame.anchor] = (frame.value, frame.nodes)
                value, nodes = frame.value, frame.nodes
                if stack:
                    stack[-1].nodes += nodes
                    _attach(doc, stack[-1], value, mark)
                else:
                    doc.data, root_done = value, True
                continue

            anchor = getattr(event, "anchor", None)
            if isinstance(event, yaml.AliasEvent):
                if event.anchor not in anchors:
                    raise _fail(file, event.start_mark, "yaml.alias", f"unknown alias *{event.anchor}")
                value, nodes = anchors[event.anchor]
                total += nodes
                if total > max_nodes:
                    raise _fail(
                        file, event.start_mark, "yaml.too-many-nodes",
                        f"aliases expand this document to more than {max_nodes} nodes",
                        "this looks like an alias bomb; write the data out instead",
                    )
                if stack:
                    stack[-1].nodes += nodes
                    _attach(doc, stack[-1], value, mark)
                else:
                    doc.data, root_done = value, True
                continue

            tag = getattr(event, "tag", None)
            if tag is not None and tag not in _ALLOWED_TAGS:
                raise _fail(
                    file, event.start_mark, "yaml.tag",
                    f"YAML tag {tag!r} is not allowed in manifests",
                    "remove the tag; manifests hold plain strings, numbers, lists and mappings",
                )
            total += 1
            if total > max_nodes:
                raise _fail(file, event.start_mark, "yaml.too-many-nodes",
                            f"document has more than {max_nodes} nodes",
                            "split it into several files")
            if isinstance(event, yaml.ScalarEvent):
                top = stack[-1] if stack else None
                if top is not None and top.kind == "map" and top.key is _NO_KEY:
                    top.nodes += 1
                    _set_key(file, doc, top, event, mark)
                    continue
                value = _scalar_value(event)
                if anchor is not None:
                    anchors[anchor] = (value, 1)
                if top is not None:
                    top.nodes += 1
                    _attach(doc, top, value, mark)
                else:
                    doc.data, root_done = value, True
                    doc.marks[()] = mark
                continue

            # Collection start: work out its path, then push.
            if len(stack) >= max_depth:
                raise _fail(
                    file, event.start_mark, "yaml.too-deep",
                    f"nesting deeper than {max_depth} levels",
                    "manifests are never this deep; check the file is the one intended",
                )
            if stack:
                parent = stack[-1]
                if parent.kind == "map" and parent.key is _NO_KEY:
                    raise _fail(file, event.start_mark, "yaml.complex-key",
                                "a mapping key must be a plain value, not a list or mapping")
                path = parent.path + ((parent.key,) if parent.kind == "map" else (len(parent.value),))
            else:
                path = ()
            if path not in doc.marks:
                doc.marks[path] = mark
            kind = "map" if isinstance(event, yaml.MappingStartEvent) else "seq"
            stack.append(_Frame(kind, {} if kind == "map" else [], path, anchor))
        if not root_done:
            doc.data = None
        docs.append(doc)
    return docs


def _set_key(file: str, doc: Document, frame: _Frame, event: Any, mark: tuple[int, int]) -> None:
    # Keys keep the text the author wrote: JSON objects have string keys, and `0x10:` or
    # `yes:` as a key should stay what it says.
    key = event.value
    if event.value == "" and event.implicit[0]:
        raise _fail(file, event.start_mark, "yaml.null-key", "a mapping key is empty",
                    "give the key a name")
    if key == _MERGE and event.implicit[0]:
        frame.key, frame.key_mark = _MERGE, mark
        return
    if key in frame.seen:
        first = frame.seen[key]
        where = format_path(frame.path + (key,))
        raise ManifestError([
            Problem(
                file, mark[0], mark[1], where, "yaml.duplicate-key",
                f"duplicate key {key!r} (first written at line {first[0]}, column {first[1]})",
                "error",
                "remove one of them; YAML loaders differ on which one wins",
            )
        ])
    frame.seen[key] = mark
    frame.key, frame.key_mark = key, mark


def _attach(doc: Document, frame: _Frame, value: Any, mark: tuple[int, int]) -> None:
    if frame.kind == "seq":
        path = frame.path + (len(frame.value),)
        doc.marks.setdefault(path, mark)
        frame.value.append(value)
        return
    key = frame.key
    frame.key = _NO_KEY
    if key == _MERGE:
        sources = value if isinstance(value, list) else [value]
        for source in sources:
            if not isinstance(source, dict):
                raise ManifestError([doc.problem(frame.path, "yaml.merge",
                                                 "'<<' merges only mappings or lists of mappings")])
            frame.merges.append(source)
        return
    doc.marks[frame.path + (key,)] = frame.key_mark or mark
    frame.value[key] = value
