"""The job progress reporter: Redis at any rate, the DB about once a second and on every state change.

Redis keys of a job:
  job:<id>          hash with the latest state, phase, progress, bytes and rate
  job:<id>:log      list of every event (JSON), the history an SSE client gets first
  job:<id>:events   pub/sub channel the same events are published on, live
  job:<id>:seq      event counter, so a client can join history and live without gaps
"""

import json
import logging
import time
from typing import Any

import redis
from redis.commands.core import Script
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from models import FINAL_STATES, Job, utcnow
from tasks.continuations import Wait

HISTORY_LIMIT = 1000
KEY_TTL_S = 7 * 24 * 3600

log = logging.getLogger(__name__)


def hash_key(job_id: str) -> str:
    return f"job:{job_id}"


def log_key(job_id: str) -> str:
    return f"job:{job_id}:log"


def channel(job_id: str) -> str:
    return f"job:{job_id}:events"


def job_snapshot(job: Job) -> dict[str, Any]:
    """The fields of a job that its events carry."""
    return {
        "job_id": job.id,
        "state": job.state,
        "phase": job.phase,
        "progress": round(job.progress, 2),
        "bytes_done": job.bytes_done,
        "bytes_total": job.bytes_total,
        "rate_bps": job.rate_bps,
        "error": {"code": job.error_code, "message": job.error_message} if job.error_code else None,
    }


def publish_if_possible(client: redis.Redis, job_id: str, fields: dict[str, Any]) -> dict[str, Any] | None:
    """publish, for a running job: events are a live view of what the DB also records, so while Redis is
    away they are dropped (and logged), never the job's reason to fail."""
    try:
        return publish(client, job_id, fields)
    except redis.RedisError as error:
        log.warning("event of job %s not published: %s", job_id, error)
        return None


# One round trip per event: number it, keep it in the hash and the history, publish it. The event's JSON
# comes without its closing brace (ARGV[1]) so the script can add the seq it drew; ARGV[4..] are the
# hash's field/value pairs.
PUBLISH = Script(None, b"""
local seq = redis.call('INCR', KEYS[1])
local payload = ARGV[1] .. ', "seq": ' .. seq .. '}'
redis.call('HSET', KEYS[2], 'seq', seq, unpack(ARGV, 4))
redis.call('RPUSH', KEYS[3], payload)
redis.call('LTRIM', KEYS[3], -tonumber(ARGV[2]), -1)
for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
redis.call('PUBLISH', KEYS[4], payload)
return seq
""")


def publish(client: redis.Redis, job_id: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Record one event for a job in Redis (hash, history, channel) and return it with its seq."""
    event = {**fields, "at": time.time()}
    flat = [part for key, value in event.items() for part in (key, json.dumps(value, default=str))]
    keys = [f"job:{job_id}:seq", hash_key(job_id), log_key(job_id), channel(job_id)]
    seq = PUBLISH(keys=keys, args=[json.dumps(event, default=str)[:-1], HISTORY_LIMIT, KEY_TTL_S, *flat], client=client)
    return {**event, "seq": int(seq)}


class Reporter:
    """Progress of one running job. Cheap to call often: the DB is written at most every `db_interval`s."""

    def __init__(self, job_id: str, sessions: sessionmaker[Session], client: redis.Redis, db_interval: float = 1.0,
                 *, resumed_from: Job | None = None, attempt: int | None = None) -> None:
        self.job_id = job_id
        self._sessions = sessions
        self._redis = client
        self._db_interval = db_interval
        self._last_db_write = 0.0
        self._state: dict[str, Any] = {"phase": "", "progress": 0.0, "bytes_done": None, "bytes_total": None, "rate_bps": None}
        if resumed_from is not None:
            self._state.update(phase=resumed_from.phase, progress=resumed_from.progress)
        self._rate_mark: tuple[float, int] | None = None
        self._attempt = attempt

    def update(self, *, phase: str | None = None, progress: float | None = None,
               bytes_done: int | None = None, bytes_total: int | None = None, message: str | None = None,
               session: Session | None = None) -> bool:
        """Report the job's phase, percent (0-100) and, where data moves, bytes and rate; a DB write due goes
        into `session` when given (the caller's transaction), else into one of its own. False, with nothing
        published, if that write found the job ended or run by another attempt."""
        if phase is not None:
            self._state["phase"] = phase
        if progress is not None:
            self._state["progress"] = max(0.0, min(100.0, float(progress)))
        if bytes_total is not None:
            self._state["bytes_total"] = bytes_total
        if bytes_done is not None:
            self._state["rate_bps"] = self._rate(bytes_done)
            self._state["bytes_done"] = bytes_done
        if phase is not None or time.monotonic() - self._last_db_write >= self._db_interval:
            if not (self.flush() if session is None else self.record(session)):
                return False
        event = {"job_id": self.job_id, "state": "running", **self._state}
        if message:
            event["message"] = message
        publish_if_possible(self._redis, self.job_id, event)
        return True

    @property
    def progress(self) -> float:
        return self._state["progress"]

    def flush(self) -> bool:
        """Write the latest progress to the DB now; see record."""
        with self._sessions() as session, session.begin():
            return self.record(session)

    def record(self, session: Session) -> bool:
        """Write the latest progress to the job's row in `session`; False, writing nothing, if the job ended or
        another attempt has it. One UPDATE both checks and writes (a select first would be a second statement)."""
        self._last_db_write = time.monotonic()
        ours = [Job.id == self.job_id, Job.state.not_in(FINAL_STATES)]
        if self._attempt is not None:
            ours.append(Job.attempt == self._attempt)
        written = session.execute(update(Job).where(*ours).values(**self._state, updated_at=utcnow())
                                  .returning(Job.parent_id)).first()
        if written is None:
            return False
        if written.parent_id is not None:
            roll_up(session, self._redis, written.parent_id)
        return True

    def _rate(self, bytes_done: int) -> float | None:
        now = time.monotonic()
        if self._rate_mark is None:
            self._rate_mark = (now, bytes_done)
            return None
        since, then = self._rate_mark
        if now - since < 0.5:
            return self._state["rate_bps"]
        self._rate_mark = (now, bytes_done)
        return (bytes_done - then) / (now - since)


def announce(client: redis.Redis, job: Job) -> dict[str, Any]:
    """Publish a job's state change (queued, running, final) as an event."""
    return publish(client, job.id, job_snapshot(job))


def announce_if_possible(client: redis.Redis, job: Job) -> dict[str, Any] | None:
    """announce, from a worker: a Redis outage must not keep a job from running or ending."""
    return publish_if_possible(client, job.id, job_snapshot(job))


def roll_up(session: Session, client: redis.Redis, parent_id: str) -> None:
    """Carry children's progress up to a parent that waits for them (it runs no code to do so itself):
    their mean progress onto the parent's span, and a lone child's bytes."""
    parent = session.get(Job, parent_id)
    wait = Wait.of(parent) if parent is not None and parent.waiting else None
    if wait is None:
        return
    children = list(session.scalars(select(Job).where(Job.id.in_(wait.ids))))
    share = sum(100.0 if child.state in FINAL_STATES else child.progress for child in children) / 100.0
    progress = wait.start + (wait.end - wait.start) * (wait.done + share) / max(wait.total, 1)
    lone = children[0] if wait.total == 1 and len(children) == 1 else None
    if progress <= parent.progress and lone is None:
        return
    parent.progress = max(parent.progress, min(progress, 100.0))
    if lone is not None:
        parent.bytes_done, parent.bytes_total, parent.rate_bps = lone.bytes_done, lone.bytes_total, lone.rate_bps
    publish_if_possible(client, parent.id, {"job_id": parent.id, "state": parent.state, "phase": parent.phase,
                                "progress": round(parent.progress, 2), "bytes_done": parent.bytes_done,
                                "bytes_total": parent.bytes_total, "rate_bps": parent.rate_bps})
    if parent.parent_id is not None:
        roll_up(session, client, parent.parent_id)
