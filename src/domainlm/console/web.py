"""The console's web app: the Console service (console.app) behind its JSON API (console.api) and its pages
(console.pages), with the token check and the static files. The top of the console: nothing in it imports this."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from domainlm.console import api, pages
from domainlm.console.app import HERE, Console
from domainlm.console.security import TokenAuth


def allowed_methods(scope) -> list[str]:
    """The methods of every route (API and pages) whose path matches the request's, as the OpenAPI document lists
    them (Starlette answers HEAD for a GET too, which the document does not list)."""
    from starlette.routing import Match

    found: set[str] = set()
    for route in [*api.router.routes, *pages.router.routes]:
        methods = getattr(route, "methods", None) or set()
        if methods and route.matches({**scope, "method": next(iter(methods))})[0] != Match.NONE:
            found |= methods
    return sorted(found - {"HEAD"})


def create_app(console: Console) -> FastAPI:
    from contextlib import asynccontextmanager

    from fastapi.exception_handlers import http_exception_handler
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @asynccontextmanager
    async def lifespan(_app):
        console.start()
        try:
            yield
        finally:
            console.stop()

    # /docs is the console's own page over /openapi.json: the usual Swagger UI would load from a CDN
    app = FastAPI(
        title="domainlm console",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="Create, watch and compare domainlm training jobs. Every call needs "
        "`Authorization: Bearer TOKEN` (the token `domainlm console` printed).",
    )
    app.state.console = console
    app.add_middleware(TokenAuth, token=console.token)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(api.router)
    app.include_router(pages.router)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        """The API answers JSON; a page answers a page that says what is missing and where to go. A method the
        path does not have is 405 with every method the path has (Starlette names only its first route's)."""
        if exc.status_code == 405:
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed_methods(request.scope))}
        if request.url.path.startswith("/api/") or "text/html" not in request.headers.get("accept", ""):
            return await http_exception_handler(request, exc)
        return pages.render(request, "error.html", exc.status_code, status=exc.status_code, detail=exc.detail)

    return app
