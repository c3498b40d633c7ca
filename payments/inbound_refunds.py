"""Provider refund reports -> refunds: the refund half of a provider event.

Called by payments.inbound inside the event's unit of work, with the payment's row
lock held (every refund write happens under it: one lock order everywhere), after the
event was recorded on the payment, so a replayed event never gets here. Each refund
the event reports goes through payments.refunding.record_provider_refund: matched to
the stored refund by its Stripe id, else by the ``refund_id`` the service put in its
metadata (an event that outran the commit of the create), else by the metadata's
``request_id`` among the payment's refunds Stripe's id is not stored for, so an event
about a refund the service made never makes a second record; a refund made outside the service
(Stripe's dashboard) is recorded as ``stripe:<re_id>`` of the payment's caller and
moved like any other, so its caller hears of it too. Moves are forward only, through
the unit of work: a late ``refund.failed`` after ``succeeded`` is recorded on the
refund's history and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from payments.model import Payment
from payments.providers.base import ProviderEvent, ProviderRefund
from payments.refunding import find_own_refund, record_provider_refund, remember_money_ids
from payments.storage import refunds as refund_store
from payments.storage.database import Connection
from payments.unit_of_work import Work


async def apply_refunds(work: Work, payment: Payment, event: ProviderEvent) -> list[str]:
    """Apply every refund ``event`` reports to ``payment`` (locked); a note for each
    that could change something (see :func:`_news`)."""
    notes = []
    for report in await _news(work.conn, payment, event.refunds):
        refund = await record_provider_refund(
            work,
            payment,
            await _by_request_id(work.conn, payment, report),
            reason=f"provider event {event.event_type}",
            provider_event_id=event.event_id,
            provider_event_type=event.event_type,
        )
        notes.append(f"refund {refund.id} {refund.status.name}")
    return notes


async def _news(
    conn: Connection, payment: Payment, reports: Sequence[ProviderRefund]
) -> Sequence[ProviderRefund]:
    """The reports that may change something. A charge's list (``charge.refunded``)
    repeats every refund of the charge each time one more is made; the ones stored
    under their Stripe id at the status reported are left out after one read, so an
    event costs what it changes, not the payment's refund count (one query per listed
    refund made a payment's refunds quadratic). A single report always goes through:
    an event about one refund is recorded on its history even when it changes
    nothing."""
    if len(reports) < 2:
        return reports
    stored = {
        refund.provider_refund_id: refund.status
        for refund in await refund_store.refunds_by_provider_ids(
            conn, payment.id, [report.provider_refund_id for report in reports]
        )
    }
    news = []
    for report in reports:
        if stored.get(report.provider_refund_id) == report.status:
            # What refunding.remember_money_ids would have kept from it.
            await remember_money_ids(conn, payment, report)
        else:
            news.append(report)
    return news


async def _by_request_id(
    conn: Connection, payment: Payment, report: ProviderRefund
) -> ProviderRefund:
    """``report`` naming the payment's unbound refund whose request_id its metadata
    carries, when neither its Stripe id nor a refund_id finds a stored refund."""
    if not report.request_id or await find_own_refund(conn, payment, report) is not None:
        return report
    for refund in await refund_store.list_refunds(conn, payment.id):
        if refund.request_id == report.request_id and not refund.provider_refund_id:
            return attrs.evolve(report, refund_id=refund.id)
    return report
