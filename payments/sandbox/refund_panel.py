"""The dashboard's payments-and-refunds panel: refund "on the Stripe side" by hand.

Rendered into ``/_sandbox/dashboard`` (payments.sandbox.pages) and answering its forms::

    POST /_sandbox/dashboard/refunds                  charge=ch_..&amount=  a refund
    POST /_sandbox/dashboard/refunds/hold             hold=on|off  the next one stays pending
    POST /_sandbox/dashboard/refunds/{re_..}/succeed  a pending refund succeeds
    POST /_sandbox/dashboard/refunds/{re_..}/fail     a pending refund fails

Each answers 303 back to the dashboard (a reload never refunds twice) or a page naming
what was refused. Same access rule as the dashboard itself (pages.CheckoutPages checks
it before calling here). The control API (payments.sandbox.control) offers the same
moves to tests.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from html import escape
from typing import Any
from urllib.parse import parse_qs

from payments.sandbox import money
from payments.sandbox.params import SessionStateError, StripeError
from payments.sandbox.state import StripeState

PREFIX = "/_sandbox/dashboard/refunds"
ROWS = 200


def _form(body: bytes) -> dict[str, str]:
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {key: values[-1].strip() for key, values in fields.items()}


class RefundPanel:
    """Charges with their refunds, and the forms that move them."""

    def __init__(
        self,
        state: StripeState,
        *,
        amount: Callable[[int, str], str],
        when: Callable[[int], str],
    ) -> None:
        self.state = state
        self._amount = amount
        self._when = when

    @staticmethod
    def serves(path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    def act(self, path: str, body: bytes) -> str:
        """Do what the form asks; the error text to show, or "" when done."""
        parts = [p for p in path[len(PREFIX) :].split("/") if p]
        form = _form(body)
        try:
            match parts:
                case []:
                    amount = int(form["amount"]) if form.get("amount") else None
                    if amount is not None and amount < 1:
                        return "The amount must be a positive number of minor units."
                    charge = money.charge_for(
                        self.state, payment_intent=None, charge=form["charge"]
                    )
                    money.create_refund(self.state, charge, amount=amount, reason=None)
                case ["hold"]:
                    self.state.refund_hold = form.get("hold") == "on"
                case [refund_id, "succeed" | "fail" as outcome]:
                    money.settle_refund(self.state, refund_id, succeed=outcome == "succeed")
                case _:
                    return "There is no such refund action."
        except StripeError as exc:
            return exc.message
        except (KeyError, ValueError, SessionStateError) as exc:
            return str(exc).strip("'\"") or "The form is incomplete."
        return ""

    def render(self) -> str:
        state = self.state
        charges = list(reversed(state.charges.values()))[:ROWS]
        rows = "".join(self._charge_row(c) for c in charges)
        hold = "on" if state.refund_hold else "off"
        flip = "off" if state.refund_hold else "on"
        return (
            "<h2>Payments and refunds</h2>"
            f'<form method="post" action="{PREFIX}/hold" id="refund-hold">'
            f"<p>Hold the next refund pending: <strong>{hold}</strong> "
            f'<input type="hidden" name="hold" value="{flip}">'
            f"<button>Turn {flip}</button></p></form>"
            '<div class="scroll"><table id="charges"><thead><tr>'
            "<th>Created</th><th>Charge</th><th>PaymentIntent</th><th>Amount</th>"
            "<th>Refunded</th><th>Refunds</th><th>Refund</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></div>"
        )

    def _charge_row(self, charge: Mapping[str, Any]) -> str:
        currency = charge["currency"]
        refunds = "".join(self._refund_item(r, currency) for r in charge["refunds"]["data"])
        form = (
            ""
            if charge["refunded"]
            else f'<form method="post" action="{PREFIX}">'
            f'<input type="hidden" name="charge" value="{escape(charge["id"])}">'
            '<input name="amount" size="8" placeholder="all" inputmode="numeric">'
            "<button>Refund</button></form>"
        )
        return (
            "<tr>"
            f'<td class="when">{escape(self._when(charge["created"]))}</td>'
            f"<td><code>{escape(charge['id'])}</code></td>"
            f"<td><code>{escape(charge['payment_intent'] or '')}</code></td>"
            f"<td>{escape(self._amount(charge['amount'], currency))}</td>"
            f"<td>{escape(self._amount(charge['amount_refunded'], currency))}</td>"
            f"<td><ul>{refunds}</ul></td><td>{form}</td>"
            "</tr>"
        )

    def _refund_item(self, refund: Mapping[str, Any], currency: str) -> str:
        refund_id = escape(refund["id"])
        buttons = ""
        if refund["status"] == "pending":
            buttons = "".join(
                f'<form method="post" action="{PREFIX}/{refund_id}/{outcome}" '
                f'style="display:inline"><button>{label}</button></form>'
                for outcome, label in (("succeed", "Succeed"), ("fail", "Fail"))
            )
        return (
            f"<li><code>{refund_id}</code> {escape(self._amount(refund['amount'], currency))} "
            f"{escape(refund['status'])} {buttons}</li>"
        )
