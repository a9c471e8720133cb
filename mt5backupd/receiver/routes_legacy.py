"""The one-shot REST protocol the legacy scripts (and curl) speak: POST /api/backup/upload
(multipart or a raw body), GET /api/backup/list, GET /api/backup/download/{id} (ranges,
ETag, the ``.sha256`` sidecar)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from aiohttp import BodyPartReader, web
from loguru import logger

from mt5backupd.names import SIDECAR_SUFFIX
from mt5backupd.receiver.bodies import (
    body_chunks,
    body_wait,
    check_kind,
    check_name,
    field_text,
    part_chunks,
    sha_param,
)
from mt5backupd.receiver.commits import after_commit
from mt5backupd.receiver.context import METRICS_KEY, STORAGE_KEY, principal, target_client
from mt5backupd.receiver.noise import short
from mt5backupd.receiver.ranges import RangeMalformed, RangeNotSatisfiable, parse_range
from mt5backupd.receiver.storage import BadRequest, TempUpload
from mt5backupd.records import sidecar_line


def _default_name() -> str:
    return datetime.now(UTC).strftime("upload-%Y%m%d-%H%M%S.dump")


async def legacy_upload(request: web.Request) -> web.Response:
    """``curl -F file=@x.dump`` (multipart) or a raw body; optional sha256 verified.

    Everything known before the body (name, kind, declared sha256 from the URL, the headers
    or form fields that precede the file) is checked before a byte of it is stored: a bad
    name must not cost the receiver a 1 GB write first."""
    storage = request.app[STORAGE_KEY]
    client = principal(request).name
    name = request.query.get("name") or request.headers.get("X-Backup-Name")
    kind = request.query.get("kind", "database")
    raw_sha = request.headers.get("X-Content-SHA256") or request.query.get("sha256")
    check_name(name)
    check_kind(kind)
    expected = sha_param(raw_sha, "sha256") if raw_sha else None
    metadata: Any = None
    temp: TempUpload | None = None
    m = request.app[METRICS_KEY]
    try:
        with m.uploads_in_flight.track_inprogress():
            if request.content_type.startswith("multipart/"):
                try:
                    temp, name, kind, expected, metadata = await _legacy_multipart(
                        request, client, name, kind, expected)
                except ValueError as exc:  # aiohttp's multipart parser: a broken body
                    raise BadRequest(f"malformed multipart body ({short(exc)})") from None
            else:
                temp = await storage.receive_temp(client, body_chunks(request),
                                                  request.content_length)
        if temp.size == 0:
            # what a legacy script sends when its pg_dump failed before writing a byte
            # (`pg_dump ... ; curl -F file=@...`): never a backup
            raise BadRequest("empty upload: the body holds no backup bytes; nothing stored")
        final, temp = temp, None
        record = await storage.publish_temp(final, name or _default_name(), kind, metadata,
                                            expected)
    finally:
        if temp is not None:
            await storage.discard_temp(temp)
    await after_commit(request, record)
    return web.json_response({"status": "ok", **record.to_json()})


async def _legacy_multipart(
    request: web.Request, client: str, name: str | None, kind: str, expected: str | None,
) -> tuple[TempUpload, str | None, str, str | None, Any]:
    """Read a multipart one-shot upload; each field is checked as it arrives, so fields sent
    before the file refuse the upload before its bytes are stored."""
    storage = request.app[STORAGE_KEY]
    metadata: Any = None
    temp: TempUpload | None = None
    try:
        reader = await request.multipart()
        while True:
            async with body_wait(request):
                part = await reader.next()
            if part is None:
                break
            if not isinstance(part, BodyPartReader):
                raise BadRequest("nested multipart is not supported")
            if part.name == "file":
                if temp is not None:
                    raise BadRequest("only one file field per upload")
                name = name or part.filename
                check_name(name)
                temp = await storage.receive_temp(client, part_chunks(request, part), None)
            elif part.name in ("sha256", "checksum"):
                # Accept the bare hash or a whole `sha256sum` line.
                raw_sha = ((await field_text(request, part)).split() or [""])[0]
                expected = sha_param(raw_sha, "sha256") if raw_sha else None
            elif part.name == "name":
                name = (await field_text(request, part)).strip()
                check_name(name)
            elif part.name == "kind":
                kind = (await field_text(request, part)).strip()
                check_kind(kind)
            elif part.name == "metadata":
                try:
                    metadata = json.loads(await field_text(request, part))
                except (ValueError, RecursionError):
                    raise BadRequest("metadata field is not valid JSON") from None
            else:
                async with body_wait(request):
                    await part.release()
        if temp is None:
            raise BadRequest("multipart upload without a 'file' field")
    except BaseException:
        if temp is not None:
            await storage.discard_temp(temp)
        raise
    return temp, name, kind, expected, metadata


async def list_backups(request: web.Request) -> web.Response:
    storage = request.app[STORAGE_KEY]
    caller = principal(request)
    if caller.admin and "client" not in request.query:
        clients = await storage.clients()
    else:
        clients = [target_client(request)]
    records = [r.to_json() for c in clients for r in await storage.list_backups(c)]
    return web.json_response({"backups": records, "count": len(records)})


async def download(request: web.Request) -> web.StreamResponse:
    storage = request.app[STORAGE_KEY]
    client = target_client(request)
    raw_id = request.match_info["id"]
    if raw_id.endswith(SIDECAR_SUFFIX):
        record = await storage.get(client, raw_id.removesuffix(SIDECAR_SUFFIX))
        return web.Response(text=sidecar_line(record.sha256, record.id),
                            headers={"X-Content-SHA256": record.sha256})
    record, reader = await storage.open_data(client, raw_id)
    try:
        etag = f'"{record.sha256}"'
        headers = {
            "ETag": etag,
            "X-Content-SHA256": record.sha256,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{record.id}"',
        }
        if etag in [t.strip() for t in request.headers.get("If-None-Match", "").split(",")]:
            return web.Response(status=304, headers=headers)
        range_header = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if if_range is not None and if_range.strip() != etag:
            range_header = None  # the representation changed: send it whole
        try:
            span = parse_range(range_header, record.size)
        except RangeNotSatisfiable:
            return web.Response(status=416, headers={**headers,
                                                     "Content-Range": f"bytes */{record.size}"})
        except RangeMalformed:
            raise BadRequest("Range: positions must be ASCII digits (bytes=FIRST-LAST)") from None
        start, end = span if span is not None else (0, record.size - 1)
        length = max(0, end - start + 1)
        resp = web.StreamResponse(status=206 if span else 200, headers=headers)
        if span:
            resp.headers["Content-Range"] = f"bytes {start}-{end}/{record.size}"
        resp.content_length = length
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        remaining = length
        async for block in reader.chunks(start, length):
            await resp.write(block)
            remaining -= len(block)
        if remaining > 0:
            # The stored data is shorter than its record (truncated by someone or a failing
            # disk). The promised Content-Length can never be met: close now, so the client
            # fails at once instead of waiting for bytes until its timeout.
            logger.bind(client=client).error(
                "backup {} is truncated in storage ({} bytes short of its {}-byte record); "
                "download closed", record.id, remaining, record.size)
            if request.transport is not None:
                request.transport.close()
            return resp
        await resp.write_eof()
        return resp
    finally:
        await reader.close()


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/api/backup/upload", legacy_upload)
    router.add_get("/api/backup/list", list_backups)
    router.add_get("/api/backup/download/{id}", download)
