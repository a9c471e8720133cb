"""The resumable upload protocol (tus-like): POST /api/v1/uploads creates an upload, PATCH
appends at ``Upload-Offset``, HEAD/GET report the offset, POST .../commit verifies size and
sha256 and publishes, DELETE aborts. An interrupted upload resumes where it stopped."""

from __future__ import annotations

from aiohttp import web
from loguru import logger

from mt5backupd.receiver.bodies import body_chunks, json_body, opt_int, sha_param
from mt5backupd.receiver.commits import after_commit
from mt5backupd.receiver.context import METRICS_KEY, STORAGE_KEY, principal
from mt5backupd.receiver.ranges import parse_offset
from mt5backupd.receiver.storage import BadRequest
from mt5backupd.records import UploadSession


async def create_upload(request: web.Request) -> web.Response:
    body = await json_body(request)
    name = body.get("name")
    kind = body.get("kind", "database")
    if not isinstance(name, str) or not isinstance(kind, str):
        raise BadRequest("name and kind must be strings")
    sess = await request.app[STORAGE_KEY].create_session(
        principal(request).name, name, kind, opt_int(body.get("size"), "size"),
        body.get("metadata"),
    )
    location = f"/api/v1/uploads/{sess.uid}"
    logger.bind(client=sess.client).info("upload {} started for {} ({})", sess.uid, name, kind)
    return web.json_response(
        UploadSession(sess.uid, 0, location).to_json(),
        status=201,
        headers={"Location": location, "Upload-Offset": "0"},
    )


async def upload_status(request: web.Request) -> web.Response:
    info = await request.app[STORAGE_KEY].session_info(principal(request).name,
                                                 request.match_info["uid"])
    headers = {"Upload-Offset": str(info["offset"]), "Cache-Control": "no-store"}
    if info["expected_size"] is not None:
        headers["Upload-Length"] = str(info["expected_size"])
    if request.method == "HEAD":
        return web.Response(status=200, headers=headers)
    return web.json_response(info, headers=headers)


async def append_upload(request: web.Request) -> web.Response:
    wanted = parse_offset(request.headers.get("Upload-Offset"))
    if wanted is None:
        raise BadRequest("Upload-Offset header (a non-negative integer in ASCII digits) is "
                         "required")
    m = request.app[METRICS_KEY]
    with m.uploads_in_flight.track_inprogress():
        offset = await request.app[STORAGE_KEY].append(
            principal(request).name, request.match_info["uid"], wanted,
            body_chunks(request), request.content_length,
        )
    return web.Response(status=204, headers={"Upload-Offset": str(offset)})


async def commit_upload(request: web.Request) -> web.Response:
    body = await json_body(request)
    sha256 = sha_param(body.get("sha256"), "sha256")
    size = opt_int(body.get("size"), "size")
    if size is None:
        raise BadRequest("size is required")
    client = principal(request).name
    record = await request.app[STORAGE_KEY].commit(client, request.match_info["uid"], sha256, size)
    await after_commit(request, record)
    return web.json_response(record.to_json(), status=201)


async def abort_upload(request: web.Request) -> web.Response:
    await request.app[STORAGE_KEY].abort(principal(request).name, request.match_info["uid"])
    return web.Response(status=204)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_post("/api/v1/uploads", create_upload)
    router.add_route("HEAD", "/api/v1/uploads/{uid}", upload_status)
    router.add_get("/api/v1/uploads/{uid}", upload_status, allow_head=False)
    router.add_patch("/api/v1/uploads/{uid}", append_upload)
    router.add_post("/api/v1/uploads/{uid}/commit", commit_upload)
    router.add_delete("/api/v1/uploads/{uid}", abort_upload)
