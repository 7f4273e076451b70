"""The checks of settings that are more than a number in a range: URLs, hosts, tokens.

Each raises ValueError naming the part that is wrong, never echoing the value (a URL may
carry a password, a token list is secret); ``settings.py`` turns that into a ConfigError
naming the variable.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

# Redis's default ``databases 16``; kombu and redis-py both take the db from the URL path.
MAX_REDIS_DB = 15
# TLS options redis-py and kombu both read from a rediss:// query string.
_REDIS_TLS_OPTIONS = frozenset(
    {"ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname"}
)
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def parse_tokens(spec: str) -> dict[str, str]:
    """Parse ``name:token,name2:token2`` into {name: token} (ValueError without the tokens)."""
    tokens: dict[str, str] = {}
    for position, item in enumerate(filter(None, (p.strip() for p in spec.split(","))), 1):
        name, sep, token = item.partition(":")
        if not sep or not name.strip() or len(token.strip()) < 16:
            raise ValueError(
                f"entry {position}: expected NAME:TOKEN with a token of 16 or more characters"
            )
        tokens[name.strip()] = token.strip()
    return tokens


def valid_host(host: str) -> bool:
    """Whether ``host`` is an IP address or a syntactically valid host name."""
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(_HOST_LABEL.fullmatch(p) for p in name.split("."))


def _port(parsed: Any) -> int | None:
    try:
        port: int | None = parsed.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("the port must be an integer 1-65535")
    return port


def check_base_url(value: str) -> str:
    """The provider base URL without a trailing slash, or ValueError (URL not echoed)."""
    if not value.isprintable() or any(ch.isspace() for ch in value):
        raise ValueError("has whitespace or control characters")
    parsed = urlsplit(value)
    if parsed.scheme not in ("https", "http"):
        raise ValueError("expected an http:// or https:// URL")
    if not parsed.hostname or not valid_host(parsed.hostname):
        raise ValueError("expected a host name or IP address after the scheme")
    _port(parsed)
    if parsed.username is not None or parsed.password is not None:
        raise ValueError("must not carry user:password (the API key and secret sign each call)")
    if parsed.query or parsed.fragment or value.endswith(("?", "#")):
        raise ValueError("must not have a query string or fragment")
    return value.rstrip("/")


def check_redis_url(value: str) -> str:
    """Parse ``redis://``, ``rediss://`` or ``sentinel://h1:p;sentinel://h2:p/db``.

    Returns the URL to use (a sentinel list gets the database on every entry, since kombu
    reads it from the first and ``worker.state.store`` from any); raises ValueError naming the
    part that is wrong, never echoing the URL (it may carry a password).
    """
    if not value.isprintable() or any(ch.isspace() for ch in value):
        raise ValueError("has whitespace or control characters")
    if value.startswith("sentinel://"):
        return _sentinel_url(value)
    parsed = urlsplit(value)
    if parsed.scheme not in ("redis", "rediss"):
        raise ValueError(
            "expected redis://host:port/db, rediss://host:port/db or "
            "sentinel://h1:26379;sentinel://h2:26379/db (unix:// sockets are not "
            "supported by the Celery broker)"
        )
    _check_node(parsed, "")
    _redis_db(parsed.path, "")
    if parsed.fragment:
        raise ValueError("must not have a fragment")
    for key, _ in parse_qsl(parsed.query, keep_blank_values=True):
        if parsed.scheme != "rediss" or key not in _REDIS_TLS_OPTIONS:
            raise ValueError(
                f"unsupported option {key[:40]!r}: only rediss:// takes "
                f"{', '.join(sorted(_REDIS_TLS_OPTIONS))}"
            )
    return value


def _sentinel_url(value: str) -> str:
    parts = value.split(";")
    parsed = [urlsplit(part) for part in parts]
    dbs: set[int] = set()
    for number, part in enumerate(parsed, 1):
        where = f"sentinel entry {number}: " if len(parts) > 1 else ""
        if part.scheme != "sentinel":
            raise ValueError(f"{where}expected sentinel://host:port (entries separated by ';')")
        _check_node(part, where)
        if part.query or part.fragment:
            raise ValueError(f"{where}must not have a query string or fragment")
        db = _redis_db(part.path, where)
        if db is not None:
            dbs.add(db)
    if len(dbs) > 1:
        raise ValueError("the sentinel entries name different databases")
    db = dbs.pop() if dbs else 0
    return ";".join(urlunsplit(("sentinel", p.netloc, f"/{db}", "", "")) for p in parsed)


def _check_node(parsed: Any, where: str) -> None:
    if not parsed.hostname or not valid_host(parsed.hostname):
        raise ValueError(f"{where}expected a host name or IP address after the scheme")
    try:
        _port(parsed)
    except ValueError as exc:
        raise ValueError(f"{where}{exc}") from None


def _redis_db(path: str, where: str) -> int | None:
    if path in ("", "/"):
        return None
    digits = path[1:]
    if not digits.isdigit() or not digits.isascii() or int(digits) > MAX_REDIS_DB:
        raise ValueError(f"{where}the database (the URL path) must be an integer 0-{MAX_REDIS_DB}")
    return int(digits)
