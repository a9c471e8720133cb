"""A SHA-256 whose running state can be saved and restored: OpenSSL's own SHA256_CTX, through
ctypes, as bytes.

An S3 upload session must be continued by any receiver replica, and the receiver must hash
every byte itself; parts of an unfinished multipart upload cannot be read back, so the hash
state over the completed parts is stored in the bucket with the session. ``hashlib`` cannot
export its state; libcrypto (the library ``hashlib`` itself uses) can, as the plain struct
``SHA256_CTX`` (h[8], Nl, Nh, data[16], num, md_len: 112 bytes, unchanged since OpenSSL 0.9.8).
The byte count inside the state is checked against the session's offset on restore, so a state
from anywhere else is refused rather than trusted. ctypes releases the GIL during a call, so
updates run in worker threads in parallel with the network, like hashlib's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct

CTX_BYTES = 112
_CTX_ALLOC_BYTES = 128  # headroom: the library never writes past its struct


class HashStateError(ValueError):
    """A saved state that is not a SHA-256 state of the expected length."""


def _load_libcrypto() -> ctypes.CDLL:
    name = ctypes.util.find_library("crypto")
    if name is None:
        raise OSError("libcrypto (OpenSSL) not found; the S3 backend needs it for its hash state")
    lib = ctypes.CDLL(name)
    for fn in (lib.SHA256_Init, lib.SHA256_Update, lib.SHA256_Final):
        fn.restype = ctypes.c_int
    lib.SHA256_Init.argtypes = [ctypes.c_void_p]
    lib.SHA256_Update.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    lib.SHA256_Final.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    return lib


_LIB: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        _LIB = _load_libcrypto()
    return _LIB


class ResumableSha256:
    """``update``/``hexdigest`` like hashlib's, plus ``state()`` and ``from_state()``."""

    def __init__(self) -> None:
        self._ctx = ctypes.create_string_buffer(_CTX_ALLOC_BYTES)
        if _lib().SHA256_Init(self._ctx) != 1:
            raise OSError("SHA256_Init failed")

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(data, bytes) and len(data):  # from_buffer shares the memory, no copy
            buf = (ctypes.c_char * len(data)).from_buffer(data)
            _lib().SHA256_Update(self._ctx, ctypes.cast(buf, ctypes.c_char_p), len(data))
            return
        _lib().SHA256_Update(self._ctx, bytes(data), len(data))

    @property
    def length_bytes(self) -> int:
        """How many bytes the state has hashed (from its own bit counter)."""
        low, high = struct.unpack_from("<II", self._ctx.raw, 32)
        return int(((high << 32) | low) // 8)

    def state(self) -> bytes:
        return self._ctx.raw[:CTX_BYTES]

    @classmethod
    def from_state(cls, state: bytes, expected_length: int) -> ResumableSha256:
        if len(state) != CTX_BYTES:
            raise HashStateError(f"hash state is {len(state)} bytes, not {CTX_BYTES}")
        h = cls()
        ctypes.memmove(h._ctx, state, CTX_BYTES)
        if h.length_bytes != expected_length:
            raise HashStateError(f"hash state covers {h.length_bytes} bytes, the session "
                                 f"{expected_length}")
        return h

    def copy(self) -> ResumableSha256:
        h = ResumableSha256()
        ctypes.memmove(h._ctx, self._ctx, _CTX_ALLOC_BYTES)
        return h

    def hexdigest(self) -> str:
        out = ctypes.create_string_buffer(32)
        _lib().SHA256_Final(out, self.copy()._ctx)
        return out.raw.hex()
