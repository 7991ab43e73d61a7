"""Who may do what (API tokens) and who did what (the audit trail)."""

import hashlib
from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from models.base import Base, utcnow

ROLES = ("viewer", "operator", "admin")


class ApiToken(Base):
    """A bearer token; only its SHA-256 is stored, and its first characters (`prefix`) to recognise it by.

    Tokens are identified by `id`: `name` is who it is for, chosen by people, and need not be unique.
    A token stops working when it is revoked or once `expires_at` has passed (None: never expires).
    """

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63))
    role: Mapped[str] = mapped_column(String(15))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked: Mapped[bool] = mapped_column(default=False)
    # Added in migration 0004; tokens made before it have no prefix and never expire.
    prefix: Mapped[str | None] = mapped_column(String(12))
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    @staticmethod
    def digest(secret: str) -> str:
        """The stored form of a bearer token: its SHA-256, hex."""
        return hashlib.sha256(secret.encode()).hexdigest()

    def state(self, now: datetime) -> str:
        """`revoked`, `expired` or `active` at `now` (naive UTC, as stored)."""
        if self.revoked:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(127))
    action: Mapped[str] = mapped_column(String(127))
    target: Mapped[str] = mapped_column(String(255), default="")
    source_ip: Mapped[str | None] = mapped_column(String(45))
    details: Mapped[dict] = mapped_column(default=dict)
