"""The HTTP routes: one thin layer over `Collection` (and through it `CopyDetector`), as HMA's sit over storage.

    GET    /                          the review page (static/: plain HTML, CSS and JS)
    GET    /health                    {"status", "references", "threshold", "weights": {part: fingerprint}}
    POST   /match                     multipart `image` parts; k, threshold, correspondences (form or query)
    GET    /references?offset&limit   {"total", "offset", "limit", "ids"}
    POST   /references                multipart `image` parts, id = file stem (Bearer token if configured)
    DELETE /references/{id}           (Bearer token if configured)
    GET    /references/{id}/image     JPEG thumbnail the collection keeps of a reference

Every refusal is JSON `{"error": "..."}` with a 4xx status naming the problem (ServeError, framework errors,
the body limit); an unexpected failure is a 500 with the exception's type, and the server keeps serving.
Blocking work (image checks, models, saves) runs in worker threads, never on the event loop.
"""
from __future__ import annotations

import hmac
import logging
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pair_vit.serve import uploads
from pair_vit.serve.config import ServeConfig
from pair_vit.serve.errors import ServeError
from pair_vit.serve.service import Collection

log = logging.getLogger(__name__)

STATIC = Path(str(resources.files("pair_vit.serve") / "static"))
MAX_LIST = 1000  # ids per GET /references page


class BodyTooLarge(Exception):
    """A request body over `max_request_bytes` (raised while it is read, so it is never held whole)."""


class BodyLimit:
    """ASGI middleware: a request whose body grows past `limit` bytes fails with BodyTooLarge as it is read
    (a declared Content-Length over it at once), which the app answers with a 413."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            declared = dict(scope["headers"]).get(b"content-length", b"0")
            if declared.isdigit() and int(declared) > self.limit:
                raise BodyTooLarge()
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge()
            return message

        await self.app(scope, limited, send)


def create_app(collection: Collection, cfg: ServeConfig, token: str | None = None) -> Starlette:
    """The ASGI app over `collection`; with `token`, the writing routes need `Authorization: Bearer <token>`."""
    routes = Routes(collection, cfg, token)
    app = Starlette(routes=[
        Route("/", routes.page), Route("/health", routes.health),
        Route("/match", routes.match, methods=["POST"]),
        Route("/references", routes.list_ids, methods=["GET"]),
        Route("/references", routes.add, methods=["POST"]),
        Route("/references/{ref_id:str}", routes.remove, methods=["DELETE"]),
        Route("/references/{ref_id:str}/image", routes.image),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ], exception_handlers={ServeError: _refused, HTTPException: _framework, BodyTooLarge: _too_large,
                           Exception: _failed})
    app.add_middleware(BodyLimit, limit=cfg.max_request_bytes)
    app.state.max_request_mb = cfg.max_request_mb
    return app


class Routes:
    """The endpoints: parse and check the request, call the collection in a worker thread, answer JSON."""

    def __init__(self, collection: Collection, cfg: ServeConfig, token: str | None):
        self.collection, self.cfg, self.token = collection, cfg, token

    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    async def health(self, request: Request) -> Response:
        return JSONResponse(self.collection.health())

    async def list_ids(self, request: Request) -> Response:
        q = request.query_params
        offset = uploads.int_param(q.get("offset"), "offset", 0, 0)
        limit = uploads.int_param(q.get("limit"), "limit", 100, 1, MAX_LIST)
        return JSONResponse(await run_in_threadpool(self.collection.ids, offset, limit))

    async def match(self, request: Request) -> Response:
        form = await self._form(request)
        params = {**request.query_params, **{k: v for k, v in form.multi_items() if isinstance(v, str)}}
        k = uploads.int_param(params.get("k"), "k", self.cfg.default_k, 1)
        threshold = uploads.threshold_param(params.get("threshold"))
        explain = params.get("correspondences", "") in ("1", "true", "yes")
        with tempfile.TemporaryDirectory(prefix="pair_vit_serve_") as tmp:
            checked = await self._images(form, "query", Path(tmp))
            found = await run_in_threadpool(self.collection.match, {u.image_id: u.path for u in checked}, k,
                                            threshold, explain)
        return JSONResponse(found)

    async def add(self, request: Request) -> Response:
        self._authorise(request)  # before the body is read: an unauthorised request changes nothing
        form = await self._form(request)
        with tempfile.TemporaryDirectory(prefix="pair_vit_serve_") as tmp:
            checked = await self._images(form, "reference", Path(tmp))
            return JSONResponse(await run_in_threadpool(self.collection.add, checked))

    async def remove(self, request: Request) -> Response:
        self._authorise(request)
        return JSONResponse(await run_in_threadpool(self.collection.remove, request.path_params["ref_id"]))

    async def image(self, request: Request) -> Response:
        jpeg = await run_in_threadpool(self.collection.reference_image, request.path_params["ref_id"])
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})

    # ------------------------------------------------------------------ helpers

    def _authorise(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            raise ServeError(401, "this route needs the header 'Authorization: Bearer <token>' with the token of "
                                  "the server's --token-file")

    async def _form(self, request: Request) -> Any:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ServeError(415, "send images as multipart/form-data, one 'image' part each")
        return await request.form(max_files=self.cfg.max_files, max_fields=32)

    async def _images(self, form: Any, what: str, folder: Path) -> list[uploads.Upload]:
        parts = await uploads.read_parts(form, what)
        return await run_in_threadpool(uploads.checked, parts, self.cfg.max_pixels, folder)


# ----------------------------------------------------------------------------- errors as JSON


def _error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


async def _refused(request: Request, err: ServeError) -> Response:
    if err.status == 401:
        return _error(401, err.message, **{"WWW-Authenticate": "Bearer"})
    return _error(err.status, err.message)


async def _framework(request: Request, err: HTTPException) -> Response:
    return _error(err.status_code, str(err.detail), **(err.headers or {}))


async def _too_large(request: Request, err: BodyTooLarge) -> Response:
    return _error(413, f"request body over the server's limit of {request.app.state.max_request_mb} MB "
                       f"(--max-request-mb)")


async def _failed(request: Request, err: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.url.path)
    return _error(500, f"internal error ({type(err).__name__}); the server keeps serving")
