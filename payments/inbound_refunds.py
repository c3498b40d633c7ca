"""Provider refund reports -> refunds: the refund half of a provider event.

Called by payments.inbound inside the event's unit of work, with the payment's row
lock held (every refund write happens under it: one lock order everywhere), after the
event was recorded on the payment, so a replayed event never gets here. Each refund
the event reports goes through payments.refunding.record_provider_refund: matched to
the stored refund by its Stripe id, else by the ``refund_id`` the service put in its
metadata (an event that outran the commit of the create), so an event about a refund
the service made never makes a second record; a refund made outside the service
(Stripe's dashboard) is recorded as ``stripe:<re_id>`` of the payment's caller and
moved like any other, so its caller hears of it too. Moves are forward only, through
the unit of work: a late ``refund.failed`` after ``succeeded`` is recorded on the
refund's history and changes nothing.
"""

from __future__ import annotations

from payments.model import Payment
from payments.providers.base import ProviderEvent
from payments.refunding import record_provider_refund
from payments.unit_of_work import Work


async def apply_refunds(work: Work, payment: Payment, event: ProviderEvent) -> list[str]:
    """Apply every refund ``event`` reports to ``payment`` (locked); a note for each."""
    notes = []
    for report in event.refunds:
        refund = await record_provider_refund(
            work,
            payment,
            report,
            reason=f"provider event {event.event_type}",
            provider_event_id=event.event_id,
            provider_event_type=event.event_type,
        )
        notes.append(f"refund {refund.id} {refund.status.name}")
    return notes
