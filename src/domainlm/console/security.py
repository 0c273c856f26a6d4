"""Access token, CSRF, paths kept inside --home, safe file names, and uploads limited while they stream."""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import tempfile
from pathlib import Path
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from domainlm import outputs
from domainlm.errors import DomainLMError

COOKIE = "domainlm_token"
CSRF_HEADER = "x-csrf-token"
UNSAFE = {"POST", "PUT", "PATCH", "DELETE"}


class PathError(ValueError):
    """A path that leaves --home (by .., an absolute path or a symlink)."""


def inside(home: Path, value: str | Path) -> Path:
    """`value` (relative to home, or absolute) resolved with symlinks followed; refused unless inside home."""
    root = home.resolve()
    if "\x00" in str(value):  # no file system takes one: refused before the path is looked at
        raise PathError(f"{str(value)!r} is not a path (it holds a NUL character)")
    path = Path(value)
    resolved = (path if path.is_absolute() else root / path).resolve()
    if not outputs.inside(resolved, root):
        raise PathError(f"{value} is outside the console's home folder")
    return resolved


def safe_filename(name: str) -> str:
    """The last path component, with anything but letters, digits, '.', '-' and '_' replaced; never hidden."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip("._")[:100]
    return base or "upload"


def load_or_create_secret(path: Path, given: str | None = None) -> str:
    """A secret given on the command line, else the one kept in `path` (created 0600 at first start)."""
    if given:
        return given
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    value = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(value + "\n")
    return value


def csrf_token(token: str) -> str:
    return hmac.new(token.encode(), b"domainlm-csrf", hashlib.sha256).hexdigest()[:32]


def check_csrf(token: str, supplied: str | None) -> bool:
    return bool(supplied) and hmac.compare_digest(csrf_token(token), supplied or "")


LOGIN_PAGE = """<!doctype html><html lang="{lang}"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:34em;margin:4em auto;color:#222}}input{{padding:.4em;width:70%}}
button{{padding:.4em 1em}}</style></head><body><h1>{heading}</h1>
<p>{text}</p>
<form method="get" action="/"><input name="token" type="password" autofocus placeholder="{token}">
<button type="submit">{open}</button></form></body></html>"""


LOGIN_TEXT = (
    "This console needs its access token. Open the link <code>domainlm console</code> printed when it "
    "started (it ends in <code>?token=...</code>), or paste the token here."
)


def login_page(request: Request) -> str:
    """The page that asks for the token, in the browser's language."""
    from domainlm.console import i18n

    _ = i18n.translator(i18n.of(request))
    return LOGIN_PAGE.format(
        lang=_.lang,
        title=_("domainlm console: token needed"),
        heading=_("domainlm console"),
        token=_("token"),
        open=_("Open"),
        text=_(LOGIN_TEXT),
    )


class TokenAuth:
    """ASGI middleware: every request needs the token (Bearer header, cookie, or ?token= which sets the cookie).
    A state-changing request authenticated by the cookie also needs the CSRF token (header or form field; forms
    are checked by their handlers, which read the body)."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        response = self._check(request)
        if response is not None:
            return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def _ok(self, value: str | None) -> bool:
        return bool(value) and hmac.compare_digest(value.encode(), self.token.encode())  # type: ignore[union-attr]

    def _check(self, request: Request) -> Response | None:
        header = request.headers.get("authorization", "")
        bearer = header[7:].strip() if header.lower().startswith("bearer ") else None
        query = request.query_params.get("token")
        if query is not None and self._ok(query):  # first visit: keep the token in a cookie, drop it from the URL
            rest = [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            target = request.url.path + ("?" + urlencode(rest) if rest else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict", max_age=30 * 24 * 3600)
            return response
        if self._ok(bearer):
            request.scope.setdefault("state", {})["csrf_checked"] = True
            return None  # scripts: a header a browser never adds on its own, so no CSRF token is needed
        if not self._ok(request.cookies.get(COOKIE)):
            if request.url.path.startswith("/api/") or "application/json" in request.headers.get("accept", ""):
                return JSONResponse({"detail": "missing or wrong token (Authorization: Bearer TOKEN)"}, status_code=401)
            return HTMLResponse(login_page(request), status_code=401)
        if request.method in UNSAFE:
            origin = request.headers.get("origin")
            if origin and origin.split("://", 1)[-1] != request.headers.get("host"):
                return JSONResponse({"detail": "cross-origin request refused"}, status_code=403)
            content_type = request.headers.get("content-type", "")
            is_form = content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data"))
            # forms carry the token in a field that their handlers check after reading the body
            handler_checks = is_form and (
                not request.url.path.startswith("/api/") or request.url.path == "/api/datasets"
            )
            if not handler_checks and not check_csrf(self.token, request.headers.get(CSRF_HEADER)):
                return JSONResponse({"detail": "missing or wrong CSRF token (X-CSRF-Token header)"}, status_code=403)
            request.scope.setdefault("state", {})["csrf_checked"] = not handler_checks
        return None


class UploadTooLarge(Exception):
    pass


async def receive_upload(request: Request, folder: Path, limit: int) -> tuple[dict[str, str], Path | None, str]:
    """Stream a multipart form (or a raw body with ?filename=) into a temporary file in `folder`, counting
    bytes as they arrive: over `limit`, stop reading and delete what was written. Returns the form's text
    fields, the temporary file and the client's file name."""
    from python_multipart import MultipartParser
    from python_multipart.multipart import parse_options_header

    folder.mkdir(parents=True, exist_ok=True)
    fields: dict[str, str] = {}
    tmp = tempfile.NamedTemporaryFile(dir=folder, prefix=".upload-", delete=False)
    state: dict = {"filename": None, "name": None, "headers": {}, "field": None, "value": bytearray(), "is_file": False}
    header: dict = {"field": bytearray(), "value": bytearray()}
    received = 0

    def on_part_begin():
        state.update(headers={}, is_file=False, name=None)
        state["value"] = bytearray()

    def on_header_field(data, start, end):
        header["field"] += data[start:end]

    def on_header_value(data, start, end):
        header["value"] += data[start:end]

    def on_header_end():
        state["headers"][bytes(header["field"]).decode("latin-1").lower()] = bytes(header["value"])
        header["field"], header["value"] = bytearray(), bytearray()

    def on_headers_finished():
        _, params = parse_options_header(state["headers"].get("content-disposition", b""))
        state["name"] = params.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in params:
            state["is_file"] = True
            state["filename"] = params[b"filename"].decode("utf-8", "replace")

    def on_part_data(data, start, end):
        if state["is_file"]:
            tmp.write(data[start:end])
        else:
            state["value"] += data[start:end]
            if len(state["value"]) > 64 * 1024:
                raise UploadTooLarge("form field too long")

    def on_part_end():
        if not state["is_file"] and state["name"]:
            fields[state["name"]] = bytes(state["value"]).decode("utf-8", "replace")

    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    declared = request.headers.get("content-length", "")
    try:
        if declared.isdigit() and int(declared) > limit:  # refused before reading; others are counted as they come
            raise UploadTooLarge(f"the upload is larger than the limit of {limit / 1e6:g} MB")
        if content_type == b"multipart/form-data":
            parser = MultipartParser(
                params.get(b"boundary", b""),
                {
                    "on_part_begin": on_part_begin,
                    "on_header_field": on_header_field,
                    "on_header_value": on_header_value,
                    "on_header_end": on_header_end,
                    "on_headers_finished": on_headers_finished,
                    "on_part_data": on_part_data,
                    "on_part_end": on_part_end,
                },
            )
        else:
            parser = None
            state["filename"] = request.query_params.get("filename", "")
            fields.update({k: v for k, v in request.query_params.items() if k != "filename"})
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit:
                raise UploadTooLarge(f"the upload is larger than the limit of {limit / 1e6:g} MB")
            if parser is not None:
                parser.write(chunk)
            else:
                tmp.write(chunk)
        if parser is not None:
            parser.finalize()
    except BaseException as e:
        tmp.close()
        os.unlink(tmp.name)
        from python_multipart.exceptions import MultipartParseError

        if isinstance(e, MultipartParseError):  # a client's broken form: its problem, said as such (not a 500)
            raise DomainLMError(f"the upload is not a well-formed multipart form ({e})") from None
        raise
    tmp.close()
    if not state["filename"]:
        os.unlink(tmp.name)
        return fields, None, ""
    return fields, Path(tmp.name), state["filename"]
