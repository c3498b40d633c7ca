"""The hosted checkout page and the sandbox dashboard: plain server-rendered HTML.

A browser (a developer clicking through, or the e2e browser test) opens the ``url`` of
a Checkout Session or a Payment Link, as it would open Stripe's hosted checkout::

    GET  /pay/{cs_...}               the page: amount, currency, product, interval and
                                     three forms (Pay, Decline, Cancel)
    GET  /pay/{plink_...}            opens a new session from the link (with the link's
                                     metadata, as Stripe does) and 303s to its page
    POST /pay/{cs_...}/pay           completes it paid (pay_session) -> 303 success_url
    POST /pay/{cs_...}/decline       fails the payment (decline_session) -> 303 cancel_url
    POST /pay/{cs_...}/cancel        leaves it open -> 303 cancel_url
    GET  /_sandbox/dashboard         sessions, charges with their refunds (and forms to
                                     refund, hold the next refund pending, settle it:
                                     payments.sandbox.refund_panel), the status
                                     callbacks received, the events sent
    POST /_sandbox/callbacks/...     a status-callback receiver for trying the service
                                     by hand (payments.sandbox.callback_sink)

No JavaScript and no external assets: each button is a form that POSTs, and the answer
is a 303 (Post/Redirect/Get), so a reload never pays twice. A session that is no longer
open shows a page saying so, and its forms answer 409 without touching it. Every value
that reaches the HTML is escaped. Without a ``success_url`` / ``cancel_url`` (a Payment
Link has no cancel URL) the redirect goes back to the session's own page.

Why the pages need no auth: a customer's browser opens them, as Stripe's checkout is
public. They only show what the customer sees at Stripe (never metadata, keys or the
API), and they can only move one session through the moves a customer makes. The
dashboard shows every session, so it is open only while the sandbox binds a loopback
address (nobody else can reach it); bound elsewhere it asks for the secret key, as
Bearer or as the Basic-auth user name (a browser prompts for that), like Stripe's API.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import time
from collections.abc import Iterable, Mapping
from html import escape
from typing import Any
from urllib.parse import quote, urlsplit

from payments.sandbox.api import ApiRequest, ApiResponse
from payments.sandbox.callback_sink import CallbackSink
from payments.sandbox.params import ZERO_DECIMAL, SessionStateError
from payments.sandbox.refund_panel import RefundPanel
from payments.sandbox.state import StripeState

PAY_PREFIX = "/pay/"
DASHBOARD_PATH = "/_sandbox/dashboard"
# Currencies Stripe counts in thousandths (its "three-decimal currencies").
THREE_DECIMAL = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})
_DASHBOARD_ROWS = 200  # newest first; the page stays small however long the run
_ACTIONS = ("pay", "decline", "cancel")

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;background:#f6f8fa;color:#1f2328}
main{box-sizing:border-box;max-width:34rem;margin:3rem auto;background:#fff;
border:1px solid #d0d7de;border-radius:8px;padding:2rem}
main.wide{max-width:90rem;margin:1rem}
.scroll{overflow-x:auto}
td.when{white-space:nowrap}
.badge{display:inline-block;background:#fff8c5;border:1px solid #d4a72c;border-radius:4px;
padding:.1rem .5rem;font-size:.8rem}
.amount{font-size:2rem;font-weight:600;margin:.5rem 0}
.interval{font-size:1rem;font-weight:400;color:#59636e}
table{border-collapse:collapse;width:100%;margin:1rem 0;font-size:.9rem}
th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid #d0d7de;vertical-align:top}
.actions{display:flex;gap:.5rem;margin-top:1.5rem}
button{font-size:1rem;padding:.6rem 1.2rem;border-radius:6px;border:1px solid #d0d7de;
background:#f6f8fa;cursor:pointer}
button.pay{background:#1f883d;border-color:#1a7f37;color:#fff}
.small{font-size:.8rem;color:#59636e}
code{font-size:.85rem}
"""


# --- formatting ---------------------------------------------------------------------


def format_amount(amount: int | None, currency: str | None) -> str:
    """``2500, "eur"`` -> ``"EUR 25.00"``, in the currency's own minor unit."""
    code = (currency or "").lower()
    value = amount or 0
    if code in ZERO_DECIMAL:
        shown = f"{value:,}"
    elif code in THREE_DECIMAL:
        shown = f"{value / 1000:,.3f}"
    else:
        shown = f"{value / 100:,.2f}"
    return f"{code.upper()} {shown}".strip()


def format_interval(recurring: Mapping[str, Any] | None) -> str:
    """``{"interval": "month", "interval_count": 1}`` -> ``"every 1 month"``."""
    if not recurring:
        return ""
    count = int(recurring.get("interval_count") or 1)
    interval = str(recurring.get("interval") or "")
    return f"every {count} {interval}{'' if count == 1 else 's'}"


def _when(timestamp: int | None) -> str:
    if not timestamp:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def is_loopback_host(host: str) -> bool:
    """Whether binding ``host`` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --- responses ----------------------------------------------------------------------


def _html_response(
    status: int, title: str, body: str, *, wide: bool = False, extra: Iterable[tuple[str, str]] = ()
) -> ApiResponse:
    document = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f"<body><main{' class=wide' if wide else ''}>"
        '<p class="badge">Stripe sandbox &middot; test mode, no real money moves</p>'
        f"{body}</main></body></html>\n"
    )
    headers = (
        ("content-type", "text/html; charset=utf-8"),
        ("cache-control", "no-store"),
        # No scripts, frames or outside assets; the forms post to this page's origin and
        # may be redirected anywhere (success_url), so form-action is left open.
        (
            "content-security-policy",
            "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
            "frame-ancestors 'none'",
        ),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
        *extra,
    )
    return ApiResponse(status, document.encode("utf-8"), headers)


def _message(status: int, title: str, text: str, *, back: str = "") -> ApiResponse:
    link = f'<p><a href="{escape(back)}">Back</a></p>' if back else ""
    return _html_response(status, title, f"<h1>{escape(title)}</h1><p>{escape(text)}</p>{link}")


def _redirect(location: str) -> ApiResponse:
    return ApiResponse(
        303,
        b"",
        (("location", location), ("cache-control", "no-store"), ("referrer-policy", "no-referrer")),
    )


def _not_allowed(allow: str) -> ApiResponse:
    response = _message(405, "Method not allowed", f"This page answers {allow} only.")
    return ApiResponse(405, response.body, (*response.headers, ("allow", allow)))


def _session_path(session_id: str) -> str:
    return PAY_PREFIX + quote(session_id, safe="")


# --- the pages ----------------------------------------------------------------------


class CheckoutPages:
    """The customer-facing pages over a :class:`StripeState` (see the module doc)."""

    def __init__(self, state: StripeState, *, dashboard_open: bool) -> None:
        self.state = state
        self.dashboard_open = dashboard_open
        self.refunds = RefundPanel(state, amount=format_amount, when=_when)
        self.callbacks = CallbackSink()

    @staticmethod
    def serves(path: str) -> bool:
        """Whether ``path`` is one of these pages (the server asks before routing)."""
        return (
            path.startswith(PAY_PREFIX)
            or path.rstrip("/") == DASHBOARD_PATH
            or RefundPanel.serves(path)
            or CallbackSink.serves(path)
        )

    def handle(self, request: ApiRequest) -> ApiResponse:
        method = request.method.upper()
        path = request.target.partition("?")[0]
        response = self._route(method, path, request)
        if method == "HEAD":  # same status and headers, no body (HTTP's rule)
            return ApiResponse(response.status, b"", response.headers)
        return response

    def _route(self, method: str, path: str, request: ApiRequest) -> ApiResponse:
        if RefundPanel.serves(path):
            return self._refund_action(method, path, request)
        if CallbackSink.serves(path):
            return self.callbacks.handle(request)
        if path.rstrip("/") == DASHBOARD_PATH:
            if method not in ("GET", "HEAD"):
                return _not_allowed("GET")
            return self.dashboard(request)
        parts = path[len(PAY_PREFIX) :].split("/")
        if len(parts) == 1 and parts[0]:
            if method != "GET":  # HEAD too: it must not open a session for a link
                return _not_allowed("GET")
            return self.page(parts[0])
        if len(parts) == 2 and parts[1] in _ACTIONS:
            if method != "POST":
                return _not_allowed("POST")
            return self.act(parts[0], parts[1])
        return _message(404, "Not found", "There is no checkout page here.")

    # --- GET /pay/{id} ---------------------------------------------------------------

    def page(self, object_id: str) -> ApiResponse:
        if object_id.startswith("plink_"):
            return self._open_link(object_id)
        session = self.state.sessions.get(object_id)
        if session is None:
            return _message(404, "Checkout not found", "No checkout session has this id.")
        self._expire_if_due(session)
        if session["status"] != "open":
            return self._closed(session, 200)
        return self._checkout(session)

    def _open_link(self, link_id: str) -> ApiResponse:
        link = self.state.payment_links.get(link_id)
        if link is None:
            return _message(404, "Payment link not found", "No payment link has this id.")
        try:
            session = self.state.open_payment_link(link_id)
        except SessionStateError:
            return _message(410, "Payment link inactive", "This payment link is no longer active.")
        return _redirect(_session_path(session["id"]))

    def _expire_if_due(self, session: dict[str, Any]) -> None:
        """Stripe expires a session at ``expires_at``; the sandbox does it when asked."""
        if session["status"] == "open" and session["expires_at"] <= self.state.now():
            self.state.expire_session(session["id"])

    def _checkout(self, session: dict[str, Any]) -> ApiResponse:
        items = self.state.line_items.get(session["id"], [])
        total = format_amount(session["amount_total"], session["currency"])
        recurring = next(
            (i["price"]["recurring"] for i in items if i["price"].get("recurring")), None
        )
        interval = format_interval(recurring)
        names = [str(item.get("description") or "") for item in items]
        heading = ", ".join(n for n in names if n) or "Checkout"
        rows = "".join(
            "<tr>"
            f"<td>{escape(str(item.get('description') or ''))}</td>"
            f"<td>{int(item.get('quantity') or 1)}</td>"
            f"<td>{escape(format_amount(item['amount_total'], item['currency']))}"
            f"{self._interval_suffix(item)}</td>"
            "</tr>"
            for item in items
        )
        base = _session_path(session["id"])
        interval_html = f' <span class="interval">{escape(interval)}</span>' if interval else ""
        body = (
            f"<h1>{escape(heading)}</h1>"
            f'<p class="amount">{escape(total)}{interval_html}</p>'
            "<table><thead><tr><th>Product</th><th>Qty</th><th>Amount</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>"
            '<div class="actions">'
            f'<form method="post" action="{escape(base)}/pay">'
            '<button class="pay" type="submit">Pay</button></form>'
            f'<form method="post" action="{escape(base)}/decline">'
            '<button type="submit">Decline</button></form>'
            f'<form method="post" action="{escape(base)}/cancel">'
            '<button type="submit">Cancel</button></form>'
            "</div>"
            f'<p class="small">Session <code>{escape(session["id"])}</code> &middot; '
            f"{escape(session['mode'])} &middot; expires {escape(_when(session['expires_at']))}"
            "</p>"
        )
        return _html_response(200, f"Pay {total} - sandbox checkout", body)

    @staticmethod
    def _interval_suffix(item: Mapping[str, Any]) -> str:
        interval = format_interval(item["price"].get("recurring"))
        return f' <span class="interval">{escape(interval)}</span>' if interval else ""

    def _closed(self, session: dict[str, Any], status: int) -> ApiResponse:
        """The page of a session that can no longer be paid (no forms on it)."""
        total = format_amount(session["amount_total"], session["currency"])
        if session["status"] == "expired":
            title, text = "Checkout expired", "This checkout session has expired."
        elif self.state.payment_failed(session["id"]):
            title = "Payment failed"
            text = "The payment of this checkout session was declined."
        elif session["payment_status"] == "unpaid":
            title = "Payment processing"
            text = "This checkout session is complete; its payment is still on its way."
        else:
            title = "Already paid"
            text = f"This checkout session is complete: {total} was paid."
            message = self._confirmation_message(session)
            if message:
                text += " " + message
        body = (
            f"<h1>{escape(title)}</h1><p>{escape(text)}</p>"
            f'<p class="small">Session <code>{escape(session["id"])}</code> &middot; status '
            f"{escape(session['status'])} &middot; payment_status "
            f"{escape(session['payment_status'])}</p>"
        )
        return _html_response(status, f"{title} - sandbox checkout", body)

    def _confirmation_message(self, session: Mapping[str, Any]) -> str:
        link = self.state.payment_links.get(session.get("payment_link") or "")
        if link is None:
            return ""
        confirmation = link["after_completion"].get("hosted_confirmation") or {}
        return str(confirmation.get("custom_message") or "")

    # --- POST /pay/{id}/{action} ------------------------------------------------------

    def act(self, session_id: str, action: str) -> ApiResponse:
        session = self.state.sessions.get(session_id)
        if session is None:
            return _message(404, "Checkout not found", "No checkout session has this id.")
        self._expire_if_due(session)
        if session["status"] != "open":  # never pay (or fail) twice
            return self._closed(session, 409)
        if action == "pay":
            self.state.pay_session(session_id)
            return _redirect(self._after(session, session.get("success_url")))
        if action == "decline":
            self.state.decline_session(session_id)
        return _redirect(self._after(session, session.get("cancel_url")))

    @staticmethod
    def _after(session: Mapping[str, Any], url: str | None) -> str:
        """Where the browser goes next: the URL with Stripe's ``{CHECKOUT_SESSION_ID}``
        filled in, or back to the session's page when there is none."""
        if url and urlsplit(url).scheme in ("http", "https"):
            return url.replace("{CHECKOUT_SESSION_ID}", session["id"])
        return _session_path(session["id"])

    # --- GET /_sandbox/dashboard -------------------------------------------------------

    def _authorized(self, request: ApiRequest) -> bool:
        if self.dashboard_open:
            return True
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        key = ""
        if scheme.lower() == "bearer":
            key = credentials.strip()
        elif scheme.lower() == "basic":
            try:
                key = base64.b64decode(credentials.strip()).decode().partition(":")[0]
            except (ValueError, UnicodeDecodeError):
                key = ""
        return bool(key) and hmac.compare_digest(key.encode(), self.state.secret_key.encode())

    def _refund_action(self, method: str, path: str, request: ApiRequest) -> ApiResponse:
        if method != "POST":
            return _not_allowed("POST")
        if not self._authorized(request):
            return self._key_needed()
        error = self.refunds.act(path, request.body)
        if error:
            return _message(400, "Refund refused", error, back=DASHBOARD_PATH)
        return _redirect(DASHBOARD_PATH)

    def _key_needed(self) -> ApiResponse:
        response = _message(
            401,
            "Secret key needed",
            "The sandbox is not bound to loopback: give its secret key as the user name.",
        )
        return ApiResponse(
            401,
            response.body,
            (*response.headers, ("www-authenticate", 'Basic realm="payments-sandbox"')),
        )

    def dashboard(self, request: ApiRequest) -> ApiResponse:
        if not self._authorized(request):
            return self._key_needed()
        state = self.state
        sessions = list(reversed(state.sessions.values()))[:_DASHBOARD_ROWS]
        session_rows = "".join(self._session_row(s) for s in sessions)
        deliveries: dict[str, list[str]] = {}
        for record in state.deliveries:
            shown = str(record.status) if record.status is not None else record.error or "..."
            deliveries.setdefault(record.event_id, []).append(shown)
        events = list(reversed(state.events))[:_DASHBOARD_ROWS]
        event_rows = "".join(
            "<tr>"
            f'<td class="when">{escape(_when(e["created"]))}</td>'
            f"<td><code>{escape(e['id'])}</code></td>"
            f"<td>{escape(e['type'])}</td>"
            f"<td><code>{escape(str(e['data']['object'].get('id', '')))}</code></td>"
            f'<td class="delivery">{escape(", ".join(deliveries.get(e["id"], [])) or "-")}</td>'
            "</tr>"
            for e in events
        )
        target = (
            f"Events are posted to <code>{escape(state.webhook.url)}</code>."
            if state.webhook is not None
            else "No webhook endpoint is set: events are recorded, not sent."
        )
        body = (
            "<h1>Sandbox dashboard</h1>"
            f"<p>{len(state.sessions)} checkout sessions, {len(state.events)} events "
            f"(newest first, at most {_DASHBOARD_ROWS} of each). {target}</p>"
            "<h2>Checkout sessions</h2>"
            '<div class="scroll"><table id="sessions"><thead><tr>'
            "<th>Created</th><th>Session</th><th>Amount</th>"
            "<th>Status</th><th>Payment status</th><th>Payment link</th><th>Page</th></tr>"
            f"</thead><tbody>{session_rows}</tbody></table></div>"
            f"{self.refunds.render()}"
            f"{self.callbacks.render()}"
            "<h2>Events</h2>"
            '<div class="scroll"><table id="events"><thead><tr>'
            "<th>Created</th><th>Event</th><th>Type</th>"
            "<th>Object</th><th>Deliveries (HTTP status per attempt)</th></tr></thead>"
            f"<tbody>{event_rows}</tbody></table></div>"
        )
        return _html_response(200, "Sandbox dashboard", body, wide=True)

    def _session_row(self, session: Mapping[str, Any]) -> str:
        items = self.state.line_items.get(session["id"], [])
        recurring = next(
            (i["price"]["recurring"] for i in items if i["price"].get("recurring")), None
        )
        amount = format_amount(session["amount_total"], session["currency"])
        interval = format_interval(recurring)
        path = _session_path(session["id"])
        return (
            "<tr>"
            f'<td class="when">{escape(_when(session["created"]))}</td>'
            f"<td><code>{escape(session['id'])}</code></td>"
            f"<td>{escape(amount)}{' ' + escape(interval) if interval else ''}</td>"
            f"<td>{escape(session['status'])}</td>"
            f"<td>{escape(session['payment_status'])}</td>"
            f"<td><code>{escape(session.get('payment_link') or '')}</code></td>"
            f'<td><a href="{escape(path)}">open</a></td>'
            "</tr>"
        )
