"""The one redaction step for text that came from outside (pure, no I/O, no dependencies).

Whatever a peer wrote (the provider's ``reason``, an error text, a body excerpt, a
``Location``) passes through ``redact`` before it is logged, stored or shown: known
secrets and anything shaped like a Sign are blanked, the record's number is masked to its
last four digits, control characters are neutralised and the length is capped. Redaction
comes before the cap, so a cap can never cut a secret in half and leave a prefix visible.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

REDACTED = "[REDACTED]"
# What one piece of peer text may cost in a log line or a stored attempt.
TEXT_LIMIT = 200
_HEX32 = re.compile(r"(?<![0-9a-fA-F])[0-9a-fA-F]{32}(?![0-9a-fA-F])")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def mask_number(number: str) -> str:
    """All but the last four digits replaced by ``*`` (for logs and listings)."""
    return "*" * max(len(number) - 4, 0) + number[-4:]


def cap(text: str, limit: int = TEXT_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[+{len(text) - limit} chars]"


def redact(
    text: str,
    *,
    secrets: Iterable[str] = (),
    number: str | None = None,
    limit: int = TEXT_LIMIT,
) -> str:
    """Peer text made safe to log, store and show (see the module docstring)."""
    text = _CONTROL.sub(" ", text)
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:  # shorter would mangle ordinary text
            text = text.replace(secret, REDACTED)
    text = _HEX32.sub(REDACTED, text)  # a Sign of any attempt, ours or not
    if number:
        text = text.replace(number, mask_number(number))
    return cap(text, limit)
