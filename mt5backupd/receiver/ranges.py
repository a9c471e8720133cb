"""Parsing of numeric request headers: ``Range`` for downloads, ``Upload-Offset`` (pure).

Only ASCII ``0-9`` are digits here: ``str.isdigit()`` also accepts ``²`` and ``٣``, which
``int()`` then refuses (a 500) or reads as another number. Only single ranges are served; other
units and multi-ranges get the whole body, which RFC 9110 allows. A ``bytes=`` range whose
positions are not ASCII digits is malformed (400).
"""

from __future__ import annotations

_ASCII_DIGITS = frozenset("0123456789")
# Longer than any file or offset; also keeps int() clear of its 4300-digit limit (a ValueError).
MAX_DIGITS = 18
_HUGE = 10**MAX_DIGITS


class RangeNotSatisfiable(ValueError):
    """Valid syntax, but wholly outside the body: 416."""


class RangeMalformed(ValueError):
    """A ``bytes=`` range whose positions are not ASCII digits: 400."""


def is_ascii_digits(text: str) -> bool:
    return bool(text) and all(c in _ASCII_DIGITS for c in text)


def parse_offset(text: str | None) -> int | None:
    """An ``Upload-Offset`` value: a non-negative integer in ASCII digits, else None."""
    if text is None or not is_ascii_digits(text) or len(text) > MAX_DIGITS:
        return None
    return int(text)


def _position(text: str) -> int:
    """A range position already known to be ASCII digits; huge values clamp past any size."""
    return int(text) if len(text) <= MAX_DIGITS else _HUGE


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Return (start, end_inclusive) for a satisfiable single range, None to serve everything.

    Raises RangeNotSatisfiable (416) for a syntactically valid range outside the body and
    RangeMalformed (400) for a single ``bytes=`` range whose positions are not ASCII digits.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        raise RangeMalformed(header)
    first, last = first.strip(), last.strip()
    if not first:  # suffix range: the last N bytes
        if not is_ascii_digits(last):
            raise RangeMalformed(header)
        n = _position(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return max(0, size - n), size - 1
    if not is_ascii_digits(first) or (last and not is_ascii_digits(last)):
        raise RangeMalformed(header)
    start = _position(first)
    end = _position(last) if last else size - 1
    if last and end < start:
        return None  # RFC 9110: an invalid range-spec is ignored, the whole body is served
    if start >= size:
        raise RangeNotSatisfiable(header)
    return start, min(end, size - 1)
