"""Following a job to its end: the SSE stream as events, and a live rich progress bar.

Any command with `--watch` (servers refresh, later vm migrate, backup …) calls `watch_job`; it
returns when the job is final and raises JobDidNotSucceed (non-zero exit) if it failed or was cancelled.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import IO, Any

import click
import requests
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from cli.client import ApiError, Client

FINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
RECONNECTS = 5
EXIT_FAILED = 1
EXIT_CANCELLED = 3


class JobDidNotSucceed(click.ClickException):
    """A watched job ended failed (exit 1) or cancelled (exit 3); printed as `code: message`."""

    def __init__(self, event: dict[str, Any]) -> None:
        error = event.get("error") or {}
        if event["state"] == "cancelled":
            code, message, self.exit_code = "Cancelled", f"job {event['job_id']} was cancelled", EXIT_CANCELLED
        else:
            code, message, self.exit_code = error.get("code") or "Failed", error.get("message") or "", EXIT_FAILED
        super().__init__(f"{code}: {message}")
        self.event = event

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(self.format_message(), err=True, file=file)


def follow(client: Client, job_id: str, after_seq: int = 0) -> Iterator[dict[str, Any]]:
    """Every event of the job with seq > `after_seq`, in order, until a final state.

    A dropped stream is resumed where it stopped (Last-Event-ID); it gives up after a few failures.
    """
    last, failures = after_seq, 0
    while True:
        try:
            for event in _stream(client, job_id, last):
                failures, last = 0, event.get("seq", last)
                yield event
                if event.get("state") in FINAL_STATES:
                    return
        except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError, ApiError) as error:
            if isinstance(error, ApiError) and error.code != "Unreachable":
                raise
        failures += 1
        if failures > RECONNECTS:
            raise ApiError("StreamLost", f"lost the event stream of job {job_id}; `laxcluster jobs watch {job_id}` resumes")
        time.sleep(min(failures, 5))  # back off before reconnecting to a restarting API


def _stream(client: Client, job_id: str, after_seq: int) -> Iterator[dict[str, Any]]:
    with client.stream(f"/jobs/{job_id}/events", headers={"Last-Event-ID": str(after_seq)}) as response:
        data: list[str] = []
        for line in response.iter_lines(chunk_size=None, decode_unicode=True):
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif line == "" and data:
                yield json.loads("\n".join(data))
                data = []


def watch_job(client: Client, job_id: str, console: Console | None = None) -> dict[str, Any]:
    """Show the job's progress live until it is final; return the final event, or raise JobDidNotSucceed."""
    columns = (TextColumn("{task.fields[status]:<28}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[data]}"), TimeElapsedColumn())
    final: dict[str, Any] = {}
    with Progress(*columns, console=console or Console()) as bar:
        task = bar.add_task(job_id, total=100, status="waiting", data="")
        for final in follow(client, job_id):
            bar.update(task, completed=final.get("progress") or 0, status=_status(final), data=_data_moved(final))
    if final.get("state") != "succeeded":
        raise JobDidNotSucceed(final)
    return final


def _status(event: dict[str, Any]) -> str:
    phase = event.get("phase") or ""
    return f"{event.get('state', '?')}{': ' + phase if phase else ''}"[:28]


def _data_moved(event: dict[str, Any]) -> str:
    done, total, rate = event.get("bytes_done"), event.get("bytes_total"), event.get("rate_bps")
    if done is None:
        return ""
    text = f"{human_bytes(done)}" + (f"/{human_bytes(total)}" if total else "")
    return text + (f" {human_bytes(rate)}/s" if rate else "")


def human_bytes(count: float) -> str:
    """1536 -> '1.5 KiB'."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    index = 0
    while abs(count) >= 1024 and index < len(units) - 1:
        count, index = count / 1024, index + 1
    return f"{count:.0f} B" if index == 0 else f"{count:.1f} {units[index]}"
