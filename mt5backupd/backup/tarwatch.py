"""Read chosen members of a tar stream as it goes by, without holding the stream (pure).

The base backup streams from pg_basebackup straight into zstd; the WAL range it needs is in its
``backup_manifest`` member (the last one), so the pump shows every batch to a ``TarWatcher``
that keeps only the members asked for.
"""

from __future__ import annotations

BLOCK = 512


def _octal(field: bytes) -> int:
    text = field.rstrip(b"\0 ").strip()
    if text and text[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    return int(text or b"0", 8)


class TarWatcher:
    """Feed it the stream in pieces of any size; ``files`` holds the wanted members' bytes."""

    def __init__(self, wanted: tuple[str, ...], max_member_bytes: int = 64 * 1024 * 1024) -> None:
        self.wanted = wanted
        self.max_member_bytes = max_member_bytes
        self.files: dict[str, bytes] = {}
        self._buf = bytearray()
        self._skip = 0  # bytes of the current member (and its padding) still to pass
        self._capture: str | None = None
        self._capture_left = 0
        self._captured = bytearray()
        self._done = False  # the end-of-archive block was seen

    def feed(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view and not self._done:
            if self._skip:
                take = min(self._skip, len(view))
                if self._capture is not None and self._capture_left:
                    keep = min(take, self._capture_left)
                    self._captured += view[:keep]
                    self._capture_left -= keep
                    if not self._capture_left:
                        self.files[self._capture] = bytes(self._captured)
                        self._capture = None
                self._skip -= take
                view = view[take:]
                continue
            need = BLOCK - len(self._buf)
            self._buf += view[:need]
            view = view[need:]
            if len(self._buf) == BLOCK:
                self._header(bytes(self._buf))
                self._buf.clear()

    def _header(self, header: bytes) -> None:
        if header == bytes(BLOCK):
            self._done = True
            return
        name = header[:100].split(b"\0", 1)[0].decode(errors="replace")
        prefix = header[345:500].split(b"\0", 1)[0].decode(errors="replace")
        if prefix:
            name = f"{prefix}/{name}"
        size = _octal(header[124:136])
        self._skip = (size + BLOCK - 1) // BLOCK * BLOCK
        if name in self.wanted and size <= self.max_member_bytes:
            self._capture, self._capture_left, self._captured = name, size, bytearray()
            if size == 0:
                self.files[name] = b""
                self._capture = None
