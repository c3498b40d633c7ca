"""The emulator's own control API, for tests that run it as a separate process (e2e).

In-process tests use ``sandbox.state`` directly; a process started with
``python -m payments.sandbox`` is driven over HTTP instead, under ``/_sandbox/``
(JSON in and out, the same secret key as Bearer auth; ``/_sandbox/health`` is open).
These requests are neither logged nor subject to faults. ``/_sandbox/dashboard`` is not
here but in payments.sandbox.pages (HTML for a browser).

    GET    /_sandbox/health                                   {"status": "ok"}
    GET    /_sandbox/objects                                  every object, by kind
    GET    /_sandbox/requests                                 the request log
    GET    /_sandbox/events                                   recorded events
    POST   /_sandbox/checkout/sessions/{id}/{complete|fail|expire|succeed}
                               complete takes {"payment_status": "unpaid"} (delayed method)
    POST   /_sandbox/payment_links/{id}/{open|pay}            a session for the link
    POST   /_sandbox/subscriptions/{id}/cancel                customer.subscription.deleted
    POST   /_sandbox/subscriptions/{id}/invoices/{pay|fail}   invoice.paid / .payment_failed
    POST   /_sandbox/webhook    {"url": ..., "secret": ..., "api_key": "", "envelope": false,
                                 "signature_header": "Stripe-Signature",
                                 "retry_delays": [0.05, 0.25, 1.0], "timeout": 5}
    DELETE /_sandbox/webhook                                  stop delivering
    GET    /_sandbox/webhook/deliveries                       every delivery attempt
    POST   /_sandbox/events/{id}/resend                       deliver an event again
    POST   /_sandbox/faults     {"kind": "delay|error|drop|hang", "path": "/v1/", "method": null,
                                 "times": 1, "seconds": 0, "after": false, "status": 500}
                                 (hang: held unanswered until the faults are cleared)
    DELETE /_sandbox/faults                                   clear faults (releases hangs)
    POST   /_sandbox/clock      {"offset_seconds": N}          shift the account's clock
    POST   /_sandbox/reset                                    forget everything
    POST   /_sandbox/refunds    {"payment_intent" | "charge": ..., "amount": null,
                                 "reason": null}   a refund made in Stripe's dashboard
    POST   /_sandbox/refunds/hold      {"hold": true}         the next refund stays pending
    POST   /_sandbox/refunds/{id}/{succeed|fail}  {"failure_reason": ...}  settle a pending one
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

import attrs

from payments.sandbox import money
from payments.sandbox.api import ApiRequest, ApiResponse
from payments.sandbox.params import StripeError
from payments.sandbox.state import (
    Fault,
    FaultKind,
    SessionStateError,
    StripeState,
    WebhookEndpoint,
)
from payments.sandbox.webhooks import WebhookSender

_SESSION_ACTIONS: dict[str, Callable[[StripeState, str], dict[str, Any]]] = {
    "fail": lambda s, i: s.fail_session(i),
    "expire": lambda s, i: s.expire_session(i),
    "succeed": lambda s, i: s.succeed_async_payment(i),
}
_LINK_ACTIONS: dict[str, Callable[[StripeState, str], dict[str, Any]]] = {
    "open": lambda s, i: s.open_payment_link(i),
    "pay": lambda s, i: s.pay_payment_link(i),
}
_INVOICE_ACTIONS: dict[str, Callable[[StripeState, str], dict[str, Any]]] = {
    "pay": lambda s, i: s.pay_invoice(i),
    "fail": lambda s, i: s.fail_invoice(i),
}


def _answer(status: int, body: Any) -> ApiResponse:
    return ApiResponse(
        status,
        json.dumps(body, separators=(",", ":"), default=str).encode(),
        (("content-type", "application/json"),),
    )


def _body(body: bytes) -> dict[str, Any]:
    spec = json.loads(body or b"{}")
    if not isinstance(spec, dict):
        raise ValueError("the body must be a JSON object")
    return spec


def _error(status: int, message: str) -> ApiResponse:
    return _answer(status, {"error": {"type": "invalid_request_error", "message": message}})


class ControlApi:
    """Drive and inspect a :class:`StripeState` over HTTP."""

    PREFIX = "/_sandbox/"

    def __init__(self, state: StripeState, webhooks: WebhookSender | None = None) -> None:
        self.state = state
        self.webhooks = webhooks

    def handle(self, request: ApiRequest) -> ApiResponse:
        method = request.method.upper()
        parts = request.target.partition("?")[0][len(self.PREFIX) :].strip("/").split("/")
        if parts == ["health"]:
            return _answer(200, {"status": "ok"})
        auth = request.headers.get("authorization", "")
        if not hmac.compare_digest(auth.encode(), f"Bearer {self.state.secret_key}".encode()):
            return _error(401, "the sandbox control API needs the secret key as Bearer auth")
        try:
            if parts[0] == "refunds":
                return self._refunds(method, parts[1:], request.body)
            return self._route(method, parts, request.body)
        except StripeError as exc:
            return _answer(exc.status, exc.body())
        except (KeyError, SessionStateError) as exc:
            return _error(404 if isinstance(exc, KeyError) else 400, str(exc).strip("'\""))
        except (ValueError, TypeError) as exc:
            return _error(400, str(exc))

    def _refunds(self, method: str, parts: list[str], body: bytes) -> ApiResponse:
        """Refunds made "on the Stripe side" (as in Stripe's dashboard), the switch that
        holds the next refund pending, and the outcome of a pending one."""
        state = self.state
        match (method, parts):
            case ("POST", []):
                spec = _body(body)
                charge = money.charge_for(
                    state,
                    payment_intent=spec.get("payment_intent"),
                    charge=spec.get("charge"),
                )
                amount = spec.get("amount")
                if amount is not None and (not isinstance(amount, int) or amount < 1):
                    raise ValueError("amount must be a positive integer")
                refund = money.create_refund(
                    state, charge, amount=amount, reason=spec.get("reason")
                )
                return _answer(200, refund)
            case ("POST", ["hold"]):
                state.refund_hold = bool(_body(body).get("hold", True))
                return _answer(200, {"hold": state.refund_hold})
            case ("POST", [refund_id, "succeed" | "fail" as outcome]):
                reason = str(_body(body).get("failure_reason") or "")
                refund = money.settle_refund(
                    state, refund_id, succeed=outcome == "succeed", reason=reason
                )
                return _answer(200, refund)
        return _error(404, f"unknown sandbox control route {method} /refunds/{'/'.join(parts)}")

    def _route(self, method: str, parts: list[str], body: bytes) -> ApiResponse:
        state = self.state
        match (method, parts):
            case ("GET", ["objects"]):
                return _answer(
                    200,
                    {
                        "products": state.products,
                        "prices": state.prices,
                        "payment_links": state.payment_links,
                        "checkout_sessions": state.sessions,
                        "subscriptions": state.subscriptions,
                        "customers": state.customers,
                        "invoices": state.invoices,
                        "payment_intents": state.payment_intents,
                        "charges": state.charges,
                        "refunds": state.refunds,
                    },
                )
            case ("GET", ["requests"]):
                return _answer(200, {"data": [attrs.asdict(r) for r in state.requests]})
            case ("GET", ["events"]):
                return _answer(200, {"data": state.events})
            case ("POST", ["checkout", "sessions", session_id, "complete"]):
                spec = _body(body)
                payment_status = str(spec.get("payment_status", "paid"))
                return _answer(
                    200, state.complete_session(session_id, payment_status=payment_status)
                )
            case ("POST", ["checkout", "sessions", session_id, action]) if (
                action in _SESSION_ACTIONS
            ):
                return _answer(200, _SESSION_ACTIONS[action](state, session_id))
            case ("POST", ["payment_links", link_id, action]) if action in _LINK_ACTIONS:
                return _answer(200, _LINK_ACTIONS[action](state, link_id))
            case ("POST", ["subscriptions", subscription_id, "cancel"]):
                return _answer(200, state.cancel_subscription(subscription_id))
            case ("POST", ["subscriptions", subscription_id, "invoices", action]) if (
                action in _INVOICE_ACTIONS
            ):
                return _answer(200, _INVOICE_ACTIONS[action](state, subscription_id))
            case ("POST", ["webhook"]):
                spec = _body(body)
                if not spec.get("url") or not spec.get("secret"):
                    raise ValueError("a webhook needs url and secret")
                options = {key: spec[key] for key in ("signature_header", "timeout") if key in spec}
                if "retry_delays" in spec:
                    options["retry_delays"] = tuple(float(d) for d in spec["retry_delays"])
                state.webhook = WebhookEndpoint(
                    url=str(spec["url"]),
                    secret=str(spec["secret"]),
                    api_key=str(spec.get("api_key") or ""),
                    envelope=bool(spec.get("envelope", False)),
                    **options,
                )
                return _answer(200, {"url": state.webhook.url, "envelope": state.webhook.envelope})
            case ("DELETE", ["webhook"]):
                state.webhook = None
                return _answer(200, {"deleted": True})
            case ("GET", ["webhook", "deliveries"]):
                return _answer(200, {"data": [attrs.asdict(d) for d in state.deliveries]})
            case ("POST", ["events", event_id, "resend"]):
                if self.webhooks is None:
                    raise ValueError("webhook delivery is not running")
                return _answer(200, self.webhooks.resend(event_id))
            case ("POST", ["faults"]):
                spec = json.loads(body or b"{}")
                kind = FaultKind(spec.get("kind", ""))
                fault = state.faults.add(
                    Fault(
                        kind=kind,
                        path_prefix=spec.get("path", "/v1/"),
                        method=spec.get("method"),
                        remaining=spec.get("times", None if kind is FaultKind.HANG else 1),
                        seconds=float(spec.get("seconds", 0)),
                        after=bool(spec.get("after", False)),
                        status=int(spec.get("status", 500)),
                    )
                )
                return _answer(200, fault.as_dict())
            case ("DELETE", ["faults"]):
                state.faults.clear()
                return _answer(200, {"cleared": True})
            case ("POST", ["clock"]):
                spec = _body(body)
                state.clock_offset = float(spec.get("offset_seconds", 0))
                return _answer(200, {"offset_seconds": state.clock_offset, "now": state.now()})
            case ("POST", ["reset"]):
                state.reset()
                return _answer(200, {"reset": True})
        return _error(404, f"unknown sandbox control route {method} /{'/'.join(parts)}")
