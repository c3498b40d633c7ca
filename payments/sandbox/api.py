"""The emulated Stripe v1 API: routing, auth, idempotency, validation and handlers.

Transport-free and synchronous: the server hands over a parsed :class:`ApiRequest` and
sends back the :class:`ApiResponse`. A request goes through :meth:`StripeApi.begin`
(parse, match the route, log it) and then either :meth:`StripeApi.respond` or, when a
fault is injected, :meth:`StripeApi.fault_response`; the server owns everything that
needs time or the socket (delays, dropped connections).

Faithful where the service depends on it: bracket-nested form parameters, Bearer (or
Basic) auth, ``Idempotency-Key`` replay scoped per key and endpoint, Stripe's error JSON
and HTTP codes, and Stripe-like validation (unknown parameters and missing required
ones named in ``param``).
"""

from __future__ import annotations

import base64
import hmac
import itertools
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import unquote

import attrs

from payments.sandbox import money
from payments.sandbox import params as P
from payments.sandbox.forms import FormError, parse_form
from payments.sandbox.params import ZERO_DECIMAL, StripeError, invalid, missing, no_such
from payments.sandbox.state import (
    API_VERSION,
    CURRENCIES,
    MINIMUM_CHARGE,
    SESSION_LIFETIME_SECONDS,
    Fault,
    RequestRecord,
    StripeState,
    new_id,
)

log = logging.getLogger("payments.sandbox")

MAX_IDEMPOTENCY_KEY = 255
Json = dict[str, Any]


@attrs.frozen
class ApiRequest:
    """One HTTP request. Header names are lower-case."""

    method: str
    target: str  # path and query, as on the request line
    headers: Mapping[str, str]
    body: bytes = b""


@attrs.frozen
class ApiResponse:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


@attrs.define
class _Stored:
    """A saved idempotent result (kept as its JSON dict: it is persisted)."""

    method: str
    path: str
    params: Json
    status: int
    body: str
    request_id: str


@attrs.define
class Call:
    """A request on its way through the API (see :meth:`StripeApi.begin`)."""

    request: ApiRequest
    method: str
    path: str
    params: Json
    form_error: FormError | None
    handler: Callable[[Json, str], Json] | None
    object_id: str
    record: RequestRecord


# --- schemas ----------------------------------------------------------------------------

_RECURRING = {
    "interval": P.one_of("day", "week", "month", "year"),
    "interval_count": P.integer,
    "usage_type": P.one_of("licensed", "metered"),
}
_PRODUCT_DATA = {
    "name": P.max_len(250),
    "description": P.string,
    "metadata": P.metadata,
    "images": [P.string],
    "tax_code": P.string,
    "unit_label": P.string,
    "statement_descriptor": P.max_len(22),
}
_PRICE_DATA = {
    "currency": P.string,
    "product": P.string,
    "product_data": _PRODUCT_DATA,
    "recurring": {"interval": _RECURRING["interval"], "interval_count": P.integer},
    "tax_behavior": P.one_of("exclusive", "inclusive", "unspecified"),
    "unit_amount": P.integer,
}
_ADJUSTABLE = {"enabled": P.boolean, "maximum": P.integer, "minimum": P.integer}
_DATA_META = {"metadata": P.metadata, "description": P.string}
_SUBSCRIPTION_DATA = {**_DATA_META, "trial_period_days": P.integer}
_AFTER_COMPLETION = {
    "type": P.one_of("redirect", "hosted_confirmation"),
    "redirect": {"url": P.url},
    "hosted_confirmation": {"custom_message": P.max_len(500)},
}
_EXPAND_ONLY = {"expand": P.EXPAND}

PRODUCT_CREATE = {
    "name": P.max_len(250),
    "active": P.boolean,
    "description": P.string,
    "metadata": P.metadata,
    "images": [P.string],
    "url": P.url,
    "tax_code": P.string,
    "unit_label": P.string,
    "statement_descriptor": P.max_len(22),
    "expand": P.EXPAND,
}
PRICE_CREATE = {
    "currency": P.string,
    "unit_amount": P.integer,
    "product": P.string,
    "product_data": {k: v for k, v in _PRODUCT_DATA.items() if k not in ("description", "images")}
    | {"active": P.boolean},
    "recurring": _RECURRING,
    "active": P.boolean,
    "metadata": P.metadata,
    "nickname": P.string,
    "lookup_key": P.max_len(200),
    "tax_behavior": P.one_of("exclusive", "inclusive", "unspecified"),
    "billing_scheme": P.one_of("per_unit"),
    "expand": P.EXPAND,
}
PAYMENT_LINK_CREATE = {
    "line_items": [{"price": P.string, "quantity": P.integer, "adjustable_quantity": _ADJUSTABLE}],
    "after_completion": _AFTER_COMPLETION,
    "metadata": P.metadata,
    "allow_promotion_codes": P.boolean,
    "currency": P.string,
    "payment_intent_data": _DATA_META,
    "subscription_data": _SUBSCRIPTION_DATA,
    "payment_method_types": [P.string],
    "restrictions": {"completed_sessions": {"limit": P.integer}},
    "expand": P.EXPAND,
}
PAYMENT_LINK_UPDATE = {
    "active": P.boolean,
    "metadata": P.metadata,
    "after_completion": _AFTER_COMPLETION,
    "allow_promotion_codes": P.boolean,
    "expand": P.EXPAND,
}
SESSION_CREATE = {
    "mode": P.one_of("payment", "setup", "subscription"),
    "line_items": [
        {
            "price": P.string,
            "price_data": _PRICE_DATA,
            "quantity": P.integer,
            "adjustable_quantity": _ADJUSTABLE,
        }
    ],
    "client_reference_id": P.max_len(200),
    "metadata": P.metadata,
    "success_url": P.url,
    "cancel_url": P.url,
    "customer": P.string,
    "customer_email": P.string,
    "currency": P.string,
    "expires_at": P.integer,
    "locale": P.string,
    "allow_promotion_codes": P.boolean,
    "payment_method_types": [P.string],
    "payment_intent_data": {**_DATA_META, "statement_descriptor": P.max_len(22)},
    "subscription_data": _SUBSCRIPTION_DATA,
    "ui_mode": P.one_of("hosted"),
    "expand": P.EXPAND,
}
SESSION_LIST = {
    "created": {"gt": P.integer, "gte": P.integer, "lt": P.integer, "lte": P.integer},
    "payment_link": P.string,
    "status": P.one_of("open", "complete", "expired"),
    "subscription": P.string,
    "customer": P.string,
    "payment_intent": P.string,
    "limit": P.integer,
    "starting_after": P.string,
    "ending_before": P.string,
    "expand": P.EXPAND,
}
SUBSCRIPTION_CANCEL = {
    "invoice_now": P.boolean,
    "prorate": P.boolean,
    "cancellation_details": {
        "comment": P.string,
        "feedback": P.one_of(
            "customer_service",
            "low_quality",
            "missing_features",
            "other",
            "switched_service",
            "too_complex",
            "too_expensive",
            "unused",
        ),
    },
    "expand": P.EXPAND,
}
REFUND_CREATE = {
    "payment_intent": P.string,
    "charge": P.string,
    "amount": P.integer,
    "reason": P.one_of(*money.REFUND_REASONS),
    "metadata": P.metadata,
    "expand": P.EXPAND,
}
REFUND_LIST = {
    "payment_intent": P.string,
    "charge": P.string,
    "limit": P.integer,
    "expand": P.EXPAND,
}
INVOICE_PAYMENT_LIST = {"invoice": P.string, "limit": P.integer, "expand": P.EXPAND}
_MAX_INTERVAL_COUNT = {"day": 365, "week": 52, "month": 12, "year": 1}


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _redact(key: str) -> str:
    prefix = key[:8] if key.startswith(("sk_", "rk_")) else ""
    return prefix + "*" * max(len(key) - len(prefix) - 4, 4) + key[-4:]


def _clean_metadata(meta: Mapping[str, str] | None) -> dict[str, str]:
    """On create, an empty value means no key (Stripe's unset)."""
    return {k: v for k, v in (meta or {}).items() if v != ""}


def _merge_metadata(current: Mapping[str, str], update: Mapping[str, str]) -> dict[str, str]:
    merged = dict(current)
    for key, value in update.items():
        if value == "":
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


class StripeApi:
    """Stripe's v1 API over a :class:`StripeState`."""

    def __init__(self, state: StripeState) -> None:
        self.state = state
        # (method, path) -> handler for fixed paths; templates for paths with an id.
        self._static: dict[tuple[str, str], tuple[str, Callable[[Json, str], Json]]] = {}
        self._templates: list[tuple[str, re.Pattern[str], str, Callable[[Json, str], Json]]] = []
        for method, template, handler in self._routes():
            if "{id}" in template:
                pattern = re.compile("^" + re.escape(template).replace(r"\{id\}", "([^/]+)") + "$")
                self._templates.append((method, pattern, f"{method} {template}", handler))
            else:
                self._static[(method, template)] = (f"{method} {template}", handler)

    def _routes(self) -> list[tuple[str, str, Callable[[Json, str], Json]]]:
        return [
            ("POST", "/v1/products", self.create_product),
            ("GET", "/v1/products/{id}", self.retrieve_product),
            ("POST", "/v1/prices", self.create_price),
            ("GET", "/v1/prices/{id}", self.retrieve_price),
            ("POST", "/v1/payment_links", self.create_payment_link),
            ("GET", "/v1/payment_links/{id}", self.retrieve_payment_link),
            ("POST", "/v1/payment_links/{id}", self.update_payment_link),
            ("GET", "/v1/payment_links/{id}/line_items", self.payment_link_line_items),
            ("POST", "/v1/checkout/sessions", self.create_session),
            ("GET", "/v1/checkout/sessions", self.list_sessions),
            ("GET", "/v1/checkout/sessions/{id}", self.retrieve_session),
            ("POST", "/v1/checkout/sessions/{id}/expire", self.expire_session),
            ("GET", "/v1/checkout/sessions/{id}/line_items", self.session_line_items),
            ("GET", "/v1/subscriptions/{id}", self.retrieve_subscription),
            ("GET", "/v1/invoices/{id}", self.retrieve_invoice),
            ("DELETE", "/v1/subscriptions/{id}", self.cancel_subscription),
            ("GET", "/v1/invoice_payments", self.list_invoice_payments),
            ("GET", "/v1/payment_intents/{id}", self.retrieve_payment_intent),
            ("GET", "/v1/charges/{id}", self.retrieve_charge),
            ("POST", "/v1/refunds", self.create_refund),
            ("GET", "/v1/refunds", self.list_refunds),
            ("GET", "/v1/refunds/{id}", self.retrieve_refund),
        ]

    # --- the request pipeline ---------------------------------------------------------

    def begin(self, request: ApiRequest) -> Call:
        """Parse and route a request, and log it (faulted requests are logged too)."""
        method = request.method.upper()
        path, _, query = request.target.partition("?")
        form_error = None
        params: Json = {}
        try:
            params = parse_form(query)
            if method == "POST" and request.body:
                params.update(parse_form(request.body))
        except FormError as exc:
            form_error = exc
        except UnicodeDecodeError:
            form_error = FormError("Invalid request: the body is not UTF-8", "body")
        handler: Callable[[Json, str], Json] | None = None
        object_id = ""
        endpoint = f"{method} {path}"
        if (method, path) in self._static:
            endpoint, handler = self._static[(method, path)]
        else:
            for route_method, pattern, template, route_handler in self._templates:
                match = pattern.match(path) if route_method == method else None
                if match:
                    endpoint, handler, object_id = template, route_handler, unquote(match[1])
                    break
        record = RequestRecord(
            method=method,
            path=path,
            endpoint=endpoint,
            params=params,
            idempotency_key=request.headers.get("idempotency-key"),
            at=self.state.clock(),
            request_id=new_id("req_", 14),
        )
        self.state.requests.append(record)
        self.state.calls[endpoint] += 1
        return Call(request, method, path, params, form_error, handler, object_id, record)

    def respond(self, call: Call) -> ApiResponse:
        """Authenticate, replay or run the handler, and answer."""
        try:
            self._authenticate(call.request)
            if call.handler is None:
                raise StripeError(
                    f"Unrecognized request URL ({call.method}: {call.path}). Please see "
                    "https://stripe.com/docs or we can help at https://support.stripe.com/.",
                    status=404,
                )
            if call.form_error is not None:
                raise invalid(str(call.form_error), call.form_error.param)
            key = call.record.idempotency_key if call.method == "POST" else None
            if key:
                replay = self._replay(call, key)
                if replay is not None:
                    return self._finish(call, replay)
            body = call.handler(call.params, call.object_id)
            response = self._json(call, 200, body)
            if key:
                self.state.idempotency[key] = attrs.asdict(
                    _Stored(
                        call.method,
                        call.path,
                        call.params,
                        response.status,
                        response.body.decode(),
                        call.record.request_id,
                    )
                )
            return self._finish(call, response)
        except StripeError as exc:
            return self._finish(call, self._json(call, exc.status, exc.body(), exc.headers))
        except Exception:
            # An emulator bug: answer like Stripe's 500 instead of taking the server down.
            log.exception("sandbox handler failed", extra={"endpoint": call.record.endpoint})
            error = StripeError(
                "An unknown error occurred (sandbox bug).", status=500, type="api_error"
            )
            return self._finish(call, self._json(call, 500, error.body()))

    def fault_response(self, call: Call, fault: Fault) -> ApiResponse:
        """The answer of an injected error: Stripe's shape for that status, unhandled."""
        status = fault.status
        if status == 429:
            error = StripeError(
                fault.message
                or "Too many requests hit the API too quickly. We recommend an exponential "
                "backoff of your requests.",
                status=429,
                type=fault.error_type or "invalid_request_error",
                code="rate_limit",
            )
        elif status == 401:
            error = StripeError(
                fault.message or "Invalid API Key provided.",
                status=401,
                type=fault.error_type or "invalid_request_error",
            )
        elif status >= 500:
            error = StripeError(
                fault.message
                or "An unknown error occurred while processing your request (injected by "
                "the sandbox).",
                status=status,
                type=fault.error_type or "api_error",
            )
        else:
            error = StripeError(
                fault.message or "Injected error.",
                status=status,
                type=fault.error_type or "invalid_request_error",
            )
        call.record.fault = call.record.fault or "error"
        return self._finish(call, self._json(call, status, error.body()))

    def _finish(self, call: Call, response: ApiResponse) -> ApiResponse:
        call.record.status = response.status
        return response

    def _json(
        self, call: Call, status: int, body: Any, extra: Mapping[str, str] | None = None
    ) -> ApiResponse:
        headers = [
            ("content-type", "application/json"),
            ("cache-control", "no-cache, no-store"),
            ("request-id", call.record.request_id),
            ("stripe-version", call.request.headers.get("stripe-version", API_VERSION)),
        ]
        if call.record.idempotency_key and call.method == "POST":
            headers.append(("idempotency-key", call.record.idempotency_key))
        headers.extend((k.lower(), v) for k, v in (extra or {}).items())
        return ApiResponse(status, _json_bytes(body), tuple(headers))

    def _authenticate(self, request: ApiRequest) -> None:
        auth = request.headers.get("authorization", "")
        scheme, _, credentials = auth.partition(" ")
        key = ""
        if scheme.lower() == "bearer":
            key = credentials.strip()
        elif scheme.lower() == "basic":
            try:
                key = base64.b64decode(credentials.strip()).decode().partition(":")[0]
            except (ValueError, UnicodeDecodeError):
                key = ""
        if not key:
            raise StripeError(
                "You did not provide an API key. You need to provide your API key in the "
                "Authorization header, using Bearer auth (e.g. 'Authorization: Bearer "
                "YOUR_SECRET_KEY'). See https://stripe.com/docs/api#authentication for "
                "details, or we can help at https://support.stripe.com/.",
                status=401,
            )
        if not hmac.compare_digest(key.encode(), self.state.secret_key.encode()):
            raise StripeError(f"Invalid API Key provided: {_redact(key)}", status=401)

    def _replay(self, call: Call, key: str) -> ApiResponse | None:
        if len(key) > MAX_IDEMPOTENCY_KEY:
            raise invalid(
                f"Invalid idempotency key: must be at most {MAX_IDEMPOTENCY_KEY} characters",
                None,
            )
        saved: Json | None = self.state.idempotency.get(key)
        if saved is None:
            return None
        stored = _Stored(**saved)
        if (stored.method, stored.path) != (call.method, call.path):
            raise StripeError(
                "Keys for idempotent requests can only be used for the same endpoint they "
                f"were first used for ('{stored.method} {stored.path}' vs "
                f"'{call.method} {call.path}'). Try using a key other than '{key}' if you "
                "meant to execute a different request.",
                type="idempotency_error",
            )
        if stored.params != call.params:
            raise StripeError(
                "Keys for idempotent requests can only be used with the same parameters they "
                f"were first used with. Try using a key other than '{key}' if you meant to "
                "execute a different request.",
                type="idempotency_error",
            )
        call.record.replayed = True
        response = self._json(
            call,
            stored.status,
            None,
            {"idempotent-replayed": "true", "original-request": stored.request_id},
        )
        return attrs.evolve(response, body=stored.body.encode())

    # --- shared validation -----------------------------------------------------------

    def _currency(self, value: str | None, param: str) -> str:
        if not value:
            raise missing(param)
        currency = value.lower()
        if currency not in CURRENCIES:
            raise invalid(
                f"Invalid currency: {value}. Stripe currently supports these currencies: "
                + ", ".join(sorted(CURRENCIES)),
                param,
            )
        return currency

    def _recurring(self, recurring: Json | None, param: str) -> Json | None:
        if recurring is None:
            return None
        interval = recurring.get("interval")
        if not interval:
            raise missing(f"{param}[interval]")
        count = recurring.get("interval_count", 1)
        if count < 1:
            raise invalid(
                "This value must be greater than or equal to 1.", f"{param}[interval_count]"
            )
        if count > _MAX_INTERVAL_COUNT[interval]:
            raise invalid(
                "The maximum billing interval is one year (1 year, 12 months, 52 weeks or "
                "365 days).",
                f"{param}[interval_count]",
            )
        return {**recurring, "interval_count": count}

    def _unit_amount(self, value: int | None, param: str) -> int:
        if value is None:
            raise missing(param)
        if value < 0:
            raise invalid("This value must be greater than or equal to 0.", param)
        if value > 99_999_999:
            raise invalid("This value must be less than or equal to 99999999.", param)
        return value

    def _quantity(self, value: int | None, param: str) -> int:
        if value is None:
            raise missing(param)
        if value < 1:
            raise invalid("This value must be greater than or equal to 1.", param)
        return value

    def _price(self, price_id: str, param: str) -> Json:
        price = self.state.prices.get(price_id)
        if price is None:
            raise no_such("price", price_id, param)
        if not price["active"]:
            raise invalid(
                "The price specified is inactive. This field only accepts active prices.", param
            )
        return price

    def _product_from(self, p: Json, name: Callable[[str], str]) -> Json:
        """The product of a price: ``product`` (existing) or ``product_data`` (new)."""
        if "product" in p and "product_data" in p:
            raise invalid(
                "You may only specify one of these parameters: product, product_data.",
                name("product"),
            )
        if "product" in p:
            product = self.state.products.get(p["product"])
            if product is None:
                raise no_such("product", p["product"], name("product"))
            return product
        data = p.get("product_data")
        if data is None:
            raise invalid(
                "You must specify either `product` or `product_data` when creating a price.",
                name("product"),
            )
        if not data.get("name"):
            raise missing(name("product_data") + "[name]")
        return self.state.create_product(
            {**data, "metadata": _clean_metadata(data.get("metadata"))}
        )

    def _build_price(self, p: Json, param: str) -> tuple[Json, Json]:
        """Validate price params (top level, or nested under ``param``) -> (price, product)."""

        def name(field: str) -> str:
            return f"{param}[{field}]" if param else field

        currency = self._currency(p.get("currency"), name("currency"))
        unit_amount = self._unit_amount(p.get("unit_amount"), name("unit_amount"))
        recurring = self._recurring(p.get("recurring"), name("recurring"))
        product = self._product_from(p, name)
        price = self.state.create_price(
            {
                **p,
                "currency": currency,
                "unit_amount": unit_amount,
                "recurring": recurring,
                "metadata": _clean_metadata(p.get("metadata")),
            },
            product["id"],
        )
        return price, product

    # --- products and prices -----------------------------------------------------------

    def create_product(self, params: Json, _: str) -> Json:
        p = P.coerce(params, PRODUCT_CREATE, "")
        if not p.get("name"):
            raise missing("name")
        product = self.state.create_product({**p, "metadata": _clean_metadata(p.get("metadata"))})
        self.state.products[product["id"]] = product
        return product

    def retrieve_product(self, params: Json, product_id: str) -> Json:
        P.coerce(params, _EXPAND_ONLY, "")
        product = self.state.products.get(product_id)
        if product is None:
            raise no_such("product", product_id)
        return product

    def create_price(self, params: Json, _: str) -> Json:
        p = P.coerce(params, PRICE_CREATE, "")
        created_product = "product_data" in p
        price, product = self._build_price(p, "")
        if created_product:
            self.state.products[product["id"]] = product
        self.state.prices[price["id"]] = price
        return price

    def retrieve_price(self, params: Json, price_id: str) -> Json:
        P.coerce(params, _EXPAND_ONLY, "")
        price = self.state.prices.get(price_id)
        if price is None:
            raise no_such("price", price_id)
        return price

    # --- payment links -------------------------------------------------------------------

    def _after_completion(self, after: Json | None) -> Json | None:
        if after is None:
            return None
        kind = after.get("type")
        if not kind:
            raise missing("after_completion[type]")
        if kind == "redirect" and not (after.get("redirect") or {}).get("url"):
            raise missing("after_completion[redirect][url]")
        return after

    def create_payment_link(self, params: Json, _: str) -> Json:
        p = P.coerce(params, PAYMENT_LINK_CREATE, "")
        lines = p.get("line_items")
        if not lines:
            raise missing("line_items")
        if len(lines) > 20:
            raise invalid("A payment link can have at most 20 line items.", "line_items")
        items = []
        for i, line in enumerate(lines):
            param = f"line_items[{i}]"
            if not line.get("price"):
                raise missing(f"{param}[price]")
            price = self._price(line["price"], f"{param}[price]")
            quantity = self._quantity(line.get("quantity"), f"{param}[quantity]")
            product = self.state.products.get(price["product"], {"name": ""})
            items.append(self.state.line_item(price, quantity, product["name"]))
        if len({item["currency"] for item in items}) > 1:
            raise invalid("All prices on a payment link must have the same currency.", "line_items")
        recurring = [i["price"]["recurring"] for i in items if i["price"]["type"] == "recurring"]
        if len({(r["interval"], r["interval_count"]) for r in recurring}) > 1:
            raise invalid(
                "All recurring prices on a payment link must have the same interval.",
                "line_items",
            )
        if not recurring and "subscription_data" in p:
            raise invalid(
                "`subscription_data` can only be used with recurring prices.", "subscription_data"
            )
        p["after_completion"] = self._after_completion(p.get("after_completion"))
        p["metadata"] = _clean_metadata(p.get("metadata"))
        return self.state.create_payment_link(p, items)

    def _link(self, link_id: str) -> Json:
        link = self.state.payment_links.get(link_id)
        if link is None:
            raise no_such("payment_link", link_id)
        return link

    def retrieve_payment_link(self, params: Json, link_id: str) -> Json:
        P.coerce(params, _EXPAND_ONLY, "")
        return self._link(link_id)

    def update_payment_link(self, params: Json, link_id: str) -> Json:
        p = P.coerce(params, PAYMENT_LINK_UPDATE, "")
        link = self._link(link_id)
        if "after_completion" in p:
            after = self._after_completion(p["after_completion"]) or {}
            link["after_completion"] = {
                "type": after["type"],
                "redirect": after.get("redirect") if after["type"] == "redirect" else None,
                "hosted_confirmation": after.get("hosted_confirmation", {"custom_message": None})
                if after["type"] == "hosted_confirmation"
                else None,
            }
        if "metadata" in p:
            link["metadata"] = _merge_metadata(link["metadata"], p["metadata"])
        for field in ("active", "allow_promotion_codes"):
            if field in p:
                link[field] = p[field]
        return link

    def payment_link_line_items(self, params: Json, link_id: str) -> Json:
        P.coerce(params, {"limit": P.integer, **_EXPAND_ONLY}, "")
        self._link(link_id)
        return self._list(f"/v1/payment_links/{link_id}/line_items", self.state.line_items[link_id])

    # --- checkout sessions ---------------------------------------------------------------

    def _session_item(self, line: Json, param: str) -> Json:
        if "price" in line and "price_data" in line:
            raise invalid(
                "You may only specify one of these parameters: price, price_data.",
                f"{param}[price]",
            )
        quantity = self._quantity(line.get("quantity"), f"{param}[quantity]")
        if "price" in line:
            price = self._price(line["price"], f"{param}[price]")
            product = self.state.products.get(price["product"], {"name": ""})
        elif "price_data" in line:
            price, product = self._build_price(line["price_data"], f"{param}[price_data]")
        else:
            raise invalid(
                "You must specify either `price` or `price_data` for each line item.",
                f"{param}[price]",
            )
        return self.state.line_item(price, quantity, product["name"])

    def create_session(self, params: Json, _: str) -> Json:
        p = P.coerce(params, SESSION_CREATE, "")
        mode = p.get("mode")
        if not mode:
            raise missing("mode")
        if mode == "setup":
            raise invalid("The sandbox does not emulate `setup` mode.", "mode")
        lines = p.get("line_items")
        if not lines:
            raise missing("line_items")
        if "customer" in p and "customer_email" in p:
            raise invalid(
                "You may only specify one of these parameters: customer, customer_email.",
                "customer_email",
            )
        if "customer" in p and p["customer"] not in self.state.customers:
            raise no_such("customer", p["customer"], "customer")
        items = [self._session_item(line, f"line_items[{i}]") for i, line in enumerate(lines)]
        currencies = {item["currency"] for item in items}
        if len(currencies) > 1:
            raise invalid("All line items must have the same currency.", "line_items")
        recurring = [i for i, item in enumerate(items) if item["price"]["type"] == "recurring"]
        if mode == "payment":
            if recurring:
                raise invalid(
                    "You specified `payment` mode but passed a recurring price. Either switch "
                    "to `subscription` mode or use only one-time prices.",
                    f"line_items[{recurring[0]}]",
                )
            if "subscription_data" in p:
                raise invalid(
                    "You can not pass `subscription_data` in `payment` mode.", "subscription_data"
                )
            currency = items[0]["currency"]
            total = sum(item["amount_total"] for item in items)
            minimum = MINIMUM_CHARGE.get(currency, 0)
            if total < minimum:
                shown = str(minimum) if currency in ZERO_DECIMAL else f"{minimum / 100:.2f}"
                raise invalid(
                    "The Checkout Session's total amount due must add up to at least "
                    f"{shown} {currency}",
                    "line_items",
                    code="amount_too_small",
                )
        else:
            if not recurring:
                raise invalid(
                    "You must provide at least one recurring price in `subscription` mode "
                    "when using prices.",
                    "line_items",
                )
            if "payment_intent_data" in p:
                raise invalid(
                    "You can not pass `payment_intent_data` in `subscription` mode.",
                    "payment_intent_data",
                )
        now = self.state.now()
        expires_at = p.get("expires_at")
        if expires_at is not None and not (
            now + 1800 <= expires_at <= now + SESSION_LIFETIME_SECONDS
        ):
            raise invalid(
                "The `expires_at` timestamp must be between 30 minutes and 24 hours from "
                "Checkout Session creation.",
                "expires_at",
            )
        p["metadata"] = _clean_metadata(p.get("metadata"))
        return self.state.create_session(p, items)

    def _session(self, session_id: str) -> Json:
        session = self.state.sessions.get(session_id)
        if session is None:
            raise no_such("checkout.session", session_id, "session")
        return session

    def _with_expand(self, session: Json, params: Json) -> Json:
        if "line_items" in (params.get("expand") or []):
            items = self.state.line_items[session["id"]]
            line_items = self._list(f"/v1/checkout/sessions/{session['id']}/line_items", items)
            return {**session, "line_items": line_items}
        return session

    def retrieve_session(self, params: Json, session_id: str) -> Json:
        p = P.coerce(params, _EXPAND_ONLY, "")
        return self._with_expand(self._session(session_id), p)

    def expire_session(self, params: Json, session_id: str) -> Json:
        p = P.coerce(params, _EXPAND_ONLY, "")
        session = self._session(session_id)
        if session["status"] != "open":
            raise invalid(
                'Only Checkout Sessions with a status in ["open"] can be expired. This '
                f"Checkout Session has a status of {session['status']!r}.",
                "session",
                code="checkout_session_not_open",
            )
        self.state.expire_session(session_id)
        return self._with_expand(session, p)

    def session_line_items(self, params: Json, session_id: str) -> Json:
        P.coerce(params, {"limit": P.integer, **_EXPAND_ONLY}, "")
        self._session(session_id)
        return self._list(
            f"/v1/checkout/sessions/{session_id}/line_items", self.state.line_items[session_id]
        )

    def list_sessions(self, params: Json, _: str) -> Json:
        p = P.coerce(params, SESSION_LIST, "")
        limit = self._limit(p)
        equal = [
            (field, p[field])
            for field in ("payment_link", "status", "subscription", "customer", "payment_intent")
            if field in p
        ]
        created = p.get("created")

        def matches(session: Json) -> bool:
            return all(session[field] == value for field, value in equal) and (
                not created or _created_within(session["created"], created)
            )

        newest_first = reversed(self.state.sessions.values())
        if "starting_after" in p and "ending_before" not in p:
            # Walk from the newest and stop a page past the cursor: paging through a
            # large account (the expirer's listings) costs a page, not the account.
            page = _page_after(newest_first, matches, p["starting_after"], limit)
            if page is None:
                raise no_such("checkout.session", p["starting_after"], "starting_after")
            return self._list("/v1/checkout/sessions", page[:limit], has_more=len(page) > limit)
        sessions = [s for s in newest_first if matches(s)]
        has_more = len(sessions) > limit
        if "starting_after" in p or "ending_before" in p:
            cursor_param = "starting_after" if "starting_after" in p else "ending_before"
            ids = [s["id"] for s in sessions]
            cursor = p[cursor_param]
            if cursor not in ids:
                raise no_such("checkout.session", cursor, cursor_param)
            at = ids.index(cursor)
            if cursor_param == "starting_after":
                sessions = sessions[at + 1 :]
                has_more = len(sessions) > limit
            else:  # the page just before the cursor (newer objects)
                sessions = sessions[max(at - limit, 0) : at]
                has_more = at > limit
        return self._list("/v1/checkout/sessions", sessions[:limit], has_more=has_more)

    # --- subscriptions -------------------------------------------------------------------

    def retrieve_subscription(self, params: Json, subscription_id: str) -> Json:
        P.coerce(params, _EXPAND_ONLY, "")
        subscription = self.state.subscriptions.get(subscription_id)
        if subscription is None:
            raise no_such("subscription", subscription_id)
        return subscription

    def retrieve_invoice(self, params: Json, invoice_id: str) -> Json:
        P.coerce(params, _EXPAND_ONLY, "")
        invoice = self.state.invoices.get(invoice_id)
        if invoice is None:
            raise no_such("invoice", invoice_id)
        return invoice

    def cancel_subscription(self, params: Json, subscription_id: str) -> Json:
        p = P.coerce(params, SUBSCRIPTION_CANCEL, "")
        subscription = self.state.subscriptions.get(subscription_id)
        # Stripe answers a second cancel as if the subscription were gone.
        if subscription is None or subscription["status"] == "canceled":
            raise no_such("subscription", subscription_id)
        details = p.get("cancellation_details", {})
        subscription["cancellation_details"] = {
            "comment": details.get("comment"),
            "feedback": details.get("feedback"),
            "reason": "cancellation_requested",
        }
        return self.state.cancel_subscription(subscription_id)

    def list_invoice_payments(self, params: Json, _: str) -> Json:
        p = P.coerce(params, INVOICE_PAYMENT_LIST, "")
        limit = self._limit(p)
        found = [
            payment
            for payment in reversed(self.state.invoice_payments.values())
            if "invoice" not in p or payment["invoice"] == p["invoice"]
        ]
        return self._list("/v1/invoice_payments", found[:limit], has_more=len(found) > limit)

    # --- money: payment intents, charges, refunds ---------------------------------------

    def retrieve_payment_intent(self, params: Json, intent_id: str) -> Json:
        P.coerce(params, _EXPAND_ONLY, "")
        intent = self.state.payment_intents.get(intent_id)
        if intent is None:
            raise no_such("payment_intent", intent_id, "intent")
        return intent

    def retrieve_charge(self, params: Json, charge_id: str) -> Json:
        P.coerce(params, _EXPAND_ONLY, "")
        charge = self.state.charges.get(charge_id)
        if charge is None:
            raise no_such("charge", charge_id)
        return charge

    def create_refund(self, params: Json, _: str) -> Json:
        p = P.coerce(params, REFUND_CREATE, "")
        amount = p.get("amount")
        if amount is not None and amount < 1:
            raise invalid("Invalid positive integer", "amount", code="parameter_invalid_integer")
        charge = money.charge_for(
            self.state, payment_intent=p.get("payment_intent"), charge=p.get("charge")
        )
        return money.create_refund(
            self.state,
            charge,
            amount=amount,
            reason=p.get("reason"),
            metadata=_clean_metadata(p.get("metadata")),
        )

    def retrieve_refund(self, params: Json, refund_id: str) -> Json:
        P.coerce(params, _EXPAND_ONLY, "")
        refund = self.state.refunds.get(refund_id)
        if refund is None:
            raise no_such("refund", refund_id, "refund")
        return refund

    def list_refunds(self, params: Json, _: str) -> Json:
        p = P.coerce(params, REFUND_LIST, "")
        limit = self._limit(p)
        found = money.refunds_of(
            self.state, payment_intent=p.get("payment_intent", ""), charge=p.get("charge", "")
        )
        return self._list("/v1/refunds", found[:limit], has_more=len(found) > limit)

    # --- helpers ------------------------------------------------------------------------

    @staticmethod
    def _limit(p: Json) -> int:
        limit = int(p.get("limit", 10))
        if not 1 <= limit <= 100:
            raise invalid("This value must be between 1 and 100.", "limit")
        return limit

    @staticmethod
    def _list(url: str, data: list[Json], *, has_more: bool = False) -> Json:
        return {"object": "list", "data": data, "has_more": has_more, "url": url}


_CREATED_BOUNDS = {
    "gt": lambda at, bound: at > bound,
    "gte": lambda at, bound: at >= bound,
    "lt": lambda at, bound: at < bound,
    "lte": lambda at, bound: at <= bound,
}


def _page_after(
    sessions: Iterator[Json], matches: Callable[[Json], bool], cursor: str, limit: int
) -> list[Json] | None:
    """Up to ``limit + 1`` matching sessions after the one with id ``cursor`` (None when
    no matching session has that id)."""
    for session in sessions:
        if session["id"] == cursor:
            if not matches(session):
                return None
            return list(itertools.islice(filter(matches, sessions), limit + 1))
    return None


def _created_within(created: int, bounds: Json) -> bool:
    """Stripe's ``created[gt|gte|lt|lte]`` list filter."""
    return all(
        _CREATED_BOUNDS[name](created, bound) for name, bound in bounds.items() if bound is not None
    )
