"""The secret values every log line is masked against: a registry with no logging library in
it, so the config loader can register a password before loguru (and the asyncio it imports)
is loaded: ``--run-now`` starts pg_dump before both (backup/runstart)."""

from __future__ import annotations

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


def any_registered() -> bool:
    return bool(_secrets)
