"""The long-running processes' log lines (`tc serve`, the `enforce` loop): text for people, or
one JSON object per line (`--log-format json`) for the log pipelines operators already run
(journald, Loki, Elastic): time, level, event, message and the event's fields, never a secret."""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any, TextIO

FORMATS = ("text", "json")
_format = "text"


def configure(fmt: str) -> None:
    """Set the format for this process, Python's logging (uvicorn's) included."""
    global _format
    if fmt not in FORMATS:
        raise ValueError(f"--log-format takes {' or '.join(FORMATS)}, not {fmt!r}")
    _format = fmt
    if fmt == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root = logging.getLogger()
        root.handlers[:] = [handler]
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logger = logging.getLogger(name)
            logger.handlers[:] = []
            logger.propagate = True


def is_json() -> bool:
    return _format == "json"


def record(level: str, event: str, message: str, **fields: Any) -> dict[str, Any]:
    return {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": level, "event": event, "message": message, **fields}


def emit(event: str, message: str, level: str = "info", stream: TextIO | None = None, **fields: Any) -> None:
    """One line: the message as text, or the event as a JSON object."""
    out = stream or sys.stderr
    if _format == "json":
        out.write(json.dumps(record(level, event, message, **fields), default=str) + "\n")
    else:
        out.write(message + "\n")
    out.flush()


class JsonFormatter(logging.Formatter):
    """Python logging records (uvicorn's) as the same JSON lines."""

    def format(self, rec: logging.LogRecord) -> str:
        return json.dumps(record(rec.levelname.lower(), rec.name, rec.getMessage()), default=str)


__all__ = ["FORMATS", "JsonFormatter", "configure", "emit", "is_json"]
