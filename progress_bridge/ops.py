"""``GET /healthz`` and ``GET /metrics`` (Prometheus text format)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from planrun.progress_bridge.state import state_of

router = APIRouter()


@router.get("/healthz")
async def healthz(request: Request) -> dict[str, Any]:
    """``{"status": "ok"}`` while the bridge serves, with its client and run counts."""
    state = state_of(request)
    return {"status": "ok", "clients": state.hub.subscribers(), "runs": len(state.store.runs())}


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus metrics of this bridge."""
    return Response(state_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)
