"""A status-callback receiver for trying the service by hand: ``POST /_sandbox/callbacks/...``.

The README's quick start needs a ``status_callback_url`` that answers; without one the
dispatcher retries into the void and fills the log. Any path under the prefix answers
``200 {"received": true}`` and the dashboard lists the newest callbacks (path, webhook
id, and the payment's id and status, or the first bytes of a body it cannot read).
Kept in memory only, at most :data:`KEPT`: it is a development aid, not a record.

Open like the checkout pages (the service posts without the sandbox's key). What it
shows leaves out every header but the Standard Webhooks id, so the service's own
``X-API-Key`` sent with each callback is never displayed.
"""

from __future__ import annotations

import collections
import json
import time
from html import escape

import attrs

from payments.sandbox.api import ApiRequest, ApiResponse

PREFIX = "/_sandbox/callbacks"
KEPT = 200
_SHOWN_BYTES = 200


@attrs.frozen
class ReceivedCallback:
    at: float
    path: str
    webhook_id: str
    summary: str


def _summary(body: bytes) -> str:
    """``payment <id>: status <n>`` (and the refund's, when there is one), or the start of
    the body as text."""
    try:
        data = json.loads(body)
        payment = data["payment"]
        text = f"payment {payment.get('id')}: status {payment.get('status')}"
        refund = data.get("refund")
        if isinstance(refund, dict):
            text += f"; refund {refund.get('id')}: status {refund.get('status')}"
        return text
    except (ValueError, TypeError, KeyError):
        return body[:_SHOWN_BYTES].decode("utf-8", "replace")


class CallbackSink:
    """Answers and remembers status callbacks (see the module doc)."""

    def __init__(self) -> None:
        self.received: collections.deque[ReceivedCallback] = collections.deque(maxlen=KEPT)

    @staticmethod
    def serves(path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    def handle(self, request: ApiRequest) -> ApiResponse:
        if request.method.upper() != "POST":
            return ApiResponse(405, b"", (("allow", "POST"),))
        self.received.append(
            ReceivedCallback(
                at=time.time(),
                path=request.target.partition("?")[0],
                webhook_id=request.headers.get("webhook-id", ""),
                summary=_summary(request.body),
            )
        )
        return ApiResponse(200, b'{"received":true}', (("content-type", "application/json"),))

    def render(self) -> str:
        rows = "".join(
            "<tr>"
            f'<td class="when">{escape(time.strftime("%H:%M:%S", time.localtime(c.at)))}</td>'
            f"<td><code>{escape(c.path)}</code></td>"
            f"<td><code>{escape(c.webhook_id)}</code></td>"
            f"<td>{escape(c.summary)}</td>"
            "</tr>"
            for c in reversed(self.received)
        )
        return (
            "<h2>Status callbacks received</h2>"
            f"<p>Give <code>{PREFIX}/&lt;anything&gt;</code> on this sandbox as a payment's "
            "<code>status_callback_url</code> to see its callbacks here.</p>"
            '<div class="scroll"><table id="callbacks"><thead><tr>'
            "<th>Received</th><th>Path</th><th>webhook-id</th><th>Content</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></div>"
        )
