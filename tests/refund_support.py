"""Helpers of the refund tests: a service over a database and the Stripe emulator, and
payments PAID the way Stripe pays them (a completed checkout with its PaymentIntent)."""

from __future__ import annotations

import uuid
from typing import Any

import attrs

from payments.model import (
    Caller,
    CreatePaymentInput,
    CreateRefundInput,
    Payment,
    PaymentMethod,
    PaymentStatus,
    PaymentType,
    ProviderType,
    Refund,
)
from payments.providers.registry import ProviderRegistry
from payments.providers.stripe import StripeProvider
from payments.sandbox import Sandbox
from payments.service import PaymentService
from payments.storage import refunds as store
from payments.storage import repository as repo
from payments.storage.database import Database
from payments.unit_of_work import UnitOfWork
from payments.validation import validate_create, validate_refund

CALLER = Caller("svc-a")


@attrs.define
class RefundEnv:
    """The service on ``database`` with the emulator as Stripe; ``terminal`` lists the
    payments whose callback the unit of work announced."""

    database: Database
    sandbox: Sandbox
    service: PaymentService
    uow: UnitOfWork
    terminal: list[Payment]
    provider: StripeProvider

    @classmethod
    def over(cls, database: Database, sandbox: Sandbox, provider: StripeProvider) -> RefundEnv:
        registry = ProviderRegistry({ProviderType.STRIPE: provider})
        terminal: list[Payment] = []
        uow = UnitOfWork(database, on_terminal=terminal.append)
        service = PaymentService(uow, registry, "https://payments.test/webhooks/providers/stripe")
        return cls(database, sandbox, service, uow, terminal, provider)

    async def paid(self, caller: Caller = CALLER, **changes: Any) -> Payment:
        """A payment made through the service and paid at the emulator, then PAID."""
        fields: dict[str, Any] = {
            "request_id": f"pay-{uuid.uuid4().hex[:12]}",
            "caller_service": caller.service_name,
            "resource_type": "order",
            "resource_id": "1042",
            "amount_cents": 1000,
            "currency": "usd",
            "payment_method": int(PaymentMethod.HOSTED_CARD),
            "payment_type": int(PaymentType.ONE_TIME),
            "status_callback_url": "https://svc-a.internal/payments/callback",
        }
        if changes.get("payment_type") == PaymentType.RECURRING:
            fields.update(recurring_interval="month", recurring_interval_count=1)
        fields.update(changes)
        payment = await self.service.create(caller, validate_create(CreatePaymentInput(**fields)))
        state = self.sandbox.state
        if payment.payment_method == PaymentMethod.PAYMENT_LINK:
            state.pay_payment_link(payment.provider_payment_id)
        else:
            state.complete_session(payment.provider_payment_id)
        async with self.uow.begin() as work:
            locked = await repo.get_payment(work.conn, payment.id, for_update=True)
            assert locked is not None
            assert await work.change_status(locked, PaymentStatus.PAID, reason="paid (test)")
        return await self.service.get(caller, payment.id)

    async def refund(
        self, payment_id: int, request_id: str = "", caller: Caller = CALLER, **changes: Any
    ) -> Refund:
        request_id = request_id or f"ref-{uuid.uuid4().hex[:12]}"
        raw = CreateRefundInput(payment_id=payment_id, request_id=request_id, **changes)
        return await self.service.refunds.create(caller, validate_refund(raw, caller.service_name))

    async def payment(self, payment_id: int) -> Payment:
        return await self.service.get(CALLER, payment_id)

    async def stored_refund(self, refund_id: int) -> Refund:
        async with self.database.connection() as conn:
            refund = await store.get_refund(conn, refund_id)
        assert refund is not None
        return refund

    def stripe_refunds(self) -> list[dict[str, Any]]:
        """The refunds the emulator made, oldest first."""
        return list(self.sandbox.state.refunds.values())
