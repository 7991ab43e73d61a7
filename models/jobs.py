"""Jobs: the durable record of every state-changing request, and the per-target locks."""

from datetime import datetime

from sqlalchemy import BigInteger, Float, ForeignKey, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, new_id, utcnow

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED})
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)


class Job(Base):
    __tablename__ = "jobs"
    # Named as migration 0002 created it: the naming convention would say uq_jobs_parent_id.
    __table_args__ = (UniqueConstraint("parent_id", "step", name="uq_jobs_parent_id_step"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    kind: Mapped[str] = mapped_column(String(31), index=True)
    target: Mapped[str] = mapped_column(String(127), index=True)
    params: Mapped[dict] = mapped_column(default=dict)
    queue: Mapped[str] = mapped_column(String(63))
    state: Mapped[str] = mapped_column(String(15), default=QUEUED, index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    phase: Mapped[str] = mapped_column(String(127), default="")
    bytes_done: Mapped[int | None] = mapped_column(BigInteger)
    bytes_total: Mapped[int | None] = mapped_column(BigInteger)
    rate_bps: Mapped[float | None] = mapped_column(Float)
    result: Mapped[dict] = mapped_column(default=dict)
    error_code: Mapped[str | None] = mapped_column(String(63))
    error_message: Mapped[str | None] = mapped_column(Text)
    requested_by: Mapped[str] = mapped_column(String(127), default="system")
    idempotency_key: Mapped[str | None] = mapped_column(String(127), unique=True)
    # SHA-256 of the request that made the job (method, path, body): a repeated Idempotency-Key must
    # come with the same request, not only the same job parameters.
    request_digest: Mapped[str | None] = mapped_column(String(64))
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    # A child's name inside its parent's workflow: a resumed parent finds the child it made before.
    step: Mapped[str | None] = mapped_column(String(191))
    # A parent waiting for its children holds no worker; they wake it when they end.
    waiting: Mapped[bool] = mapped_column(default=False, index=True)
    # What a resumed run needs: the awaited children, remembered values, a pending cleanup.
    continuation: Mapped[dict] = mapped_column(default=dict)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    attempt: Mapped[int] = mapped_column(default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES


class JobLock(Base):
    """One row per locked target; the primary key makes a second claim fail atomically."""

    __tablename__ = "job_locks"

    target: Mapped[str] = mapped_column(String(127), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
