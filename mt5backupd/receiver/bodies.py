"""Reading request bodies and parameters: every wait for body data bounded by the body idle
timeout (408), every field bounded in size, every parameter checked before it is used."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import BodyPartReader, web

from mt5backupd.names import InvalidName, is_sha256_hex, validate_backup_id, validate_kind
from mt5backupd.receiver.context import BODY_IDLE_KEY
from mt5backupd.receiver.storage import BadRequest, InvalidId, RequestTimeout

READ_BUFSIZE = 1024 * 1024
BODY_IDLE_TIMEOUT_S = 120.0
MAX_FIELD_BYTES = 64 * 1024


def _body_timeout(request: web.Request) -> RequestTimeout:
    return RequestTimeout(f"no request body data for {request.app[BODY_IDLE_KEY]:g} s")


@contextlib.asynccontextmanager
async def body_wait(request: web.Request) -> AsyncIterator[None]:
    """One wait for body data, bounded by the body idle timeout (408 when it passes)."""
    try:
        async with asyncio.timeout(request.app[BODY_IDLE_KEY]):
            yield
    except TimeoutError:
        raise _body_timeout(request) from None


async def body_chunks(request: web.Request) -> AsyncIterator[bytes]:
    """The body as it arrives. A client silent for the body idle timeout (a half-open TCP
    connection, a stalled sender) ends the request with 408, so it cannot hold its upload's
    lock for hours."""
    idle_s = request.app[BODY_IDLE_KEY]
    while True:
        # asyncio.timeout inline, not wait_for: no extra task or context manager object per
        # chunk on the ingest path
        try:
            async with asyncio.timeout(idle_s):
                chunk = await request.content.readany()
        except TimeoutError:
            raise _body_timeout(request) from None
        if not chunk:
            return
        yield chunk


async def json_body(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    try:
        async with body_wait(request):
            body = await request.json()
    except (ValueError, RecursionError):
        # JSONDecodeError, UnicodeDecodeError, an integer past int()'s digit limit, nesting
        # deeper than the recursion limit: all just bad JSON from the client.
        raise BadRequest("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("body must be a JSON object")
    return body


async def field_text(request: web.Request, part: BodyPartReader) -> str:
    """A small form field, read with a bound (a text field is never a reason to buffer MBs)."""
    data = bytearray()
    while True:
        async with body_wait(request):
            chunk = await part.read_chunk(8192)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_FIELD_BYTES:
            raise BadRequest(f"form field {part.name!r} is larger than {MAX_FIELD_BYTES} bytes")
    return data.decode(errors="replace")


async def part_chunks(request: web.Request, part: BodyPartReader) -> AsyncIterator[bytes]:
    while True:
        async with body_wait(request):
            chunk = await part.read_chunk(READ_BUFSIZE)
        if not chunk:
            return
        yield chunk


def opt_int(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{what} must be an integer")
    return value


def sha_param(value: Any, what: str) -> str:
    if not isinstance(value, str) or not is_sha256_hex(value.strip().lower()):
        raise BadRequest(f"{what} must be 64 hex digits")
    return value.strip().lower()


def check_name(name: str | None) -> None:
    if name is not None:
        try:
            validate_backup_id(name)
        except InvalidName as exc:
            raise InvalidId(str(exc)) from None


def check_kind(kind: str) -> None:
    try:
        validate_kind(kind)
    except InvalidName as exc:
        raise InvalidId(str(exc)) from None
