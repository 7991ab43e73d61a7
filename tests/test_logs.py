"""The log formats: a JSON line carries the job it was logged for, and only while that job runs."""

import json
import logging
import sys

import pytest

from config.logs import JsonFormatter, TextFormatter, about_job, dict_config


def record(message: str, exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("tasks.runner", logging.INFO, __file__, 1, message, (), exc_info)


def test_a_line_logged_for_a_job_names_it_and_one_after_does_not():
    with about_job("j-1", "install-vm", "vm/web1", attempt=2, parent="p-9"):
        inside = json.loads(JsonFormatter().format(record("phase place")))
    outside = json.loads(JsonFormatter().format(record("idle")))
    assert {k: inside[k] for k in ("message", "job_id", "kind", "target", "attempt", "parent_id")} == {
        "message": "phase place", "job_id": "j-1", "kind": "install-vm", "target": "vm/web1", "attempt": 2,
        "parent_id": "p-9"}
    assert "job_id" not in outside and outside["level"] == "INFO" and outside["logger"] == "tasks.runner"


def test_a_traceback_stays_on_its_one_line():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        line = JsonFormatter().format(record("crashed", sys.exc_info()))
    assert "\n" not in line and "RuntimeError: boom" in json.loads(line)["exception"]


def test_text_lines_name_the_job_at_their_end():
    with about_job("j-2", "noop", "noop/x"):
        assert TextFormatter().format(record("phase step 1/1")).endswith("phase step 1/1 [job j-2]")


def test_an_unknown_format_is_refused_by_name():
    with pytest.raises(ValueError, match="format must be one of json, text"):
        dict_config({"format": "xml"})
    assert dict_config({})["formatters"]["laxcluster"]["()"].endswith("JsonFormatter")
