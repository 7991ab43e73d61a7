"""A job's progress as Server-Sent Events: history first, then live, ending at a final state.

The stream subscribes to the job's pub/sub channel before it reads the history list, so no
event published in between is lost; `seq` removes the duplicates the overlap may cause.
"""

import json
import time
from collections.abc import Iterator
from typing import Any

from redis.client import PubSub

from models import FINAL_STATES
from models.db import transaction
from tasks import jobs
from tasks.progress import channel, job_snapshot, log_key
from tasks.runtime import Runtime

POLL_S = 1.0


def job_events(rt: Runtime, job_id: str, after_seq: int = 0, keepalive_s: float = 15.0) -> Iterator[str]:
    """SSE frames for job `job_id` with seq > `after_seq`, until the job is final; a comment every `keepalive_s`.

    Subscribes right away, so a Redis outage is an error before the stream starts, not a broken stream.
    """
    pubsub = rt.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel(job_id))
    return _frames(rt, job_id, pubsub, _Stream(after_seq), keepalive_s)


def _frames(rt: Runtime, job_id: str, pubsub: PubSub, stream: "_Stream", keepalive_s: float) -> Iterator[str]:
    try:
        yield "retry: 3000\n\n"
        yield from stream.send(_history(rt, job_id))
        if not stream.ended:
            yield from stream.send(_final_from_db(rt, job_id, stream))
        quiet_since = time.monotonic()
        while not stream.ended:
            message = pubsub.get_message(timeout=POLL_S)
            if message is not None and message.get("type") == "message":
                yield from stream.send([json.loads(message["data"])])
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= keepalive_s:
                yield ": keep-alive\n\n"
                quiet_since = time.monotonic()
                # A job can end without an event (a reconciler, a lost publish): the DB has the last word.
                yield from stream.send(_history(rt, job_id) + _final_from_db(rt, job_id, stream))
    finally:
        pubsub.close()


class _Stream:
    """The position of one client in a job's event sequence."""

    def __init__(self, after_seq: int) -> None:
        self.last_seq = after_seq
        self.ended = False

    def send(self, events: list[dict[str, Any]]) -> Iterator[str]:
        for event in events:
            if self.ended or event.get("seq", 0) <= self.last_seq:
                continue
            self.last_seq = event["seq"]
            self.ended = event.get("state") in FINAL_STATES
            yield f"id: {event['seq']}\ndata: {json.dumps(event, default=str)}\n\n"


def _history(rt: Runtime, job_id: str) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in rt.redis.lrange(log_key(job_id), 0, -1)]


def _final_from_db(rt: Runtime, job_id: str, stream: _Stream) -> list[dict[str, Any]]:
    """The job's final state from its row, as one event, if it is final and Redis never said so."""
    with transaction(rt.sessions) as db:
        job = jobs.get(db, job_id)
        if job.state not in FINAL_STATES:
            return []
        latest = _history(rt, job_id)
        if any(event.get("state") in FINAL_STATES for event in latest):
            return latest
        return [{**job_snapshot(job), "seq": stream.last_seq + 1, "at": time.time(), "source": "db"}]
