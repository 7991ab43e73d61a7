"""API tokens in the inventory: issue one (its secret is shown once, only its digest is kept), revoke one.

Shared by `laxcluster token create` (straight into the DB, to bootstrap the first admin) and the
API's `/tokens` routes.
"""

import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.orm import Session

from errors import InvalidInput, TokenNotFound
from models import ROLES, ApiToken, utcnow

SECRET_PREFIX = "lax_"
# "lax_" and four random characters: enough to tell one's tokens apart, far too little to guess the rest.
SHOWN_PREFIX_LENGTH = 8
MAX_LIFETIME = timedelta(days=3650)


@dataclass(frozen=True)
class Issued:
    token: ApiToken
    secret: str


def issue(session: Session, role: str, name: str, lifetime: timedelta | None = None) -> Issued:
    """Store a new token for `role` under `name` (hashed) in the caller's transaction, expiring after
    `lifetime` (None: never); its secret is returned only here."""
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}", field="role")
    if lifetime is not None and not timedelta(0) < lifetime <= MAX_LIFETIME:
        raise InvalidInput(f"a token's lifetime must be more than 0 and at most {MAX_LIFETIME.days} days", field="expires")
    expires_at = utcnow() + lifetime if lifetime is not None else None
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(name=name, role=role, token_hash=ApiToken.digest(secret), prefix=secret[:SHOWN_PREFIX_LENGTH],
                     expires_at=expires_at)
    session.add(token)
    session.flush()
    return Issued(token, secret)


def revoke(session: Session, token_id: int) -> tuple[ApiToken, bool]:
    """Revoke token `token_id`; return it and whether this call revoked it (False: it already was)."""
    token = session.get(ApiToken, token_id)
    if token is None:
        raise TokenNotFound(f"no API token {token_id}", token_id=token_id)
    if token.revoked:
        return token, False
    token.revoked, token.revoked_at = True, utcnow()
    session.flush()
    return token, True
