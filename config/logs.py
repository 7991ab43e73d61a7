"""How every LaxCluster process logs: one JSON object per line (or plain text, `[logging] format = "text"`),
each line written while a job runs carrying that job's id, kind, target and attempt, so that grepping a job
id across the API's and the workers' logs tells the job's whole story."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

FORMATS = ("json", "text")
TEXT_FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] %(name)s: %(message)s"
_job: ContextVar[dict[str, Any] | None] = ContextVar("laxcluster_job", default=None)


@contextmanager
def about_job(job_id: str, kind: str, target: str, attempt: int | None = None,
              parent: str | None = None) -> Iterator[None]:
    """Every line logged in this context (this thread or task) names the job."""
    fields = {"job_id": job_id, "kind": kind, "target": target, "attempt": attempt, "parent_id": parent}
    fields = {key: value for key, value in fields.items() if value is not None}
    token = _job.set(fields)
    try:
        yield
    finally:
        _job.reset(token)


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON: time, level, logger, process, message, the job's fields, the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": f"{record.processName}:{record.process}",
            "message": record.getMessage(),
            **(_job.get() or {}),
        }
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """The plain format, with the job's id in front of the message while one runs."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        job = _job.get()
        return f"{text} [job {job['job_id']}]" if job else text


def dict_config(settings: dict[str, Any], level: int | str | None = None, logfile: str | None = None) -> dict[str, Any]:
    """A `logging.config.dictConfig` for a process from the `[logging]` settings: everything to stderr (or
    `logfile`) in their format (JSON when a config file has no such section), gunicorn's loggers too."""
    log_format, level = settings.get("format", "json"), level or settings.get("level", "INFO")
    if log_format not in FORMATS:
        raise ValueError(f"[logging] format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    formatter = {"()": f"{__name__}.{'JsonFormatter' if log_format == 'json' else 'TextFormatter'}"}
    handler = ({"class": "logging.FileHandler", "filename": logfile, "formatter": "laxcluster"} if logfile else
               {"class": "logging.StreamHandler", "formatter": "laxcluster", "stream": "ext://sys.stderr"})
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"laxcluster": formatter},
        "handlers": {"stderr": handler},
        "root": {"level": level, "handlers": ["stderr"]},
        "loggers": {name: {"level": level, "handlers": ["stderr"], "propagate": False}
                    for name in ("gunicorn.error", "gunicorn.access")},
    }
