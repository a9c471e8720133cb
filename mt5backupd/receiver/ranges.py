"""HTTP Range parsing for downloads (pure). Only single ranges are served; anything else gets
the whole body, which RFC 9110 allows."""

from __future__ import annotations


class RangeNotSatisfiable(ValueError):
    pass


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Return (start, end_inclusive) for a satisfiable single range, None to serve everything.

    Raises RangeNotSatisfiable (416) for a syntactically valid range outside the body.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    first, last = first.strip(), last.strip()
    if not first:  # suffix range: the last N bytes
        if not last.isdigit():
            return None
        n = int(last)
        if n == 0:
            raise RangeNotSatisfiable(header)
        return (max(0, size - n), size - 1) if size else _unsatisfiable(header)
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    start = int(first)
    end = int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(header)
    return start, min(end, size - 1)


def _unsatisfiable(header: str) -> tuple[int, int]:
    raise RangeNotSatisfiable(header)
