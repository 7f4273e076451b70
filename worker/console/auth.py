"""Who may use the console, and proof that a state-changing request came from its pages.

Users come from ``BACKFILL_CONSOLE_USERS`` (``name:password,...``); a request carries
them as HTTP Basic credentials (as Flower does), compared in constant time. Every POST
must come from the console's own origin (``Origin``, else ``Referer``, matching
``Host``) and carry the CSRF token its form was rendered with: an HMAC of the user and
the time it was issued under a key this process drew at random, so tokens die with the
process and after ``TOKEN_TTL_S``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

from worker.operate.errors import ConfigError

VARIABLE = "BACKFILL_CONSOLE_USERS"
MIN_PASSWORD = 12
MAX_PASSWORD = 256
TOKEN_TTL_S = 12 * 3600
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
_AUTH_HEADER_LIMIT = 1024
_TOKEN = re.compile(r"([0-9]{1,12})\.([0-9a-f]{64})")
REALM = 'Basic realm="backfill console", charset="UTF-8"'


def parse_users(spec: str) -> dict[str, str]:
    """``name:password,...`` as {name: password}; ConfigError naming the variable and the
    user (never a password) for a bad entry, a short password or a repeated name."""
    users: dict[str, str] = {}
    entries = [part.strip() for part in spec.split(",") if part.strip()]
    if not entries:
        raise ConfigError(f"{VARIABLE}: no users (expected NAME:PASSWORD,...)")
    for position, entry in enumerate(entries, 1):
        name, sep, password = entry.partition(":")
        if not sep:  # the entry may be a password: never echoed
            raise ConfigError(f"{VARIABLE}: entry {position}: expected NAME:PASSWORD")
        if not _NAME.fullmatch(name):
            raise ConfigError(
                f"{VARIABLE}: entry {position}: a user name is 1 to 64 of A-Z a-z 0-9 _ . @ -"
            )
        if name in users:
            raise ConfigError(f"{VARIABLE}: user {name!r} is listed twice")
        if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
            raise ConfigError(
                f"{VARIABLE}: user {name!r}: the password must be {MIN_PASSWORD} to "
                f"{MAX_PASSWORD} characters"
            )
        if not password.isprintable():
            raise ConfigError(f"{VARIABLE}: user {name!r}: the password has control characters")
        users[name] = password
    return users


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


class Guard:
    """The console's users and this process's CSRF key."""

    def __init__(self, users: Mapping[str, str]) -> None:
        self._users = {name: _digest(password) for name, password in users.items()}
        self._missing = _digest(secrets.token_hex(16))  # an unknown name costs the same
        self._key = secrets.token_bytes(32)

    def user(self, authorization: str | None) -> str | None:
        """The user an ``Authorization: Basic`` header proves, or None."""
        presented = credentials(authorization)
        if presented is None:
            return None
        name, password = presented
        expected = self._users.get(name, self._missing)
        matches = hmac.compare_digest(_digest(password), expected)
        return name if matches and name in self._users else None

    def knows(self, name: str) -> bool:
        """Whether ``name`` is a console user's."""
        return name in self._users

    def token(self, user: str, now: float | None = None) -> str:
        """A CSRF token for ``user``'s forms."""
        issued = str(int(time.time() if now is None else now))
        return f"{issued}.{self._mac(user, issued)}"

    def token_valid(self, user: str, token: str, now: float | None = None) -> bool:
        """Whether ``token`` was issued by this process to ``user`` within TOKEN_TTL_S."""
        found = _TOKEN.fullmatch(token)
        if found is None:
            return False
        issued, mac = found.groups()
        age = (time.time() if now is None else now) - int(issued)
        fresh = -60 <= age <= TOKEN_TTL_S
        return hmac.compare_digest(mac, self._mac(user, issued)) and fresh

    def _mac(self, user: str, issued: str) -> str:
        message = f"csrf|{user}|{issued}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()


def credentials(authorization: str | None) -> tuple[str, str] | None:
    """The (name, password) an ``Authorization: Basic`` header presents, or None."""
    if not authorization or len(authorization) > _AUTH_HEADER_LIMIT:
        return None
    scheme, _, encoded = authorization.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    name, sep, password = decoded.partition(":")
    return (name, password) if sep else None


def same_origin(headers: Mapping[str, str]) -> bool:
    """Whether a request's ``Origin`` (else its ``Referer``) names the host it was sent to.

    A request with neither is refused: browsers send ``Origin`` with every form POST.
    """
    host = headers.get("host", "").strip().lower()
    source = headers.get("origin") or headers.get("referer") or ""
    if not host or not source or source == "null":
        return False
    try:
        parsed = urlsplit(source.strip())
        netloc = parsed.netloc.lower()
    except ValueError:
        return False
    if parsed.scheme not in ("http", "https") or "@" in netloc:
        return False
    return netloc == host or _default_port(netloc, parsed.scheme) == host


def _default_port(netloc: str, scheme: str) -> str:
    """``host`` as ``host:80`` (or ``:443``): a Host header may carry the default port."""
    return f"{netloc}:{443 if scheme == 'https' else 80}" if ":" not in netloc else netloc
