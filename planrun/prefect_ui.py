"""Links into the Prefect UI (docs/prefect-ui.md)."""

from __future__ import annotations


def flow_run_url(run_id: str) -> str | None:
    """The Prefect UI's page of the flow run ``run_id``, where the UI's address is known
    (``PREFECT_UI_URL``, or derived from ``PREFECT_API_URL``)."""
    from prefect.settings import get_current_settings

    ui = get_current_settings().ui_url
    return f"{ui}/runs/flow-run/{run_id}" if ui else None
