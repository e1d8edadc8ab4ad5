"""``GET /docs`` and ``GET /redoc``: the API documentation pages, behind the token.

FastAPI's own pages fetch ``/openapi.json`` without the token the page was opened with;
these pass the page's ``?token=`` on to it. The OpenAPI document declares the bearer
token, so Swagger UI's "Authorize" button sends it with "Try it out". The pages load
their scripts from a CDN: the bridge's ``Referrer-Policy: no-referrer`` (see
``progress_bridge.auth``) keeps the page's address, token included, from it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse

TITLE = "planrun progress bridge"


def install(app: FastAPI) -> None:
    """Add the documentation pages to ``app`` (made with ``docs_url=redoc_url=None``)."""

    @app.get("/docs", include_in_schema=False)
    async def swagger(request: Request) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=_openapi_url(request), title=TITLE)

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        return get_redoc_html(openapi_url=_openapi_url(request), title=TITLE)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "token": {"type": "http", "scheme": "bearer",
                          "description": "the bridge token (`planrun up` prints where "
                                         "it is)"}}
            schema["security"] = [{"token": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _openapi_url(request: Request) -> str:
    # The Guard let this request in, so a ?token= here is the bridge's own token;
    # quoted, it cannot break out of the page's script string.
    token = request.query_params.get("token")
    return "/openapi.json" + (f"?token={quote(token, safe='')}" if token else "")
