"""The emulator's world: Stripe objects, the request log, counters, events and faults.

Everything here is plain, synchronous Python so a test can read or drive it in-process
(``sandbox.state``) between requests without races: trio runs one task at a time and
nothing here awaits. Objects are kept as the JSON dicts the API answers with, so what a
test inspects is exactly what the SDK received.

State changes that Stripe announces with an event (a session completed or expired, a
subscription created or deleted, an invoice paid or failed) go through
:meth:`StripeState.emit`, which records the event and calls the listeners. Webhook
delivery (payments.sandbox.webhooks) is one listener: while ``webhook`` holds a
:class:`WebhookEndpoint`, every event is posted there, and each attempt is appended to
``deliveries``.

Objects live in :class:`Table` dicts that remember which ids a request touched; with a
:class:`~payments.sandbox.store.SandboxStore` attached, :meth:`StripeState.flush`
(called by the server before each answer) writes exactly those, so persistence costs
what the request changed, never the account's size.
"""

from __future__ import annotations

import collections
import copy
import enum
import hashlib
import heapq
import json
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import attrs
import trio

from payments.sandbox import money
from payments.sandbox.ids import new_id
from payments.sandbox.params import SessionStateError

if TYPE_CHECKING:
    from payments.sandbox.store import SandboxStore

API_VERSION = "2026-10-28.endive"
SESSION_LIFETIME_SECONDS = 24 * 3600

# Currencies Stripe presents (lower-case ISO 4217).
_CURRENCY_CODES = """
    usd aed afn all amd ang aoa ars aud awg azn bam bbd bdt bgn bhd bif bmd bnd bob brl
    bsd bwp byn bzd cad cdf chf clp cny cop crc cve czk djf dkk dop dzd egp etb eur fjd fkp
    gbp gel gip gmd gnf gtq gyd hkd hnl htg huf idr ils inr isk jmd jod jpy kes kgs khr kmf
    krw kwd kyd kzt lak lbp lkr lrd lsl mad mdl mga mkd mmk mnt mop mur mvr mwk mxn myr mzn
    nad ngn nio nok npr nzd omr pab pen pgk php pkr pln pyg qar ron rsd rub rwf sar sbd scr
    sek sgd shp sle sos srd std szl thb tjs tnd top try ttd twd tzs uah ugx uyu uzs vnd vuv
    wst xaf xcd xof xpf yer zar zmw
"""
CURRENCIES = frozenset(_CURRENCY_CODES.split())
# Smallest amount a one-time payment may charge, in minor units (Stripe's table).
MINIMUM_CHARGE = {
    "usd": 50, "aed": 200, "aud": 50, "bgn": 100, "brl": 50, "cad": 50, "chf": 50,
    "czk": 1500, "dkk": 250, "eur": 50, "gbp": 30, "hkd": 400, "huf": 17500, "inr": 50,
    "jpy": 50, "mxn": 1000, "myr": 200, "nok": 300, "nzd": 50, "pln": 200, "ron": 200,
    "sek": 300, "sgd": 50, "thb": 1000,
}  # fmt: skip


class FaultKind(enum.StrEnum):
    DELAY = "delay"  # sleep before (or after) handling
    ERROR = "error"  # answer an error status instead of handling
    DROP = "drop"  # close the connection without answering
    HANG = "hang"  # hold the request, unanswered, until the fault is cleared


@attrs.define
class Fault:
    """One injected fault. ``remaining`` None means until cleared."""

    kind: FaultKind
    path_prefix: str = "/v1/"
    method: str | None = None
    remaining: int | None = 1
    seconds: float = 0.0
    after: bool = False  # DELAY: handle first, then hold the answer back
    status: int = 500
    error_type: str | None = None
    message: str | None = None
    hits: int = 0
    # HANG: set when the fault is cleared or removed; the held requests then go on.
    released: trio.Event = attrs.field(factory=trio.Event, eq=False, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self, filter=lambda field, _: field.name != "released")

    def matches(self, method: str, path: str) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return path.startswith(self.path_prefix)


class Faults:
    """Faults a test sets for the next requests: each matching request consumes one use.

    ``times=None`` keeps a fault until :meth:`clear` (or :meth:`remove`). Several faults
    may hit one request: delays add up, then a drop wins over an error.
    """

    def __init__(self) -> None:
        self._faults: list[Fault] = []
        self._hangs: list[Fault] = []  # until released, used up or not

    def add(self, fault: Fault) -> Fault:
        self._faults.append(fault)
        if fault.kind is FaultKind.HANG:
            self._hangs.append(fault)
        return fault

    def hang(
        self, *, path: str = "/v1/", method: str | None = None, times: int | None = None
    ) -> Fault:
        """Hold matching requests unanswered (connection open, no byte back) until
        :meth:`clear` or :meth:`remove`: a Stripe that hangs. Then they are handled."""
        return self.add(Fault(FaultKind.HANG, path, method, times))

    def delay(
        self,
        seconds: float,
        *,
        path: str = "/v1/",
        method: str | None = None,
        times: int | None = 1,
        after: bool = False,
    ) -> Fault:
        """Hold matching requests ``seconds`` before handling them (``after``: handle
        first, so the object exists, then hold the answer: a lost response)."""
        return self.add(Fault(FaultKind.DELAY, path, method, times, seconds=seconds, after=after))

    def fail(
        self,
        status: int = 500,
        *,
        path: str = "/v1/",
        method: str | None = None,
        times: int | None = 1,
        error_type: str | None = None,
        message: str | None = None,
    ) -> Fault:
        """Answer matching requests with a Stripe-shaped error of ``status`` unhandled."""
        return self.add(
            Fault(
                FaultKind.ERROR,
                path,
                method,
                times,
                status=status,
                error_type=error_type,
                message=message,
            )
        )

    def drop(
        self, *, path: str = "/v1/", method: str | None = None, times: int | None = 1
    ) -> Fault:
        """Close the connection of matching requests without an answer (unhandled)."""
        return self.add(Fault(FaultKind.DROP, path, method, times))

    def remove(self, fault: Fault) -> None:
        if fault in self._faults:
            self._faults.remove(fault)
        if fault in self._hangs:
            self._hangs.remove(fault)
            fault.released.set()

    def clear(self) -> None:
        self._faults.clear()
        for fault in self._hangs:
            fault.released.set()
        self._hangs.clear()

    @property
    def active(self) -> list[Fault]:
        return [f for f in self._faults if f.remaining is None or f.remaining > 0]

    def take(self, method: str, path: str) -> list[Fault]:
        """The faults that hit this request, each use consumed."""
        hit = [f for f in self._faults if f.matches(method, path)]
        for fault in hit:
            fault.hits += 1
            if fault.remaining is not None:
                fault.remaining -= 1
        self._faults = [f for f in self._faults if f.remaining is None or f.remaining > 0]
        return hit


@attrs.define
class RequestRecord:
    """One request as the emulator saw it. ``status`` stays None for a dropped one."""

    method: str
    path: str
    endpoint: str  # route template, e.g. "POST /v1/checkout/sessions/{id}/expire"
    params: dict[str, Any]
    idempotency_key: str | None
    at: float
    status: int | None = None
    replayed: bool = False
    fault: str = ""
    request_id: str = ""


@attrs.define
class WebhookEndpoint:
    """Where emitted events go, and how (see payments.sandbox.webhooks).

    ``url`` is the service's provider callback base (``.../webhooks/providers/stripe``):
    the object's ``metadata.callback_hash`` is appended, as the gateway routes each event
    to its payment's URL; a ``{callback_hash}`` placeholder is filled in instead when
    present. ``api_key`` and a fresh ``X-Request-ID`` are the headers a gateway adds;
    ``envelope`` wraps the event as ``{"payload": ..., "signature": ...}``.
    """

    url: str
    secret: str = attrs.field(repr=False)
    api_key: str = attrs.field(default="", repr=False)
    envelope: bool = False
    signature_header: str = "Stripe-Signature"
    # Seconds before each retry: 1 + len(retry_delays) attempts in all (Stripe retries
    # for days; an emulator retries a few times, quickly).
    retry_delays: tuple[float, ...] = (0.05, 0.25, 1.0)
    timeout: float = 5.0


@attrs.define
class DeliveryRecord:
    """One attempt to deliver an event. ``status`` is None when no answer came."""

    event_id: str
    event_type: str
    url: str
    attempt: int
    at: float
    request_id: str = ""
    status: int | None = None
    error: str = ""
    envelope: bool = False

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class Table(dict[str, Any]):
    """Objects of one kind by id, remembering which ids were read or written since the
    last :meth:`StripeState.flush`: every handler reaches an object it changes through
    ``[]``, ``get`` or assignment, so these marks are all a flush needs to write (its
    cost follows the request, not the account's history). Iterating marks nothing:
    listings only read."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.touched: set[str] = set(self)

    def __getitem__(self, key: str) -> Any:
        value = super().__getitem__(key)
        self.touched.add(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default  # noqa: SIM401  (marks it touched)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.touched.add(key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value


def _route(metadata: dict[str, Any] | None) -> str:
    """The callback hash in an object's metadata ("" when none)."""
    return str((metadata or {}).get("callback_hash") or "")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class StripeState:
    """Objects, log and knobs of one emulated Stripe account."""

    def __init__(
        self,
        secret_key: str,
        *,
        base_url: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.secret_key = secret_key
        self.base_url = base_url.rstrip("/")
        self.clock = clock
        # Seconds added to ``clock`` (control API ``POST /clock``): objects made in the
        # past, sessions past their expires_at, without waiting. Kept across reset().
        self.clock_offset = 0.0
        self.faults = Faults()
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.webhook: WebhookEndpoint | None = None  # kept across reset()
        self.store: SandboxStore | None = None  # see attach()
        self.reset()

    def reset(self) -> None:
        """Forget every object, request, event, delivery and fault (keeps key, URL,
        listeners and the webhook endpoint; empties the store when one is attached)."""
        self.products = Table()
        self.prices = Table()
        self.payment_links = Table()
        self.sessions = Table()
        # (expires_at, id) of sessions made open, soonest first: the expiry tick pops
        # what is due instead of scanning every session (bench/README.md, propagation
        # in "How to read it").
        self._expiries: list[tuple[int, str]] = []
        self.subscriptions = Table()
        self.customers = Table()
        self.invoices = Table()
        # line items are not part of the session / link JSON (Stripe needs an expand)
        self.line_items = Table()
        # extra create params kept for later objects (subscription_data of a session/link)
        self.create_params = Table()
        # Idempotency-Key -> the stored answer (payments.sandbox.api keeps its shape)
        self.idempotency = Table()
        # money that moved (payments.sandbox.money)
        self.payment_intents = Table()
        self.charges = Table()
        self.refunds = Table()
        self.invoice_payments = Table()
        # charge id -> the callback hash its payment's events went to (the gateway's map)
        self.callback_routes = Table()
        self.refund_hold = False  # the next refund stays pending (a knob, not persisted)
        self.requests: list[RequestRecord] = []
        self.calls: collections.Counter[str] = collections.Counter()
        self.events: list[dict[str, Any]] = []
        self.deliveries: list[DeliveryRecord] = []
        self.faults.clear()
        self._events_saved = 0
        self._digests: dict[tuple[str, str], bytes] = {}
        if self.store is not None:
            self.store.clear()

    # --- persistence (the embedded profile keeps checkouts payable across restarts) -------

    _PERSISTED = (
        "products",
        "prices",
        "payment_links",
        "sessions",
        "subscriptions",
        "customers",
        "invoices",
        "line_items",
        "create_params",
        "idempotency",
        "payment_intents",
        "charges",
        "refunds",
        "invoice_payments",
        "callback_routes",
    )

    def _tables(self) -> Iterator[tuple[str, Table]]:
        for name in self._PERSISTED:
            yield name, getattr(self, name)

    def snapshot(self) -> dict[str, Any]:
        """The account's objects and events as JSON-ready data (the request log and
        deliveries serve tests, not a restart)."""
        return {**{name: dict(table) for name, table in self._tables()}, "events": self.events}

    def restore(self, data: dict[str, Any]) -> None:
        """Load what :meth:`snapshot` returned (unknown or missing parts are skipped);
        with a store attached, the next :meth:`flush` writes it all."""
        for name, table in self._tables():
            value = data.get(name)
            if isinstance(value, dict):
                table.update(value)
        if isinstance(data.get("events"), list):
            self.events = list(data["events"])
        self._index_expiries()

    def attach(self, store: SandboxStore) -> None:
        """Load the account from ``store`` and write every later change through to it.

        A legacy ``sandbox.json`` snapshot may be :meth:`restore`-d first: the objects
        not yet in the store are written by the flush that ends this call.
        """
        self.store = store
        for kind, key, value in store.objects():
            if kind in self._PERSISTED:
                dict.__setitem__(getattr(self, kind), key, value)
                self._digests[(kind, key)] = _digest(_dumps(value))
        stored_events = store.events()
        self.events = stored_events + self.events
        self._events_saved = len(stored_events)
        self._index_expiries()
        self.flush()

    def flush(self) -> int:
        """Write what changed since the last flush (objects read or written, new
        events) in one transaction; the server calls this before it answers. Returns
        how many rows were written. Without a store it only forgets the marks."""
        if self.store is None:  # in memory only (tests, benchmarks): nothing to write
            for _, table in self._tables():
                table.touched.clear()
            self._events_saved = len(self.events)
            return 0
        rows: list[tuple[str, str, str]] = []
        digests: dict[tuple[str, str], bytes] = {}
        for kind, table in self._tables():
            for key in table.touched:
                if not dict.__contains__(table, key):
                    continue
                text = _dumps(dict.__getitem__(table, key))
                digest = _digest(text)
                if self._digests.get((kind, key)) != digest:
                    rows.append((kind, key, text))
                    digests[(kind, key)] = digest
        events = [_dumps(e) for e in self.events[self._events_saved :]]
        if rows or events:
            self.store.write(rows, events)  # raises: the marks stay for the next flush
        self._digests.update(digests)
        for _, table in self._tables():
            table.touched.clear()
        self._events_saved = len(self.events)
        return len(rows) + len(events)

    def now(self) -> int:
        return int(self.clock() + self.clock_offset)

    def requests_to(self, endpoint: str) -> list[RequestRecord]:
        """Requests to one route, e.g. ``"POST /v1/checkout/sessions"``."""
        return [r for r in self.requests if r.endpoint == endpoint]

    def count(self, endpoint: str) -> int:
        """How many requests reached ``endpoint`` (faulted ones included)."""
        return self.calls[endpoint]

    def events_of(self, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == type_]

    def event(self, event_id: str) -> dict[str, Any]:
        for event in self.events:
            if event["id"] == event_id:
                return event
        raise KeyError(f"no such event: {event_id}")

    def deliveries_of(self, event_id: str) -> list[DeliveryRecord]:
        return [d for d in self.deliveries if d.event_id == event_id]

    def sessions_for_link(self, link_id: str) -> list[dict[str, Any]]:
        return [s for s in self.sessions.values() if s["payment_link"] == link_id]

    # --- events ---------------------------------------------------------------------

    def emit(self, type_: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Record a Stripe event holding a snapshot of ``obj`` and tell the listeners."""
        event = {
            "id": new_id("evt_"),
            "object": "event",
            "api_version": API_VERSION,
            "created": self.now(),
            "data": {"object": copy.deepcopy(obj)},
            "livemode": False,
            "pending_webhooks": len(self.listeners),
            "request": {"id": None, "idempotency_key": None},
            "type": type_,
        }
        self.events.append(event)
        for listener in list(self.listeners):
            listener(event)
        return event

    # --- object construction (used by the API and by the helpers) -------------------

    def create_product(self, params: dict[str, Any]) -> dict[str, Any]:
        now = self.now()
        product = {
            "id": new_id("prod_", 14),
            "object": "product",
            "active": params.get("active", True),
            "created": now,
            "default_price": None,
            "description": params.get("description"),
            "images": [],
            "livemode": False,
            "marketing_features": [],
            "metadata": params.get("metadata", {}),
            "name": params["name"],
            "package_dimensions": None,
            "shippable": None,
            "statement_descriptor": None,
            "tax_code": None,
            "type": "service",
            "unit_label": None,
            "updated": now,
            "url": None,
        }
        return product

    def create_price(self, params: dict[str, Any], product_id: str) -> dict[str, Any]:
        recurring = params.get("recurring")
        unit_amount = params["unit_amount"]
        return {
            "id": new_id("price_"),
            "object": "price",
            "active": params.get("active", True),
            "billing_scheme": "per_unit",
            "created": self.now(),
            "currency": params["currency"].lower(),
            "custom_unit_amount": None,
            "livemode": False,
            "lookup_key": params.get("lookup_key"),
            "metadata": params.get("metadata", {}),
            "nickname": params.get("nickname"),
            "product": product_id,
            "recurring": None
            if recurring is None
            else {
                "interval": recurring["interval"],
                "interval_count": recurring.get("interval_count", 1),
                "meter": None,
                "trial_period_days": None,
                "usage_type": recurring.get("usage_type", "licensed"),
            },
            "tax_behavior": params.get("tax_behavior", "unspecified"),
            "tiers_mode": None,
            "transform_quantity": None,
            "type": "one_time" if recurring is None else "recurring",
            "unit_amount": unit_amount,
            "unit_amount_decimal": str(unit_amount),
        }

    def line_item(self, price: dict[str, Any], quantity: int, description: str) -> dict[str, Any]:
        amount = (price["unit_amount"] or 0) * quantity
        return {
            "id": new_id("li_"),
            "object": "item",
            "amount_discount": 0,
            "amount_subtotal": amount,
            "amount_tax": 0,
            "amount_total": amount,
            "currency": price["currency"],
            "description": description,
            "price": price,
            "quantity": quantity,
        }

    def create_session(
        self,
        params: dict[str, Any],
        items: list[dict[str, Any]],
        *,
        payment_link: str | None = None,
    ) -> dict[str, Any]:
        """A new open Checkout Session over already built line items."""
        now = self.now()
        session_id = new_id("cs_test_", 58)
        total = sum(item["amount_total"] for item in items)
        currency = items[0]["currency"] if items else params.get("currency")
        session = {
            "id": session_id,
            "object": "checkout.session",
            "after_expiration": None,
            "allow_promotion_codes": params.get("allow_promotion_codes"),
            "amount_subtotal": total,
            "amount_total": total,
            "billing_address_collection": None,
            "cancel_url": params.get("cancel_url"),
            "client_reference_id": params.get("client_reference_id"),
            "created": now,
            "currency": currency,
            "customer": params.get("customer"),
            "customer_creation": "if_required" if params["mode"] == "payment" else "always",
            "customer_details": None,
            "customer_email": params.get("customer_email"),
            "expires_at": params.get("expires_at") or now + SESSION_LIFETIME_SECONDS,
            "invoice": None,
            "livemode": False,
            "locale": params.get("locale"),
            "metadata": params.get("metadata", {}),
            "mode": params["mode"],
            "payment_intent": None,
            "payment_link": payment_link,
            "payment_method_types": params.get("payment_method_types", ["card"]),
            "payment_status": "unpaid",
            "status": "open",
            "subscription": None,
            "success_url": params.get("success_url"),
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
            "ui_mode": "hosted",
            "url": f"{self.base_url}/pay/{session_id}",
        }
        self.sessions[session_id] = session
        heapq.heappush(self._expiries, (session["expires_at"], session_id))
        self.line_items[session_id] = items
        self.create_params[session_id] = params
        return session

    def create_payment_link(
        self, params: dict[str, Any], items: list[dict[str, Any]]
    ) -> dict[str, Any]:
        link_id = new_id("plink_")
        after = params.get("after_completion") or {"type": "hosted_confirmation"}
        link = {
            "id": link_id,
            "object": "payment_link",
            "active": params.get("active", True),
            "after_completion": {
                "type": after["type"],
                "redirect": after.get("redirect") if after["type"] == "redirect" else None,
                "hosted_confirmation": after.get("hosted_confirmation", {"custom_message": None})
                if after["type"] == "hosted_confirmation"
                else None,
            },
            "allow_promotion_codes": params.get("allow_promotion_codes", False),
            "billing_address_collection": "auto",
            "currency": items[0]["currency"],
            "livemode": False,
            "metadata": params.get("metadata", {}),
            "payment_method_types": None,
            "restrictions": params.get("restrictions"),
            "url": f"{self.base_url}/pay/{link_id}",
        }
        self.payment_links[link_id] = link
        self.line_items[link_id] = items
        self.create_params[link_id] = params
        return link

    # --- helpers a test (or the later checkout page) uses to move things on ---------

    def _session(self, session_id: str) -> dict[str, Any]:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise KeyError(f"no such checkout session: {session_id}") from None

    def complete_session(self, session_id: str, *, payment_status: str = "paid") -> dict[str, Any]:
        """The customer paid: status complete (a subscription is started in that mode).

        ``payment_status="unpaid"`` models a delayed method (the money comes later:
        follow with :meth:`succeed_async_payment` or :meth:`fail_session`).
        """
        session = self._session(session_id)
        if session["status"] != "open":
            raise SessionStateError(f"session {session_id} is {session['status']}, not open")
        if session["amount_total"] == 0 and payment_status == "paid":
            payment_status = "no_payment_required"
        customer = self._customer_for(session)
        session.update(
            status="complete",
            payment_status=payment_status,
            customer=customer["id"],
            customer_details={"email": customer["email"], "name": None},
            url=None,
        )
        if session["mode"] == "payment":
            data = self.create_params.get(session_id, {}).get("payment_intent_data", {})
            intent = money.open_intent(
                self,
                session["amount_total"],
                session["currency"],
                customer=customer["id"],
                metadata=data.get("metadata", {}),
            )
            session["payment_intent"] = intent["id"]
            if payment_status == "paid":
                money.capture(self, intent["id"], route=_route(session.get("metadata")))
        if session["mode"] == "subscription":
            subscription = self._start_subscription(session, customer["id"])
            session["subscription"] = subscription["id"]
            session["invoice"] = subscription["latest_invoice"]
        self.emit("checkout.session.completed", session)
        if session["mode"] == "subscription":
            self._announce_first_invoice(session)
        self._apply_link_limit(session.get("payment_link"))
        return session

    def _announce_first_invoice(self, session: dict[str, Any]) -> None:
        """The events Stripe sends after a subscription checkout, in the order a
        Checkout subscription showed them at Stripe: ``invoice.created`` (a draft),
        ``invoice.finalized``, ``customer.subscription.created``, then, when the money
        came with the checkout, ``invoice.paid`` and ``invoice.payment_succeeded``.
        Stripe promises no delivery order, and the sender posts each event on its own
        task, so a receiver must cope with any order anyway."""
        invoice = self.invoices[session["invoice"]]
        self.emit("invoice.created", {**invoice, "status": "draft"})
        self.emit("invoice.finalized", invoice)
        self.emit("customer.subscription.created", self.subscriptions[session["subscription"]])
        if session["payment_status"] != "unpaid":
            self._settle(invoice)
            self.emit("invoice.paid", invoice)
            self.emit("invoice.payment_succeeded", invoice)

    def _apply_link_limit(self, link_id: str | None) -> None:
        """Stripe deactivates a link once ``restrictions.completed_sessions.limit``
        sessions of it completed: it cannot be paid again."""
        link = self.payment_links.get(link_id or "")
        limit = ((link or {}).get("restrictions") or {}).get("completed_sessions", {})
        if link is None or not limit:
            return
        completed = sum(
            1
            for s in self.sessions.values()
            if s.get("payment_link") == link_id and s["status"] == "complete"
        )
        if completed >= int(limit.get("limit", 0)):
            link["active"] = False

    def succeed_async_payment(self, session_id: str) -> dict[str, Any]:
        """A delayed payment of a completed session arrived."""
        session = self._session(session_id)
        if session["status"] != "complete" or session["payment_status"] != "unpaid":
            raise SessionStateError(f"session {session_id} has no payment pending")
        session["payment_status"] = "paid"
        if session["payment_intent"]:
            money.capture(self, session["payment_intent"], route=_route(session.get("metadata")))
        self.emit("checkout.session.async_payment_succeeded", session)
        return session

    def fail_session(self, session_id: str) -> dict[str, Any]:
        """The payment failed: an open session is completed unpaid (a delayed method),
        then its payment fails, as Stripe reports it."""
        session = self._session(session_id)
        if session["status"] == "open":
            self.complete_session(session_id, payment_status="unpaid")
        elif session["status"] != "complete" or session["payment_status"] != "unpaid":
            raise SessionStateError(f"session {session_id} has no payment pending")
        if session["payment_intent"]:
            money.fail_intent(self, session["payment_intent"])
        self.emit("checkout.session.async_payment_failed", session)
        return session

    def pay_session(self, session_id: str) -> dict[str, Any]:
        """What the hosted page's Pay does: the session completes paid (in
        subscription mode with the first invoice's events, see complete_session)."""
        return self.complete_session(session_id)

    def decline_session(self, session_id: str) -> dict[str, Any]:
        """What the hosted page's Decline does: the payment fails, for good.

        Stripe keeps a card session open after a decline and lets the customer try
        another card; it announces no session-level failure then. The sandbox instead
        ends the attempt the way Stripe reports a failed payment on a session:
        completed unpaid, then ``checkout.session.async_payment_failed`` (and, in
        subscription mode, ``invoice.payment_failed`` for the first invoice). The
        service maps both to FAILED, and the session can no longer be paid.
        """
        session = self.fail_session(session_id)
        if session["mode"] == "subscription" and session["subscription"]:
            self.fail_invoice(session["subscription"])
        return session

    def payment_failed(self, session_id: str) -> bool:
        """Whether the session's payment was announced as failed."""
        return any(
            event["data"]["object"]["id"] == session_id
            for event in self.events_of("checkout.session.async_payment_failed")
        )

    def expire_session(self, session_id: str) -> dict[str, Any]:
        """The session expired (as after ``expires_at``, or the expire endpoint)."""
        session = self._session(session_id)
        if session["status"] != "open":
            raise SessionStateError(f"session {session_id} is {session['status']}, not open")
        session.update(status="expired", url=None)
        self.emit("checkout.session.expired", session)
        return session

    def expire_due_sessions(self) -> list[dict[str, Any]]:
        """Expire every open session whose ``expires_at`` has passed on ``clock``."""
        now = self.now()
        due: list[str] = []
        while self._expiries and self._expiries[0][0] <= now:
            _, session_id = heapq.heappop(self._expiries)
            session = dict.get(self.sessions, session_id)  # not a touch: most are closed
            if session is None or session["status"] != "open":
                continue
            if session["expires_at"] <= now:
                due.append(session_id)
            else:  # moved later since it was pushed: due then
                heapq.heappush(self._expiries, (session["expires_at"], session_id))
        return [self.expire_session(session_id) for session_id in due]

    def age_session(self, session_id: str, seconds: int) -> None:
        """Move a session's ``created`` and ``expires_at`` ``seconds`` into the past (tests
        make old sessions without waiting)."""
        session = self._session(session_id)
        session["created"] -= seconds
        session["expires_at"] -= seconds
        heapq.heappush(self._expiries, (session["expires_at"], session_id))

    def _index_expiries(self) -> None:
        """Every open session in the expiry heap (after a load or a restore)."""
        self._expiries = [
            (s["expires_at"], s["id"]) for s in self.sessions.values() if s["status"] == "open"
        ]
        heapq.heapify(self._expiries)

    def open_payment_link(self, link_id: str) -> dict[str, Any]:
        """A customer opened the link: a new open session for it, as Stripe makes one."""
        link = self.payment_links[link_id]
        if not link["active"]:
            raise SessionStateError(f"payment link {link_id} is not active")
        items = [
            self.line_item(item["price"], item["quantity"], item["description"])
            for item in self.line_items[link_id]
        ]
        recurring = any(item["price"]["type"] == "recurring" for item in items)
        link_params = self.create_params.get(link_id, {})
        params: dict[str, Any] = {
            "mode": "subscription" if recurring else "payment",
            # Stripe copies a link's metadata onto the sessions it opens.
            "metadata": dict(link["metadata"]),
            "subscription_data": link_params.get("subscription_data", {}),
            "payment_intent_data": link_params.get("payment_intent_data", {}),
        }
        after = link["after_completion"]
        if after["type"] == "redirect":
            params["success_url"] = after["redirect"]["url"]
        return self.create_session(params, items, payment_link=link_id)

    def pay_payment_link(self, link_id: str, *, payment_status: str = "paid") -> dict[str, Any]:
        """A customer paid through the link: a completed session for it."""
        session = self.open_payment_link(link_id)
        return self.complete_session(session["id"], payment_status=payment_status)

    def cancel_subscription(self, subscription_id: str) -> dict[str, Any]:
        subscription = self._subscription(subscription_id)
        if subscription["status"] == "canceled":
            raise SessionStateError(f"subscription {subscription_id} is already canceled")
        now = self.now()
        subscription.update(status="canceled", canceled_at=now, ended_at=now)
        self.emit("customer.subscription.deleted", subscription)
        return subscription

    def _customer_for(self, session: dict[str, Any]) -> dict[str, Any]:
        if session["customer"] and session["customer"] in self.customers:
            return self.customers[session["customer"]]
        customer = {
            "id": new_id("cus_", 14),
            "object": "customer",
            "created": self.now(),
            "email": session["customer_email"] or "customer@example.com",
            "livemode": False,
            "metadata": {},
        }
        self.customers[customer["id"]] = customer
        return customer

    def _start_subscription(self, session: dict[str, Any], customer_id: str) -> dict[str, Any]:
        now = self.now()
        sub_id = new_id("sub_")
        items = [
            {
                "id": new_id("si_", 14),
                "object": "subscription_item",
                "created": now,
                "metadata": {},
                "price": item["price"],
                "quantity": item["quantity"],
                "subscription": sub_id,
            }
            for item in self.line_items[session["id"]]
            if item["price"]["type"] == "recurring"
        ]
        recurring = items[0]["price"]["recurring"]
        period = {"day": 86400, "week": 7 * 86400, "month": 30 * 86400, "year": 365 * 86400}
        period_end = now + period[recurring["interval"]] * recurring["interval_count"]
        for item in items:
            item.update(current_period_start=now, current_period_end=period_end)
        data = self.create_params.get(session["id"], {}).get("subscription_data", {})
        subscription = {
            "id": sub_id,
            "object": "subscription",
            "cancel_at": None,
            "cancel_at_period_end": False,
            "canceled_at": None,
            "collection_method": "charge_automatically",
            "created": now,
            "currency": session["currency"],
            "customer": customer_id,
            "description": data.get("description"),
            "ended_at": None,
            "items": {
                "object": "list",
                "data": items,
                "has_more": False,
                "url": f"/v1/subscription_items?subscription={sub_id}",
            },
            "latest_invoice": None,
            "livemode": False,
            "metadata": data.get("metadata", {}),
            "start_date": now,
            "status": "active" if session["payment_status"] != "unpaid" else "incomplete",
        }
        self.subscriptions[sub_id] = subscription
        self._new_invoice(subscription, "subscription_create")  # settled by the caller
        return subscription

    # --- invoices (subscriptions) ----------------------------------------------------

    def _subscription(self, subscription_id: str) -> dict[str, Any]:
        try:
            return self.subscriptions[subscription_id]
        except KeyError:
            raise KeyError(f"no such subscription: {subscription_id}") from None

    def _new_invoice(self, subscription: dict[str, Any], billing_reason: str) -> dict[str, Any]:
        """An open invoice for the subscription's items (current API shape: the
        subscription and its metadata under ``parent.subscription_details``)."""
        now = self.now()
        invoice_id = new_id("in_")
        sub_id = subscription["id"]
        lines = []
        for item in subscription["items"]["data"]:
            price = item["price"]
            amount = (price["unit_amount"] or 0) * item["quantity"]
            lines.append(
                {
                    "id": new_id("il_"),
                    "object": "line_item",
                    "amount": amount,
                    "currency": price["currency"],
                    "description": None,
                    "invoice": invoice_id,
                    "livemode": False,
                    "metadata": dict(subscription["metadata"]),
                    "parent": {
                        "invoice_item_details": None,
                        "subscription_item_details": {
                            "invoice_item": None,
                            "proration": False,
                            "proration_details": {"credited_items": None},
                            "subscription": sub_id,
                            "subscription_item": item["id"],
                        },
                        "type": "subscription_item_details",
                    },
                    "period": {
                        "start": item["current_period_start"],
                        "end": item["current_period_end"],
                    },
                    "pricing": {
                        "price_details": {"price": price["id"], "product": price["product"]},
                        "type": "price_details",
                        "unit_amount_decimal": price["unit_amount_decimal"],
                    },
                    "quantity": item["quantity"],
                }
            )
        total = sum(line["amount"] for line in lines)
        invoice = {
            "id": invoice_id,
            "object": "invoice",
            "amount_due": total,
            "amount_paid": 0,
            "amount_remaining": total,
            "attempt_count": 0,
            "attempted": False,
            "billing_reason": billing_reason,
            "collection_method": "charge_automatically",
            "created": now,
            "currency": subscription["currency"],
            "customer": subscription["customer"],
            "lines": {
                "object": "list",
                "data": lines,
                "has_more": False,
                "url": f"/v1/invoices/{invoice_id}/lines",
            },
            "livemode": False,
            "metadata": {},
            "parent": {
                "quote_details": None,
                "subscription_details": {
                    "metadata": dict(subscription["metadata"]),
                    "subscription": sub_id,
                },
                "type": "subscription_details",
            },
            "period_start": now,
            "period_end": now,
            "status": "open",
            "status_transitions": {
                "finalized_at": now,
                "marked_uncollectible_at": None,
                "paid_at": None,
                "voided_at": None,
            },
            "total": total,
        }
        self.invoices[invoice_id] = invoice
        subscription["latest_invoice"] = invoice_id
        return invoice

    def _settle(self, invoice: dict[str, Any]) -> None:
        invoice.update(
            status="paid",
            amount_paid=invoice["amount_due"],
            amount_remaining=0,
            attempted=True,
            attempt_count=invoice["attempt_count"] + 1,
        )
        invoice["status_transitions"]["paid_at"] = self.now()
        if invoice["amount_paid"] <= 0:
            return
        details = invoice["parent"]["subscription_details"]
        intent = money.pay(
            self,
            invoice["amount_paid"],
            invoice["currency"],
            customer=invoice["customer"],
            metadata={},
            route=_route(details.get("metadata")),
        )
        payment = {
            "id": new_id("inpay_"),
            "object": "invoice_payment",
            "amount_paid": invoice["amount_paid"],
            "amount_requested": invoice["amount_due"],
            "created": self.now(),
            "currency": invoice["currency"],
            "invoice": invoice["id"],
            "is_default": True,
            "livemode": False,
            "payment": {"type": "payment_intent", "payment_intent": intent["id"]},
            "status": "paid",
            "status_transitions": {"canceled_at": None, "paid_at": self.now()},
        }
        self.invoice_payments[payment["id"]] = payment

    def _open_invoice(self, subscription_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """The subscription and its latest invoice if still open, else a new renewal."""
        subscription = self._subscription(subscription_id)
        if subscription["status"] == "canceled":
            raise SessionStateError(f"subscription {subscription_id} is canceled")
        latest = self.invoices.get(subscription["latest_invoice"] or "")
        if latest is None or latest["status"] != "open":
            latest = self._new_invoice(subscription, "subscription_cycle")
        return subscription, latest

    def pay_invoice(self, subscription_id: str) -> dict[str, Any]:
        """The subscription's open invoice (or its next renewal) is paid: ``invoice.paid``."""
        subscription, invoice = self._open_invoice(subscription_id)
        self._settle(invoice)
        subscription["status"] = "active"
        self.emit("invoice.paid", invoice)
        return invoice

    def fail_invoice(self, subscription_id: str) -> dict[str, Any]:
        """A payment attempt of the open invoice (or the next renewal) failed:
        ``invoice.payment_failed``; the subscription is past due (incomplete if it never
        was paid)."""
        subscription, invoice = self._open_invoice(subscription_id)
        invoice.update(attempted=True, attempt_count=invoice["attempt_count"] + 1)
        subscription["status"] = "past_due" if subscription["status"] == "active" else "incomplete"
        self.emit("invoice.payment_failed", invoice)
        return invoice
