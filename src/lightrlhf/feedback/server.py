"""The labelling server: one FastAPI app, served by uvicorn, over a candidates file and a label store.

    GET  /                         the page (static/index.html, page.js, page.css; no build step)
    GET  /api/next?annotator=NAME  {"done", "candidate": {id, prompt, a, b, a_media?, b_media?} | null,
                                    "progress": {"labelled", "total"}}
    POST /api/label                {"id", "annotator", "choice", "reason"?, "seconds"?} -> {"progress"}
    POST /api/undo                 {"annotator"} -> {"undone": id | null, "progress"}
    GET  /media/<path>             a file named by a candidate's a_media/b_media, nothing else

Every error is a JSON object {"error": "<one line>"} with a 4xx status: 400 a malformed request,
401 a missing or wrong token, 404 an unknown id or path, 409 a pair this annotator already
labelled, 413 a body over 64 KiB; 507 when the disk refuses the write (nothing earlier is touched).

The next pair for an annotator is the first in file order that they have not labelled, so a
restarted server, a reloaded page or a second browser resumes at the same place. The server binds
127.0.0.1 by default; any other address needs a token, which every request must then carry
(`?token=`, `Authorization: Bearer`, or the cookie the page gets when opened with `?token=`), because the page has no other authentication and labels
are research data.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import socket
import threading
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from lightrlhf.errors import UserError
from lightrlhf.feedback.candidates import MEDIA, Candidate, media_path, read_candidates
from lightrlhf.feedback.labels import LabelRejected, check_annotator
from lightrlhf.feedback.store import LabelStore

LOOPBACK = ("127.0.0.1", "localhost", "::1")
TOKEN_COOKIE = "lightrlhf_feedback_token"
MAX_BODY_BYTES = 64 * 1024
_STATIC = {"index.html": "text/html; charset=utf-8", "page.js": "text/javascript; charset=utf-8",
           "page.css": "text/css; charset=utf-8"}
# The page's own files only: no inline script or style, so even text that escaped textContent could not run.
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self'; object-src 'none'; "
                                            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                 "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


class RequestError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(candidates: list[Candidate], candidates_path: str | Path, store: LabelStore,
               token: str | None = None) -> FastAPI:
    """The ASGI app over already-read candidates and an open store."""
    order = [c.id for c in candidates]
    by_id = {c.id: c for c in candidates}
    media = {getattr(c, name): media_path(candidates_path, getattr(c, name))
             for c in candidates for name in MEDIA if getattr(c, name) is not None}
    page = {name: resources.files("lightrlhf.feedback").joinpath("static", name).read_bytes() for name in _STATIC}
    app = FastAPI(title="lightrlhf feedback", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers={"Cache-Control": "no-store"})

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if token is None:
            return await call_next(request)
        header = request.headers.get("authorization", "")
        given = [request.query_params.get("token"), request.cookies.get(TOKEN_COOKIE),
                 header[7:].strip() if header.lower().startswith("bearer ") else None]
        if not any(g is not None and hmac.compare_digest(g.encode(), token.encode()) for g in given):
            return error(401, "a valid token is required (open the URL the server printed, with ?token=...)")
        response = await call_next(request)
        if given[0] is not None:  # the page's own requests (its script, style, images, API calls) carry it on
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(RequestError)
    async def request_error(request: Request, problem: RequestError):
        return error(problem.status, str(problem))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, problem: HTTPException):
        return error(problem.status_code, str(problem.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, problem: RequestValidationError):
        return error(400, "malformed request")

    @app.exception_handler(LabelRejected)
    async def rejected(request: Request, problem: LabelRejected):
        return error(problem.status, str(problem))

    @app.exception_handler(UserError)
    async def user_error(request: Request, problem: UserError):
        return error(500, str(problem))

    def progress(annotator: str) -> dict[str, int]:
        done = store.labelled_ids(annotator)
        return {"labelled": sum(id in done for id in order), "total": len(order)}

    def next_for(annotator: str) -> dict[str, Any]:
        done = store.labelled_ids(annotator)
        first = next((id for id in order if id not in done), None)
        return {"done": first is None, "candidate": None if first is None else by_id[first].public(),
                "progress": {"labelled": sum(id in done for id in order), "total": len(order)}}

    async def body(request: Request, allowed: tuple[str, ...]) -> dict[str, Any]:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise RequestError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        try:
            values = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RequestError(400, "the request body is not valid JSON") from None
        if not isinstance(values, dict):
            raise RequestError(400, "the request body must be a JSON object")
        unknown = [name for name in values if name not in allowed]
        if unknown:
            raise RequestError(400, f'unknown field "{unknown[0]}"; expected: {", ".join(allowed)}')
        return values

    def static(name: str) -> Response:
        return Response(page[name], media_type=_STATIC[name], headers=_PAGE_HEADERS)

    @app.get("/")
    async def index() -> Response:
        return static("index.html")

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/static/{name}")
    async def static_file(name: str) -> Response:
        if name not in _STATIC:
            raise RequestError(404, f"no such file: /static/{name}")
        return static(name)

    @app.get("/api/next")
    async def api_next(request: Request) -> JSONResponse:
        annotator = _annotator(request.query_params.get("annotator"))
        return JSONResponse(await run_in_threadpool(next_for, annotator), headers={"Cache-Control": "no-store"})

    @app.post("/api/label")
    async def api_label(request: Request) -> JSONResponse:
        values = await body(request, ("id", "annotator", "choice", "reason", "seconds"))
        for name in ("id", "annotator", "choice"):
            if name not in values:
                raise RequestError(400, f'field "{name}" is missing')
        label = await run_in_threadpool(store.append, values["id"], values["annotator"], values["choice"],
                                        values.get("reason", ""), values.get("seconds", 0.0))
        return JSONResponse({"progress": await run_in_threadpool(progress, label.annotator)})

    @app.post("/api/undo")
    async def api_undo(request: Request) -> JSONResponse:
        values = await body(request, ("annotator",))
        annotator = _annotator(values.get("annotator"))
        undone = await run_in_threadpool(store.undo, annotator)
        return JSONResponse({"undone": undone, "progress": await run_in_threadpool(progress, annotator)})

    @app.get("/media/{path:path}")
    async def media_file(path: str) -> Response:
        if path not in media:
            raise RequestError(404, f"no such media file: {path}")
        return FileResponse(media[path], headers={"X-Content-Type-Options": "nosniff"})

    return app


def _annotator(value: Any) -> str:
    if value is None:
        raise RequestError(400, 'field "annotator" is missing')
    try:
        return check_annotator(value)
    except LabelRejected as problem:
        raise RequestError(400, str(problem)) from None


def check_binding(host: str, token: str | None) -> None:
    """Anything but loopback is reachable by others: refuse it without a token."""
    if host not in LOOPBACK and not token:
        raise UserError(f"--host {host}: listening beyond this machine needs a token (--token SECRET); "
                        "every request must then carry it")
    if token is not None and (not token or any(c.isspace() for c in token)):
        raise UserError("--token: must be a non-empty string without spaces")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or one line saying why not (port in use, address not on this machine)."""
    address = "127.0.0.1" if host == "localhost" else host
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    # reuse a port whose previous server was just killed (connections in TIME_WAIT), never a live one
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
        sock.listen(128)
    except OSError as problem:
        sock.close()
        if problem.errno == errno.EADDRINUSE:
            raise UserError(f"{host}:{port}: the port is in use (another server?); choose another with --port") \
                from None
        raise UserError(f"{host}:{port}: cannot listen there ({problem.strerror or problem})") from None
    return sock


def base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _server(app):
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    return uvicorn.Server(config)


class Served:
    """What `open_server` prepared: candidates, store, app and listening socket."""

    def __init__(self, candidates_path: str | Path, labels_path: str | Path, host: str, port: int,
                 token: str | None) -> None:
        check_binding(host, token)
        self.candidates = read_candidates(candidates_path)
        self.socket = bind(host, port)  # before the label file: a busy port leaves no new empty file behind
        try:
            self.store = LabelStore(labels_path, [c.id for c in self.candidates])
        except BaseException:
            self.socket.close()
            raise
        self.app = create_app(self.candidates, candidates_path, self.store, token)
        self.host, self.port, self.token = host, self.socket.getsockname()[1], token

    @property
    def url(self) -> str:
        return base_url(self.host, self.port)

    def close(self) -> None:
        self.socket.close()
        self.store.close()


def serve(candidates_path: str | Path, labels_path: str | Path, host: str = "127.0.0.1", port: int = 8765,
          token: str | None = None, announce=print) -> None:
    """Serve in the foreground until Ctrl-C or SIGTERM (every label is already on disk by then)."""
    served = Served(candidates_path, labels_path, host, port, token)
    try:
        for note in served.store.notes:
            announce(f"note: {note}")
        labelled = len(served.store.labels())
        announce(f"{len(served.candidates)} pairs from {candidates_path}; labels go to {labels_path} "
                 f"({labelled} there already)")
        # every address of this machine: name one that a browser elsewhere can reach
        shown = socket.gethostname() if host in ("0.0.0.0", "::") else host
        page = base_url(shown, served.port) + "/" + (f"?token={token}" if token else "")
        announce(f"open {page}   (Ctrl-C stops; each label is on disk before the page shows the next pair)")
        _server(served.app).run(sockets=[served.socket])
    finally:
        served.close()


@contextlib.contextmanager
def serve_in_thread(candidates_path: str | Path, labels_path: str | Path, host: str = "127.0.0.1", port: int = 0,
                    token: str | None = None) -> Iterator[str]:
    """Serve in a background thread for the length of the block; yields the base URL (no trailing /)."""
    served = Served(candidates_path, labels_path, host, port, token)
    server = _server(served.app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [served.socket]}, name="feedback-server",
                              daemon=True)
    try:
        thread.start()
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the feedback server stopped while starting")
            thread.join(0.01)
        yield served.url
    finally:
        server.should_exit = True
        thread.join()
        served.close()
