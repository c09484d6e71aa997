"""How a worker logs: lorafleet's own lines, as text or JSON lines, never arq's per-job ones.

arq logs every job twice (start and end) with its raw arguments, which for lorafleet are
msgpack bytes, and a line per poll for a job this worker itself is running ("already
running elsewhere"). lorafleet logs each job once instead, from ``jobs.generate``: failures
at WARNING with job id, adapter and error code, successes at DEBUG (``-v``) with tokens,
outcome and time. Fields such as ``job_id`` ride on records as ``extra``: the JSON format
writes them as keys, for log pipelines.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

#: Output formats of ``configure_logging``.
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: ``LogRecord`` attributes that are not ``extra`` fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (ISO 8601, UTC), ``level``, ``logger``,
    ``message``, the record's ``extra`` fields, and ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(verbose: bool = False, log_format: str = "text") -> None:
    """lorafleet's lines at INFO (DEBUG with ``verbose``) on stderr, as ``text`` or
    ``json``; arq's at WARNING only, since lorafleet's replace its per-job lines."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT, "%H:%M:%S")
    )
    for name, level in (
        ("lorafleet", logging.DEBUG if verbose else logging.INFO),
        ("arq", logging.WARNING),
    ):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


def ensure_logging(log_format: str = "text") -> None:
    """Under plain ``arq lorafleet.worker.WorkerSettings`` arq configures its own logger
    only: configure lorafleet's (its ready line and job lines must show) as
    ``configure_logging`` would, verbose when arq's ``--verbose`` is, unless it ran already."""
    if logging.getLogger("lorafleet").handlers:
        return
    configure_logging(logging.getLogger("arq").level == logging.DEBUG, log_format)
