"""The secret values every log line and public text is masked against: a registry with no
logging library in it, so the config loader can register a password before loguru (and the
asyncio it imports) is loaded: ``--run-now`` starts pg_dump before both (backup/runstart)."""

from __future__ import annotations

import re

MASK = "***"
_secrets: set[str] = set()


def register_secret(value: str) -> None:
    """Mask ``value`` in every later log message. Short values are ignored (too many false hits)."""
    if len(value) >= 6:
        _secrets.add(value)


def mask(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")


def public_text(text: str) -> str:
    """An error text fit for an unauthenticated endpoint (/health): a URL's user:password@
    removed, known secrets masked, one line, at most 300 characters."""
    text = mask(_USERINFO.sub(r"\1", text)).replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."
