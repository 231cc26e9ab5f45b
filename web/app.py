"""`imagebatch serve`: a read-only web app (aiohttp.web, Jinja2) over the database and the
storage the other commands use. Routes read through `pipeline.gallery`; none changes state.

Safe by default: it binds 127.0.0.1; any other address needs IMAGEBATCH_SERVE_TOKEN, and
once the token is set every request needs it (`Authorization: Bearer TOKEN`, or the /login
form's HttpOnly SameSite cookie). Without a token, requests must name a loopback Host (a web
page elsewhere cannot reach the app by rebinding a name of its own to 127.0.0.1). Media are
served only by image id, from the keys the pipeline stored, and a file only from under the
storage root once resolved (no symlink or `..` out of it); S3 objects are proxied, so no
credential or presigned URL reaches a page or a log.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import jinja2
from aiohttp import web
from sqlalchemy.orm import Session, sessionmaker

from pipeline import gallery
from pipeline.db import open_database
from pipeline.models import utcnow
from pipeline.settings import Settings
from pipeline.storage import (
    FileStore,
    MediaStore,
    ObjectNotFound,
    StorageError,
    check_key,
    open_store,
)
from web.chart import dollars, stacked_by_day

__all__ = ["TOKEN_ENV", "ServeRefused", "check_bind", "make_app", "media_path", "read_token",
           "serve"]

log = logging.getLogger("imagebatch.serve")

TOKEN_ENV = "IMAGEBATCH_SERVE_TOKEN"
TOKEN_MIN = 16  # characters: guessing one is out of reach, even over many requests
COOKIE = "imagebatch_session"
HERE = Path(__file__).resolve().parent
PAGE = 60  # files or items a gallery page shows
JOBS_PAGE = 100
SPEND_DAYS = 30

SESSIONS = web.AppKey("sessions", sessionmaker)
STORE = web.AppKey("store", object)
TEMPLATES = web.AppKey("templates", jinja2.Environment)
TOKEN = web.AppKey("token", object)
HOSTS = web.AppKey("hosts", object)

# Media types a browser may show inline; anything else (SVG, HTML: script carriers) is sent
# as an attachment of no type.
INLINE_MEDIA = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/avif",
                "image/bmp", "video/", "audio/")
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "media-src 'self'; connect-src 'self'; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

T = TypeVar("T")


class ServeRefused(ValueError):
    """`serve` will not start as asked; the message is one line naming what to change."""


def read_token(env: dict[str, str] | None = None) -> str | None:
    """IMAGEBATCH_SERVE_TOKEN (None when unset or empty); ServeRefused when too short."""
    token = (os.environ if env is None else env).get(TOKEN_ENV) or None
    if token is not None and (len(token) < TOKEN_MIN or not token.isprintable()):
        # Never echoed: the value is the secret.
        raise ServeRefused(f"{TOKEN_ENV}: use at least {TOKEN_MIN} printable characters, e.g. "
                           "python -c 'import secrets; print(secrets.token_urlsafe())'")
    return token


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name could resolve anywhere


def check_bind(host: str, token: str | None) -> None:
    """ServeRefused unless `host` is a loopback address or a token guards every request."""
    if token is None and not is_loopback(host):
        raise ServeRefused(f"--host {host}: serving on any address but 127.0.0.1 needs "
                           f"{TOKEN_ENV} set (every request must then carry it)")


def loopback_hosts(port: int) -> frozenset[str]:
    """The Host headers a browser on this machine sends to the app on `port`."""
    names = ("127.0.0.1", "localhost", "[::1]")
    return frozenset({*names, *(f"{name}:{port}" for name in names)})


def session_value(token: str) -> str:
    """The login cookie: derived from the token, never the token itself."""
    return hmac.new(token.encode(), b"imagebatch serve session", hashlib.sha256).hexdigest()


def authorized(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                          token.encode()):
        return True
    cookie = request.cookies.get(COOKIE, "")
    return hmac.compare_digest(cookie.encode(), session_value(token).encode())


# --- the app ---------------------------------------------------------------------------------


def make_app(sessions: sessionmaker[Session], store: MediaStore, *, token: str | None,
             hosts: frozenset[str] | None) -> web.Application:
    """The app over `sessions` and `store`. `hosts`: the Host headers accepted (None: any,
    which only a token may allow)."""
    if token is None and hosts is None:
        raise ServeRefused(f"without {TOKEN_ENV}, the app answers loopback Host names only")
    app = web.Application(middlewares=[guard])
    app[SESSIONS] = sessions
    app[STORE] = store
    app[TOKEN] = token
    app[HOSTS] = hosts
    app[TEMPLATES] = templates()
    app.add_routes([
        web.get("/", jobs_page),
        web.get("/jobs/rows", jobs_rows),
        web.get(r"/jobs/{job:\d{1,18}}", job_page),
        web.get("/spend", spend_page),
        web.get(r"/media/{image:\d{1,18}}", media),
        web.get("/login", login_form),
        web.post("/login", login),
        web.static("/static", HERE / "static", follow_symlinks=False),
    ])
    return app


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every user string (prompts, names, reasons) is escaped
        undefined=jinja2.StrictUndefined,
    )
    env.filters["dollars"] = lambda cents: "-" if cents is None else dollars(cents)
    env.filters["duration"] = duration
    env.globals["query"] = query_string
    return env


def query_string(**params: object) -> str:
    """`?a=1&b=x` of the params that have a value (URL-encoded: the template escapes the
    result again for its attribute); "" when none has."""
    given = {name: value for name, value in params.items() if value not in (None, "")}
    return "?" + urlencode(given) if given else ""


def duration(seconds: int | None) -> str:
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@web.middleware
async def guard(request: web.Request,
                handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                ) -> web.StreamResponse:
    hosts, token = request.app[HOSTS], request.app[TOKEN]
    if hosts is not None and request.host not in hosts:
        return web.Response(status=421, text="unknown host: open the app as "
                            "http://127.0.0.1:PORT/\n")
    if token is not None and request.path != "/login" and not authorized(request, token):
        return refuse(request)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        secure(exc)
        raise
    return secure(response)


def secure(response: web.StreamResponse) -> web.StreamResponse:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def refuse(request: web.Request) -> web.StreamResponse:
    """401: a page asks a person to log in; anything else is told to send the token."""
    if request.method == "GET" and "text/html" in request.headers.get("Accept", ""):
        return secure(web.Response(status=303, headers={"Location": "/login"}))
    response = web.Response(status=401, text=f"the token is needed ({TOKEN_ENV}): send "
                            "Authorization: Bearer TOKEN, or log in at /login\n")
    response.headers["WWW-Authenticate"] = 'Bearer realm="imagebatch"'
    return secure(response)


def page(request: web.Request, template: str, http_status: int = 200,
         **values: Any) -> web.Response:
    html = request.app[TEMPLATES].get_template(template).render(
        token_needed=request.app[TOKEN] is not None, **values)
    return web.Response(text=html, content_type="text/html", status=http_status)


def problem(request: web.Request, status: int, message: str) -> web.Response:
    return page(request, "problem.html", http_status=status, message=message)


async def read(request: web.Request, query: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a gallery query on a thread (the loop keeps serving), in a session of its own."""
    sessions = request.app[SESSIONS]

    def run() -> T:
        with sessions() as session:
            return query(session, *args, **kwargs)

    return await asyncio.to_thread(run)


# --- pages -----------------------------------------------------------------------------------


async def jobs_page(request: web.Request) -> web.Response:
    before = _number(request, "before")
    jobs = await read(request, gallery.list_job_rows, limit=JOBS_PAGE, before=before)
    older = jobs[-1].id if len(jobs) == JOBS_PAGE else None
    return page(request, "jobs.html", jobs=jobs, before=before, older=older)


async def jobs_rows(request: web.Request) -> web.Response:
    """The jobs table's rows alone: what the list page fetches every 2 s to stay current."""
    jobs = await read(request, gallery.list_job_rows, limit=JOBS_PAGE,
                      before=_number(request, "before"))
    return page(request, "jobs_rows.html", jobs=jobs)


def _after(request: web.Request) -> int | None:
    return _number(request, "after")


def _number(request: web.Request, name: str) -> int | None:
    text = request.query.get(name, "")
    if text == "":
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 18:  # "²" is a digit too
        raise web.HTTPBadRequest(text=f"{name}: a whole number\n")
    return int(text)


async def job_page(request: web.Request) -> web.Response:
    job_id = int(request.match_info["job"])
    status = request.query.get("status", gallery.FILES)
    model = request.query.get("model", "").strip()[:200] or None
    if status != gallery.FILES and status not in gallery.ITEM_STATUSES:
        return problem(request, 400, f"status: one of {gallery.FILES}, "
                       f"{', '.join(gallery.ITEM_STATUSES)}")
    after = _after(request)
    job = await read(request, gallery.job_row, job_id)
    if job is None:
        return problem(request, 404, f"no job {job_id}")
    models = await read(request, gallery.known_models)
    if status == gallery.FILES:
        files = await read(request, gallery.job_files, job_id, after=after, model=model,
                           limit=PAGE)
        items = None
    else:
        files = None
        items = await read(request, gallery.job_items, job_id, status, after=after,
                           model=model, limit=PAGE)
    return page(request, "job.html", job=job, status=status, model=model, after=after,
                models=models, files=files, items=items, statuses=gallery.ITEM_STATUSES)


async def spend_page(request: web.Request) -> web.Response:
    teams = await read(request, gallery.team_budgets)
    now = utcnow()
    first = (now - timedelta(days=SPEND_DAYS - 1)).date()
    charts = {}
    for by in ("team", "model"):
        rows = await read(request, gallery.spend_by_day, by, days=SPEND_DAYS, now=now)
        charts[by] = stacked_by_day(rows, first=first, last=now.date())
    return page(request, "spend.html", teams=teams, charts=charts, days=SPEND_DAYS)


# --- media -----------------------------------------------------------------------------------


def media_path(root: Path, key: str) -> Path | None:
    """The file of `key` under `root`, or None when the key is not a storage key or its file,
    once every symlink and `..` is resolved, is not a regular file under the root."""
    try:
        path = root.joinpath(*check_key(key).split("/")).resolve(strict=True)
        inside = path.is_relative_to(root.resolve(strict=True))
    except (StorageError, OSError, RuntimeError):
        return None
    return path if inside and path.is_file() else None


def media_headers(content_type: str) -> dict[str, str]:
    inline = content_type.startswith(INLINE_MEDIA)
    headers = {
        "Content-Type": content_type if inline else "application/octet-stream",
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": "default-src 'none'; sandbox",
        "Cache-Control": "private, max-age=3600",  # a stored file never changes
    }
    if not inline:
        headers["Content-Disposition"] = "attachment"
    return headers


async def media(request: web.Request) -> web.StreamResponse:
    image_id = int(request.match_info["image"])
    found = await read(request, gallery.stored_file, image_id)
    if found is None:
        raise web.HTTPNotFound(text="no such file\n")
    store = request.app[STORE]
    headers = media_headers(found.content_type)
    if isinstance(store, FileStore):
        path = media_path(store.root, found.key)
        if path is None:
            raise web.HTTPNotFound(text="no such file\n")
        return web.FileResponse(path, headers=headers)
    try:  # S3: proxied, so the page never holds a credential or a presigned URL
        data = await asyncio.to_thread(store.get, found.key)
    except ObjectNotFound:
        raise web.HTTPNotFound(text="no such file\n") from None
    except StorageError as exc:
        log.warning("media %s: %s", image_id, exc)
        raise web.HTTPBadGateway(text="storage did not answer\n") from None
    return web.Response(body=data, headers=headers)


# --- login -----------------------------------------------------------------------------------


async def login_form(request: web.Request) -> web.Response:
    if request.app[TOKEN] is None:
        raise web.HTTPSeeOther("/")
    return page(request, "login.html", wrong=False)


async def login(request: web.Request) -> web.Response:
    token = request.app[TOKEN]
    if token is None:
        raise web.HTTPSeeOther("/")
    origin = request.headers.get("Origin")
    if origin not in (None, "null") and origin.split("://", 1)[-1] != request.host:
        raise web.HTTPForbidden(text="login from another site\n")
    form = await request.post()
    given = str(form.get("token", ""))
    if not hmac.compare_digest(given.encode(), token.encode()):
        return page(request, "login.html", http_status=401, wrong=True)
    response = web.HTTPSeeOther("/")
    response.set_cookie(COOKIE, session_value(token), httponly=True, samesite="Strict",
                        path="/", secure=request.secure)
    raise response


# --- the command -----------------------------------------------------------------------------


def serve(settings: Settings, host: str, port: int) -> None:
    """Serve until interrupted. ServeRefused (and the database's or storage's one-line
    errors) before anything listens."""
    token = read_token()
    check_bind(host, token)
    store = open_store(settings.storage_url)
    if not isinstance(store, FileStore):
        store.check()  # a bucket that does not answer is said now, not on every image
    with open_database(settings) as sessions:
        app = make_app(sessions, store, token=token,
                       hosts=None if token else loopback_hosts(port))
        shown = f"[{host}]" if ":" in host else host
        print(f"imagebatch serve: http://{shown}:{port}/ (read-only"
              f"{', token required' if token else ''}; Ctrl-C stops)", flush=True)
        web.run_app(app, host=host, port=port, print=None, handle_signals=True)
