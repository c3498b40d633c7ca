"""Money that moved: PaymentIntents, their Charges, and Refunds of those charges.

A paid Checkout Session (payment mode) and a paid invoice each leave a succeeded
PaymentIntent with one succeeded Charge, as at Stripe; a refund names either and
returns part or all of the charge. The rules are Stripe's: several partial refunds,
their total at most the charge (pending refunds count, failed ones give the amount
back), ``amount_too_large`` past what is left and ``charge_already_refunded`` when
nothing is. Events: ``refund.created`` on creation; ``charge.refunded`` when money is
returned (at once, or when a pending refund succeeds); ``refund.updated`` on every
later status change and ``refund.failed`` when one fails.

``state.refund_hold`` (the dashboard's and the control API's switch) makes the next
refund stay ``pending`` until :func:`settle_refund` succeeds or fails it.

Functions over a :class:`~payments.sandbox.state.StripeState` rather than methods on
it, to keep that class about objects and events in general.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from payments.sandbox.ids import new_id
from payments.sandbox.params import ZERO_DECIMAL, SessionStateError, StripeError, invalid, no_such

if TYPE_CHECKING:
    from payments.sandbox.state import StripeState

Json = dict[str, Any]
REFUND_REASONS = ("duplicate", "fraudulent", "requested_by_customer")
REFUND_FAILURE_REASONS = (
    "expired_or_canceled_card",
    "lost_or_stolen_card",
    "declined",
    "insufficient_funds",
    "merchant_request",
    "unknown",
)
# Statuses whose amount is out of the charge: pending money may still leave.
_HOLDING = ("pending", "requires_action", "succeeded")


def open_intent(
    state: StripeState, amount: int, currency: str, *, customer: str | None, metadata: Json
) -> Json:
    """A PaymentIntent waiting for its money (a delayed method): ``processing``."""
    intent = {
        "id": new_id("pi_"),
        "object": "payment_intent",
        "amount": amount,
        "amount_received": 0,
        "created": state.now(),
        "currency": currency,
        "customer": customer,
        "description": None,
        "latest_charge": None,
        "livemode": False,
        "metadata": dict(metadata),
        "status": "processing",
    }
    state.payment_intents[intent["id"]] = intent
    return intent


def capture(state: StripeState, intent_id: str, *, route: str = "") -> Json:
    """The intent's money arrived: a succeeded Charge (carrying the intent's metadata,
    as Stripe copies it). ``route`` is the callback hash the emulator's gateway uses for
    the charge's and its refunds' events when their own metadata has none."""
    intent = state.payment_intents[intent_id]
    charge = {
        "id": new_id("ch_"),
        "object": "charge",
        "amount": intent["amount"],
        "amount_captured": intent["amount"],
        "amount_refunded": 0,
        "captured": True,
        "created": state.now(),
        "currency": intent["currency"],
        "customer": intent["customer"],
        "description": intent["description"],
        "livemode": False,
        "metadata": dict(intent["metadata"]),
        "paid": True,
        "payment_intent": intent_id,
        "refunded": False,
        "refunds": _refund_list([], ""),
        "status": "succeeded",
    }
    charge["refunds"]["url"] = f"/v1/charges/{charge['id']}/refunds"
    state.charges[charge["id"]] = charge
    intent.update(status="succeeded", amount_received=intent["amount"], latest_charge=charge["id"])
    if route:
        state.callback_routes[charge["id"]] = route
    return intent


def fail_intent(state: StripeState, intent_id: str) -> None:
    """The delayed payment failed: Stripe asks for another payment method."""
    state.payment_intents[intent_id]["status"] = "requires_payment_method"


def pay(
    state: StripeState,
    amount: int,
    currency: str,
    *,
    customer: str | None,
    metadata: Json,
    route: str,
) -> Json:
    """A payment made at once: a succeeded PaymentIntent and its Charge."""
    intent = open_intent(state, amount, currency, customer=customer, metadata=metadata)
    return capture(state, intent["id"], route=route)


# --- refunds -------------------------------------------------------------------------


def _refund_list(data: list[Json], url: str) -> Json:
    return {"object": "list", "data": data, "has_more": False, "total_count": len(data), "url": url}


def _money(amount: int, currency: str) -> str:
    symbol = {"usd": "$", "eur": "€", "gbp": "£"}.get(currency, currency.upper() + " ")
    if currency in ZERO_DECIMAL:
        return f"{symbol}{amount}"
    return f"{symbol}{amount // 100}.{amount % 100:02d}"


def charge_for(state: StripeState, *, payment_intent: str | None, charge: str | None) -> Json:
    """The charge a refund names (directly, or as the intent's latest charge)."""
    if charge:
        found = state.charges.get(charge)
        if found is None:
            raise no_such("charge", charge, "charge")
        if payment_intent and found["payment_intent"] != payment_intent:
            raise invalid(
                f"The charge {charge} does not belong to the PaymentIntent {payment_intent}.",
                "charge",
            )
        return found
    if not payment_intent:
        raise invalid("One of `charge` or `payment_intent` is required.", None)
    intent = state.payment_intents.get(payment_intent)
    if intent is None:
        raise no_such("payment_intent", payment_intent, "payment_intent")
    if intent["latest_charge"] is None or intent["status"] != "succeeded":
        raise invalid(
            f"This PaymentIntent ({payment_intent}) does not have a successful charge to refund.",
            "payment_intent",
        )
    return state.charges[intent["latest_charge"]]


def create_refund(
    state: StripeState,
    charge: Json,
    *,
    amount: int | None = None,
    reason: str | None = None,
    metadata: Json | None = None,
) -> Json:
    """Refund ``amount`` (default: all that is left) of ``charge``, or raise Stripe's
    error; announces ``refund.created`` (and ``charge.refunded`` unless held)."""
    left = charge["amount"] - charge["amount_refunded"]
    if left <= 0:
        raise StripeError(
            f"Charge {charge['id']} has already been refunded.", code="charge_already_refunded"
        )
    amount = left if amount is None else amount
    if amount > left:
        raise StripeError(
            f"Refund amount ({_money(amount, charge['currency'])}) is greater than unrefunded "
            f"amount on charge ({_money(left, charge['currency'])})",
            param="amount",
            code="amount_too_large",
        )
    held, state.refund_hold = state.refund_hold, False
    refund = {
        "id": new_id("re_"),
        "object": "refund",
        "amount": amount,
        "balance_transaction": None,
        "charge": charge["id"],
        "created": state.now(),
        "currency": charge["currency"],
        "destination_details": None,
        "failure_reason": None,
        "metadata": dict(metadata or {}),
        "payment_intent": charge["payment_intent"],
        "reason": reason,
        "receipt_number": None,
        "source_transfer_reversal": None,
        "status": "pending" if held else "succeeded",
        "transfer_reversal": None,
    }
    state.refunds[refund["id"]] = refund
    _account(state, charge, refund)
    state.emit("refund.created", refund)
    if not held:
        state.emit("charge.refunded", charge)
    return refund


def settle_refund(state: StripeState, refund_id: str, *, succeed: bool, reason: str = "") -> Json:
    """A pending refund's outcome: ``refund.updated`` and then ``charge.refunded`` (it
    succeeded) or ``refund.failed`` (it failed: the amount is refundable again)."""
    refund = state.refunds.get(refund_id)
    if refund is None:
        raise KeyError(f"no such refund: {refund_id}")
    if refund["status"] != "pending":
        raise SessionStateError(f"refund {refund_id} is {refund['status']}, not pending")
    if succeed:
        refund["status"] = "succeeded"
    else:
        reason = reason or REFUND_FAILURE_REASONS[0]
        if reason not in REFUND_FAILURE_REASONS:
            raise ValueError(f"failure_reason must be one of {', '.join(REFUND_FAILURE_REASONS)}")
        refund.update(status="failed", failure_reason=reason)
    charge = state.charges[refund["charge"]]
    _account(state, charge)
    state.emit("refund.updated", refund)
    state.emit("charge.refunded" if succeed else "refund.failed", charge if succeed else refund)
    return refund


def _account(state: StripeState, charge: Json, new: Json | None = None) -> None:
    """Recompute the charge's refunded amount and its list of refunds (newest first)."""
    ids = [r["id"] for r in charge["refunds"]["data"]]
    if new is not None:
        ids.insert(0, new["id"])
    mine = [state.refunds[refund_id] for refund_id in ids]
    charge["amount_refunded"] = sum(r["amount"] for r in mine if r["status"] in _HOLDING)
    charge["refunded"] = charge["amount_refunded"] >= charge["amount"]
    charge["refunds"] = _refund_list(mine, f"/v1/charges/{charge['id']}/refunds")


def refunds_of(state: StripeState, *, payment_intent: str = "", charge: str = "") -> list[Json]:
    """Refunds, newest first, optionally of one intent or charge (Stripe's list filters)."""
    found = [
        r
        for r in state.refunds.values()
        if (not payment_intent or r["payment_intent"] == payment_intent)
        and (not charge or r["charge"] == charge)
    ]
    return list(reversed(found))


def route_of(state: StripeState, obj: Json) -> str:
    """The callback hash of the payment a charge or refund belongs to ("" if none)."""
    charge_id = obj.get("charge") if obj.get("object") == "refund" else obj.get("id")
    return str(state.callback_routes.get(charge_id or "", ""))
