"""``GET /v1/runs/{id}/view``: a live web page of one run.

The page is one self-contained file, ``static/view.html`` (inline CSS and JavaScript, no
external requests), read once. Its script follows ``WS /v1/runs/{id}/ws`` and reconnects
by itself with ``?after=<last seq>``, passing on the page's own ``?token=``. The run id
reaches the page only as an HTML-escaped JSON string in ``<body data-run-id>``; a fresh
nonce per response lets the page's own ``<style>`` and ``<script>`` run and nothing else.
"""

from __future__ import annotations

import html
import json
import re
import secrets
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

PAGE = files("planrun.progress_bridge").joinpath("static/view.html").read_text(encoding="utf-8")
_SLOT = re.compile(r"__(RUN_ID|NONCE)__")
# connect-src 'self' covers ws:// and wss:// to the page's own host (CSP level 3).
_POLICY = ("default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
           "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
           "frame-ancestors 'none'")

router = APIRouter()


@router.get("/v1/runs/{run_id}/view", response_class=HTMLResponse)
async def run_view(run_id: str) -> HTMLResponse:
    """The live page of the run: its step graph, statuses, progress bar and estimate."""
    nonce = secrets.token_urlsafe(16)
    headers = {"Content-Security-Policy": _POLICY.format(nonce=nonce),
               # The page's address holds ?token=: keep it out of Referer headers (the
               # Guard says so for every response; the page must not depend on that).
               "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}
    return HTMLResponse(render(run_id, nonce), headers=headers)


def render(run_id: str, nonce: str) -> str:
    """The page for ``run_id``, its ``<style>`` and ``<script>`` carrying ``nonce``.

    One pass over the template, so nothing inserted is read again as a slot.
    """
    values = {"RUN_ID": html.escape(json.dumps(run_id), quote=True), "NONCE": nonce}
    return _SLOT.sub(lambda slot: values[slot[1]], PAGE)
