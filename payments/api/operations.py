"""The open operations routes of the HTTP port: ``/readyz`` and ``/openapi.json``.

Added to the app by :func:`add_operations_routes` (a function of its own, so the rest
of the app's routes stay in http.py). Neither needs headers: orchestrators and client
generators call them.
"""

from __future__ import annotations

from quart import Response
from quart_trio import QuartTrio

from payments.api import wire
from payments.api.openapi import document_bytes
from payments.readiness import Readiness

# Endpoint names of these routes: http.py lets them through without headers.
OPEN_ENDPOINTS = frozenset({"readyz", "openapi"})


def add_operations_routes(app: QuartTrio, readiness: Readiness) -> None:
    """Register ``GET /readyz`` and ``GET /openapi.json`` on ``app``."""
    document = document_bytes()  # built once: it describes the code, which is fixed

    async def readyz() -> Response:
        """200 when ready; 503 naming each part that is not (payments.readiness)."""
        failing = await readiness.check()
        body = (
            {"status": "ready"}
            if not failing
            else {
                "status": "not ready",
                "not_ready": [{"part": item.part, "reason": item.reason} for item in failing],
            }
        )
        return Response(
            wire.dumps(body),
            status=503 if failing else 200,
            content_type="application/json",
            headers={"Cache-Control": "no-store"},
        )

    async def openapi() -> Response:
        return Response(document, status=200, content_type="application/json")

    app.add_url_rule("/readyz", "readyz", readyz, methods=["GET"])
    app.add_url_rule("/openapi.json", "openapi", openapi, methods=["GET"])
